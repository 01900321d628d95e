"""A new user's first hour: row labels that say what was evaluated, the sweep in TensorBoard as curves, plots and
tables that say what they show, predictions named after their images, and the small traps of a copied config."""

from __future__ import annotations

import csv
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, make_image_tree

from dtem_lightning import DTEMHard, DTEMSoft, NoMerge, ToMe
from dtem_lightning.callbacks import FinalCheckpoint, plot_tradeoff, tag_of, tradeoff_series
from dtem_lightning.cli import main
from dtem_lightning.data import SyntheticDataModule
from dtem_lightning.data.captions import collate_captions
from dtem_lightning.optim import CosineLR
from dtem_lightning.tasks import CaptioningTask, ClassificationTask
from dtem_lightning.tasks.sweep import distinct_labels, policy_label

CONFIGS = ROOT / "configs"
TINY = dict(backbone="vit_tiny_patch16_224", img_size=32, num_classes=3,
            backbone_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))  # fmt: skip


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    kw = {"logger": False, "enable_checkpointing": False, **kw}
    return L.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, **kw)  # fmt: skip


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = folder.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = acc.Tags()
    out = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    out["__images__"] = tags["images"]  # type: ignore[assignment]
    return out


def test_labels_say_what_was_evaluated():
    """The DTEM family is "DTEM", trained or untrained; repeated labels tell their policies apart."""
    task = ClassificationTask(
        policy=DTEMSoft(r=2), test_policies=[ToMe(), DTEMHard(), ToMe(prop_attn=False)], **TINY
    )
    assert [label for label, _ in task.policies()] == [
        "DTEM (untrained)", "ToMe", "DTEM (untrained #2)", "ToMe (prop_attn=False)"
    ]  # fmt: skip
    task._policy_trained = True  # as after a fit or a checkpoint with its weights
    assert [label for label, _ in task.policies()][:3] == ["DTEM (trained)", "ToMe", "DTEM (untrained)"]
    assert (
        policy_label(NoMerge(), trained=False) == "NoMerge" and policy_label(ToMe(), trained=True) == "ToMe"
    )
    assert distinct_labels(["ToMe", "ToMe", "ToMe"], [ToMe(), ToMe(), ToMe()]) == [
        "ToMe",
        "ToMe (#2)",
        "ToMe (#3)",
    ]
    assert tag_of("DTEM (untrained #2)") == "DTEM_untrained_2" and tag_of("ToMe (prop_attn=False)") == (
        "ToMe_prop_attn=False"
    )


def test_r_zero_is_one_nomerge_row():
    """test_r with 0 adds NoMerge once (bit-identical for every policy) instead of one r = 0 row per policy."""
    task = ClassificationTask(policy=DTEMSoft(r=2), test_policies=[ToMe()], test_r=[0, 2, "2,0"], **TINY)
    rows = [(label, r) for _, label, _, r in task.sweep()]
    assert rows == [("DTEM (untrained)", 2), ("DTEM (untrained)", [2, 0]), ("ToMe", 2), ("ToMe", [2, 0]),
                    ("NoMerge", 0)]  # fmt: skip
    listed = ClassificationTask(policy=ToMe(r=2), test_policies=[NoMerge()], test_r=[0, 2], **TINY)
    assert [(label, r) for _, label, _, r in listed.sweep()] == [("ToMe", 2), ("NoMerge", 0)]
    assert len(listed.test_policies) == 1  # a listed NoMerge is the r = 0 row; none is added


def test_fit_then_test_labels_tensorboard_curves_and_note(tmp_path):
    """Through the CLI: "DTEM (trained)" for the fitted policy, "DTEM (untrained)" for the control, NoMerge
    once; TensorBoard holds the sweep as curves over r (step = r, from NoMerge at 0), the figure and the table,
    and no tag with spaces or parentheses."""
    root = make_image_tree(tmp_path / "imgs")
    common = ["-c", str(CONFIGS / "deit_s_modular.yaml"), "-c", str(CONFIGS / "debug.yaml"),
              f"--data.init_args.root={root}", f"--trainer.logger.init_args.save_dir={tmp_path}"]  # fmt: skip
    main(["fit", *common, "--trainer.logger.init_args.version=fit"])
    ckpt = tmp_path / "debug" / "fit" / "checkpoints" / "last.ckpt"
    main(["test", *common, "--trainer.logger.init_args.version=test", f"--ckpt_path={ckpt}",
          "--model.init_args.test_policies+=ToMe", "--model.init_args.test_policies+=DTEMHard"])  # fmt: skip
    run = tmp_path / "debug" / "test"
    with (run / "sweep.csv").open() as f:
        rows = [(r["policy"], r["r"]) for r in csv.DictReader(f)]
    assert rows == [("DTEM (trained)", "2"), ("DTEM (trained)", "4"), ("ToMe", "2"), ("ToMe", "4"),
                    ("DTEM (untrained)", "2"), ("DTEM (untrained)", "4"), ("NoMerge", "0")]  # fmt: skip
    md = (run / "sweep.md").read_text()
    assert "- DTEM (trained): the learned policy of this run, evaluated with hard merging." in md
    assert "- DTEM (untrained): a policy with freshly initialised parameters (a control" in md
    scalars = _scalars(run)
    assert [s for s, _ in scalars["sweep/acc1/DTEM_trained"]] == [0, 2, 4]  # a curve that starts at NoMerge
    assert [s for s, _ in scalars["sweep/tokens/ToMe"]] == [0, 2, 4]
    assert [v for _, v in scalars["sweep/tokens/ToMe"]] == [65, 61, 57]
    assert scalars["sweep/acc1/DTEM_trained"][0] == scalars["sweep/acc1/ToMe"][0]  # both start at NoMerge's
    assert "sweep/tradeoff" in scalars["__images__"]
    assert not [t for t in scalars if " " in t or "(" in t or ")" in t]
    assert not [t for t in scalars if t.startswith("test/")]  # no one-point chart per row


def test_plot_says_what_it_shows(tmp_path, monkeypatch):
    """Axis labels in words, a NoMerge level line, error bars on the differences, coinciding curves each with
    their own marker and dash."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    rows = [
        {"policy": "NoMerge", "r": 0, "gflops": 1.0, "acc1": 0.8},
        *[{"policy": p, "r": r, "gflops": 1 - r / 10, "acc1": 0.7, "d_acc1": 0.01 if p != "ToMe" else "",
           "d_acc1_lo": -0.01 if p != "ToMe" else "", "d_acc1_hi": 0.03 if p != "ToMe" else "", "d_ref": "ToMe"}
          for p in ("DTEM (trained)", "ToMe", "DTEM (untrained)") for r in (2, 4)],
    ]  # fmt: skip
    curves, baselines, diffs, ref = tradeoff_series(rows, "acc1")
    plot_tradeoff(curves, tmp_path / "t.png", "acc1", (), baselines, diffs, ref)
    (fig,) = figures
    top, bottom = fig.axes
    assert (
        top.get_ylabel() == "top-1 accuracy" and bottom.get_xlabel() == "GMACs per image (the gflops column)"
    )
    assert "top-1 accuracy − ToMe at the same r" in bottom.get_ylabel()
    lines = {ln.get_label(): ln for ln in top.get_lines()}
    assert "NoMerge (r = 0)" in lines  # the level line
    same = [lines[k] for k in ("DTEM (trained)", "ToMe", "DTEM (untrained)")]  # identical values: overlapping
    assert len({(ln.get_marker(), ln.get_linestyle()) for ln in same}) == 3
    assert len({ln.get_markersize() for ln in same}) == 3
    assert bottom.containers  # error bars
    plt.close("all")


def test_collect_refuses_mixed_metrics_in_one_figure(tmp_path):
    """A classification and a segmentation sweep into one figure: one line, exit 1, nothing written."""
    a, b = tmp_path / "cls.csv", tmp_path / "seg.csv"
    a.write_text("policy,r,gflops,tokens,acc1\nToMe,2,1.0,9,0.5\n")
    b.write_text("policy,r,gflops,tokens,miou,pixel_acc\nToMe,2,1.0,9,0.3,0.7\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/collect.py"), str(a), str(b), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1
    run = (
        f"{tmp_path.parent.name}/{tmp_path.name}/seg"  # two files of one folder: labelled apart by file name
    )
    assert proc.stderr.splitlines() == [
        f"error: sweep {run} has no 'acc1' column (its metrics: miou, pixel_acc): one figure plots one metric, "
        "so collect each task's sweeps separately or pass --metric"
    ]
    assert not (out / "sweep.csv").exists()


def test_captioning_note_names_skipped_metrics_and_no_copied_column(tmp_path, monkeypatch):
    """METEOR skipped says why; ``tokens`` is described instead of copied into ``visual_tokens``."""
    import dtem_lightning.tasks.captioning as cap

    monkeypatch.setattr(cap, "meteor_missing", lambda: "Java is not on the PATH")
    from dtem_lightning.text import Vocabulary

    task = CaptioningTask(backbone="vit_tiny_patch16_224", img_size=32, policy=ToMe(r=2), test_r=[2],
                          backbone_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2), decoder_width=32,
                          decoder_depth=1, decoder_heads=2, max_len=6, use_meteor=None, bootstrap=0)  # fmt: skip
    task.set_vocab(Vocabulary.build(["a dog runs", "a cat sits"], min_freq=1))
    images = torch.randn(2, 3, 32, 32)
    data = [(images[i], ["a dog runs"]) for i in range(2)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate_captions)
    task.metrics = lambda: cap.MetricCollection({"caption": cap.CaptionMetrics(False)})  # no Java needed here
    _trainer(tmp_path).test(task, dataloaders=loader, verbose=False)
    assert "visual_tokens" not in task.sweep_results[0]
    assert "METEOR: skipped, Java is not on the PATH; it needs pycocoevalcap and Java." in task.sweep_note
    assert "tokens: the visual tokens the encoder passes to the decoder" in task.sweep_note


def test_predictions_are_named_after_their_images(tmp_path):
    """`dtem predict` on classification writes predictions.csv with each image's name and class names."""
    root = make_image_tree(tmp_path / "imgs", classes=3, per_class=3)
    args = ["predict", "-c", str(CONFIGS / "deit_s_modular.yaml"), "-c", str(CONFIGS / "debug.yaml"),
            f"--data.init_args.root={root}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.version=p"]  # fmt: skip
    main(args)
    with (tmp_path / "debug" / "p" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [f"test/c{c}/{i}.png" for c in range(3) for i in range(3)]
    assert {r["label"] for r in rows} == {"c0", "c1", "c2"} and all(
        r["prediction"] in {"c0", "c1", "c2"} for r in rows
    )
    assert all(0 < float(r["probability"]) <= 1 for r in rows)


def test_fit_ending_on_max_epochs_before_max_steps_warns(tmp_path):
    dm = SyntheticDataModule(num_classes=3, num_samples=8, batch_size=4, img_size=32)
    task = ClassificationTask(policy=ToMe(r=2), **TINY)
    with pytest.warns(UserWarning, match=r"the fit ended on max_epochs=1 after 2 of max_steps=50 steps"):
        _trainer(tmp_path, max_epochs=1, max_steps=50, callbacks=[FinalCheckpoint()]).fit(task, dm)


def test_final_weights_are_validated_when_max_steps_ends_mid_epoch(tmp_path):
    """max_steps = 3 in a 5-batch epoch: Lightning alone would stop without validating the final weights."""
    dm = SyntheticDataModule(num_classes=3, num_samples=20, batch_size=4, img_size=32)
    steps = []

    class Probe(L.Callback):
        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            steps.append(trainer.global_step)

    task = ClassificationTask(policy=ToMe(r=2), **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, max_steps=3, num_sanity_val_steps=0, callbacks=[FinalCheckpoint(), Probe()]).fit(
            task, dm
        )
    assert steps == [3]


def test_warmup_longer_than_the_run_warns(tmp_path):
    dm = SyntheticDataModule(num_classes=3, num_samples=8, batch_size=4, img_size=32)
    task = ClassificationTask(
        policy=ToMe(r=2), lr_scheduler=lambda opt: CosineLR(opt, warmup_steps=10), **TINY
    )
    with pytest.warns(UserWarning, match=r"warmup_steps=10 is not shorter than the run \(2 steps\)"):
        _trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(task, dm)


def test_parameter_groups_are_named():
    task = ClassificationTask(policy=DTEMSoft(r=2), train="policy", **TINY)
    assert [g["name"] for g in task.configure_optimizers().param_groups] == ["decay", "no_decay"]


def test_torchvision_fix_imports_nothing_at_start_up():
    """The .pth start-up hook runs in every interpreter: importing it must import no other module."""
    code = (
        "import sys; before = set(sys.modules); sys.path.insert(0, sys.argv[1]); import dtem_lightning_tvfix; "
        "print(sorted(set(sys.modules) - before))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['dtem_lightning_tvfix']"


def test_collect_says_what_the_labels_mean(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "sweep.csv").write_text(
        "policy,r,gflops,tokens,acc1\nDTEM (trained),2,0.9,9,0.5\nNoMerge,0,1.0,12,0.6\n"
    )
    out = tmp_path / "out"
    assert subprocess.run([sys.executable, str(ROOT / "experiments/collect.py"), str(tmp_path / "run"), "--out",
                           str(out)], capture_output=True, timeout=120).returncode == 0  # fmt: skip
    assert (
        "DTEM (trained): the run's learned embedding, evaluated with hard merging"
        in (out / "sweep.md").read_text()
    )
