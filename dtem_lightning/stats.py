"""Pure tensor functions for paired bootstrap intervals of sweep differences.

A metric is computed from per-sample statistics that add up over samples: top-1 correctness [n] (accuracy =
sum / n), per-image CIDEr-D [n] (corpus CIDEr-D = sum / n), per-image class counts [n, 3, K] (mIoU of the summed
counts). A bootstrap resample draws n sample indices with replacement; a row's metric on it is its statistic
of the resampled sums. Paired: every row of a sweep is evaluated on the same resamples, so the difference of
two rows is taken image by image and the test set's shared difficulty cancels.

Shapes: n samples, R resamples, S the shape of one sample's statistic (() or (3, K)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

# statistic(totals [R, *S], n) -> metric [R]: the metric of R corpora of n samples, from their summed statistics
Statistic = Callable[[Tensor, int], Tensor]

# Resample rows generated at once: bounds the [rows, n] index and count matrices to about 32 MB (float64).
_CHUNK_ELEMENTS = 2**22


def mean_statistic(totals: Tensor, n: int) -> Tensor:
    """Mean of per-sample scalars: totals [R] -> [R] (accuracy from correctness, CIDEr-D from per-image scores)."""
    return totals / n


def class_counts(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Per-image intersection, target and prediction pixel counts of each class.

    They are the diagonal, row sums and column sums of each image's confusion matrix: all that mIoU reads from
    it, at 3·K numbers per image instead of K² (ADE20K's K = 150 would be 22,500). Pixels whose target is
    ``ignore_index`` are left out, as torchmetrics does.

    Args:
        preds: [B, H, W] predicted labels in [0, K).
        target: [B, H, W] labels in [0, K) or ``ignore_index``.
        num_classes: K.
        ignore_index: the label of ignored pixels.

    Returns:
        [B, 3, K] int64: (intersection, target count, predicted count) per class.
    """
    B, K = preds.shape[0], num_classes
    valid = (target != ignore_index) & (target >= 0) & (target < K)  # in range: no spill into another image
    preds, target = preds.reshape(B, -1).long(), target.reshape(B, -1).long()
    valid = valid.reshape(B, -1)
    offset = torch.arange(B, device=preds.device)[:, None] * (K + 1)  # bin K of each image: dropped pixels

    def count(labels: Tensor, keep: Tensor) -> Tensor:
        bins = (offset + torch.where(keep, labels, K)).flatten()
        return torch.bincount(bins, minlength=B * (K + 1)).view(B, K + 1)[:, :K]

    hit = valid & (preds == target)
    return torch.stack([count(target, hit), count(target, valid), count(preds, valid)], dim=1)


def miou_of_counts(totals: Tensor, n: int = 0) -> Tensor:
    """mIoU of summed class counts, as torchmetrics' macro ``MulticlassJaccardIndex`` computes it.

    IoU_k = I_k / (T_k + P_k - I_k); the mean runs over the classes present in target or prediction (a class
    with an empty union has weight 0). In float64.

    Args:
        totals: [..., 3, K] summed (intersection, target, prediction) counts (see :func:`class_counts`).
        n: samples summed (unused; the :data:`Statistic` signature).

    Returns:
        [...] mIoU.
    """
    inter, tgt, pred = totals.double().unbind(-2)
    union = tgt + pred - inter
    present = union > 0
    iou = torch.where(present, inter / union.clamp(min=1), torch.zeros_like(union))
    return iou.sum(-1) / present.sum(-1).clamp(min=1)


def first_occurrences(index: Tensor) -> Tensor:
    """Positions that put samples in index order, each index once (the first of its copies kept).

    A DistributedSampler pads the last round by repeating the first samples, and DDP gathers rank by rank; this
    order makes the statistics of any number of processes the same [n] sequence as one process's.

    Args:
        index: [m] dataset index of each gathered sample (duplicates allowed).

    Returns:
        [n] positions into ``index`` (n = distinct indices), sorted by index.
    """
    order = torch.argsort(index, stable=True)
    ranked = index[order]
    keep = torch.ones_like(ranked, dtype=torch.bool)
    keep[1:] = ranked[1:] != ranked[:-1]
    return order[keep]


def resample_indices(n: int, resamples: int, seed: int) -> Iterator[Tensor]:
    """Bootstrap resamples of n samples, drawn with replacement by a generator seeded with ``seed``.

    Yields:
        [c, n] int64 sample indices, c rows at a time (c depends on n only); ``resamples`` rows in all.
    """
    g = torch.Generator().manual_seed(seed)
    rows = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, resamples, rows):
        yield torch.randint(0, n, (min(rows, resamples - start), n), generator=g)


def bootstrap(
    stats: Mapping[str, Tensor], statistic: Statistic, resamples: int, seed: int
) -> dict[str, Tensor]:
    """Every row's metric on the same bootstrap resamples.

    Args:
        stats: row -> [n, *S] per-sample statistics (the same n samples, in the same order, for every row).
        statistic: metric of summed statistics (see :data:`Statistic`).
        resamples: R.
        seed: seed of the resampling (the same seed gives the same resamples).

    Returns:
        row -> [R] float64 metric on each resample.
    """
    if not stats:
        return {}
    n = len(next(iter(stats.values())))
    flat = {k: s.reshape(n, -1).double().cpu() for k, s in stats.items()}  # [n, D]
    out: dict[str, list[Tensor]] = {k: [] for k in stats}
    for idx in resample_indices(n, resamples, seed):
        # counts[j, i]: copies of sample i in resample j; its sums are one matmul, exact in float64
        counts = torch.zeros(idx.shape[0], n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(idx.shape, dtype=torch.float64)
        )
        for k, s in flat.items():
            totals = (counts @ s).view(idx.shape[0], *stats[k].shape[1:])
            out[k].append(statistic(totals, n).double().reshape(-1))
    return {k: torch.cat(v) for k, v in out.items()}


def percentile_interval(samples: Tensor, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval: the (1 - level)/2 and (1 + level)/2 quantiles of ``samples`` [R].

    Quantiles interpolate linearly between order statistics (numpy's default ``percentile``).
    """
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(samples.double(), q).tolist()
    return lo, hi


def paired_difference(
    a: Tensor, b: Tensor, boot_a: Tensor, boot_b: Tensor, statistic: Statistic, level: float = 0.95
) -> tuple[float, float, float]:
    """Difference metric(a) - metric(b) on all samples and its paired percentile interval.

    Args:
        a: [n, *S] per-sample statistics of the row.
        b: [n, *S] those of the reference row (the same samples in the same order).
        boot_a: [R] the row's metric on each resample (:func:`bootstrap`).
        boot_b: [R] the reference's metric on the same resamples.
        statistic: the metric of summed statistics.
        level: coverage of the interval.

    Returns:
        (difference, lower, upper).
    """
    n = len(a)
    full_a = statistic(a.double().sum(0, keepdim=True), n)
    full_b = statistic(b.double().sum(0, keepdim=True), n)
    lo, hi = percentile_interval(boot_a - boot_b, level)
    return float(full_a - full_b), lo, hi


def paired_bootstrap(
    a: Tensor, b: Tensor, statistic: Statistic = mean_statistic, resamples: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:  # fmt: skip
    """Paired bootstrap of metric(a) - metric(b): (difference, lower, upper) of a ``level`` interval.

    Args:
        a: [n, *S] per-sample statistics of one row.
        b: [n, *S] those of the reference row on the same samples.
        statistic: metric of summed statistics (default: the mean).
        resamples: R.
        seed: resampling seed.
        level: coverage.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired rows need the same samples: shapes {tuple(a.shape)} and {tuple(b.shape)}")
    boot = bootstrap({"a": a, "b": b}, statistic, resamples, seed)
    return paired_difference(a, b, boot["a"], boot["b"], statistic, level)
