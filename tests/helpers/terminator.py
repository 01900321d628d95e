"""Test helper callback: a process that receives SIGTERM (pre-emption, ``docker stop``) after a given step."""

from __future__ import annotations

import os
import signal

import lightning as L


class TermAtStep(L.Callback):
    """Send this process SIGTERM once training step ``step`` has finished (as a scheduler would, between steps)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
