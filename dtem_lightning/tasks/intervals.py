"""Paired intervals of the sweep: per-sample statistics, gathered over processes, against a reference row."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dtem_lightning import stats
from dtem_lightning.encoder import r_key
from dtem_lightning.policy import NoMerge


class IntervalMixin:
    """Per-sample statistics of the sweep's rows and the paired bootstrap intervals of the ``d_<metric>`` columns.

    A task names its ``interval_metric`` and implements :meth:`sample_stats` (and :meth:`interval_statistic`
    when the metric is not a mean); the sweep keeps the statistics of the rows :meth:`interval_pairs` compares.
    """

    interval_metric: str | None = None  # metric column that gets paired intervals; None: the task has none

    def sample_stats(self, preds: Any, target: Any) -> Tensor | None:
        """Per-sample statistics [B, *S] of one test batch whose sums over samples give ``interval_metric``
        (see :meth:`interval_statistic`); None (the default): none kept per batch."""
        return None

    def interval_statistic(self, totals: Tensor, n: int) -> Tensor:
        """``interval_metric`` [R] of R corpora of n samples from their summed statistics ``totals`` [R, *S]."""
        return stats.mean_statistic(totals, n)

    def row_sample_stats(self, key: str) -> Tensor | None:
        """Per-sample statistics [m, *S] of sweep row ``key`` from every process, rank after rank, each rank in
        batch order (torchmetrics gathers list states in this order too). Called by ``on_test_epoch_end`` on
        every process after the row's metrics are computed and before they are reset."""
        local = self._test_stats.get(key)
        return self._gather(torch.cat(local)) if local else None

    def interval_pairs(self) -> dict[int, int]:
        """Position in :meth:`sweep` -> position of its reference row (``interval_reference``); {}: no intervals.

        The reference is the row labelled ``interval_reference`` at the same r (a policy swept once, NoMerge,
        is the reference of every r); when two policies share that label, the first one. The reference's
        own rows and NoMerge rows have none.
        """
        ref, entries = self.hparams.interval_reference, self.sweep()
        if ref is None or self.hparams.bootstrap <= 0 or self.interval_metric is None:
            return {}
        owner = next((i for i, label, _, _ in entries if label == ref), None)
        if owner is None:
            return {}
        refs = [(j, p, r) for j, (i, _, p, r) in enumerate(entries) if i == owner]
        pairs = {}
        for j, (i, _, p, r) in enumerate(entries):
            if i == owner or isinstance(p, NoMerge):
                continue
            match = [k for k, q, rr in refs if isinstance(q, NoMerge) or r_key(rr) == r_key(r)]
            if match:
                pairs[j] = match[0]
        return pairs

    @staticmethod
    def _gather(t: Tensor) -> Tensor:
        """``t`` [m, ...] of every process concatenated rank after rank (sizes may differ); ``t`` alone without
        DDP."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return t
        from torchmetrics.utilities.distributed import gather_all_tensors

        return torch.cat(gather_all_tensors(t.contiguous()))

    def _reset_sample_stats(self) -> None:
        self._test_stats: dict[str, list[Tensor]] = {}  # row key -> per-batch [B, *S] statistics
        self._test_index: list[Tensor] = []  # per-batch [B] dataset indices of the samples
        self._test_batches: list[list[int]] | None = None  # this process's batches as its sampler lists them
        self._test_seen = 0
        self._keep_stats = False
        self.sweep_note = ""

    def _sampler_batches(self) -> list[list[int]] | None:
        """Dataset indices of each test batch of this process, as its (distributed) sampler lists them."""
        loader = self.trainer.test_dataloaders if self._trainer is not None else None
        if isinstance(loader, list | tuple):
            loader = loader[0] if len(loader) == 1 else None
        batch_sampler = getattr(loader, "batch_sampler", None)
        if batch_sampler is None:  # an iterable dataset: no indices to read
            return None
        return [list(b) for b in batch_sampler]  # test samplers do not shuffle: the order of the loop

    def _sample_index(self, batch: Any, batch_idx: int) -> Tensor:
        """[B] dataset indices of the samples of test batch ``batch_idx`` of this process.

        Read from the sampler (a DistributedSampler's padding repeats indices: ``on_test_epoch_end`` keeps each
        sample once). Without a sampler, the position in the loop, interleaved over processes as a
        DistributedSampler deals them out: unique, so nothing is dropped.
        """
        size = self.batch_size_of(batch)
        order = self._test_batches
        if order is not None:
            if batch_idx >= len(order) or len(order[batch_idx]) != size:
                raise RuntimeError(
                    f"test batch {batch_idx} holds {size} samples but the sampler lists "
                    f"{len(order[batch_idx]) if batch_idx < len(order) else 'no'} batch there: cannot pair "
                    "per-sample statistics (set --model.init_args.bootstrap=0 to skip the intervals)"
                )
            return torch.tensor(order[batch_idx], dtype=torch.long)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        position = self._test_seen + torch.arange(size)
        self._test_seen += size
        return position * world + rank

    def _add_intervals(self, row_stats: dict[str, Tensor]) -> str:
        """Fill the ``d_<metric>`` columns of ``sweep_results`` from gathered per-sample statistics.

        Args:
            row_stats: row key -> [m, *S] statistics of the rows in :meth:`interval_pairs`, rank after rank.

        Returns:
            A note saying what the columns hold ("" when there are none).
        """
        pairs, entries = self.interval_pairs(), self.sweep()
        keys = [self.sweep_key(i, r) for i, _, _, r in entries]
        used = sorted({keys[j] for pair in pairs.items() for j in pair})
        if not pairs or not self._test_index or any(k not in row_stats for k in used):
            return ""
        index = self._gather(torch.cat(self._test_index).to(self.device)).cpu()
        for k in used:
            if len(row_stats[k]) != len(index):
                raise RuntimeError(
                    f"per-sample statistics of {k} cover {len(row_stats[k])} samples but the test loop indexed "
                    f"{len(index)}"
                )
        once = stats.first_occurrences(index)  # dataset order, padded duplicates out: any world size alike
        per_row = {k: row_stats[k].cpu()[once] for k in used}
        R, seed, level = self.hparams.bootstrap, self.hparams.bootstrap_seed, 0.95
        boot = stats.bootstrap(per_row, self.interval_statistic, R, seed)
        m, ref = self.interval_metric, self.hparams.interval_reference
        for j, row in enumerate(self.sweep_results):
            d = lo = hi = name = None
            if j in pairs:
                a, b = keys[j], keys[pairs[j]]
                d, lo, hi = stats.paired_difference(
                    per_row[a], per_row[b], boot[a], boot[b], self.interval_statistic, level
                )
                name = ref
            row.update({f"d_{m}": d, f"d_{m}_lo": lo, f"d_{m}_hi": hi, "d_ref": name})
        n, padded = len(once), len(index) - len(once)
        at = "" if isinstance(entries[next(iter(pairs.values()))][2], NoMerge) else " at the same r"
        note = (
            f"d_{m}: {m} minus the {ref} row{at}, with its paired bootstrap {level:.0%} percentile "
            f"interval [d_{m}_lo, d_{m}_hi] over the same {n} test samples ({R} resamples, seed {seed})."
        )
        if padded:
            note += (
                f" The distributed sampler repeated {padded} sample(s) to fill the last batches: the intervals "
                "count each sample once, the metric columns count the repeats."
            )
        return note
