"""Every demo, replication and paper-scale Makefile target parses: ``make -n``, then ``--print_config``."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from dtem_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [
    "pretrain-small", "demo", "demo-quick", "replicate-small", "seg-backbone", "replicate-seg",
    "table1-deit-s", "table1-deit-b", "table1-mae-b", "table1-mae-l", "tome-offshelf", "e2e-deit-s",
    "table4-git-b", "table4-git-scratch", "table5-seg-s", "compare-seg", "select-seg", "table6",
]  # fmt: skip


def make_n(target: str, *variables: str) -> list[list[str]]:
    """Commands ``make -n TARGET`` would run (continuation lines joined), each split into words."""
    env = {**os.environ, "MAKEFLAGS": ""}
    proc = subprocess.run(
        ["make", "-n", "--no-print-directory", target, *variables],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


def dtem_commands(cmds: list[list[str]]) -> list[list[str]]:
    """The ``dtem`` invocations among ``cmds``, without the program name."""
    return [c[1:] for c in cmds if c and Path(c[0]).name == "dtem"]


def print_config(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """``--print_config`` output of a dtem command line (``--ckpt_path`` dropped: the checkpoint does not exist)."""
    args = [a for a in args if not a.startswith("--ckpt_path")] + ["--print_config"]
    with pytest.raises(SystemExit) as e, pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["dtem"])
        main(args)
    assert e.value.code == 0, args
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def parsed() -> dict[str, list[list[str]]]:
    roots = ("IMAGENET=/data/imagenet", "COCO=/data/coco", "ADE20K=/data/ade")
    return {t: make_n(t, *roots, "DEVICES=8") for t in TARGETS}


@pytest.mark.parametrize("target", TARGETS)
def test_target_parses(target, parsed, capsys):
    cmds = dtem_commands(parsed[target])
    assert cmds, f"make -n {target} runs no dtem command"
    for args in cmds:
        assert args[0] in ("fit", "test"), args
        out = print_config(args, capsys)
        assert "class_path: dtem_lightning." in out
        if target.startswith(("table1", "tome", "e2e")):
            assert "root: /data/imagenet" in out and "devices: '8'" in out and "strategy: ddp" in out
            assert "accelerator: gpu" in out
        if target.startswith(("table4", "table5")):
            root = "/data/coco" if target.startswith("table4") else "/data/ade"
            assert f"root: {root}" in out and "devices: '8'" in out and "accelerator: gpu" in out
    if target.startswith(("table4", "table5")):
        collect_cmd = parsed[target][-1]
        metric = "cider" if target.startswith("table4") else "miou"
        assert Path(collect_cmd[1]).name == "collect.py" and collect_cmd[-2:] == ["--metric", metric]


def test_table7_target_parses():
    scripts = [Path(c[1]).name for c in make_n("table7")]
    assert scripts == ["table7.py", "table7.py"]


def test_headroom_target_parses():
    cmds = make_n("headroom-small")
    assert any(Path(w).name == "headroom.py" for w in cmds[-1])
    replicate = make_n("replicate-small")
    assert any(Path(w).name == "headroom.py" for c in replicate for w in c)


def test_demo_sequence(parsed):
    cmds = parsed["demo"]
    stages = [c[0] for c in dtem_commands(cmds)]
    assert stages == ["fit", "test", "fit", "test"]  # classification, then segmentation (CamVid)
    test = dtem_commands(cmds)[1]
    assert {"--model.init_args.test_policies+=NoMerge", "--model.init_args.test_policies+=ToMe",
            "--model.init_args.test_policies+=DTEMHard"} <= set(test)  # fmt: skip
    collects = [c for c in cmds if any("collect.py" in w for w in c)]
    assert "results/demo" in collects[0] and "results/demo/seg" in collects[1]
    seg_fit, seg_test = dtem_commands(cmds)[2:]
    assert "--model.init_args.init_from=checkpoints/camvid_seg_vit.ckpt" in seg_fit
    assert "--ckpt_path=runs/demo/seg_fit/checkpoints/last.ckpt" in seg_test
    assert any("prepare_cifar10.py" in w for c in cmds for w in c)


def test_table6_is_one_sweep_of_the_demo_fit_with_the_e2e_fits_as_test_checkpoints(parsed, capsys):
    import json

    fits, (test,) = dtem_commands(parsed["table6"])[:-1], dtem_commands(parsed["table6"])[-1:]
    versions = [
        w.split("=", 1)[1] for c in fits for w in c if w.startswith("--trainer.logger.init_args.version=")
    ]
    assert [c[0] for c in fits] == ["fit", "fit"] and versions == ["tome_e2e", "tome_soft_e2e"]
    assert test[0] == "test" and "--ckpt_path=runs/demo/fit/checkpoints/last.ckpt" in test
    (arg,) = [w for w in test if w.startswith("--model.init_args.test_checkpoints=")]
    named = json.loads(arg.split("=", 1)[1])
    assert named == {v: f"runs/table6/{v}/checkpoints/last.ckpt" for v in versions}
    rows = {w.split("+=")[1] for w in test if w.startswith("--model.init_args.test_policies+=")}
    assert rows == {"NoMerge", "ToMe", "DTEMHard", "PiToMe", "ToFu", "ATM"}
    assert "--model.init_args.interval_reference=ToMe" in test
    assert "tome_soft_e2e: runs/table6/tome_soft_e2e/checkpoints/last.ckpt" in print_config(test, capsys)
    collect_cmd = parsed["table6"][-1]
    assert collect_cmd[-3:] == ["table6=runs/table6/test/sweep.csv", "--out", "results/table6"]


def test_replicate_seg_sequence(parsed):
    stages = [c[0] for c in dtem_commands(parsed["replicate-seg"])]
    assert stages == ["fit", "test"] * 3  # three training seeds, one test sweep each
    seeds = [
        w for c in dtem_commands(parsed["replicate-seg"]) for w in c if w.startswith("--seed_everything")
    ]
    assert seeds == ["--seed_everything=0"] * 2 + ["--seed_everything=1"] * 2 + ["--seed_everything=2"] * 2


def test_overlays_change_the_model(parsed, capsys):
    mae_l = dtem_commands(parsed["table1-mae-l"])[0]
    out = print_config(mae_l, capsys)
    for needle in ("backbone: vit_large_patch16_224", "global_pool: avg", "embed_dim: 128", "prop_attn: train",
                   "tau1: 0.1", "r: 8"):  # fmt: skip
        assert needle in out, needle
    demo_fit = dtem_commands(parsed["demo"])[0]
    out = print_config(demo_fit, capsys)
    assert "checkpoint_path: checkpoints/cifar10_vit_small.safetensors" in out and "train: policy" in out
