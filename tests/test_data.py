"""Data modules: the CIFAR-10 JPEG subset, hand-made image trees (modes, corrupt files, layout errors), synthetic."""

from __future__ import annotations

import pickle
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID, CIFAR, needs_shared
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import RandAugment
from torchvision import transforms as T

from dtem_lightning.data import BaseDataModule, ImageFolderDataModule, SyntheticDataModule
from dtem_lightning.data.base import resolve_backbone_config
from dtem_lightning.data.sampling import ResumableSampler, SeededDataset
from dtem_lightning.data.store import to_rgb

CIFAR_ZIP = CIFAR
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
needs_cifar = needs_shared(CIFAR)


def rgb(h: int = 20, w: int = 24, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_tree(root: Path, layout: dict[str, dict[str, int]], ext: str = ".png") -> Path:
    """Write ``layout[split][class]`` random RGB images under ``root/split/class/``."""
    for split, classes in layout.items():
        for cls, n in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rgb(seed=i).save(folder / f"{i:03d}{ext}")
    return root


def first_batch(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


# --- CIFAR-10 JPEG subset (a zip read in place) ------------------------------------------------------------


@needs_cifar
def test_cifar_zip_batches_and_test_serves_val():
    dm = ImageFolderDataModule(
        str(CIFAR_ZIP), max_per_class=3, img_size=32, batch_size=8, train_transform="simple", num_workers=0
    )
    assert dm.num_classes == 10 and dm.classes == CIFAR_CLASSES  # known before setup, for the CLI link
    assert (dm.val_split, dm.test_split) == ("test", "test")
    dm.setup("fit")
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < 10
    assert len(dm.train_dataset) == 30 and len(dm.train_dataloader()) == 30 // 8  # drop_last
    assert len(dm.val_dataset) == 30 and len(dm.val_dataloader()) == 4  # ceil(30 / 8): nothing dropped
    dm.setup("test")
    assert dm.test_dataset is dm.val_dataset
    xv, _ = first_batch(dm.test_dataloader())
    assert xv.shape == (8, 3, 32, 32)


@needs_cifar
def test_cifar_zip_with_workers_and_deit_transform():
    # default backbone size (224): DeiT augmentation on real JPEGs, two worker processes sharing one archive
    dm = ImageFolderDataModule(str(CIFAR_ZIP), max_per_class=1, batch_size=5, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    batches = list(loader)
    assert len(batches) == 2 and all(x.shape == (5, 3, 224, 224) for x, _ in batches)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(10))


@needs_cifar
def test_cifar_zip_equals_extracted_folder(tmp_path):
    dm_zip = ImageFolderDataModule(str(CIFAR_ZIP), max_per_class=2, img_size=32)
    dm_zip.setup("test")
    with zipfile.ZipFile(CIFAR_ZIP) as zf:
        for name, _ in dm_zip.test_dataset.samples:
            zf.extract(name, tmp_path)
        zf.extract("train/cat/0000.jpg", tmp_path)
    for cls in CIFAR_CLASSES:  # train needs every class folder; one image in each is enough here
        (tmp_path / "train" / cls).mkdir(exist_ok=True)
    dm_dir = ImageFolderDataModule(str(tmp_path), max_per_class=2, img_size=32)
    dm_dir.setup("test")
    assert dm_dir.num_classes == 10 and dm_dir.val_split == "test"
    x_zip, y_zip = first_batch(dm_zip.test_dataloader())
    x_dir, y_dir = first_batch(dm_dir.test_dataloader())
    assert torch.equal(x_zip, x_dir) and torch.equal(y_zip, y_dir)


# --- image modes ---------------------------------------------------------------------------------------


def test_image_modes_become_rgb(tmp_path):
    make_tree(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    base = np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    img = Image.fromarray(base)
    odd = tmp_path / "train" / "a"
    img.convert("L").save(odd / "gray.png")
    img.convert("LA").save(odd / "gray_alpha.png")
    img.convert("RGBA").save(odd / "rgba.png")
    img.convert("CMYK").save(odd / "cmyk.jpg")
    img.convert("P").save(odd / "palette.png")
    pal = img.convert("P")
    pal.save(odd / "palette_transparent.png", transparency=0)
    Image.fromarray(base[..., 0].astype(np.uint16) * 257).save(odd / "gray16.png")
    Image.fromarray(base[..., 0].astype(np.int32) * 257).save(odd / "int32.tif")
    Image.fromarray(base[..., 0].astype(np.float32) / 255).save(odd / "float.tif")
    Image.fromarray(base).save(odd / "upper.JPG")  # extensions are matched case-insensitively
    (odd / "notes.txt").write_text("not an image")  # ignored
    dm = ImageFolderDataModule(str(tmp_path), img_size=16, batch_size=4, train_transform="simple")
    dm.setup("fit")
    assert len(dm.train_dataset) == 14
    for i in range(len(dm.train_dataset)):
        x, _ = dm.train_dataset[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    for name in ("gray16.png", "int32.tif", "float.tif"):  # rescaled, not clipped to white
        got = np.asarray(dm.store.load(str(odd / name)))
        assert got.shape == (20, 24, 3) and np.abs(got[..., 0].astype(int) - base[..., 0]).max() <= 1, name


def test_to_rgb_16_bit_scaling():
    img = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert img.mode == "I;16"
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 100, 255]


# --- layout errors -------------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataModule(str(tmp_path / "nowhere"))


def test_missing_train_names_path_and_zip_hint(tmp_path):
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"train not found"):
        ImageFolderDataModule(str(tmp_path))
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as zf:
        zf.writestr("train/a/0.png", b"")
    with pytest.raises(FileNotFoundError, match=r"root: .*data\.zip"):
        ImageFolderDataModule(str(tmp_path))


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataModule(str(tmp_path))


def test_no_eval_split(tmp_path):
    make_tree(tmp_path, {"train": {"a": 1}})
    with pytest.raises(FileNotFoundError, match="neither .*val nor .*test"):
        ImageFolderDataModule(str(tmp_path))


def test_mismatched_classes_named(tmp_path):
    make_tree(tmp_path, {"train": {"a": 1, "b": 1, "cat": 1}, "val": {"a": 1, "b": 1, "dog": 1}})
    with pytest.raises(ValueError, match=r"only in train: \['cat'\]; only in val: \['dog'\]"):
        ImageFolderDataModule(str(tmp_path))


def test_empty_split_and_empty_class(tmp_path):
    make_tree(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 0, "b": 0}})
    (tmp_path / "val" / "a" / "readme.txt").write_text("x")
    dm = ImageFolderDataModule(str(tmp_path))
    with pytest.raises(ValueError, match=r"val has no images"):
        dm.setup("validate")
    make_tree(tmp_path, {"val": {"a": 1}})
    dm = ImageFolderDataModule(str(tmp_path))
    with pytest.raises(ValueError, match=r"without images: .*val/b"):
        dm.setup("validate")


def test_bad_arguments(tmp_path):
    make_tree(tmp_path, {"train": {"a": 1}, "val": {"a": 1}})
    with pytest.raises(ValueError, match="'fancy'"):
        ImageFolderDataModule(str(tmp_path), train_transform="fancy")
    with pytest.raises(ValueError, match="max_per_class"):
        ImageFolderDataModule(str(tmp_path), max_per_class=0)
    with pytest.raises(ValueError, match="not_a_model"):
        ImageFolderDataModule(str(tmp_path), backbone="not_a_model")
    not_zip = tmp_path / "x.zip"
    not_zip.write_text("plain text")
    with pytest.raises(ValueError, match="not a zip"):
        ImageFolderDataModule(str(not_zip))


# --- corrupt files -------------------------------------------------------------------------------------


def corrupt_tree(root: Path) -> tuple[Path, Path]:
    make_tree(root, {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}}, ext=".jpg")
    garbage = root / "train" / "a" / "001.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    truncated = root / "train" / "b" / "002.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    return garbage, truncated


def test_corrupt_image_error_names_file(tmp_path):
    garbage, _ = corrupt_tree(tmp_path)
    dm = ImageFolderDataModule(str(tmp_path), img_size=16, batch_size=6, train_transform="simple")
    dm.setup("fit")
    with pytest.raises(ValueError, match=rf"cannot read image {garbage}.*skip_corrupt"):
        dm.train_dataset[1]


def test_skip_corrupt_replaces_with_warning(tmp_path):
    garbage, truncated = corrupt_tree(tmp_path)
    dm = ImageFolderDataModule(
        str(tmp_path), img_size=16, batch_size=3, skip_corrupt=True, train_transform="simple"
    )
    dm.setup("fit")
    with pytest.warns(UserWarning, match="skipping unreadable image") as record:
        batches = list(dm.train_dataloader())
    messages = " ".join(str(w.message) for w in record)
    assert str(garbage) in messages and str(truncated) in messages
    assert len(batches) == 2 and all(x.shape == (3, 3, 16, 16) for x, _ in batches)
    # the replacement is the next readable sample, with its own label
    assert dm.train_dataset[1][1] == dm.train_dataset.targets[2]
    assert dm.train_dataset[5][1] == dm.train_dataset.targets[0]  # 5 is b/002 (truncated): wraps to 0


# --- sizes, subsampling, loaders -----------------------------------------------------------------------


def test_img_size_crop_pct_and_max_per_class(tmp_path):
    make_tree(tmp_path, {"train": {"a": 7, "b": 7}, "val": {"a": 2, "b": 2}})
    dm = ImageFolderDataModule(str(tmp_path), img_size=48, max_per_class=3, batch_size=2)
    assert dm.input_size == (3, 48, 48) and dm.data_config["crop_pct"] == 1.0  # tiny: evaluated whole
    dm.setup("fit")
    names = [Path(p).name for p, _ in dm.train_dataset.samples]
    assert names == ["000.png", "002.png", "004.png"] * 2  # evenly spaced, deterministic
    assert first_batch(dm.train_dataloader())[0].shape == (2, 3, 48, 48)
    assert first_batch(dm.val_dataloader())[0].shape == (2, 3, 48, 48)
    big = ImageFolderDataModule(str(tmp_path), backbone="deit_small_patch16_224", crop_pct=0.875)
    assert big.input_size == (3, 224, 224)
    resize = next(t for t in big.transform("eval").transforms if isinstance(t, T.Resize))
    assert resize.size == 256  # DeiT's eval: Resize 256 -> CenterCrop 224


def test_loader_settings(tmp_path):
    make_tree(tmp_path, {"train": {"a": 3, "b": 2}, "val": {"a": 1, "b": 1}})
    dm = ImageFolderDataModule(str(tmp_path), img_size=16, batch_size=8, train_transform="simple")
    dm.setup("fit")
    small = dm.train_dataloader()  # 5 images < one batch: kept whole rather than dropped
    assert not small.drop_last and len(small) == 1 and not small.persistent_workers
    assert small.pin_memory == torch.cuda.is_available()
    dm.batch_size = 2
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.drop_last and len(train) == 2
    assert not val.drop_last and isinstance(val.sampler, torch.utils.data.SequentialSampler)
    assert isinstance(train.sampler, ResumableSampler)  # seeded shuffle that can resume mid-epoch
    dm.setup("test")
    assert dm.test_dataset is dm.val_dataset and dm.test_split == "val"
    assert pickle.loads(pickle.dumps(dm.train_dataset))[0][0].shape == (3, 16, 16)


def test_deit_transform_survives_posterize_magnitude_10():
    class Plain(BaseDataModule):
        pass

    for size in (None, 32):
        tf = Plain(img_size=size).transform("deit")
        ra = next(t for t in tf.transforms if isinstance(t, RandAugment))
        for op in ra.ops:  # the extremes of every op, the top one drawing 0 posterize bits
            op.prob, op.magnitude_std = 1.0, 0.0
            for m in (0, 10):
                op.magnitude = m
                assert op(rgb()).size == (24, 20), op.name
        x = tf(rgb())
        assert x.shape == (3, size or 224, size or 224)


# --- backbone config -----------------------------------------------------------------------------------


def test_backbone_config_is_fast_and_right(monkeypatch):
    t0 = time.perf_counter()
    for name in (
        "deit_small_patch16_224",
        "deit_base_patch16_224",
        "vit_large_patch16_224",
        "vit_small_patch16_384",
    ):
        cfg = resolve_backbone_config(name)
    assert time.perf_counter() - t0 < 1.0  # no model is built
    cfg = resolve_backbone_config("deit_small_patch16_224")
    assert cfg["mean"] == IMAGENET_DEFAULT_MEAN and cfg["std"] == IMAGENET_DEFAULT_STD
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert resolve_backbone_config("vit_small_patch16_384")["input_size"] == (3, 384, 384)
    assert resolve_backbone_config("vit_tiny_patch16_224")["mean"] == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="no_such_tag"):
        resolve_backbone_config("deit_small_patch16_224.no_such_tag")
    # a model registered without a pretrained config: built on the meta device only
    import timm.models

    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: None)
    assert resolve_backbone_config("deit_small_patch16_224")["mean"] == IMAGENET_DEFAULT_MEAN


# --- synthetic -----------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_learnable():
    dm = SyntheticDataModule(num_classes=4, num_samples=64, img_size=8, batch_size=16)
    dm.setup("fit")
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dm.num_classes == 4 and dm.input_size == (3, 8, 8)
    again = SyntheticDataModule(num_classes=4, num_samples=64, img_size=8)
    again.setup()
    assert torch.equal(again.train_dataset.tensors[0], dm.train_dataset.tensors[0])
    assert not torch.equal(dm.val_dataset.tensors[0], dm.train_dataset.tensors[0])
    # a few SGD steps of a linear probe on pooled pixels move val accuracy well above chance
    torch.manual_seed(0)
    probe = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))
    opt = torch.optim.SGD(probe.parameters(), lr=0.5)
    xv, yv = dm.val_dataset.tensors
    before = (probe(xv).argmax(1) == yv).float().mean()
    for _ in range(5):
        for xb, yb in dm.train_dataloader():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe(xb), yb).backward()
            opt.step()
    after = (probe(xv).argmax(1) == yv).float().mean()
    assert after > max(before, 0.6)


def test_resumable_sampler_order_and_skip():
    data = list(range(10))
    s = ResumableSampler(data, seed=3)
    first = list(s)
    assert sorted(i for i, _ in first) == data and first == list(ResumableSampler(data, seed=3))
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in first]  # a new order every epoch
    s.set_epoch(0)
    s.skip_fn = lambda: 4
    assert list(s) == first[4:]  # a resumed epoch continues where it stopped
    ranks = [ResumableSampler(data, seed=3) for _ in range(2)]
    for r, smp in enumerate(ranks):
        smp.num_replicas, smp.rank = 2, r
        smp.num_samples, smp.total_size = 5, 10
    shards = [list(smp) for smp in ranks]
    assert sorted(shards[0] + shards[1]) == sorted(first)


def test_seeded_dataset_is_independent_of_global_rng():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(2) + i

    ds = SeededDataset(Noise())
    a = ds[(1, 123)]
    torch.rand(5)  # move the global RNG
    state = torch.get_rng_state()
    assert torch.equal(ds[(1, 123)], a) and not torch.equal(ds[(1, 124)], a)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was


def test_thin_keeps_an_evenly_spaced_subset_in_order():
    """The rule of max_per_split (every data module) and max_per_class (class folders)."""
    from dtem_lightning.data.store import thin

    assert thin(list(range(10)), 4) == [0, 2, 5, 7]
    assert thin(list(range(10)), None) == list(range(10)) == thin(list(range(10)), 10)
    assert thin(["a", "b", "c"], 1) == ["a"]


def _store_tree(root: Path) -> Path:
    for rel in ("train/a/1.png", "train/a/sub/2.png", "train/a/.hidden.png", "train/a/notes.txt", "train/b/3.jpg",
                "train/.cache/4.png", "test/a/5.png", "README.txt"):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    return root


def test_store_reads_a_folder_and_its_zip_alike(tmp_path):
    """One Store for folders and zips (here wrapped in one top-level folder): same listing, same bytes, and a
    store pickles for loader workers without its open zip handle."""
    from dtem_lightning.data.store import Store

    tree = _store_tree(tmp_path / "data")
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as zf:
        for f in sorted(tree.rglob("*")):
            if f.is_file():
                zf.write(f, f"wrapped/{f.relative_to(tree).as_posix()}")
    folder, zipped = (
        Store(tree, anchors=("train", "test")),
        Store(tmp_path / "data.zip", anchors=("train", "test")),
    )
    assert (folder.prefix, zipped.prefix) == ("", "wrapped/")
    for store in (folder, zipped):
        assert store.subdirs("train") == ["a", "b"] and store.isdir("train", "a") and not store.isdir("val")
        assert [store.rel(n) for n in store.files("train", "a", recursive=True)] == [
            "train/a/1.png",
            "train/a/sub/2.png",
        ]
        assert [store.rel(n) for n in store.files("train", "a")] == ["train/a/1.png"]
        assert [store.rel(n) for n in store.files(extensions=None)] == ["README.txt"]
        assert store.files("val") == [] and store.subdirs("val") == []
        for rel in ("train/b/3.jpg", "test/a/5.png"):
            assert (
                store.exists(store.name(*rel.split("/")))
                and store.read_bytes(store.name(rel)) == rel.encode()
            )
        assert not store.exists(store.name("train/b/0.jpg"))
    assert zipped.display(zipped.name("train/b/3.jpg")) == str(
        tmp_path / "data.zip" / "wrapped/train/b/3.jpg"
    )
    assert (
        folder.display(folder.name("train/b/3.jpg"))
        == str(tree / "train/b/3.jpg")
        == folder.where("train/b/3.jpg")
    )
    again = pickle.loads(pickle.dumps(zipped))  # after a read: the zip handle is open in this process
    assert again._zip is None and again.read_bytes(again.name("test/a/5.png")) == b"test/a/5.png"
    assert again.files("train", "a", recursive=True) == zipped.files("train", "a", recursive=True)


def test_max_per_split_counts_per_split_and_keeps_classes_balanced(tmp_path):
    """max_per_split: at most N samples per split, evenly spaced in (class, name) order for image folders, so
    classes stay balanced; applied after max_per_class; every data module has it."""
    from conftest import make_image_tree

    root = make_image_tree(tmp_path / "imgs", classes=3, per_class=8)
    dm = ImageFolderDataModule(str(root), max_per_split=6, img_size=32, train_transform="simple")
    dm.setup(None)
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        assert len(ds) == 6 and np.bincount(ds.targets).tolist() == [2, 2, 2]
    assert [Path(n).name for n, _ in dm.test_dataset.samples[:2]] == ["0.png", "4.png"]  # evenly spaced
    both = ImageFolderDataModule(str(root), max_per_class=3, max_per_split=6, img_size=32)
    both.setup("test")
    names = [Path(n).name for n, _ in both.test_dataset.samples]
    assert names == ["0.png", "2.png"] * 3 and both.test_dataset.targets == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]  # of 0, 2, 5 each
    synthetic = SyntheticDataModule(num_classes=2, num_samples=8, max_per_split=3)
    synthetic.setup()
    assert [len(d) for d in (synthetic.train_dataset, synthetic.val_dataset, synthetic.test_dataset)] == [
        3,
        3,
        3,
    ]
    with pytest.raises(ValueError, match="max_per_split must be >= 1 or None, got 0"):
        SyntheticDataModule(max_per_split=0)


@needs_cifar
def test_debug_max_per_split_40_keeps_the_images_of_max_per_class_4():
    """configs/debug.yaml's max_per_split 40 on the 10 CIFAR classes: the images max_per_class 4 kept."""
    per_class = ImageFolderDataModule(str(CIFAR_ZIP), max_per_class=4, img_size=32)
    per_split = ImageFolderDataModule(str(CIFAR_ZIP), max_per_split=40, img_size=32)
    for dm in (per_class, per_split):
        dm.setup(None)
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        assert getattr(per_split, split).samples == getattr(per_class, split).samples


@pytest.mark.skipif(not CAMVID.exists(), reason="CamVid subset not in ../shared/data")
def test_test_on_val_evaluates_the_validation_images(capsys):
    """`test_on: val`: choose settings on validation data; the test split is not read."""
    import torch

    from dtem_lightning.data import CamVidDataModule

    on_val = CamVidDataModule(root=str(CAMVID), max_per_split=3, test_on="val")
    on_val.setup("test")
    assert "test_on=val: the sweep evaluates the 3 validation samples" in capsys.readouterr().out
    plain = CamVidDataModule(root=str(CAMVID), max_per_split=3)
    plain.setup("validate")
    plain.setup("test")
    assert torch.equal(on_val.test_dataset[0][1], plain.val_dataset[0][1])
    assert not torch.equal(on_val.test_dataset[0][1], plain.test_dataset[0][1])
    with pytest.raises(ValueError, match="test_on must be 'test' or 'val', got 'train'"):
        CamVidDataModule(root=str(CAMVID), test_on="train")


# --- train_fraction (issue 20: data-fraction sweeps) ---------------------------------------------------------


def test_train_fraction_thins_train_only_and_is_checked(capsys):
    full = SyntheticDataModule(num_samples=40, batch_size=4)
    part = SyntheticDataModule(num_samples=40, batch_size=4, train_fraction=0.1)
    full.setup("fit"), part.setup("fit")
    part.setup("test"), full.setup("test")
    assert len(part.train_dataset) == 4 and len(full.train_dataset) == 40
    assert len(part.val_dataset) == len(part.test_dataset) == 40  # evaluation splits stay whole
    kept = torch.stack([part.train_dataset[i][0] for i in range(4)])
    evenly_spaced = torch.stack([full.train_dataset[i][0] for i in (0, 10, 20, 30)])
    assert torch.equal(kept, evenly_spaced)
    assert torch.equal(part.test_dataset.tensors[0], full.test_dataset.tensors[0])
    assert "train_fraction=0.1: training on 4 of 40 samples" in capsys.readouterr().out
    tiny = SyntheticDataModule(num_samples=40, train_fraction=0.001)
    tiny.setup("fit")
    assert len(tiny.train_dataset) == 1  # never an empty training split
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"train_fraction must be in \\(0, 1\\], got {bad}"):
            SyntheticDataModule(train_fraction=bad)


def test_train_fraction_batches_through_the_seeded_loader():
    dm = SyntheticDataModule(num_samples=40, batch_size=4, train_fraction=0.5)
    dm.setup("fit")
    # the Subset's __getitems__ must not bypass the per-sample seeds
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (4, 3, 32, 32) and len(dm.train_dataloader()) == 5
