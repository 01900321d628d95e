"""Segmentation: unmerge restores the patch grid, labels are never interpolated, mIoU by hand, sliding windows."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dtem_lightning.data import ADE20KDataModule, CamVidDataModule
from dtem_lightning.data.seg_samples import JointTransform
from dtem_lightning.labelmaps import CAMVID_CLASSES, IGNORE_INDEX
from dtem_lightning.policy import DTEMHard, NoMerge, ToMe
from dtem_lightning.tasks.segmentation import SegmentationTask, _starts

TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)


def make_task(policy=None, decoder: str = "linear", **kw) -> SegmentationTask:
    return SegmentationTask(
        num_classes=5, decoder=decoder, backbone="vit_tiny_patch16_224", img_size=32, backbone_kwargs=TINY,
        policy=policy, **kw,
    ).eval()  # fmt: skip


def make_tree(
    root, layout: dict[str, str], n: int = 3, size: tuple[int, int] = (48, 40), top: int = 12
) -> str:
    g = torch.Generator().manual_seed(0)
    for img_dir, label_dir in layout.items():
        (root / img_dir).mkdir(parents=True, exist_ok=True)
        (root / label_dir).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()
            Image.fromarray(arr).save(root / img_dir / f"im{i}.jpg")
            lab = torch.randint(0, top, (size[1], size[0]), generator=g).byte().numpy()
            Image.fromarray(lab).save(root / label_dir / f"im{i}.png")
    return str(root)


CAMVID_LAYOUT = {s: f"{s}annot" for s in ("train", "val", "test")}


def test_r0_encoder_matches_timm_exactly():
    task = make_task(ToMe(r=0))
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, dynamic_img_size=True, **TINY)
    ref.load_state_dict(task.backbone.state_dict())
    x = torch.randn(2, 3, 32, 48)  # not the creation size: position embeddings resampled
    with torch.no_grad():
        assert torch.equal(task.encode(x), ref.eval().forward_features(x)[:, 1:])
        with task.policy.reduce(0):
            feats = task.encode(x)
        source = task.policy.state.source
        assert torch.equal(task.policy.unmerge(torch.eye(source.shape[1]).expand(2, -1, -1)), source.mT)
    assert feats.shape == (2, 8 * 12, 32)


@pytest.mark.parametrize("policy", [ToMe(r=8), DTEMHard(r=8)], ids=["tome", "dtem_hard"])
def test_unmerge_restores_grid_each_patch_one_token(policy):
    task = make_task(policy)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = task.backbone.forward_features(x)
        feats = task.encode(x)
    src = task.policy.state.source  # [B, n, N0]
    assert tokens.shape[1] == 65 - 16 and src.shape == (2, 49, 65)
    assert feats.shape == (2, 64, 32)
    assert set(src.unique().tolist()) <= {0.0, 1.0} and torch.equal(src.sum(1), torch.ones(2, 65))
    owner = src.argmax(1)[:, 1:]  # token of every patch
    assert torch.equal(feats, tokens.gather(1, owner[..., None].expand(-1, -1, 32)))


def test_trace_source_forced_and_decoders_shapes():
    for decoder in ("linear", "mask_transformer"):
        task = make_task(NoMerge(), decoder=decoder, test_policies=[ToMe()])
        assert task.policy.trace_source and task.test_policies[0].trace_source
        with torch.no_grad():
            assert task(torch.randn(1, 3, 30, 37)).shape == (1, 5, 30, 37)  # padded to the patch grid
    with pytest.raises(ValueError, match="decoder"):
        make_task(decoder="fpn")


def test_decoder_drop_path_reaches_the_mask_transformer():
    """decoder_drop_path is kept (the committed CamVid checkpoint saves it): stochastic depth over the decoder."""
    task = make_task(decoder="mask_transformer", decoder_depth=3, decoder_drop_path=0.2, decoder_dropout=0.0)
    assert [getattr(b.drop_path1, "drop_prob", 0.0) for b in task.decoder.blocks] == pytest.approx(
        [0, 0.1, 0.2]
    )
    task.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    a = task(x)
    torch.manual_seed(1)
    assert not torch.equal(a, task(x))  # blocks dropped at random in training
    task.eval()
    with torch.no_grad():
        assert torch.equal(task(x), task(x))


def test_sliding_window_averages_every_window_and_one_window_is_forward():
    assert _starts(100, 32, 21) == [0, 21, 42, 63, 68] and _starts(20, 20, 21) == [0]
    task = make_task(ToMe(r=4))
    assert (task.window, task.stride) == (32, 20)  # stride: 2/3 of the window, rounded to the 4-pixel patch
    x = torch.randn(2, 3, 44, 72)
    tops, lefts = [0, 12], [0, 20, 40]  # every 20 pixels, the last window flush with the bottom/right edge
    with torch.no_grad():
        slid = task.inference(x)
        windows = {(t, c): task(x[..., t : t + 32, c : c + 32]) for t in tops for c in lefts}
        task.window = 72  # the whole image fits: one pass, the plain forward
        whole = task.inference(x)
        assert torch.equal(whole, task(x))
    total, count = torch.zeros_like(slid), torch.zeros(44, 72)
    for (t, c), logits in windows.items():
        total[..., t : t + 32, c : c + 32] += logits
        count[t : t + 32, c : c + 32] += 1
    assert count.min() == 1 and count.max() == 4
    torch.testing.assert_close(slid, total / count)
    # Pixels only the top-left window covers carry exactly that window's logits; windows see different context.
    assert torch.equal(slid[..., :12, :20], windows[0, 0][..., :12, :20])
    assert not torch.allclose(slid, whole, atol=1e-3)
    assert task.gmacs((3, 44, 72)) < make_task(ToMe(r=4)).gmacs((3, 44, 72))  # 1 window vs 6


def test_miou_by_hand_with_ignored_pixels():
    task = make_task()
    m = task.metrics()
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    preds = torch.tensor([[0, 1, 1, 1, 0, 2]])  # the ignored pixel's prediction is not counted
    m.update(preds, target)
    out = m.compute()
    iou = [1 / 3, 2 / 3, 0.0]  # class 0: tp 1, fp 1, fn 1; class 1: tp 2, fp 1; class 2: fn 1
    assert out["class_iou"][:3].tolist() == pytest.approx(iou)
    assert float(out["miou"]) == pytest.approx(sum(iou) / 3)  # classes 3, 4 absent: left out of the mean
    assert float(out["pixel_acc"]) == pytest.approx(3 / 5)


def test_joint_transform_never_interpolates_labels():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    checker = (np.indices((30, 40)).sum(0) % 2) * 10  # 0/10 checkerboard: bilinear would create 1..9
    checker[0, :5] = 11
    label = Image.fromarray(checker.astype(np.uint8))
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:11] = np.arange(11)
    for train, eval_size in [(True, None), (False, 45), (False, 17)]:
        tf = JointTransform(24, (0.5,) * 3, (0.5,) * 3, train, (0.6, 1.7), eval_size, lut)
        for _ in range(10 if train else 1):
            x, y = tf(img, label)
            assert set(y.unique().tolist()) <= {0, 10, IGNORE_INDEX}
            assert x.shape[1:] == y.shape and y.dtype == torch.int64
            if train:
                assert y.shape == (24, 24)
            else:
                assert min(y.shape) == eval_size


def test_camvid_and_ade20k_data_modules(tmp_path):
    root = make_tree(tmp_path / "camvid", CAMVID_LAYOUT, n=3, top=12)
    dm = CamVidDataModule(root, img_size=32, batch_size=2, max_per_split=2)
    dm.setup("fit")
    assert len(dm.train_dataset) == 2 and dm.class_names[0] == "sky"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and y.max() <= IGNORE_INDEX and 11 not in y.unique()
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 32, 38)  # shorter side resized to img_size
    ade_layout = {f"images/{s}": f"annotations/{s}" for s in ("training", "validation")}
    ade = ADE20KDataModule(make_tree(tmp_path / "ade", ade_layout, top=3), num_classes=2, img_size=32)
    assert ade.label_lut()[[0, 1, 2, 3]].tolist() == [IGNORE_INDEX, 0, 1, IGNORE_INDEX]
    with pytest.raises(FileNotFoundError, match="annot"):
        CamVidDataModule(str(tmp_path / "ade"), img_size=32)


def test_fit_test_predict_writes_sweep_and_pngs(tmp_path):
    root = make_tree(tmp_path / "camvid", CAMVID_LAYOUT, n=2, top=12)
    dm = CamVidDataModule(root, img_size=32, batch_size=2, backbone="vit_tiny_patch16_224")
    task = SegmentationTask(
        num_classes=11, backbone="vit_tiny_patch16_224", img_size=32, backbone_kwargs=TINY,
        policy=NoMerge(), test_policies=[ToMe()], test_r=[0, 4],
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, dm)
    trainer.test(task, dm)
    rows = task.sweep_results
    assert [(r["policy"], r["r"]) for r in rows] == [("NoMerge", 0), ("ToMe", 4)]  # r = 0 is NoMerge's row
    assert {"miou", "pixel_acc"} <= set(rows[0])
    assert rows[1]["tokens"] < rows[0]["tokens"]
    assert [list(row)[:3] for row in task.class_iou] == [["policy", "r", "miou"]] * 2
    (written,) = (tmp_path / "lightning_logs").rglob("class_iou.csv")
    with written.open() as f:
        table = list(csv.reader(f))
    assert table[0] == ["policy", "r", "miou", *CAMVID_CLASSES]
    assert [(p, int(r)) for p, r, *_ in table[1:]] == [("NoMerge", 0), ("ToMe", 4)]
    for line, row, iou in zip(table[1:], rows, task.class_iou, strict=True):
        per_class = [
            float(v) for v in line[3:]
        ]  # every class occurs in the random labels: miou is their mean
        assert per_class == pytest.approx(list(iou.values())[3:]) and all(0 <= v <= 1 for v in per_class)
        assert float(line[2]) == pytest.approx(row["miou"]) == pytest.approx(sum(per_class) / len(per_class))
    trainer.predict(task, dm)
    pngs = sorted(tmp_path.rglob("predictions/*.png"))
    assert [p.stem for p in pngs] == sorted(
        Path(img).stem for img, _ in dm.test_dataset.pairs
    )  # source names
    assert len(pngs) == 2
    assert Image.open(pngs[0]).size == (3 * 38 + 8, 32)  # image | ground truth | prediction


def test_out_of_range_label_fails_naming_file_and_value(tmp_path):
    """A label value that is neither a class nor the ignore value is an error, not silently ignored."""
    root = make_tree(tmp_path / "camvid", CAMVID_LAYOUT, n=2, top=12)  # values 0..11 (11 = ignore)
    bad = Image.fromarray(np.full((40, 48), 42, dtype=np.uint8))
    label_dir = tmp_path / "camvid" / "trainannot"
    target = sorted(label_dir.iterdir())[0]
    bad.save(target)
    dm = CamVidDataModule(root, img_size=32, batch_size=2)
    dm.setup("fit")
    with pytest.raises(
        ValueError, match=rf"{target.name}: label values \[42\] are neither a class nor the ignore"
    ):
        for i in range(len(dm.train_dataset)):
            dm.train_dataset[i]
