"""experiments/: CIFAR-10 preparation, backbone export, sweep collection and the headroom check."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dtem_lightning.tasks.classification import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import collect  # noqa: E402
import export_backbone  # noqa: E402
import headroom  # noqa: E402
import prepare_cifar10 as prep  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jpeg(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).byte().numpy()).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def fake_zip(tmp_path) -> tuple[Path, str]:
    """A CIFAR-10-shaped zip (3 train + 1 test image per class) and its sha256."""
    path = tmp_path / "cifar.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for c, cls in enumerate(prep.CLASSES):
            for i in range(3):
                zf.writestr(f"train/{cls}/{i:04d}.jpg", _jpeg(10 * c + i))
            zf.writestr(f"test/{cls}/0000.jpg", _jpeg(1000 + c))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_is_idempotent(fake_zip, tmp_path, capsys):
    archive, sha = fake_zip
    out = tmp_path / "cifar10"
    prep.prepare(out, archive, val_per_class=1, expected_sha256=sha, allow_download=False)
    assert len(list((out / "train" / "cat").glob("*.jpg"))) == 2
    assert [p.name for p in (out / "val" / "cat").glob("*.jpg")] == ["0002.jpg"]
    assert len(list((out / "test").rglob("*.jpg"))) == 10
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    capsys.readouterr()
    prep.prepare(out, archive, val_per_class=1, expected_sha256=sha, allow_download=False)
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")} == before
    (out / "test" / "cat" / "0000.jpg").write_bytes(b"tampered")  # a changed tree is rewritten
    prep.prepare(out, archive, val_per_class=1, expected_sha256=sha, allow_download=False)
    assert (out / "test" / "cat" / "0000.jpg").read_bytes() == _jpeg(1003)


def test_prepare_refuses_corrupted_archive(fake_zip, tmp_path):
    archive, sha = fake_zip
    data = bytearray(archive.read_bytes())
    data[200] ^= 0xFF  # inside the first member's bytes
    archive.write_bytes(bytes(data))
    with pytest.raises(prep.PrepareError, match="corrupted or not the expected file"):
        prep.prepare(tmp_path / "a", archive, expected_sha256=sha, allow_download=False)
    with pytest.raises(prep.PrepareError, match="CRC"):
        prep.prepare(tmp_path / "b", archive, expected_sha256=None, allow_download=False)
    assert (
        prep.main(["--zip", str(archive), "--sha256", sha, "--out", str(tmp_path / "c"), "--no-download"])
        == 1
    )


def test_prepare_without_archive_or_download(tmp_path):
    with pytest.raises(prep.PrepareError, match="downloading is disabled"):
        prep.prepare(tmp_path / "x", tmp_path / "missing.zip", allow_download=False)


def _tiny_timm(**kw: object) -> torch.nn.Module:
    cfg = dict(
        img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=2, num_classes=10, pretrained=False
    )
    return timm.create_model("vit_tiny_patch16_224", **{**cfg, **kw})


def test_export_loads_through_timm(tmp_path):
    model = _tiny_timm()
    ckpt = tmp_path / "last.ckpt"
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    state["policy.embed.0.weight"] = torch.zeros(3, 3)
    torch.save({"state_dict": state}, ckpt)
    out = tmp_path / "w.safetensors"
    export_backbone.export(ckpt, out)
    kwargs = dict(patch_size=4, embed_dim=48, depth=2, num_heads=2)
    task = ClassificationTask(
        backbone="vit_tiny_patch16_224",
        checkpoint_path=str(out),
        backbone_kwargs=kwargs,
        num_classes=10,
        img_size=32,
    )
    for (k, a), b in zip(model.state_dict().items(), task.backbone.state_dict().values()):
        torch.testing.assert_close(b, a.half().float(), msg=k)


def test_export_task_is_slim_and_loads(tmp_path):
    task = ClassificationTask(backbone="vit_tiny_patch16_224", img_size=32, num_classes=10,
                              backbone_kwargs=dict(patch_size=4, embed_dim=48, depth=2, num_heads=2))  # fmt: skip
    full = tmp_path / "full.ckpt"
    state = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "epoch": 3,
             "pytorch-lightning_version": "2.6.6",
             "optimizer_states": [{"state": {0: torch.zeros(1000)}}], "loops": {"fit_loop": {}}}  # fmt: skip
    torch.save(state, full)
    out = tmp_path / "slim.ckpt"
    export_backbone.export_task(full, out)
    slim = torch.load(out, weights_only=True)
    assert set(slim) == {"state_dict", "hyper_parameters", "epoch", "pytorch-lightning_version"}
    loaded = ClassificationTask.load_from_checkpoint(out, weights_only=True)
    for k, v in task.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.save({"state_dict": {}}, full)
    with pytest.raises(KeyError, match="no hyper_parameters"):
        export_backbone.export_task(full, out)


def _write_sweep(path: Path, rows: list[tuple[str, int, float, int, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "r", "gflops", "tokens", "acc1", "acc5"])
        for p, r, g, t, a in rows:
            w.writerow([p, r, g, t, a, min(1.0, a + 0.2)])


def test_collect_one_row_per_policy_and_r(tmp_path):
    a = [("DTEMSoft", 0, 4.6, 197, 0.79), ("DTEMSoft", 16, 2.3, 11, 0.78), ("NoMerge", 0, 4.6, 197, 0.79),
         ("ToMe", 0, 4.6, 197, 0.79), ("ToMe", 16, 2.3, 11, 0.77)]  # fmt: skip
    _write_sweep(tmp_path / "runs" / "x" / "version_0" / "sweep.csv", a)
    _write_sweep(tmp_path / "runs" / "y" / "version_0" / "sweep.csv", a[:2])
    out = tmp_path / "out"
    rows = collect.collect([str(tmp_path / "runs")], out, setting="deit_s_imagenet")
    measured = [r for r in rows if r["run"] != "published"]
    keys = [(r["run"], r["policy"], r["r"]) for r in measured]
    assert len(keys) == len(set(keys)) == 7
    published = [r for r in rows if r["run"] == "published"]
    assert {"DTEM", "MCTF", "DiffRate", "ToMe (trained)"} <= {r["policy"] for r in published}
    with (out / "sweep.csv").open() as f:
        header = next(csv.reader(f))
    assert (
        header[:5] == ["run", "policy", "r", "gflops", "tokens"] and "acc1" in header and header[-1] == "ref"
    )
    assert "| published | DTEM |" in (out / "sweep.md").read_text()
    assert (out / "tradeoff.png").read_bytes()[:8] == PNG_MAGIC
    only = collect.collect([f"demo={tmp_path / 'runs' / 'x' / 'version_0' / 'sweep.csv'}"], tmp_path / "o2")
    assert {r["run"] for r in only} == {"demo"} and len(only) == 5


def test_collect_rejects_bad_input(tmp_path):
    assert collect.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 1
    bad = tmp_path / "sweep.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        collect.collect([str(bad)], tmp_path / "o")


def test_headroom_on_tiny_model(tmp_path):
    vit = _tiny_timm(depth=3).eval()
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)
    ]
    rows = headroom.evaluate(headroom.MergingEncoder(vit), batches, rs=[4, 8], seeds=2)
    names = [r["metric"] for r in rows]
    assert (
        names.count("NoMerge") == 1
        and names.count("ToMe (keys)") == 2
        and names.count("raw block input") == 2
    )
    assert len(rows) == 1 + 4 * 2 and all(r["n"] == 16 for r in rows)
    summary = headroom.summarize(rows)
    assert [s["r"] for s in summary] == [4, 8]
    for s in summary:
        accs = [r["acc1"] for r in rows if r["r"] == s["r"]]
        assert (s["best_acc1"], s["worst_acc1"]) == (max(accs), min(accs))
        assert s["spread"] == pytest.approx(max(accs) - min(accs))
    text = headroom.markdown(rows, summary)
    assert "| random embedding (seed 1) |" in text and "verdict" in text
    raw = headroom.MergingEncoder(_tiny_timm(depth=3).eval(), headroom.RawInput(r=8))
    with torch.no_grad():
        raw(batches[0][0])
    assert raw.last_token_counts == [57, 49, 41]  # 65 tokens, 8 merged per block

    # A DTEM training checkpoint adds its embedding twice (ToMe order, size order); seed 0's weights reproduce
    # the "random embedding (seed 0)" row with ToMe's order.
    torch.manual_seed(0)
    emb = headroom.DTEMHard()
    emb.bind(vit)
    ckpt = tmp_path / "dtem.ckpt"
    torch.save({"state_dict": {f"policy.{k}": v for k, v in emb.state_dict().items()}}, ckpt)
    trained = headroom.trained_embedding(str(ckpt))
    enc = headroom.MergingEncoder(_tiny_timm(depth=3).eval())
    rows = headroom.evaluate(enc, batches, rs=[8, headroom.parse_r("16,8,0")], seeds=2, trained=trained)
    assert headroom.parse_r("12") == 12 and {r["r"] for r in rows} == {0, 8, "16,8,0"}
    assert "r=16,8,0" in headroom.markdown(rows, headroom.summarize(rows))
    acc = {r["metric"]: r["acc1"] for r in rows if r["r"] == 8}
    assert acc["trained embedding (order tome)"] == acc["random embedding (seed 0)"]
    assert "trained embedding (order size)" in acc
    torch.save({"state_dict": {"backbone.x": torch.zeros(1)}}, ckpt)
    with pytest.raises(ValueError, match="no DTEM embedding"):
        headroom.trained_embedding(str(ckpt))


def test_headroom_summary_by_hand():
    """Best, worst, spread and standard error per r, and the verdict at 2 standard errors (+ 1 point)."""
    accs = {4: (50.0, 50.5, 50.6), 8: (48.0, 49.0, 49.6), 16: (44.0, 40.0, 43.0)}  # metrics A, B, C
    rows = [{"metric": "NoMerge", "r": 0, "acc1": 60.0, "n": 10_000}]
    rows += [
        {"metric": m, "r": r, "acc1": a, "n": 10_000} for r, row in accs.items() for m, a in zip("ABC", row)
    ]
    summary = headroom.summarize(rows)
    assert [(s["r"], s["best"], s["worst"]) for s in summary] == [
        (4, "C", "A"),
        (8, "C", "A"),
        (16, "A", "B"),
    ]
    assert [s["spread"] for s in summary] == pytest.approx([0.6, 1.6, 4.0])
    for s, row in zip(summary, accs.values(), strict=True):
        mean = sum(row) / 300  # NoMerge's 60 % is not a merging metric: left out
        assert s["stderr"] == pytest.approx(100 * math.sqrt(mean * (1 - mean) / 10_000))  # ~0.5 point each
    assert [s["verdict"] for s in summary] == ["no headroom", "small", "headroom"]


def test_visualize_merges_writes_png(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    Image.new("RGB", (40, 36), (200, 30, 30)).save(tmp_path / "a.png")
    kwargs = '{"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 2}'
    script = Path(__file__).resolve().parents[1] / "experiments" / "visualize_merges.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "a.png"), "--out", str(tmp_path / "m.png"),
         "--backbone", "vit_tiny_patch16_224", "--backbone_kwargs", kwargs, "--r", "4", "16"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(tmp_path / "m.png") as img:
        assert img.size == (32 * 3, 32)  # image + one panel per r


def test_patch_histograms_by_hand():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 2, 1, 9], [2, 2, 9, 9], [2, 2, 9, 9]]])  # 9: ignored
    hist = headroom.patch_histograms(labels, patch=2, num_classes=3, ignore_index=9, num_prefix=1)
    expected = torch.tensor([[0, 0, 0], [0.75, 0, 0.25], [0, 0.75, 0], [0, 0, 1], [0, 0, 0]])
    assert torch.equal(hist[0], expected)


def test_oracle_merges_only_inside_a_class():
    from dtem_lightning.patch import apply_policy

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=32,
                            depth=3, num_heads=2, num_classes=0).eval()  # fmt: skip
    oracle = headroom.OracleLabels(r=20)
    apply_policy(vit, oracle)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[0, :, 13:] = 1  # the class border cuts through patch column 3: those patches are mixed
    labels[1, 9:, :] = 2
    oracle.patch_hist = headroom.patch_histograms(labels, 4, 3, 255, vit.num_prefix_tokens)
    with torch.no_grad():
        vit.forward_features(torch.randn(2, 3, 32, 32))
    assert oracle.state.tokens[-1] < 30  # it did merge a lot
    hist = oracle.patch_hist
    for b in range(2):
        for row in oracle.state.source[b]:
            members = hist[b, row.nonzero().flatten()]
            pure = members[(members == 1).any(-1)]  # patches of a single class
            assert len({int(m.argmax()) for m in pure}) <= 1, "a token mixes patches of two classes"


def test_headroom_segmentation_rows(tmp_path):
    from dtem_lightning.tasks.segmentation import SegmentationTask

    tiny = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    task = SegmentationTask(num_classes=3, backbone="vit_tiny_patch16_224", img_size=16, backbone_kwargs=tiny)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 16, 24), generator=g)
    labels[:, :2] = task.ignore_index
    rows = headroom.evaluate_segmentation(task, [(torch.randn(2, 3, 16, 24, generator=g), labels)], [2, 4], 1,
                                          resamples=50)  # fmt: skip
    names = [r["metric"] for r in rows]
    assert names[0] == "NoMerge" and names.count("oracle (ground-truth labels)") == 2
    assert all(r["n"] == 2 for r in rows)
    assert all(0 <= r["miou"] <= 100 and r["stderr"] >= 0 for r in rows)
    summary = headroom.summarize(rows)
    assert [s["r"] for s in summary] == [2, 4]
    at4 = [r for r in rows if r["r"] == 4]
    assert summary[1]["stderr"] == pytest.approx(sum(r["stderr"] for r in at4) / len(at4))
    assert "oracle" in headroom.markdown(rows, summary)


def test_segmentation_merge_pictures():
    import visualize_merges

    from dtem_lightning.policy import DTEMHard, ToMe
    from dtem_lightning.tasks.segmentation import SegmentationTask

    tiny = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    task = SegmentationTask(num_classes=3, backbone="vit_tiny_patch16_224", img_size=16, backbone_kwargs=tiny)
    pols = [ToMe(trace_source=True), DTEMHard(trace_source=True)]
    for p in pols:
        p.bind(task.backbone)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    pic = visualize_merges.segmentation_rows(task, x, y, pols, 4, {"mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert pic.shape == (2 * 16, 4 * 16, 3) and pic.dtype == np.uint8  # image, truth, ToMe, DTEM per row
    tome, dtem = pic[:16, 32:48], pic[:16, 48:64]
    assert not np.array_equal(tome, dtem), "two metrics drew the same groups"
    assert task.backbone._merge_policy is task.policy  # the task's own policy is back in use
