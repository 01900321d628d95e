"""Your own data in every task: generic segmentation folders (split folders or a seeded ratio split, label_map,
8-bit / palette / 16-bit label maps, ignore values that would swallow a class), one COCO-format caption JSON, split
overlap refusals, the class-folder fallbacks, the one-line data summary of every module, and caption examples
rebuilt from a checkpoint's data settings."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_image_tree, read_sweep
from PIL import Image

from dtem_lightning.cli import main
from dtem_lightning.data import (
    CamVidDataModule,
    CocoCaptionDataModule,
    Flickr8kDataModule,
    ImageFolderDataModule,
    SegmentationDataModule,
    SyntheticDataModule,
)
from dtem_lightning.labelmaps import IGNORE_INDEX

CONFIGS = ROOT / "configs"
SEG = dict(img_size=32, batch_size=2)  # small crops, small batches
WORDS = "a dog cat man runs sits on the grass red ball".split()


def write_pair(root: Path, split: str | None, name: str, label: np.ndarray, mode: str | None = None) -> None:
    """One RGB image and its label map (saved in ``mode``: L, P, I;16; default from the dtype)."""
    sub = [split] if split else []
    img_dir, label_dir = root.joinpath("images", *sub), root.joinpath("labels", *sub)
    img_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    h, w = label.shape
    rgb = np.random.default_rng(len(name)).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(img_dir / f"{name}.jpg")
    lab = Image.fromarray(label)
    if mode == "P":
        lab = lab.convert("P")  # palette index = value, as VOC-style masks store it
        lab.putpalette([v for c in range(256) for v in (c, 255 - c, 0)])
    lab.save(label_dir / f"{name}.png")


def binary_mask(i: int, high: int = 255, shape: tuple[int, int] = (40, 48)) -> np.ndarray:
    """0/``high`` mask: a vertical band whose position depends on ``i``."""
    m = np.zeros(shape, dtype=np.uint8 if high < 256 else np.uint16)
    m[:, (i * 5) % 30 : (i * 5) % 30 + 16] = high
    return m


def flat_binary_set(root: Path, n: int = 10) -> Path:
    for i in range(n):
        write_pair(root, None, f"im{i:02d}", binary_mask(i))
    return root


def all_labels(dataset) -> set[int]:
    return {int(v) for i in range(len(dataset)) for v in dataset[i][1].unique()}


# ----------------------------------------------------------------------------------------------- segmentation
def test_seg_split_folders_and_missing_test_line(tmp_path, capsys):
    root = tmp_path / "seg"
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            lab = np.random.default_rng(i).integers(0, 3, (40, 48)).astype(np.uint8)
            write_pair(root, split, f"{split}{i}", lab, mode="P" if i % 2 else None)  # L and palette maps
    dm = SegmentationDataModule(str(root), num_classes=3, **SEG)
    assert dm.folders == {s: (f"images/{s}", f"labels/{s}") for s in ("train", "val")}
    dm.setup("fit")
    dm.setup("test")
    out = capsys.readouterr().out
    assert f"data: SegmentationDataModule root={root} train=4 val=2 classes=3 ignore_index=None" in out
    assert f"data: no test split in {root}: test uses the val images" in out
    assert len(dm.test_dataset) == 2 and all_labels(dm.test_dataset) == {0, 1, 2}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and y.dtype == torch.int64 and set(y.unique().tolist()) <= {0, 1, 2, 255}


def test_seg_ratio_split_is_deterministic_disjoint_and_sized(tmp_path, capsys):
    root = flat_binary_set(tmp_path / "flat", n=20)
    kw = dict(label_map={0: 0, 255: 1}, split=(0.6, 0.2), **SEG)
    a, b = SegmentationDataModule(str(root), **kw), SegmentationDataModule(str(root), **kw)
    splits = {s: [p[0] for p in a.pairs(s)] for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [12, 4, 4]
    assert {s: [p[0] for p in b.pairs(s)] for s in splits} == splits  # the same on every run
    assert len(set().union(*splits.values())) == 20  # disjoint, nothing lost
    other = SegmentationDataModule(str(root), **{**kw, "seed": 1})
    assert [p[0] for p in other.pairs("train")] != splits["train"]
    a.setup(None)
    line = f"data: SegmentationDataModule root={root} train=12 val=4 test=4 classes=2"
    assert line in capsys.readouterr().out
    with pytest.raises(
        ValueError, match=r"2 image\(s\) in .* are too few for split=\(0.6, 0.2\): the val split"
    ):
        SegmentationDataModule(str(flat_binary_set(tmp_path / "few", n=2)), **kw).pairs("val")


def test_seg_label_map_on_binary_masks(tmp_path):
    root = flat_binary_set(tmp_path / "flat")
    dm = SegmentationDataModule(str(root), label_map={0: 0, 255: 1}, **SEG)  # num_classes from the map
    assert dm.num_classes == 2 and dm.hparams["num_classes"] == 2
    dm.setup("fit")
    assert all_labels(dm.val_dataset) == {0, 1}
    x, y = dm.val_dataset[0]
    raw = np.asarray(Image.open(dm.val_dataset.pairs[0][1]))
    assert y.shape == (32, 38) and y.float().mean() == pytest.approx((raw == 255).mean(), abs=0.05)


def test_seg_16_bit_labels(tmp_path):
    root = tmp_path / "u16"
    for i in range(6):
        lab = np.zeros((40, 48), dtype=np.uint16)
        lab[:20] = 1000
        lab[20:, :24] = 2000
        lab[-2:] = 65535  # unlabelled
        write_pair(root, None, f"{i}", lab)
    assert Image.open(root / "labels" / "0.png").mode == "I;16"
    dm = SegmentationDataModule(
        str(root), label_map={0: 0, 1000: 1, 2000: 2}, ignore_index=65535, eval_size=0, **SEG
    )
    dm.setup("fit")
    _, y = dm.val_dataset[0]
    assert y[0, 0] == 1 and y[-1, 0] == IGNORE_INDEX and y[25, 0] == 2 and y[25, -1] == 0


def test_seg_unmapped_value_is_an_error_naming_it_unless_ignored(tmp_path):
    root = flat_binary_set(tmp_path / "flat")
    bad = binary_mask(0)
    bad[:20, 20:] = 7  # a block no random training crop misses (the check below must not depend on the RNG)
    target = root / "labels" / "im03.png"
    Image.fromarray(bad).save(target)
    dm = SegmentationDataModule(str(root), label_map={0: 0, 255: 1}, split=(0.5, 0.5), seed=3, **SEG)
    split = "train" if any(p[1] == str(target) for p in dm.pairs("train")) else "val"
    stage = "fit" if split == "train" else "validate"
    with pytest.raises(ValueError, match=rf"label map {target}: label values \[7\] are neither a class nor"):
        dm.setup(stage)
    dm = SegmentationDataModule(
        str(root), label_map={0: 0, 255: 1}, unmapped="ignore", split=(0.5, 0.5), **SEG
    )
    dm.setup("fit")
    assert all_labels(dm.train_dataset) | all_labels(dm.val_dataset) == {0, 1, IGNORE_INDEX}
    with pytest.raises(ValueError, match=r"label_map maps 255 to 2, outside the classes 0..1"):
        SegmentationDataModule(str(root), num_classes=2, label_map={0: 0, 255: 2}, **SEG)


def test_seg_ignore_index_that_swallows_a_class_is_refused(tmp_path):
    root = flat_binary_set(tmp_path / "flat")
    dm = SegmentationDataModule(str(root), num_classes=2, ignore_index=255, **SEG)  # 0/255 masks, no map
    with pytest.raises(ValueError, match=r"ignore_index=255 covers .* % of the pixels of .* class\(es\) \[1\] never "
                       r"occur: if 255 is a class, map it with label_map \(e.g. \{0: 0, 255: 1\}\)"):  # fmt: skip
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"ignore_index=0 is also class 0 of num_classes=2"):
        SegmentationDataModule(str(root), num_classes=2, ignore_index=0, **SEG)
    with pytest.raises(ValueError, match=r"ignore_index=255 is also a key of label_map \(-> class 1\)"):
        SegmentationDataModule(str(root), ignore_index=255, label_map={0: 0, 255: 1}, **SEG)
    three = tmp_path / "three"  # classes 0 and 1 occur, 2 never, 255 covers pixels: a warning, not an error
    for i in range(4):
        lab = np.zeros((40, 48), dtype=np.uint8)
        lab[:10], lab[-10:] = 1, 255
        write_pair(three, None, f"{i}", lab)
    dm = SegmentationDataModule(str(three), num_classes=3, ignore_index=255, split=(0.5, 0.5), **SEG)
    with pytest.warns(UserWarning, match=r"class\(es\) \[2\] never occur"):
        dm.setup("fit")


def test_cli_segmentation_module_errors_in_one_line(tmp_path, capsys):
    """``--data=SegmentationDataModule`` (listed in the help) died with a raw IndexError traceback; now it is the
    generic module, and a folder without the layout, or missing settings, is one line."""
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["fit", "-c", str(CONFIGS / "camvid_small.yaml"), "-c", str(CONFIGS / "debug.yaml"),
            "--data=SegmentationDataModule", f"--trainer.logger.init_args.save_dir={tmp_path}"]  # fmt: skip
    for extra, needle in (
        (
            [f"--data.root={empty}", "--data.num_classes=2"],
            f"FileNotFoundError: image folder {empty}/images not found",
        ),
        ([f"--data.root={flat_binary_set(tmp_path / 'flat')}"], "ValueError: num_classes is required"),
    ):
        with pytest.raises(SystemExit) as e:
            main([*base, *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("dtem: error:")]
        assert len(errors) == 1 and needle in errors[0], err
        assert "Traceback" not in err and "IndexError" not in err
    # the per-split limit is max_per_split; max_per_class is for class folders only
    with pytest.raises(SystemExit) as e:
        main([*base, f"--data.root={empty}", "--data.num_classes=2", "--data.max_per_class=4"])
    assert e.value.code == 2 and "Option 'max_per_class' is not accepted" in capsys.readouterr().err


def test_cli_fit_and_test_own_segmentation_folders(tmp_path, capsys):
    """configs/seg_folder_example.yaml on generated 0/255 masks: fit, then test from the fit's checkpoint."""
    root = flat_binary_set(tmp_path / "masks", n=12)
    args = ["-c", str(CONFIGS / "seg_folder_example.yaml"), "-c", str(CONFIGS / "debug.yaml"),
            f"--data.init_args.root={root}", f"--trainer.logger.init_args.save_dir={tmp_path}"]  # fmt: skip
    main(["fit", *args])
    (last,) = tmp_path.rglob("last.ckpt")
    main(["test", *args, f"--ckpt_path={last}"])
    out = capsys.readouterr().out
    assert f"data: SegmentationDataModule root={root} train=10 val=1 classes=2" in out  # all 12 images
    assert f"data: SegmentationDataModule root={root} test=1 classes=2" in out
    rows = read_sweep(tmp_path)
    assert list(rows[0])[4:6] == ["miou", "pixel_acc"] and {r["policy"].split(" (")[0] for r in rows} >= {
        "ToMe"
    }
    saved = torch.load(last, weights_only=True)["datamodule_hyper_parameters"]
    assert saved["num_classes"] == 2  # inferred from label_map, stored as the task's linked value
    assert {int(k): v for k, v in saved["label_map"].items()} == {0: 0, 255: 1}  # the CLI stores str keys


def test_camvid_refuses_generic_layout_arguments(tmp_path):
    with pytest.raises(
        ValueError, match=r"CamVidDataModule has fixed folders: image_dir='imgs' applies only to"
    ):
        CamVidDataModule(str(tmp_path), image_dir="imgs", **SEG)


# ------------------------------------------------------------------------------------------------- captioning
def caption_root(root: Path, n: int = 20) -> Path:
    """``images/<i>.jpg`` and one COCO-format ``captions.json`` over all of them."""
    (root / "images").mkdir(parents=True)
    g = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        Image.fromarray(g.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            root / "images" / f"{i:03d}.jpg"
        )
        images.append({"id": 100 + i, "file_name": f"{i:03d}.jpg"})
        for _ in range(2):
            anns.append({"image_id": 100 + i, "caption": " ".join(g.choice(WORDS, 6)) + " ."})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def test_caption_examples_translate_the_old_max_per_class(tmp_path):
    """A checkpoint from before the rename stores the caption data's per-split limit as ``max_per_class``;
    caption_examples rebuilds the data with it as ``max_per_split``."""
    root = caption_root(tmp_path / "coco")
    hp = {"_class_path": "dtem_lightning.data.CocoCaptionDataModule", "root": str(root), "ann_file": "captions.json",
          "val_ann_file": None, "image_dir": "images", "min_freq": 1, "img_size": 32, "max_per_class": 2}  # fmt: skip
    torch.save({"datamodule_hyper_parameters": hp, "hyper_parameters": {}}, old := tmp_path / "old.ckpt")
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import caption_examples
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    dm = caption_examples.data_from_checkpoint(str(old))
    assert dm.max_per_split == 2 and [len(v) for v in dm.samples.values()] == [2, 2, 2]
    with pytest.raises(TypeError, match="max_per_class"):  # the module itself knows only max_per_split
        CocoCaptionDataModule(str(root), ann_file="captions.json", val_ann_file=None, max_per_class=2)


def coco_subset(src: Path, dst: Path, keep: range) -> None:
    data = json.loads(src.read_text())
    ids = {im["id"] for im in data["images"][keep.start : keep.stop]}
    dst.write_text(json.dumps({"images": [im for im in data["images"] if im["id"] in ids],
                               "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))  # fmt: skip


def test_caption_one_coco_json_is_split_by_name(tmp_path, capsys):
    root = caption_root(tmp_path / "coco")
    dm = CocoCaptionDataModule(str(root), ann_file="captions.json", val_ann_file=None, image_dir="images",
                               split=(0.6, 0.2), min_freq=1, img_size=32)  # fmt: skip
    names = {k: [Path(n).name for n, _ in v] for k, v in dm.samples.items()}
    assert names["train"] == [f"{i:03d}.jpg" for i in range(12)] and names["test"][-1] == "019.jpg"
    assert [len(v) for v in names.values()] == [12, 4, 4] and not dm.test_is_val
    dm.setup("test")
    assert f"data: CocoCaptionDataModule root={root} train=12 val=4 test=4 vocab=" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=r"captions_val2017.json not found .* set val_ann_file: null"):
        CocoCaptionDataModule(str(root), ann_file="captions.json", image_dir="images", img_size=32)
    with pytest.raises(
        FileNotFoundError, match=r"train2017/000.jpg of the train split not found \(image_dir="
    ):
        CocoCaptionDataModule(str(root), ann_file="captions.json", val_ann_file=None, img_size=32)


def test_caption_split_overlap_is_refused(tmp_path, capsys):
    root = caption_root(tmp_path / "coco")
    coco_subset(root / "captions.json", root / "val.json", range(15, 20))
    # the default-looking pair: a train file that also holds the val images
    with pytest.raises(
        ValueError, match=r"the train and val splits share 5 image\(s\) by file name \(e.g. 015.jpg\)"
    ):
        CocoCaptionDataModule(str(root), ann_file="captions.json", val_ann_file="val.json", image_dir="images",
                              val_image_dir="images", img_size=32)  # fmt: skip
    coco_subset(root / "captions.json", root / "train.json", range(0, 15))
    dm = CocoCaptionDataModule(str(root), ann_file="train.json", val_ann_file="val.json", image_dir="images",
                               val_image_dir="images", min_freq=1, img_size=32)  # fmt: skip
    dm.setup("fit")
    assert dm.test_is_val and "train=15 val=5 test=5(=val)" in capsys.readouterr().out
    karpathy = {"images": [{"filepath": "images", "filename": f"{i:03d}.jpg", "split": s,
                            "sentences": [{"raw": "a dog ."}]}
                           for i, s in ((0, "train"), (1, "restval"), (2, "val"), (1, "test"))]}  # fmt: skip
    (root / "karpathy.json").write_text(json.dumps(karpathy))
    with pytest.raises(
        ValueError, match=r"the train and test splits share 1 image\(s\) by file name \(e.g. 001.jpg"
    ):
        CocoCaptionDataModule(str(root), ann_file="karpathy.json", img_size=32)


def test_caption_examples_read_data_settings_from_checkpoint(tmp_path, capsys, monkeypatch):
    """A fit on one COCO JSON through the CLI stores its data settings; caption_examples rebuilds that data
    (not the Flickr8k/COCO defaults) and shows the test images, none of them a training image."""
    root = caption_root(tmp_path / "coco")
    args = ["-c", str(CONFIGS / "flickr8k_small.yaml"), "-c", str(CONFIGS / "debug.yaml"),
            "--data=CocoCaptionDataModule", f"--data.root={root}", "--data.ann_file=captions.json",
            "--data.val_ann_file=null", "--data.image_dir=images", "--data.min_freq=1", "--data.max_per_split=null",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--model.init_args.use_meteor=false",
            "--model.init_args.decoder_width=32", "--model.init_args.decoder_depth=1",
            "--model.init_args.decoder_heads=2", "--model.init_args.max_len=6"]  # fmt: skip
    main(["fit", *args])
    (last,) = tmp_path.rglob("last.ckpt")
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import caption_examples
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    dm = caption_examples.data_from_checkpoint(str(last), batch_size=4)
    assert type(dm) is CocoCaptionDataModule and dm.ann_file == "captions.json" and dm.val_ann_file is None
    test = [Path(n).name for n, _ in dm.samples["test"]]
    assert test == [f"{i:03d}.jpg" for i in range(18, 20)]  # 90 % of 20 by name before it
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert caption_examples.data_from_checkpoint(str(last), root=str(moved)).root == str(moved)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["caption_examples.py", str(last), "--n", "2"])
    caption_examples.main()
    out = capsys.readouterr().out
    assert "examples from the test split (2 images) of CocoCaptionDataModule" in out
    refs = {c for _, caps in dm.samples["test"] for c in caps}
    shown = [line.split("references: ")[1] for line in out.splitlines() if "references: " in line]
    assert len(shown) == 2 and all(set(s.split(" | ")) <= refs for s in shown)


# ------------------------------------------------------------------------------------------ classification etc.
def test_class_folders_missing_split_is_said_in_one_line(tmp_path, capsys):
    root = make_image_tree(tmp_path / "cls", classes=2, per_class=3)  # train/ and test/, no val/
    dm = ImageFolderDataModule(str(root), img_size=32, batch_size=2)
    dm.setup("fit")
    out = capsys.readouterr().out
    assert f"data: ImageFolderDataModule root={root} train=6 val=6 classes=2" in out
    assert f"data: no val/ folder in {root}: val uses test/" in out
    shutil.move(root / "test", root / "val")
    ImageFolderDataModule(str(root), img_size=32, batch_size=2).setup("test")
    out = capsys.readouterr().out
    assert f"data: ImageFolderDataModule root={root} test=6 classes=2" in out
    assert f"data: no test/ folder in {root}: test uses val/" in out
    doc = ImageFolderDataModule.__doc__
    assert "``train/``" in doc and "``test/``" in doc and "max_per_class" in doc and "limit_*_batches" in doc


def test_every_module_prints_its_setup_line_once(tmp_path, capsys):
    SyntheticDataModule(num_classes=3, num_samples=8, seed=5).setup("fit")
    dm = SyntheticDataModule(num_classes=3, num_samples=8, seed=5)
    dm.setup("test")  # the same line again: printed once per process
    out = capsys.readouterr().out
    assert (
        out.count("data: SyntheticDataModule root=none (generated) train=8 val=8 test=8 classes=3 seed=5")
        == 1
    )
    flickr = tmp_path / "flickr"
    caption_root(flickr)
    rows = [f"{i:03d}.jpg,a dog runs ." for i in range(20)]
    (flickr / "captions.txt").write_text("image,caption\n" + "\n".join(rows) + "\n")
    Flickr8kDataModule(str(flickr), min_freq=1, img_size=32).setup("fit")
    assert f"data: Flickr8kDataModule root={flickr} train=16 val=2 test=2 vocab=" in capsys.readouterr().out
    camvid = tmp_path / "camvid"
    for split in ("train", "val", "test"):
        for i in range(2):
            lab = np.full((40, 48), i * 3, dtype=np.uint8)
            write_pair(camvid, None, f"{split}{i}", lab)
        shutil.move(camvid / "images", camvid / split)
        shutil.move(camvid / "labels", camvid / f"{split}annot")
    CamVidDataModule(str(camvid), **SEG).setup(None)
    line = f"data: CamVidDataModule root={camvid} train=2 val=2 test=2 classes=11 ignore_index=11"
    assert line in capsys.readouterr().out
