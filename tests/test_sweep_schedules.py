"""The r-sweep with per-block schedules (test_r) and without duplicate comparison rows (test_policies)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_image_tree

from dtem_lightning import DTEMHard, DTEMSoft, NoMerge, ToMe, flops
from dtem_lightning import merge as M
from dtem_lightning.cli import main
from dtem_lightning.data import SyntheticDataModule
from dtem_lightning.tasks import ClassificationTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = dict(backbone="vit_tiny_patch16_224", img_size=32, num_classes=10,
            backbone_kwargs=dict(patch_size=4, embed_dim=32, depth=4, num_heads=2))  # fmt: skip


def run_sweep(task: ClassificationTask, tmp_path: Path, data: SyntheticDataModule) -> list[dict]:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.test(task, data, verbose=False)
    return task.sweep_results


def test_r_forms_parse_to_one_schedule():
    assert M.parse_r(16) == M.parse_r("16") == 16
    assert M.parse_r([8, 4, 0]) == M.parse_r("8,4,0") == M.parse_r(" 8, 4,0 ") == [8, 4, 0]
    assert M.r_label([8, 4, 0]) == "8,4,0" and M.r_label(16) == 16
    assert M.r_key([8, 4, 0]) == "8-4-0" and M.r_key(16) == "16"
    with pytest.raises(ValueError, match="'8,x'"):
        M.parse_r("8,x")
    with pytest.raises(ValueError, match="-2"):
        M.parse_r("8,-2")


def test_default_test_r_is_the_policys_own_schedule(tmp_path):
    """ToMe(r=[8, 4, 0, 0]) without test_r is swept as that schedule, not as a constant 8."""
    data = SyntheticDataModule(num_samples=16, batch_size=8)
    task = ClassificationTask(policy=ToMe(r=[8, 4, 0, 0]), **TINY).eval()
    assert task.test_r == [[8, 4, 0, 0]]
    # the model at the policy's own r, outside the sweep
    data.setup("test")
    images, labels = data.test_dataset.tensors
    with torch.no_grad():
        own_acc = float((task.backbone(images).argmax(-1) == labels).float().mean())
    own_gflops = flops.gmacs(task.backbone, (3, 32, 32))
    own_tokens = task.policy.token_counts(65)[-1]
    assert own_tokens == 53  # 65 -> 57 -> 53 -> 53 -> 53; a constant 8 would leave 33
    (row,) = run_sweep(task, tmp_path, data)
    assert row["policy"] == "ToMe" and row["r"] == "8,4,0,0"
    assert row["tokens"] == own_tokens
    assert row["gflops"] == pytest.approx(own_gflops, rel=1e-9)
    assert row["acc1"] == pytest.approx(own_acc)


def test_bad_schedule_in_test_r_names_it():
    with pytest.raises(ValueError, match=r"bad test_r entry \[8, 4\].*2 entries but the model has 4 blocks"):
        ClassificationTask(policy=ToMe(r=2), test_r=[0, "8,4"], **TINY)
    with pytest.raises(ValueError, match="'8;4'"):
        ClassificationTask(policy=ToMe(r=2), test_r=["8;4"], **TINY)


def test_repeated_policies_are_dropped_with_a_warning():
    with pytest.warns(UserWarning) as caught:
        task = ClassificationTask(
            policy=ToMe(r=4),
            test_policies=[ToMe(), NoMerge(), DTEMHard(), ToMe(prop_attn=False), NoMerge(r=3), DTEMHard()],
            **TINY,
        )
    messages = [str(w.message) for w in caught if "repeats" in str(w.message)]
    assert len(messages) == 3, messages
    assert messages[0].startswith("test_policies[0] ToMe(") and "repeats the task's own policy" in messages[0]
    assert "test_policies[4] NoMerge(" in messages[1] and "repeats test_policies[1]" in messages[1]
    assert "test_policies[5] DTEMHard(" in messages[2] and "repeats test_policies[2]" in messages[2]
    kept = [(type(p).__name__, p.prop_attn) for p in task.test_policies]
    # ToMe(prop_attn=False) has other init args than the task's ToMe: not a duplicate
    assert kept == [("NoMerge", True), ("DTEMHard", True), ("ToMe", False)]
    # A DTEMHard control next to a DTEM policy is the untrained control, not a duplicate.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        soft = ClassificationTask(policy=DTEMSoft(r=4), test_policies=[DTEMHard(), DTEMSoft()], **TINY)
        hard = ClassificationTask(policy=DTEMHard(r=4), test_policies=[DTEMHard()], **TINY)
    labels = [label for label, _ in soft.policies()]
    # the task's own policy too until a checkpoint or a fit trains it
    # one display name for the DTEM family; repeated labels are numbered
    assert labels == ["DTEM (untrained)", "DTEM (untrained #2)", "DTEM (untrained #3)"]
    assert [label for label, _ in hard.policies()] == ["DTEM (untrained)", "DTEM (untrained #2)"]


def test_cli_sweeps_a_schedule_string_once_per_policy(tmp_path):
    """`test_r+=4,2` (headroom.py's string form) is swept as a schedule; a repeated ToMe row is dropped."""
    args = [
        "test", "-c", str(CONFIGS / "deit_s_tome_offshelf.yaml"), "-c", str(CONFIGS / "debug.yaml"),
        f"--data.init_args.root={make_image_tree(tmp_path / 'imgs')}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--model.init_args.test_r+=4,2", "--model.init_args.test_policies+=ToMe",
    ]  # fmt: skip
    with pytest.warns(UserWarning, match=r"test_policies\[1\] ToMe\(.*repeats the task's own policy"):
        main(args)
    (sweep,) = tmp_path.rglob("sweep.csv")
    with sweep.open() as f:
        rows = [(r["policy"], r["r"], int(r["tokens"])) for r in csv.DictReader(f)]
    # debug overlay: 2 blocks, 64 patches + class token; r = 4 then 2 leaves 65 - 6 = 59 tokens
    # r = 0 is one row, NoMerge's (the debug overlay's test_r holds 0)
    assert rows == [("ToMe", "2", 61), ("ToMe", "4", 57), ("ToMe", "4,2", 59), ("NoMerge", "0", 65)]  # fmt: skip


def test_schedule_rows_survive_the_writer_and_collect(tmp_path):
    """A schedule row tied with a constant-r row (same GFLOPs and metric) plots, and collect keeps its label."""
    import importlib.util

    from dtem_lightning.callbacks import write_sweep

    rows = [
        {"policy": "ToMe", "r": 16, "gflops": 1.0, "tokens": 11, "acc1": 0.5},
        {"policy": "ToMe", "r": "8,4,0,0", "gflops": 1.0, "tokens": 11, "acc1": 0.5},
        {"policy": "ToMe", "r": 0, "gflops": 2.0, "tokens": 65, "acc1": 0.6},
    ]
    csv_path, png = write_sweep(rows, tmp_path / "run")
    assert png.stat().st_size > 0
    spec = importlib.util.spec_from_file_location("collect", CONFIGS.parent / "experiments" / "collect.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    got = collect.collect([str(csv_path)], tmp_path / "out")
    assert [r["r"] for r in got] == [16, "8,4,0,0", 0]
    assert "| 8,4,0,0 |" in (tmp_path / "out" / "sweep.md").read_text()
