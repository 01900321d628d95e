"""The paper's Table 7 analysis: how far a learned merging embedding departs from the keys ToMe matches on.

Per block, on the same tokens: Kendall's tau between the similarities of (source, destination) pairs of the hard
split computed on the keys (averaged over heads, ToMe's metric) and on the embedding, and the share of the r
sources the embedding merges that ToMe would also merge. Pure functions plus one recording policy; the script is
``experiments/table7.py``.

Shapes: B images, N tokens (P prefix first), C channels, M sampled pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dtem_lightning import merge as M
from dtem_lightning.policy import DTEMHard


def kendall_tau(a: Tensor, b: Tensor) -> Tensor:
    """Kendall's tau-a between the rankings of ``a`` and ``b`` [..., M] along the last axis (O(M²) memory).

    tau = (concordant - discordant) / (M (M - 1) / 2); tied pairs count as neither.

    Returns:
        [...] in [-1, 1].
    """
    m = a.shape[-1]
    if m < 2:
        raise ValueError(f"kendall_tau needs at least 2 values, got {m}")
    da = (a[..., :, None] - a[..., None, :]).sign()
    db = (b[..., :, None] - b[..., None, :]).sign()
    return (da * db).sum((-1, -2)) / (m * (m - 1))  # each unordered pair counted twice, as is m (m - 1)


def merge_agreement(key_metric: Tensor, embed_metric: Tensor, r: int, num_prefix: int) -> Tensor:
    """Share of the r sources merged on ``embed_metric`` that ToMe's rule on ``key_metric`` also merges.

    Returns:
        [B] in [0, 1] (1 when r is 0: nothing to disagree on).
    """
    src_key = M.bipartite_pairs(key_metric, r, num_prefix)[0]
    src_emb = M.bipartite_pairs(embed_metric, r, num_prefix)[0]
    if src_key.shape[1] == 0:
        return torch.ones(key_metric.shape[0])
    same = (src_emb[:, :, None] == src_key[:, None, :]).any(-1)
    return same.float().mean(-1)


class RecordingDTEM(DTEMHard):
    """DTEM (hard) that records, per block with r > 0, Kendall's tau between key and embedding similarities and
    the merge agreement with ToMe on the tokens that block sees. ``pairs`` caps the pairs tau is computed on
    (a fixed random subset per block, drawn from ``seed``: tau is O(pairs²))."""

    def __init__(self, r: int | list[int] = 0, pairs: int = 1024, seed: int = 0, **kwargs: object) -> None:
        super().__init__(r=r, **kwargs)
        self.pairs, self.seed = pairs, seed
        self.records: dict[int, dict[str, list[Tensor]]] = {}

    def metric(self, layer: int, u: Tensor) -> Tensor | None:
        """The embedding (called only in blocks with r > 0), recorded against the keys ``step`` handed over."""
        embed_metric = super().metric(layer, u)
        key_metric = None if self.state.keys is None else self.state.keys.mean(1)
        if key_metric is not None:
            sk = M.split_similarity(key_metric, self.num_prefix).flatten(1)
            se = M.split_similarity(embed_metric, self.num_prefix).flatten(1)
            if sk.shape[1] > self.pairs:
                g = torch.Generator().manual_seed(self.seed + layer)
                pick = torch.randperm(sk.shape[1], generator=g)[: self.pairs].to(sk.device)
                sk, se = sk[:, pick], se[:, pick]
            rec = self.records.setdefault(layer, {"tau": [], "agree": []})
            rec["tau"].append(kendall_tau(sk, se).cpu())
            agree = merge_agreement(key_metric, embed_metric, self.schedule[layer], self.num_prefix)
            rec["agree"].append(agree.cpu())
        return embed_metric

    def summary(self, groups: int = 3) -> list[dict[str, float | str]]:
        """Mean tau and agreement over images for blocks grouped into ``groups`` consecutive groups (the paper:
        1-4 / 5-8 / 9-12 of 12 blocks), blocks numbered from 1; blocks with r = 0 are left out."""
        bounds = torch.linspace(0, self.depth, groups + 1).round().long().tolist()
        rows = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            layers = [b for b in range(lo, hi) if b in self.records]
            if not layers:
                continue
            tau = torch.cat([t for b in layers for t in self.records[b]["tau"]])
            agree = torch.cat([t for b in layers for t in self.records[b]["agree"]])
            rows.append({"blocks": f"{lo + 1}-{hi}", "tau": float(tau.mean()), "agree": float(agree.mean())})
        return rows
