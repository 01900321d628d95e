"""Predict: one row per sample in ``predictions.csv``, named by the source image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dtem_lightning.io import write_csv


def source_names(dataset: Any) -> list[str]:
    """Image names of a dataset's samples in index order, as the dataset stores them (``samples`` of (name, ...)
    or ``pairs`` of (image, label) names); [] when it does not list them."""
    items = getattr(dataset, "samples", None) or getattr(dataset, "pairs", None) or []
    try:
        return [str(item[0]) for item in items]
    except (TypeError, IndexError):
        return []


class PredictMixin:
    """``predict_step`` rows (the image name, then the task's :meth:`predict_rows`) and ``predictions.csv``."""

    def start_predictions(self) -> None:
        """Read the source names of the predict dataset (relative to the data root) and clear the rows."""
        names = source_names(getattr(self._predict_loader(), "dataset", None))
        root = getattr(getattr(self.trainer, "datamodule", None), "root", None)
        if root is not None and Path(root).is_dir():  # names relative to the data root the user gave
            names = [os.path.relpath(n, root) if os.path.isabs(n) else n for n in names]
        self._predict_names = names
        self._predict_rows: list[dict[str, Any]] = []

    def _predict_loader(self) -> Any:
        loader = self.trainer.predict_dataloaders
        return loader[0] if isinstance(loader, list | tuple) else loader

    def predict_names(self, batch_idx: int, n: int) -> list[str]:
        """Source names (image names as the dataset stores them) of the ``n`` samples of predict batch
        ``batch_idx``; their dataset index when the dataset does not name them."""
        # Lightning wraps the predict batch sampler and records the indices of each batch it yields (iterating
        # the wrapper here would consume the loop's own iterator).
        seen = getattr(getattr(self._predict_loader(), "batch_sampler", None), "seen_batch_indices", None)
        index = seen[batch_idx] if seen and batch_idx < len(seen) else [batch_idx * n + j for j in range(n)]
        names = getattr(self, "_predict_names", [])
        return [names[i] if i < len(names) else f"{i:05d}" for i in index[:n]]

    def predict_rows(self, batch: Any) -> list[dict[str, Any]]:
        """One row of ``predictions.csv`` per sample of a predict batch (the task's own columns)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement predict")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Rows of ``predictions.csv``: the source image's name, then the task's columns (:meth:`predict_rows`)."""
        rows = self.predict_rows(batch)
        rows = [{"image": name, **row} for name, row in zip(self.predict_names(batch_idx, len(rows)), rows)]
        self._predict_rows += rows
        return rows

    def on_predict_epoch_end(self) -> None:
        """Write ``<run>/predictions.csv`` (``predictions_rank<k>.csv`` per process under DDP)."""
        rows = getattr(self, "_predict_rows", [])
        if not rows or not self.trainer.log_dir:
            return
        name = (
            "predictions.csv" if self.trainer.world_size == 1 else f"predictions_rank{self.global_rank}.csv"
        )
        path = write_csv(Path(self.trainer.log_dir) / name, rows, list(rows[0]))
        self.print(f"{len(rows)} predictions written to {path}")
