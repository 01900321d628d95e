"""Test helper callback: SIGKILLs its own process after a given training step (simulates a crashed job)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """Kill the process when step ``step`` begins, i.e. after step ``step - 1``'s checkpoints were written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
