"""Pure tensor functions for token merging: bipartite matching, DTEM's soft grouping, merging and tracing.

Nothing here knows about nn.Module or timm. Shapes: B batch, N tokens (P prefix tokens first), C channels,
N0 tokens at the start of the network. Sizes ``s`` count how many input patches a token stands for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

MergeFn = Callable[[Tensor], Tensor]

SIZE_EPS = 1e-6  # log(s + eps) in the attention bias: finite and differentiable at s = 0


def r_schedule(r: int | Sequence[int], depth: int) -> list[int]:
    """Expand ``r`` to one reduction per block.

    Args:
        r: tokens removed in every block (int) or one value per block (sequence of length ``depth``).
        depth: number of blocks.

    Returns:
        ``depth`` non-negative ints.
    """
    if isinstance(r, bool) or not isinstance(r, int | Sequence):
        raise TypeError(f"r must be an int or a list of ints, got {r!r}")
    rs = [r] * depth if isinstance(r, int) else list(r)
    if len(rs) != depth:
        raise ValueError(f"r has {len(rs)} entries but the model has {depth} blocks: {list(rs)}")
    for v in rs:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"r must hold ints, got {v!r} in {rs}")
        if v < 0:
            raise ValueError(f"r must be >= 0, got {v} in {rs}")
    return rs


def parse_r(r: int | str | Sequence[int]) -> int | list[int]:
    """One reduction rate as a config or command line gives it: a constant or a per-block schedule.

    ``16`` or ``"16"`` -> 16; ``[8, 4, 0]`` or ``"8,4,0"`` (the form ``experiments/headroom.py --r`` takes)
    -> [8, 4, 0]. The schedule's length is checked against the model later (:func:`r_schedule`).
    """
    if isinstance(r, str):
        text = r.strip().removeprefix("[").removesuffix("]")
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"r must be an int or comma-separated ints such as '8,4,0', got {r!r}") from None
        r = values if "," in text else values[0]
    if isinstance(r, bool) or not isinstance(r, int | Sequence):
        raise TypeError(f"r must be an int or a list of ints, got {r!r}")
    rs = r_schedule(r, 1 if isinstance(r, int) else len(r))  # types and signs; the length comes later
    return r if isinstance(r, int) else rs


def r_label(r: int | Sequence[int]) -> int | str:
    """Printable form of a reduction rate for tables and plots: 16 -> 16, [8, 4, 0] -> ``"8,4,0"``."""
    return r if isinstance(r, int) else ",".join(str(v) for v in r)


def r_key(r: int | Sequence[int]) -> str:
    """Key-safe form of a reduction rate for metric and log names: 16 -> ``"16"``, [8, 4, 0] -> ``"8-4-0"``."""
    return str(r) if isinstance(r, int) else "-".join(str(v) for v in r)


def capped_r(r: int, num_patch: int) -> int:
    """The per-block cap of hard merging (docs/design.md §3): at most half the patch tokens left merge away.

    The one place the rule is written: :func:`token_counts`, :func:`bipartite_matching` and the policy's
    warning about an r larger than the input allows all use it.

    Args:
        r: tokens the block would remove.
        num_patch: patch tokens entering the block (prefix tokens excluded).
    """
    return min(r, num_patch // 2)


def token_counts(num_tokens: int, num_prefix: int, schedule: Sequence[int]) -> list[int]:
    """Token count after each block of hard merging, with r capped at (patch tokens) // 2 per block.

    Args:
        num_tokens: tokens entering block 0, prefix included.
        num_prefix: prefix tokens (class, distillation, registers), never merged.
        schedule: r per block.

    Returns:
        one count per block.
    """
    counts, n = [], num_tokens
    for r in schedule:
        n -= capped_r(r, n - num_prefix)
        counts.append(n)
    return counts


def normalize(metric: Tensor) -> Tensor:
    """Unit-normalise ``metric`` [..., C] along C (cosine similarity by dot product)."""
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def hard_split_offset(num_prefix: int) -> int:
    """Patch position of the first destination of the hard split (docs/design.md §3): the patches at odd sequence index.

    ToMe alternates over the whole sequence, prefix tokens included (even index: sources, odd: destinations),
    and protects the prefix tokens. With one prefix token (class) the destinations are patch positions
    0, 2, 4, ...; with two (class + distillation) or none they are 1, 3, 5, ....

    Args:
        num_prefix: prefix tokens before the patch tokens.

    Returns:
        0 or 1.
    """
    if num_prefix < 0:
        raise ValueError(f"num_prefix must be >= 0, got {num_prefix}")
    return 0 if num_prefix % 2 else 1


def split_similarity(metric: Tensor, num_prefix: int) -> Tensor:
    """Cosine similarities of the hard split's sources (rows) and destinations (columns), in float32 or wider.

    Args:
        metric: [B, N, C] similarity features; the split is :func:`hard_split_offset`'s.

    Returns:
        [B, Ns, Nd].
    """
    off = hard_split_offset(num_prefix)
    m = normalize(metric[:, num_prefix:].float())
    return m[:, 1 - off :: 2] @ m[:, off::2].transpose(1, 2)


def _tome_choice(
    metric: Tensor, r: int, num_prefix: int, threshold: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's choice on the hard split: every source's most similar destination, the r best sources merged.

    Returns indices into the split's sources and destinations: ``merged`` sources [B, r'] (best first), the
    ``kept`` sources [B, Ns - r'] in their original order and the ``merged`` sources' destinations [B, r'].
    r' is r capped at half the patch tokens and, with a ``threshold``, at the smallest count over the batch of
    sources whose best similarity reaches it.
    """
    B, N, _ = metric.shape
    r = capped_r(r, N - num_prefix)  # <= the source count for either offset
    with torch.no_grad():
        sim = split_similarity(metric, num_prefix)
        if sim.shape[2]:
            best, best_dst = sim.max(dim=-1)  # [B, Ns]
        else:  # at most one patch: nothing to match (r is 0)
            best, best_dst = sim.new_zeros(B, sim.shape[1]), sim.new_zeros(B, sim.shape[1], dtype=torch.long)
        if threshold is not None:
            r = min(r, int((best >= threshold).sum(-1).min())) if B else 0
        order = best.argsort(dim=-1, descending=True)
        return order[:, :r], order[:, r:].sort(dim=-1).values, best_dst.gather(1, order[:, :r])


def rows_of(idx: Tensor, n: int) -> Tensor:
    """Rows of a flattened [B * n, C] tensor for the per-image positions ``idx`` [B, m] -> [B * m]."""
    if idx.shape[0] == 1:  # batch 1: no offsets to add (each op counts at this size)
        return idx.reshape(-1)
    return (idx + torch.arange(0, idx.shape[0] * n, n, device=idx.device)[:, None]).reshape(-1)


def take_rows(v: Tensor, idx: Tensor) -> Tensor:
    """The rows ``idx`` [B, m] of v [B, N, D] -> [B, m, D].

    One ``index_select`` on the flattened rows: on CPU, ``gather`` with an index expanded over D is about ten
    times slower, which at batch 1 made the merge cost more than the FLOPs it saves.
    """
    B, N, D = v.shape
    return v.reshape(B * N, D).index_select(0, rows_of(idx, N)).view(B, idx.shape[1], D)


def _reduce_rows_(out: Tensor, into: Tensor, rows: Tensor, reduce: str) -> Tensor:
    """Reduce ``rows`` [m, C] into the rows ``into`` [m] of ``out`` [M, C]; in place for ``sum``.

    ``index_add_`` adds the rows one at a time in index order, as ``scatter_reduce`` along the tokens does, so the
    sums are bit-identical to ToMe's, without its index expanded over C.
    """
    if reduce == "sum":
        return out.index_add_(0, into, rows)
    return out.scatter_reduce(0, into[:, None].expand(-1, out.shape[1]), rows, reduce)


def bipartite_matching(metric: Tensor, r: int, num_prefix: int) -> MergeFn:
    """ToMe's bipartite soft matching, on patch tokens only.

    The split alternates over the whole sequence: patch tokens at odd sequence index are destinations, those at
    even index sources (:func:`hard_split_offset`), so a class-token ViT has destinations at patch positions
    0, 2, 4, ... and a distilled DeiT (class + distillation token) at 1, 3, 5, .... Each source picks its most
    similar destination (cosine of ``metric``); the ``r`` sources with the highest scores are merged away.
    Output order: prefix tokens, unmerged sources in their original order, destinations in their original
    order. This is ToMe's order with a class token (and distillation token); without prefix tokens ToMe's own
    code leaves the unmerged sources in score order, here they keep their original order (a deliberate,
    documented deviation: the tokens merged and their values are the same, only their order differs).

    Args:
        metric: [B, N, C] similarity features.
        r: sources to merge away, capped at (N - num_prefix) // 2.
        num_prefix: leading tokens that never merge.

    Returns:
        ``merge(x, reduce="sum") -> [B, N - r, C']`` combining x [B, N, C'] (merging the identity gives the
        source map that :func:`unmerge_tokens` copies merged tokens back with). The merged sources are added to
        their destination one at a time in score order, best first, as ToMe's ``scatter_reduce`` adds them, so
        the sums are bit-identical to it.
    """
    B, N, _ = metric.shape
    P, off = num_prefix, hard_split_offset(num_prefix)
    merged_src, kept_src, merged_dst = _tome_choice(metric, r, num_prefix)
    r, num_kept = merged_src.shape[1], kept_src.shape[1]
    # Sequence positions of the output tokens (prefix, unmerged sources, destinations) and of the merged sources;
    # the merged sources' destinations as output positions. Few ops: at batch 1 each one costs about as much as
    # the arithmetic they do.
    pos = torch.arange(N, device=metric.device)
    src_pos, dst_pos = pos[P + 1 - off :: 2], pos[P + off :: 2]
    out_pos = torch.cat([pos[:P].expand(B, P), src_pos[kept_src], dst_pos.expand(B, -1)], dim=1)
    keep, moved = rows_of(out_pos, N), rows_of(src_pos[merged_src], N)
    into = rows_of(merged_dst + (P + num_kept), N - r)

    def merge(x: Tensor, reduce: str = "sum") -> Tensor:
        c = x.shape[-1]
        flat = x.reshape(B * N, c)
        out = _reduce_rows_(flat.index_select(0, keep), into, flat.index_select(0, moved), reduce)
        return out.view(B, N - r, c)

    return merge


def merge_weighted(merge: MergeFn, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge: x_j <- (s_j x_j + sum s_i x_i) / (s_j + sum s_i).

    Args:
        merge: closure from :func:`bipartite_matching`.
        x: [B, N, C] features.
        size: [B, N, 1] sizes.

    Returns:
        merged features [B, N - r, C] and sizes [B, N - r, 1].
    """
    # One scatter for features and sizes together (sizes ride along as an extra channel).
    merged = merge(torch.cat([x * size, size.to(x.dtype)], dim=-1), "sum")
    new_size = merged[..., -1:]
    return merged[..., :-1] / new_size, new_size


def soft_grouping(
    src: Tensor, dst: Tensor, r: int, k: int = 3, tau1: float = 0.1, tau2: float = 0.1
) -> Tensor:
    """DTEM's relaxed top-r selection of (source, destination) merges.

    Each source keeps its ``k`` most similar destinations; logits S/tau1 on those candidates go through
    ``r`` rounds of a softmax over all (source, candidate) pairs of an image at temperature tau2, each round
    suppressing the sources that already took probability mass, so every source merges about once.

    Args:
        src: [B, Na, E] unit-normalised source embeddings.
        dst: [B, Nb, E] unit-normalised destination embeddings.
        r: merges to select (capped at Na).
        k: candidate destinations per source (capped at Nb).
        tau1: similarity temperature.
        tau2: selection temperature.

    Returns:
        [B, Na, Nb] merge weights (float32 or wider), zero outside the candidates, each row summing to <= 1 and all
        of them to about ``r``.
    """
    B, Na, _ = src.shape
    Nb = dst.shape[1]
    r, k = min(r, Na), min(k, Nb)
    work = torch.promote_types(src.dtype, torch.float32)  # float32 at least, also under autocast
    sim = src.to(work) @ dst.to(work).transpose(1, 2)  # [B, Na, Nb]
    cand_sim, cand = sim.topk(k, dim=-1)  # [B, Na, k]
    logits = cand_sim / tau1
    eps = torch.finfo(torch.float32).eps  # the suppression floor of docs/design.md §5
    total = torch.zeros_like(logits)
    for _ in range(r):
        p = F.softmax((logits / tau2).flatten(1), dim=-1).view(B, Na, k)
        total = total + p
        logits = logits + torch.log((1 - p.sum(-1, keepdim=True)).clamp_min(eps))
    total = total / total.sum(-1, keepdim=True).clamp_min(1).detach()
    return sim.new_zeros(B, Na, Nb).scatter(2, cand, total)


class _BiasedAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale + bias) v whose backward recomputes the attention matrix instead of keeping it."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
        # Detached: SDPA takes its unfused path whenever an input requires grad, even with grad mode off.
        out = F.scaled_dot_product_attention(
            q.detach(), k.detach(), v.detach(), attn_mask=bias.detach(), scale=scale
        )
        ctx.save_for_backward(q, k, v, bias, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:
        q, k, v, bias, out = ctx.saved_tensors
        qs = q * ctx.scale  # the scale on q [B, H, N, D], not on the [B, H, N, N] logits
        # In place where a [B, H, N, N] tensor is updated: each pass over it costs as much as a small GEMM.
        p = torch.softmax((qs @ k.transpose(-2, -1)).add_(bias), dim=-1)  # freed on return
        grad_v = p.transpose(-2, -1) @ grad_out
        # d logits = p * (dP - rowsum(dO * O)), the softmax backward with the output's own row sums
        grad_logits = (grad_out @ v.transpose(-2, -1)).sub_((grad_out * out).sum(-1, keepdim=True)).mul_(p)
        del p
        grad_q = (grad_logits @ k).mul_(ctx.scale)
        grad_k = grad_logits.transpose(-2, -1) @ qs
        return grad_q, grad_k, grad_v, grad_logits.sum_to_size(bias.shape), None


def biased_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """Attention with an additive bias that receives a gradient (proportional attention in soft training), keeping
    no [B, H, N, N] matrix for the backward pass.

    Fused attention kernels give no gradient for their mask, so autograd would run the unfused path and keep every
    block's attention matrix; here the forward is fused and the backward recomputes the matrix one block at a time
    (one more q kᵀ product per block, as flash attention's backward does).

    Args:
        q, k, v: [B, H, N, D].
        bias: float, broadcastable to [B, H, N, N] (e.g. [B, 1, 1, N] log sizes), in q's dtype.
        scale: the logits' scale (1 / sqrt(D) in a ViT).

    Returns:
        [B, H, N, D]; equal to ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)``, and so are
        the gradients (to rounding).
    """
    return _BiasedAttention.apply(q, k, v, bias, scale)


def clamp01_st(v: Tensor) -> Tensor:
    """Clamp to [0, 1] in the forward pass, identity gradient in the backward pass."""
    return v + (v.clamp(0, 1) - v).detach()


def soft_merge(
    x_src: Tensor, x_dst: Tensor, s_src: Tensor, s_dst: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Soft size-weighted merge of sources into destinations with fractional weights.

    s_dst' = s_dst + Wᵀ s_src;  x_dst' = (s_dst x_dst + Wᵀ (s_src x_src)) / s_dst';
    s_src' = s_src · clamp(1 − W 1, 0, 1) (straight-through). Source features are unchanged: their weight
    fades through their size. Total size and the size-weighted feature sum are conserved.

    Args:
        x_src: [B, Na, C]; x_dst: [B, Nb, C]; s_src: [B, Na, 1]; s_dst: [B, Nb, 1].
        weights: [B, Na, Nb] from :func:`soft_grouping`.

    Returns:
        new destination features [B, Nb, C], destination sizes [B, Nb, 1], source sizes [B, Na, 1].
    """
    wt = weights.transpose(1, 2)
    new_s_dst = s_dst + wt @ s_src
    new_x_dst = (s_dst * x_dst + wt @ (s_src * x_src)) / new_s_dst
    new_s_src = s_src * clamp01_st(1 - weights.sum(-1, keepdim=True))
    return new_x_dst, new_s_dst, new_s_src


def soft_merge_sources(m_src: Tensor, m_dst: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Carry a source map through a soft merge: rows of destinations gain Wᵀ rows of sources, rows of sources
    keep the share they did not give away.

    Args:
        m_src: [B, Na, N0] the sources' rows of the map (share of every input patch each token holds).
        m_dst: [B, Nb, N0] the destinations' rows.
        weights: [B, Na, Nb] soft merge weights.

    Returns:
        new destination rows [B, Nb, N0] and source rows [B, Na, N0] (their row sums equal the new sizes).
    """
    new_dst = m_dst + weights.transpose(1, 2).to(m_src.dtype) @ m_src
    return new_dst, m_src * (1 - weights.sum(-1, keepdim=True)).clamp(0, 1).to(m_src.dtype)


def unmerge_tokens(x: Tensor, source: Tensor) -> Tensor:
    """Give every input patch the (share-weighted) feature of the tokens that cover it.

    Args:
        x: [B, n, C] token features.
        source: [B, n, N0] source map; with hard merging each column has exactly one 1.

    Returns:
        [B, N0, C]. With the identity map (no merging) this is exactly ``x``.
    """
    share = source.transpose(1, 2).to(x.dtype)  # [B, N0, n]
    return (share @ x) / share.sum(-1, keepdim=True).clamp_min(1e-12)


def patch_groups(source: Tensor, num_prefix: int) -> Tensor:
    """Index of the token each input patch ended up in (for pictures of merge groups).

    Args:
        source: [B, n, N0] source map (hard merging: one 1 per column).
        num_prefix: prefix tokens at the start of both axes.

    Returns:
        [B, N0 - num_prefix] long; patches with the same value were merged into one token.
    """
    return source[:, :, num_prefix:].argmax(dim=1)


# ---------------------------------------------------------------------- pair-based merging (PiToMe, ToFu)
def bipartite_pairs(
    metric: Tensor, r: int, num_prefix: int, threshold: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's matching (:func:`bipartite_matching`) as index pairs, for policies that merge differently.

    Args:
        metric: [B, N, C] similarity features.
        r: sources to merge away, capped at (N - num_prefix) // 2.
        num_prefix: leading tokens that never merge.
        threshold: if given, merge only sources whose best cosine similarity is at least this, in every image
            of the batch: r becomes the smallest such count over the images (capped at r), so the batch stays
            rectangular and no image merges a pair below the threshold.

    Returns:
        ``src`` [B, r'] and ``dst`` [B, r'] patch indices (0 = the first patch token) of the merged pairs, and
        ``keep`` [B, Np - r']: the patch indices of the output tokens in ToMe's order (unmerged sources, then
        destinations, each in their original order); r' = r without a threshold.
    """
    B, N, _ = metric.shape
    off, num_patch = hard_split_offset(num_prefix), N - num_prefix
    src_pos = torch.arange(1 - off, num_patch, 2, device=metric.device)
    dst_pos = torch.arange(off, num_patch, 2, device=metric.device)
    merged, kept, merged_dst = _tome_choice(metric, r, num_prefix, threshold)
    src, dst = src_pos[merged], dst_pos[merged_dst]
    keep = torch.cat([src_pos[kept], dst_pos.expand(B, -1)], dim=1)
    return src, dst, keep


def energy_pairs(
    metric: Tensor, r: int, num_prefix: int, margin: float, alpha: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """PiToMe's selection (Tran et al., NeurIPS 2024, §3): merge inside the 2r highest-energy patch tokens.

    The energy of patch token i is the mean over all patch tokens j of f(cos(m_i, m_j)), with f(s) = s for
    s >= ``margin`` and alpha (exp(s - margin) - 1) below it: tokens in large clusters of similar tokens score
    high (redundant, merged), isolated ones low (informative, protected). The 2r highest-energy tokens, in
    energy order, alternate into sources (even ranks) and destinations (odd ranks); every source merges into
    its most similar destination.

    Args:
        metric: [B, N, C] similarity features.
        r: sources to merge away, capped at (N - num_prefix) // 2.
        num_prefix: leading tokens that never merge.
        margin: the similarity above which f is linear.
        alpha: the scale of f below the margin.

    Returns:
        ``src`` [B, r], ``dst`` [B, r] patch indices of the merged pairs and ``keep`` [B, Np - r]: the other
        patch indices in their original order.
    """
    num_patch = metric.shape[1] - num_prefix
    r = capped_r(r, num_patch)
    with torch.no_grad():
        m = normalize(metric[:, num_prefix:].float())
        sim = m @ m.transpose(1, 2)  # [B, Np, Np]
        f = torch.where(sim >= margin, sim, alpha * (torch.exp(sim - margin) - 1))
        energy = f.mean(-1)
        ranked = energy.argsort(dim=-1, descending=True, stable=True)
        src_all, dst_all = ranked[:, : 2 * r : 2], ranked[:, 1 : 2 * r : 2]  # [B, r] each
        pair_sim = sim.gather(1, src_all[..., None].expand(-1, -1, num_patch)).gather(
            2, dst_all[:, None, :].expand(-1, r, -1)
        )
        dst = dst_all.gather(1, pair_sim.argmax(-1)) if r else dst_all
        gone = torch.zeros_like(energy, dtype=torch.bool).scatter(1, src_all, True)
        keep = (~gone).nonzero()[:, 1].view(metric.shape[0], num_patch - r)
    return src_all, dst, keep


def _into_dst(v: Tensor, src: Tensor, dst: Tensor, reduce: str) -> Tensor:
    """v [B, Np, D] with the rows ``src`` [B, r] reduced into the rows ``dst`` [B, r] (sources left as they are)."""
    B, N, D = v.shape
    out = v.clone(memory_format=torch.contiguous_format).view(B * N, D)  # one copy; v stays as it is
    return _reduce_rows_(out, rows_of(dst, N), take_rows(v, src).reshape(-1, D), reduce).view(B, N, D)


def merge_pairs(
    x: Tensor, size: Tensor, src: Tensor, dst: Tensor, keep: Tensor, num_prefix: int, how: str = "mean"
) -> tuple[Tensor, Tensor]:
    """Merge patch tokens ``src`` into ``dst`` and keep the tokens ``keep``, in that order, after the prefix.

    ``how``: ``mean`` — size-weighted average (ToMe's rule); ``prune`` — the destination keeps its feature, the
    sources' features are dropped (their sizes still add, so every input patch stays covered); ``mlerp`` —
    ToFu's norm-preserving merge (Kim et al., WACV 2024): the size-weighted average rescaled to the largest norm
    among the tokens merged into it.

    Args:
        x: [B, N, C] tokens; size: [B, N, 1] sizes.
        src, dst: [B, r] patch indices (0 = first patch token); ``keep``: [B, Np - r] patch indices of the output.
        num_prefix: prefix tokens, kept first and never merged.

    Returns:
        tokens [B, P + Np - r, C] and sizes [B, P + Np - r, 1].
    """
    if how not in ("mean", "prune", "mlerp"):
        raise ValueError(f"how must be 'mean', 'prune' or 'mlerp', got {how!r}")
    P = num_prefix
    xp, sp = x[:, P:], size[:, P:].to(x.dtype)
    new_size = _into_dst(sp, src, dst, "sum")
    out = xp
    if how != "prune":
        out = _into_dst(xp * sp, src, dst, "sum") / new_size
    if how == "mlerp":
        top = _into_dst(xp.norm(dim=-1, keepdim=True), src, dst, "amax")
        out = out * (top / out.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return torch.cat([x[:, :P], take_rows(out, keep)], 1), torch.cat(
        [size[:, :P], take_rows(new_size, keep).to(size.dtype)], 1
    )


def merge_pair_sources(source: Tensor, src: Tensor, dst: Tensor, keep: Tensor, num_prefix: int) -> Tensor:
    """Carry a source map [B, N, N0] through :func:`merge_pairs` (rows of sources add to their destinations)."""
    P = num_prefix
    return torch.cat([source[:, :P], take_rows(_into_dst(source[:, P:], src, dst, "sum"), keep)], 1)
