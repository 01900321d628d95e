"""Faults: a fit killed mid-epoch resumes bit-identically, with loader workers too; a DDP job whose worker dies exits
instead of hanging."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CIFAR, needs_shared
from test_cli import CONFIGS, ROOT
from torch.utils.data import DataLoader, Dataset

from dtem_lightning.data.sampling import ResumableDataLoader, ResumableSampler

HELPERS = Path(__file__).parent / "helpers"
# The fits need the subset's size (5 batches of 8 per epoch); without it a fit would fail on a missing root,
# which test_ddp_worker_death_ends_the_job would count as a pass.
needs_cifar = needs_shared(CIFAR)


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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoint folder of an uninterrupted fit with 2 (persistent) loader workers, one checkpoint per step."""
    out = tmp_path_factory.mktemp("full")
    proc = _fit(out, ["--data.init_args.num_workers=2", "--trainer.callbacks.save_top_k=-1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "ckpt"


def _assert_same_weights(expected: Path, actual: Path) -> None:
    a, b = _weights(expected), _weights(actual)
    assert torch.load(actual, weights_only=True)["global_step"] == 10
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ: {differ}"


@needs_cifar
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    """With 2 loader workers, whose iterator Lightning creates before it restores the batch progress."""
    extra = ["--data.init_args.num_workers=2"]
    # Killed as step 3 begins (epoch 0 has 5 batches): the checkpoint after 3 steps is on disk.
    killed = _fit(tmp_path, [*extra, "--trainer.callbacks+=killer.KillAtStep", "--trainer.callbacks.step=3"])
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = _fit(tmp_path, [*extra, f"--ckpt_path={last}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(uninterrupted / "last.ckpt", last)


@needs_cifar
@pytest.mark.parametrize(
    ("workers", "ckpt"),
    [
        pytest.param(0, "epoch=0-step=3.ckpt", id="mid-first-epoch-no-workers"),
        pytest.param(2, "epoch=0-step=5.ckpt", id="epoch-boundary"),
        pytest.param(2, "epoch=1-step=7.ckpt", id="mid-second-epoch", marks=pytest.mark.slow),
    ],
)
def test_resume_from_a_step_checkpoint_matches_uninterrupted(tmp_path, uninterrupted, workers, ckpt):
    """Resumed from the uninterrupted run's checkpoint of a step (what a kill at the next step leaves as last.ckpt).
    Without workers; and with 2 persistent ones where the sampler's epoch, not only its skip, must be right when
    they take their first indices: after the first epoch's last batch, and mid-way through the second epoch. The
    reference ran with workers, so the first case also checks that the worker count does not change the result."""
    resumed = _fit(
        tmp_path, [f"--data.init_args.num_workers={workers}", f"--ckpt_path={uninterrupted / ckpt}"]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(uninterrupted / "last.ckpt", tmp_path / "ckpt" / "last.ckpt")


class _Keys(Dataset):
    """Returns the index of each ``(index, seed)`` key a ResumableSampler yields."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, key: tuple[int, int]) -> int:
        return key[0]


@pytest.mark.parametrize("persistent", [True, False])
def test_workers_take_their_first_indices_at_the_first_batch(persistent):
    """Lightning creates the iterator, then sets the epoch and the resumed skip: the batches must follow these."""
    skip = [0]
    sampler = ResumableSampler(_Keys(), skip_fn=lambda: skip[0], seed=3)
    expected_sampler = ResumableSampler(_Keys(), skip_fn=lambda: 8, seed=3)
    expected_sampler.set_epoch(1)
    expected = [i for i, _ in expected_sampler]
    for cls in (ResumableDataLoader, DataLoader):
        loader = cls(_Keys(), batch_size=4, sampler=sampler, num_workers=2, persistent_workers=persistent)
        for _ in range(2):  # twice: persistent workers reuse their iterator
            sampler.set_epoch(0)
            skip[0] = 0
            it = iter(loader)  # as in FitLoop.setup_data
            sampler.set_epoch(1)  # as in FitLoop.on_advance_start
            skip[0] = 8  # the batch progress as the epoch loop settles it on a resume
            got = torch.cat(list(it)).tolist()
            # A plain DataLoader hands its workers indices at iter(): this checks the test can see the difference.
            assert (got == expected) == (cls is ResumableDataLoader), cls


@needs_cifar
def test_ddp_worker_death_ends_the_job(tmp_path):
    """Rank 1 is SIGKILLed mid-training: the 2-process CPU job exits non-zero within a bounded time."""
    t0 = time.monotonic()
    proc = _fit(tmp_path, ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.callbacks+=killer.KillAtStep",
                           "--trainer.callbacks.step=2", "--trainer.callbacks.rank=1"])  # fmt: skip
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 240
    # Either rank 0's collective fails (a one-line "dtem: error") or Lightning's observer kills it.
    assert "dtem: error" in proc.stderr or proc.returncode < 0, proc.stderr[-2000:]
