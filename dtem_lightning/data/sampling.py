"""Training order that resumes exactly: a (seed, epoch)-determined shuffle and per-sample augmentation seeds."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def _global_seed() -> int:
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


class ResumableSampler(DistributedSampler):
    """Shuffled order that is a function of (seed, epoch) and can skip what an interrupted run consumed.

    Yields ``(index, sample_seed)`` pairs for :class:`SeededDataset`. Shards across DDP processes itself (Lightning
    leaves a ``DistributedSampler`` alone); in one process it is a plain seeded shuffle.

    The epoch and the skip count are read when the first index is drawn, so that must happen once Lightning has
    called ``set_epoch`` and settled the resumed batch progress: with loader workers, load through
    :class:`ResumableDataLoader`, which defers the workers' first indices to the first batch request.

    Args:
        dataset: the training dataset.
        skip_fn: samples of this process to skip at the start of the next iteration (resume mid-epoch).
        seed: base seed (default: the one ``seed_everything`` set).
    """

    def __init__(
        self, dataset: Dataset, skip_fn: Callable[[], int] | None = None, seed: int | None = None
    ) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        super().__init__(
            dataset,
            num_replicas=torch.distributed.get_world_size() if distributed else 1,
            rank=torch.distributed.get_rank() if distributed else 0,
            shuffle=True,
            seed=_global_seed() if seed is None else seed,
        )
        self.skip_fn = skip_fn

    def __iter__(self):  # noqa: ANN204
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        order += order[: self.total_size - len(order)]  # pad to a multiple of the process count
        mine = list(enumerate(order))[self.rank : self.total_size : self.num_replicas]
        skip = self.skip_fn() if self.skip_fn else 0
        for pos, index in mine[skip:]:
            yield index, (self.seed * 1_000_003 + self.epoch) * 10_000_019 + pos


class SeededDataset(Dataset):
    """Runs each sample's random augmentation under its own seed, independent of the global RNG timeline."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.base[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __getattr__(self, name: str) -> Any:  # e.g. .samples, .classes of the wrapped dataset
        # not dunders: the loader's fetcher would take e.g. a Subset's __getitems__ and bypass the seeds
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose workers get their first indices at the first batch request, not at ``iter()``.

    With workers, ``iter(DataLoader)`` at once hands ``prefetch_factor * num_workers`` batches of indices to the
    workers, which fixes the sampler's epoch and skip count then. Lightning creates the training iterator in
    ``FitLoop.setup_data``: before ``set_epoch``, before its epoch loop settles a resumed batch progress, and even
    before the checkpoint's loops are loaded when ``configure_optimizers`` asks for
    ``trainer.estimated_stepping_batches``; :class:`ResumableSampler` would start from the wrong epoch or position.
    Started at the first ``next()`` instead, the order is fixed at the same moment as with ``num_workers=0`` (where
    the sampler is lazy anyway). Persistent workers are kept: a deferred start is the same ``DataLoader.__iter__``
    call, made later (it resets the persistent iterator).
    """

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers == 0:
            return super().__iter__()  # single-process iterators draw no index before the first next()
        return _StartOnFirstNext(self)


class _StartOnFirstNext(Iterator[Any]):
    """Iterator of a :class:`ResumableDataLoader` that creates (or resets) the loader's real one on first use."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self._loader = loader
        self._iterator: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = DataLoader.__iter__(self._loader)  # the sampler's order is fixed here
        return next(self._iterator)

    def __len__(self) -> int:
        return len(self._loader)


def samples_done_this_epoch(trainer: L.Trainer | None, batch_size: int) -> int:
    """Training samples this process already consumed in the current epoch (non-zero after a resume).

    Exact only from the first batch request of the epoch on: when Lightning creates the training iterator, the
    epoch loop has not yet reset the resumed batch progress (see :class:`ResumableDataLoader`).
    """
    if trainer is None or not trainer.training:
        return 0
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed * batch_size
