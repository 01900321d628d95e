"""Test helper callbacks: a process that dies after a given training step or in the middle of a checkpoint write, or
whose checkpoint write fails as on a full disk."""

from __future__ import annotations

import os
import resource
import shutil
import signal
from pathlib import Path

import lightning as L


class KillAtStep(L.Callback):
    """Kill the process (only rank ``rank`` if given) when step ``step`` begins, after the previous checkpoint."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGKILL)


class DieWritingLastCheckpoint(L.Callback):
    """When training ends, before the final ``last.ckpt`` is written: copy the current one to ``last.ckpt.before``,
    then cap this process's file size at half of it, so that the next checkpoint write is cut off midway and the
    kernel kills the process (SIGXFSZ) during the write, whichever code does the writing."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = Path(trainer.checkpoint_callback.last_model_path)
        shutil.copyfile(last, f"{last}.before")
        size = last.stat().st_size // 2
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it (writes then fail with EFBIG): die
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


class FullDiskWritingLastCheckpoint(L.Callback):
    """When training ends, before the final ``last.ckpt`` is written: copy the current one to ``last.ckpt.before``,
    then cap this process's file size at half of it with SIGXFSZ ignored (Python's default), so that the next
    checkpoint write fails midway with an OSError (EFBIG), as a write to a full disk fails with ENOSPC."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = Path(trainer.checkpoint_callback.last_model_path)
        shutil.copyfile(last, f"{last}.before")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        size = last.stat().st_size // 2
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
