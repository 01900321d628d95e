"""SyntheticDataModule: random images whose class sets their mean colour (tests only; nothing is read)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from dtem_lightning.data.base import BaseDataModule


class SyntheticDataModule(BaseDataModule):
    """Gaussian-noise images around one random mean colour per class, so a few steps can raise accuracy.

    Tensors are made directly in normalised space (no transforms); labels are balanced (index mod classes).
    Everything is fixed by ``seed``: train, val and test are independent draws around the same class colours.

    Args:
        num_classes: number of classes.
        num_samples: images per split.
        img_size: square image side.
        noise: per-pixel standard deviation around the class colour (colours are uniform in [-1, 1]).
        seed: generator seed.
        batch_size: see ``BaseDataModule``.
        num_workers: see ``BaseDataModule``.
        backbone: see ``BaseDataModule``.
        pin_memory: see ``BaseDataModule``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        num_samples: int = 64,
        img_size: int = 32,
        noise: float = 1.0,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        backbone: str = "vit_tiny_patch16_224",
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, backbone, img_size=img_size, pin_memory=pin_memory)
        self.save_hyperparameters()
        if num_classes < 1 or num_samples < 1:
            raise ValueError(f"num_classes and num_samples must be >= 1, got {num_classes}, {num_samples}")
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.noise = noise
        self.seed = seed

    def _split(self, offset: int) -> TensorDataset:
        g = torch.Generator().manual_seed(self.seed)
        colours = torch.rand(self.num_classes, 3, generator=g) * 2 - 1  # same for every split
        g.manual_seed(self.seed + 1 + offset)
        y = torch.arange(self.num_samples) % self.num_classes
        x = colours[y][:, :, None, None] + self.noise * torch.randn(
            self.num_samples, *self.input_size, generator=g
        )
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        """Make the three splits (cheap and deterministic, so every stage gets all of them)."""
        self.train_dataset = self._split(0)
        self.val_dataset = self._split(1)
        self.test_dataset = self._split(2)
        n = self.num_samples
        self.announce(
            {"train": n, "val": n, "test": n}, self.num_classes, root="none (generated)", seed=self.seed
        )
