"""Learning-rate schedules shared by every task (no Lightning, no model code)."""

from __future__ import annotations

import math

import torch


class CosineLR(torch.optim.lr_scheduler.LambdaLR):
    """Per-step cosine decay from the base lr to ``min_lr`` after optional linear warm-up.

    Args:
        optimizer: the optimizer.
        total_steps: steps of the whole run; None lets the task fill in ``trainer.estimated_stepping_batches``.
        warmup_steps: linear warm-up steps from 0.
        min_lr: final learning rate.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
    ) -> None:
        self.total_steps, self.warmup_steps, self.min_lr = total_steps, warmup_steps, min_lr
        base = [g["lr"] for g in optimizer.param_groups]
        lambdas = [lambda step, b=b: self._factor(step, b) for b in base]
        super().__init__(optimizer, lambdas)

    def _factor(self, step: int, base_lr: float) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        total = max(1, (self.total_steps or 1) - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / total)
        floor = self.min_lr / base_lr if base_lr > 0 else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
