"""SyntheticDataModule: random images whose class sets their mean colour (tests only; nothing is read)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset

from dtem_lightning.data.base import BaseDataModule
from dtem_lightning.data.store import thin


class SyntheticDataModule(BaseDataModule):
    """Gaussian-noise images around one random mean colour per class, so a few steps can raise accuracy.

    Tensors are made directly in normalised space (no transforms); labels are balanced (index mod classes).
    Everything is fixed by ``seed``: train, val and test are independent draws around the same class colours.

    Args:
        num_classes: number of classes.
        num_samples: images per split (before ``max_per_split``).
        img_size: square image side.
        noise: per-pixel standard deviation around the class colour (colours are uniform in [-1, 1]).
        seed: generator seed.
        **kwargs: see :class:`~dtem_lightning.data.base.BaseDataModule`.
    """

    def __init__(
        self,
        num_classes: int = 10,
        num_samples: int = 64,
        img_size: int = 32,
        noise: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(img_size=img_size, crop_pct=None, **kwargs)  # no transforms: crop_pct is meaningless
        self.save_hyperparameters()
        if num_classes < 1 or num_samples < 1:
            raise ValueError(f"num_classes and num_samples must be >= 1, got {num_classes}, {num_samples}")
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.noise = noise
        self.seed = seed

    def _dataset(self, split: str, train: bool) -> TensorDataset:
        g = torch.Generator().manual_seed(self.seed)
        colours = torch.rand(self.num_classes, 3, generator=g) * 2 - 1  # same for every split
        g.manual_seed(self.seed + 1 + ("train", "val", "test").index(split))
        y = torch.arange(self.num_samples) % self.num_classes
        x = colours[y][:, :, None, None] + self.noise * torch.randn(
            self.num_samples, *self.input_size, generator=g
        )
        keep = thin(range(self.num_samples), self.max_per_split)
        return TensorDataset(x[keep], y[keep])

    def setup(self, stage: str | None = None) -> None:
        """Make the three splits (cheap and deterministic, so every stage gets all of them)."""
        super().setup(None)

    def announce_fields(self) -> dict[str, object]:
        return {"root": "none (generated)", "seed": self.seed}
