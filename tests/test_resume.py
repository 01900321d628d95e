"""Faults: a fit killed mid-epoch resumes bit-identically; a DDP job whose worker dies exits instead of hanging."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import CIFAR, needs_shared
from test_cli import CONFIGS, ROOT

HELPERS = Path(__file__).parent / "helpers"
# Both fits need the subset's size (5 batches of 8 per epoch); without it a fit would fail on a missing root,
# which test_ddp_worker_death_ends_the_job would count as a pass.
pytestmark = needs_shared(CIFAR)


def _fit(out: Path, extra: list[str]) -> subprocess.CompletedProcess:
    args = [
        "fit", "-c", str(CONFIGS / "deit_s_modular.yaml"), "-c", str(CONFIGS / "debug.yaml"),
        f"--data.init_args.root={CIFAR}", f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.max_epochs=2", "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=1",
        "--data.init_args.max_per_class=8", "--data.init_args.train_transform=deit",
        "--model.init_args.backbone_kwargs.drop_path_rate=0.1", "--trainer.logger.init_args.version=0",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_last=true",
        f"--trainer.callbacks.dirpath={out / 'ckpt'}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "dtem_lightning", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)  # fmt: skip


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    full = _fit(tmp_path / "full", [])
    assert full.returncode == 0, full.stderr[-3000:]
    # Killed as step 3 begins (epoch 0 has 5 batches): the checkpoint after 3 steps is on disk.
    killed = _fit(
        tmp_path / "resumed",
        ["--trainer.callbacks+=killer.KillAtStep", "--trainer.callbacks.step=3"],
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = tmp_path / "resumed" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = _fit(tmp_path / "resumed", [f"--ckpt_path={last}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(tmp_path / "full" / "ckpt" / "last.ckpt"), _weights(last)
    assert torch.load(last, weights_only=True)["global_step"] == 10
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_worker_death_ends_the_job(tmp_path):
    """Rank 1 is SIGKILLed mid-training: the 2-process CPU job exits non-zero within a bounded time."""
    t0 = time.monotonic()
    proc = _fit(tmp_path, ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.callbacks+=killer.KillAtStep",
                           "--trainer.callbacks.step=2", "--trainer.callbacks.rank=1"])  # fmt: skip
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 240
    # Either rank 0's collective fails (a one-line "dtem: error") or Lightning's observer kills it.
    assert "dtem: error" in proc.stderr or proc.returncode < 0, proc.stderr[-2000:]
