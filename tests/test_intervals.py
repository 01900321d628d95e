"""Paired bootstrap intervals: the pure statistics, per-sample statistics of each task, the sweep columns,
sweep.md, collect.py and a 2-process DDP run with a padded test set."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from dtem_lightning import DTEMHard, DTEMSoft, NoMerge, ToMe, stats
from dtem_lightning.callbacks import SweepWriter, _limits, write_sweep
from dtem_lightning.data import SyntheticDataModule
from dtem_lightning.data.captions import collate_captions
from dtem_lightning.patch import active_policy
from dtem_lightning.tasks import CaptioningTask, ClassificationTask, SegmentationTask
from dtem_lightning.text import CaptionMetrics, Vocabulary, cider_d, cider_d_per_image, tokenize

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(backbone="vit_tiny_patch16_224", img_size=32, num_classes=10,
            backbone_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))  # fmt: skip


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kw)  # fmt: skip


def all_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return torch.cat(list(stats.resample_indices(n, resamples, seed))).numpy()


def slow_paired(
    a: np.ndarray, b: np.ndarray, metric: Callable[[np.ndarray], float], resamples: int, seed: int
) -> tuple[float, float, float]:
    """The obvious paired bootstrap: one resample at a time, the same image indices for both rows."""
    diffs = [metric(a[idx]) - metric(b[idx]) for idx in all_indices(len(a), resamples, seed)]
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return metric(a) - metric(b), float(lo), float(hi)


def sharpen(model: torch.nn.Module) -> None:
    """Re-draw every Linear weight at a large scale: a random ViT whose predictions depend on what merges.

    At timm's init (std 0.02) the residual branches are tiny, so merging hardly changes a prediction and every
    sweep row would be the same: intervals of zeros prove nothing.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=2.5 * m.in_features**-0.5)


def slow_miou(confusions: np.ndarray) -> float:
    """mIoU of the summed confusion matrices [m, K, K] (rows: target), classes with an empty union left out."""
    c = confusions.sum(0)
    ious = [c[k, k] / (c[k, :].sum() + c[:, k].sum() - c[k, k]) for k in range(len(c))
            if c[k, :].sum() + c[:, k].sum() > 0]  # fmt: skip
    return float(np.mean(ious))


# ---------------------------------------------------------------------------------------------- pure statistics
def test_paired_bootstrap_of_a_mean_matches_slow_reference():
    g = torch.Generator().manual_seed(1)
    a, b = (torch.rand(37, generator=g) < 0.6).long(), (torch.rand(37, generator=g) < 0.5).long()
    got = stats.paired_bootstrap(a, b, resamples=300, seed=5)
    want = slow_paired(a.numpy(), b.numpy(), np.mean, 300, 5)
    assert got == pytest.approx(want, abs=1e-12)
    assert got[1] < got[0] < got[2]  # a real interval, not a degenerate one
    assert stats.paired_bootstrap(a, b, resamples=300, seed=5) == got  # seeded
    assert stats.paired_bootstrap(a, b, resamples=300, seed=6) != got


def test_known_cases_identical_rows_and_a_constant_shift():
    a = torch.rand(50, dtype=torch.float64)
    assert stats.paired_bootstrap(a, a.clone(), resamples=200) == (0.0, 0.0, 0.0)
    d, lo, hi = stats.paired_bootstrap(a + 0.25, a, resamples=200)
    assert (d, lo, hi) == pytest.approx((0.25, 0.25, 0.25), abs=1e-12)
    # Unpaired resampling (independent draws for each row) would spread a pure shift over an interval.
    with pytest.raises(ValueError, match="same samples"):
        stats.paired_bootstrap(a, a[:-1])


def test_resamples_draw_with_replacement_in_chunks():
    rows = list(stats.resample_indices(3_000_000, 5, seed=0))
    assert [len(r) for r in rows] == [1, 1, 1, 1, 1]  # 2**22 elements per chunk: one row of 3M at a time
    idx = all_indices(10, 1000, 0)
    assert idx.shape == (1000, 10) and idx.min() == 0 and idx.max() == 9
    assert np.bincount(idx.ravel(), minlength=10).min() > 900  # uniform: about 1000 draws of each


def test_class_counts_sum_to_the_corpus_confusion_and_its_miou():
    K, ignore = 6, 255  # class 5 is in no target and no prediction: left out of the mean
    g = torch.Generator().manual_seed(0)
    conf = MulticlassConfusionMatrix(K, ignore_index=ignore)
    jac = MulticlassJaccardIndex(K, ignore_index=ignore, average="macro")
    counts, confusions = [], []
    for _ in range(3):  # batches
        target = torch.randint(0, 4, (4, 6, 7), generator=g)  # class 4 never in the target ...
        target[torch.rand(target.shape, generator=g) < 0.2] = ignore
        preds = torch.randint(0, 4, (4, 6, 7), generator=g)
        preds[0, 0] = 4  # ... but predicted in one image's first row
        conf.update(preds, target)
        jac.update(preds, target)
        counts.append(stats.class_counts(preds, target, K, ignore))
        for p, t in zip(preds, target):  # per-image confusion matrices, by hand
            c = np.zeros((K, K), dtype=np.int64)
            for pi, ti in zip(p.flatten().tolist(), t.flatten().tolist()):
                if ti != ignore:
                    c[ti, pi] += 1
            confusions.append(c)
    counts = torch.cat(counts)
    assert counts.shape == (12, 3, K) and counts.dtype == torch.int64
    confusions = np.stack(confusions)
    for c, (inter, tgt, pred) in zip(confusions, counts.numpy()):  # diagonal and margins of each image's
        assert (inter == np.diag(c)).all() and (tgt == c.sum(1)).all() and (pred == c.sum(0)).all()
    corpus = conf.compute()
    total = counts.sum(0)
    assert torch.equal(total[0], corpus.diag()) and torch.equal(total[1], corpus.sum(1))
    assert torch.equal(total[2], corpus.sum(0))
    assert float(stats.miou_of_counts(total)) == pytest.approx(float(jac.compute()), abs=1e-6)
    assert float(stats.miou_of_counts(total)) == pytest.approx(slow_miou(confusions), abs=1e-12)

    def miou(cs: torch.Tensor, n: int) -> torch.Tensor:
        return stats.miou_of_counts(cs)

    got = stats.paired_bootstrap(counts, counts.flip(0), miou, resamples=200, seed=2)
    idx = all_indices(12, 200, 2)
    flipped = confusions[::-1]
    diffs = [slow_miou(confusions[i]) - slow_miou(flipped[i]) for i in idx]
    assert got[1:] == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), abs=1e-12)
    assert got[0] == pytest.approx(0.0, abs=1e-12) and got[1] < 0 < got[2]


def test_first_occurrences_undo_distributed_padding():
    data = list(range(21))  # 2 ranks: 11 each, the first sample repeated to fill rank 1
    ranks = [list(DistributedSampler(data, num_replicas=2, rank=k, shuffle=False)) for k in range(2)]
    gathered = torch.tensor(ranks[0] + ranks[1])
    assert len(gathered) == 22
    assert torch.equal(gathered[stats.first_occurrences(gathered)], torch.arange(21))


def test_per_image_cider_averages_to_the_corpus_score():
    refs = [["a dog runs on the grass", "the dog is running"], ["a man sits on a bench"], ["two dogs play"]]
    cands = ["a dog runs", "a man sits on the grass", "dogs play with a ball"]
    m = CaptionMetrics(use_meteor=False)
    m.update(cands[:2], refs[:2])
    m.update(cands[2:], refs[2:])
    corpus = float(m.compute()["cider"])
    per = m.cider_per_image
    assert per.shape == (3,) and sum(per.tolist()) / 3 == corpus  # exactly: the same sum
    toks = [tokenize(c) for c in cands], [[tokenize(r) for r in rs] for rs in refs]
    assert per.tolist() == cider_d_per_image(*toks) and corpus == cider_d(*toks)
    # document frequencies from all three images: a one-image corpus scores the same caption differently
    assert cider_d_per_image(toks[0][:1], toks[1][:1])[0] != per[0]


# ---------------------------------------------------------------------------------------------- sweeps
def test_classification_sweep_intervals_equal_a_recomputation(tmp_path):
    L.seed_everything(0, verbose=False)
    task = ClassificationTask(policy=DTEMSoft(r=4), test_policies=[NoMerge(), ToMe(), DTEMHard()],
                              test_r=[16, 24], bootstrap=400, bootstrap_seed=3,
                              **{**TINY, "num_classes": 3})  # fmt: skip
    sharpen(task.backbone)
    dm = SyntheticDataModule(num_classes=3, num_samples=45, batch_size=8)  # last batch short: 5
    trainer(tmp_path, callbacks=[SweepWriter(out_dir=str(tmp_path / "run"))]).test(task, dm, verbose=False)
    with (tmp_path / "run" / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-4:] == ["d_acc1", "d_acc1_lo", "d_acc1_hi", "d_ref"]

    # Per-image correctness of every row, recomputed outside the test loop in data order.
    task.eval()
    dm.setup("test")
    correct = {}
    with torch.no_grad():
        for _, label, policy, r in task.sweep():
            with task.running(policy, r):
                hits = [(task(x).argmax(-1) == y) for x, y in dm.test_dataloader()]
            correct[(label, str(r))] = torch.cat(hits).long().numpy()
    tome = {row["r"]: row for row in rows if row["policy"] == "ToMe"}
    real = 0
    for row in rows:
        key = (row["policy"], row["r"])
        assert float(row["acc1"]) == pytest.approx(correct[key].mean(), abs=1e-6)
        if row["policy"] in ("ToMe", "NoMerge"):
            assert row["d_acc1"] == row["d_acc1_lo"] == row["d_acc1_hi"] == row["d_ref"] == ""
            continue
        d, lo, hi = slow_paired(correct[key], correct[("ToMe", row["r"])], np.mean, 400, 3)
        got = tuple(float(row[k]) for k in ("d_acc1", "d_acc1_lo", "d_acc1_hi"))
        assert got == pytest.approx((d, lo, hi), abs=1e-12), row
        assert got[0] == pytest.approx(float(row["acc1"]) - float(tome[row["r"]]["acc1"]), abs=1e-6)
        assert row["d_ref"] == "ToMe"
        real += lo < hi
    assert real >= 2  # the rows do differ image by image: the check is not one of zeros

    md = (tmp_path / "run" / "sweep.md").read_text()
    assert (
        "| d_acc1 [95 % CI] | d_ref |" in md and "over the same 45 test samples (400 resamples, seed 3)" in md
    )
    assert (tmp_path / "run" / "tradeoff.png").stat().st_size > 0

    # bootstrap=0 (or no reference in the sweep) keeps no statistics and writes no interval columns.
    for kw in ({"bootstrap": 0}, {"interval_reference": "NoSuchPolicy"}):
        off = ClassificationTask(policy=DTEMSoft(r=4), test_policies=[ToMe()], test_r=[4], **kw, **TINY)
        with pytest.warns(UserWarning, match="NoSuchPolicy") if "interval_reference" in kw else nullcontext():
            trainer(tmp_path).test(off, dm, verbose=False)
        assert "d_acc1" not in off.sweep_results[0] and "bootstrap" not in off.sweep_note


def test_nomerge_reference_compares_every_row_and_negative_bootstrap_fails(tmp_path):
    L.seed_everything(0, verbose=False)
    task = ClassificationTask(policy=ToMe(r=4), test_policies=[NoMerge()], test_r=[4, 8], bootstrap=100,
                              interval_reference="NoMerge", **TINY)  # fmt: skip
    trainer(tmp_path).test(task, SyntheticDataModule(num_samples=16, batch_size=8), verbose=False)
    rows = {(r["policy"], r["r"]): r for r in task.sweep_results}
    for r in (4, 8):
        row = rows[("ToMe", r)]
        assert row["d_ref"] == "NoMerge"
        assert row["d_acc1"] == pytest.approx(row["acc1"] - rows[("NoMerge", 0)]["acc1"], abs=1e-6)
    assert rows[("NoMerge", 0)]["d_acc1"] is None
    assert "acc1 minus the NoMerge row, with its paired bootstrap" in task.sweep_note
    bad = ClassificationTask(bootstrap=-1, **TINY)
    with pytest.raises(ValueError, match="bootstrap must be >= 0"):
        trainer(tmp_path).test(bad, SyntheticDataModule(num_samples=8, batch_size=8), verbose=False)


def _seg_tree(root: Path, n: int) -> str:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir(parents=True)
        for i in range(n):
            Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()).save(
                root / split / f"{i}.png"
            )
            lab = torch.randint(0, 12, (32, 32), generator=g).byte().numpy()  # 11 = CamVid's void
            Image.fromarray(lab).save(root / f"{split}annot" / f"{i}.png")
    return str(root)


def test_segmentation_sweep_intervals_from_summed_class_counts(tmp_path):
    from dtem_lightning.data import CamVidDataModule

    L.seed_everything(0, verbose=False)
    dm = CamVidDataModule(_seg_tree(tmp_path / "camvid", 5), img_size=32, batch_size=2,
                          backbone="vit_tiny_patch16_224")  # fmt: skip
    task = SegmentationTask(num_classes=11, decoder="linear", backbone="vit_tiny_patch16_224", img_size=32,
                            backbone_kwargs=TINY["backbone_kwargs"], policy=DTEMHard(r=8),
                            test_policies=[ToMe()], test_r=[8, 16], bootstrap=300)  # fmt: skip
    trainer(tmp_path).test(task, dm, verbose=False)
    rows = task.sweep_results
    # Per-image class counts of every row, recomputed in data order.
    task.eval()
    dm.setup("test")
    counts = {}
    with torch.no_grad():
        for _, label, policy, r in task.sweep():
            with task.running(policy, r):
                c = [stats.class_counts(task.inference(x).argmax(1), y, 11, task.ignore_index)
                     for x, y in dm.test_dataloader()]  # fmt: skip
            counts[(label, r)] = torch.cat(c)
    for row in rows:
        total = counts[(row["policy"], row["r"])].sum(0)
        assert float(stats.miou_of_counts(total)) == pytest.approx(row["miou"], abs=1e-6)  # the corpus mIoU
        if row["policy"] == "ToMe":
            assert row["d_miou"] is None
            continue
        a, b = counts[(row["policy"], row["r"])].numpy(), counts[("ToMe", row["r"])].numpy()

        def slow(cs: np.ndarray) -> float:
            inter, tgt, pred = cs.sum(0)
            union = tgt + pred - inter
            return float(np.mean(inter[union > 0] / union[union > 0]))

        d, lo, hi = slow_paired(a, b, slow, 300, 0)
        assert (row["d_miou"], row["d_miou_lo"], row["d_miou_hi"]) == pytest.approx((d, lo, hi), abs=1e-12)
        assert lo < hi


class _Scripted(CaptioningTask):
    """Captions that depend on the image, the running policy and r: rows differ image by image."""

    def evaluate(self, batch):
        images, captions = batch
        policy = active_policy(self.backbone)
        shift = policy.schedule[0] + len(type(policy).__name__)
        out = []
        for img, refs in zip(images, captions):
            words = refs[0].split()
            out.append(" ".join(words[: max(1, len(words) - (int(img[0, 0, 0]) + shift) % 3)]))
        return out, [list(c) for c in captions]


def scripted_caption(j: int, refs: list[str], name: str, r: int) -> str:
    words = refs[0].split()
    return " ".join(words[: max(1, len(words) - (j + r + len(name)) % 3)])


def test_captioning_sweep_intervals_from_per_image_cider(tmp_path):
    words = "a dog cat man runs sits on the grass red ball bench".split()
    g = torch.Generator().manual_seed(0)
    refs = [[" ".join(words[k] for k in torch.randint(0, len(words), (6,), generator=g)) for _ in range(2)]
            for _ in range(11)]  # fmt: skip
    data = [(torch.full((3, 32, 32), float(j)), refs[j]) for j in range(11)]  # pixel value = image index
    loader = DataLoader(data, batch_size=4, collate_fn=collate_captions)
    task = _Scripted(backbone="vit_tiny_patch16_224", img_size=32,
                     backbone_kwargs=dict(patch_size=4, embed_dim=48, depth=2, num_heads=2), policy=DTEMHard(r=4),
                     test_policies=[ToMe()], test_r=[4, 8], decoder_width=32, decoder_depth=1, decoder_heads=2,
                     max_len=8, use_meteor=False, bootstrap=300)  # fmt: skip
    task.set_vocab(Vocabulary.build([c for rs in refs for c in rs], min_freq=1))
    trainer(tmp_path).test(task, dataloaders=loader, verbose=False)
    toks = [[tokenize(c) for c in rs] for rs in refs]
    scores = {}
    for name in ("DTEMHard", "ToMe"):
        for r in (4, 8):
            cands = [tokenize(scripted_caption(j, refs[j], name, r)) for j in range(11)]
            scores[(name, r)] = np.array(cider_d_per_image(cands, toks))
    for row in task.sweep_results:
        # no checkpoint: the DTEMHard row is "DTEM (untrained)"
        row["policy"] = {"DTEM (untrained)": "DTEMHard"}.get(row["policy"], row["policy"])
        assert row["cider"] == pytest.approx(scores[(row["policy"], row["r"])].mean(), abs=1e-12)
        if row["policy"] == "ToMe":
            assert row["d_cider"] is None
            continue
        d, lo, hi = slow_paired(scores[("DTEMHard", row["r"])], scores[("ToMe", row["r"])], np.mean, 300, 0)
        assert (row["d_cider"], row["d_cider_lo"], row["d_cider_hi"]) == pytest.approx((d, lo, hi), abs=1e-12)
        assert lo < hi


# ---------------------------------------------------------------------------------------------- writing
def _collect():
    spec = importlib.util.spec_from_file_location("collect", ROOT / "experiments" / "collect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_md_plot_and_collect_keep_the_intervals(tmp_path):
    rows = [
        {"policy": "DTEMSoft", "r": 8, "gflops": 1.0, "tokens": 9, "acc1": 0.52, "d_acc1": 0.02,
         "d_acc1_lo": 0.005, "d_acc1_hi": 0.035, "d_ref": "ToMe"},
        {"policy": "NoMerge", "r": 0, "gflops": 2.0, "tokens": 65, "acc1": 0.55, "d_acc1": None,
         "d_acc1_lo": None, "d_acc1_hi": None, "d_ref": None},
        {"policy": "ToMe", "r": 8, "gflops": 0.98, "tokens": 9, "acc1": 0.50, "d_acc1": None,
         "d_acc1_lo": None, "d_acc1_hi": None, "d_ref": None},
    ]  # fmt: skip
    csv_path, png = write_sweep(rows, tmp_path / "run", note="d_acc1: acc1 minus ToMe.")
    md = (tmp_path / "run" / "sweep.md").read_text()
    assert "| DTEMSoft | 8 | 1.0000 | 9 | 0.5200 | +0.0200 [+0.0050, +0.0350] | ToMe |" in md
    assert "| NoMerge | 0 | 2.0000 | 65 | 0.5500 |  |  |" in md and md.endswith(
        "\nd_acc1: acc1 minus ToMe.\n"
    )
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = _collect().collect([f"demo={csv_path}"], tmp_path / "out")
    assert out[0]["d_acc1_lo"] == 0.005 and out[1]["d_acc1"] == ""
    with (tmp_path / "out" / "sweep.csv").open() as f:
        header = next(csv.reader(f))
    assert header[-4:] == ["d_acc1", "d_acc1_lo", "d_acc1_hi", "d_ref"]
    collected = (tmp_path / "out" / "sweep.md").read_text()
    assert "+0.0200 [+0.0050, +0.0350]" in collected and "paired bootstrap 95 % interval" in collected


def test_y_axis_holds_the_reference_and_never_zooms_into_the_noise():
    lo, hi = _limits([0.50, 0.501, 0.55], min_span=4 * 0.03)  # values, NoMerge level; widest interval 0.03
    assert lo < 0.50 and hi > 0.55 and hi - lo >= 0.12
    lo, hi = _limits([0.0, 0.001, -0.0005], min_span=4 * 0.02)  # differences far inside their intervals
    assert hi - lo >= 0.08 and lo < -0.03 and hi > 0.03


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_with_padded_test_set_gives_the_intervals_of_one_process(tmp_path):
    """41 test images on 2 processes: the sampler repeats one; the intervals match 1 process exactly."""
    weights = tmp_path / "sharp.pth"  # a backbone whose predictions depend on the merges (see sharpen)
    src = ClassificationTask(**{**TINY, "num_classes": 3})
    sharpen(src.backbone)
    torch.save(src.backbone.state_dict(), weights)
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "enable_checkpointing": False},
        "model": {"class_path": "ClassificationTask", "init_args": {
            "backbone": "vit_tiny_patch16_224", "backbone_kwargs": TINY["backbone_kwargs"],
            "checkpoint_path": str(weights),
            "policy": {"class_path": "DTEMHard", "init_args": {"r": 16}}, "test_policies": [{"class_path": "ToMe"}],
            "test_r": [16, 24], "bootstrap": 300}},
        "data": {"class_path": "dtem_lightning.data.SyntheticDataModule",
                 "init_args": {"num_classes": 3, "num_samples": 41, "batch_size": 4, "img_size": 32}},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    sweeps, notes = {}, {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        args = [
            "test",
            "-c",
            str(tmp_path / "cfg.yaml"),
            f"--sweep.out_dir={out}",
            f"--trainer.devices={n}",
            f"--trainer.default_root_dir={out}",
        ]  # config.yaml goes there, not into the repository
        args += ["--trainer.strategy=ddp"] if n == 2 else []
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, "-m", "dtem_lightning", *args], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        with (out / "sweep.csv").open() as f:
            sweeps[n] = list(csv.DictReader(f))
        notes[n] = (out / "sweep.md").read_text()
    for a, b in zip(sweeps[1], sweeps[2], strict=True):
        assert (a["policy"], a["r"]) == (b["policy"], b["r"])
        for k in ("d_acc1", "d_acc1_lo", "d_acc1_hi", "d_ref"):
            assert a[k] == b[k], (k, a, b)
    assert any(a["d_acc1_lo"] != a["d_acc1_hi"] for a in sweeps[1] if a["d_acc1"])
    assert "over the same 41 test samples" in notes[1] and "over the same 41 test samples" in notes[2]
    assert "repeated 1 sample" in notes[2] and "repeated" not in notes[1]
