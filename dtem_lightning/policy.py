"""Merge policies: what to merge (the metric), how many (r) and how (hard or soft); they own DTEM's parameters."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dtem_lightning import merge as M

PropAttn = bool | str  # True / False / "train" (only in train mode, as DTEM does for MAE models)


@dataclass(frozen=True)
class ModelInfo:
    """The plain description of a ViT a policy binds to, handed over by the backend (a policy never reads the
    model itself, so one policy works with every backend).

    Attributes:
        depth: blocks.
        width: token width C.
        num_heads: attention heads.
        head_dim: width of one head.
        num_prefix: prefix tokens (class, distillation, registers) before the patch tokens; they never merge.
        device: where parameters built at binding go (the model's), None: the default device.
        dtype: their dtype (the model's), None: the default dtype.
    """

    depth: int
    width: int
    num_heads: int
    head_dim: int
    num_prefix: int
    device: torch.device | None = None
    dtype: torch.dtype | None = None


@dataclass
class MergeState:
    """Per-forward bookkeeping, reset at block 0 (:meth:`MergePolicy.begin`).

    Attributes:
        size: [B, N, 1] patches per token, or None while every size is 1.
        source: [B, N, N0] patch share per token when tracing sources, else None.
        active: tokens (prefix included) still eligible for soft merging; the rest are only attended.
        keys: [B, H, N, D] attention keys of the current block, handed over by the backend in
            :meth:`MergePolicy.step` (None when it has none).
        tokens: token count after each block so far (hard merging) or active count (soft merging).
        training: the backbone's mode for this forward (soft merging and prop_attn="train" follow it).
    """

    size: Tensor | None = None
    source: Tensor | None = None
    active: int = 0
    keys: Tensor | None = None
    tokens: list[int] = field(default_factory=list)
    training: bool = False


class MergePolicy(nn.Module):
    """Base policy: holds r, binds to a :class:`ModelInfo`, keeps :class:`MergeState`, does hard size-weighted
    merging.

    Subclasses override :meth:`metric` (what similarity to match on) and, for another merging rule,
    :meth:`merge`. The base class has no metric, so it never merges: it is :class:`NoMerge`.

    The per-forward contract, what a backend's merging blocks do in one forward of the model:

    1. block 0 calls :meth:`begin` with the block's input [B, N0, C] and the backbone's mode; it resets the
       state (sizes None, sources the identity when tracing, active count N0, no token counts);
    2. every block passes :meth:`attn_bias` (None while every size is 1: no mask, so r = 0 stays bit-identical)
       as the attention's additive mask;
    3. every block, after attention, calls :meth:`step` once with the residual stream, its normalised input and
       the attention keys; the policy merges and records the sizes, the source map, the active count and the
       token count of the block in :attr:`state`;
    4. an average-pool head pools with :meth:`pool_avg` once tokens have merged.

    After the forward, :attr:`state` describes the output tokens: ``size`` [B, n, 1] (None: nothing merged),
    ``source`` [B, n, N0], ``tokens`` (one count per block).

    Args:
        r: tokens removed per block: one int for every block or a list with one entry per block.
        prop_attn: proportional attention (add log(size) to attention logits): True, False or "train".
        trace_source: keep a map from tokens to input patches (needed by :meth:`unmerge`).
    """

    display_name: str | None = None  # row name in sweep tables (default: the class name)

    def __init__(
        self, r: int | list[int] = 0, prop_attn: PropAttn = True, trace_source: bool = False
    ) -> None:
        super().__init__()
        if prop_attn not in (True, False, "train"):
            raise ValueError(f"prop_attn must be true, false or 'train', got {prop_attn!r}")
        if isinstance(r, int) and not isinstance(r, bool):
            M.r_schedule(r, 1)  # validate early: negative r fails at construction
        self.r = r
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.state = MergeState()
        self.depth = 0
        self.num_prefix = 0
        self.schedule: list[int] = []
        self._checked: set[tuple[int, tuple[int, ...]]] = set()

    # ----------------------------------------------------------------- binding
    def bind(self, model: ModelInfo | nn.Module) -> None:
        """Bind to a model described by ``model`` once; subclasses build their parameters here.

        Args:
            model: a :class:`ModelInfo`, or a model patched by a backend, which describes itself
                (``merge_info()``; :func:`dtem_lightning.patch.apply_policy` gives timm models one).
        """
        info = model if isinstance(model, ModelInfo) else getattr(model, "merge_info", None)
        if callable(info):
            info = info()
        if not isinstance(info, ModelInfo):
            raise TypeError(
                f"{type(self).__name__}.bind needs a ModelInfo or a model patched by a backend (apply_policy), "
                f"got {type(model).__name__}"
            )
        self.info = info
        self.depth, self.width, self.num_prefix = info.depth, info.width, info.num_prefix
        self.num_heads, self.head_dim = info.num_heads, info.head_dim
        self.schedule = M.r_schedule(self.r, self.depth)

    @property
    def bound(self) -> bool:
        return self.depth > 0

    @contextmanager
    def reduce(self, r: int | list[int]) -> Iterator[None]:
        """Temporarily use another r (r-sweeps); the original is restored on exit."""
        old_r, old_schedule = self.r, self.schedule
        self.schedule = M.r_schedule(r, self.depth)
        self.r = r
        try:
            yield
        finally:
            self.r, self.schedule = old_r, old_schedule

    def token_counts(self, num_tokens: int) -> list[int]:
        """Tokens after each block for an input of ``num_tokens`` tokens (prefix included)."""
        schedule = self.schedule if self.uses_merging else [0] * self.depth
        return M.token_counts(num_tokens, self.num_prefix, schedule)

    @property
    def uses_merging(self) -> bool:
        return type(self).metric is not MergePolicy.metric and any(self.schedule)

    # ----------------------------------------------------------------- per forward
    def begin(self, x: Tensor, training: bool = False) -> None:
        """Reset the per-forward state (called by block 0 with the backbone's mode)."""
        B, N, _ = x.shape
        source = None
        if self.trace_source:
            source = torch.eye(N, device=x.device, dtype=x.dtype).expand(B, N, N).clone()
        self.state = MergeState(active=N, source=source, training=training)
        if self.uses_merging and (N, tuple(self.schedule)) not in self._checked:
            self._checked.add((N, tuple(self.schedule)))
            self._warn_if_capped(N)

    def _warn_if_capped(self, num_tokens: int) -> None:
        """Warn once per (token count, schedule) when r exceeds what even the unmerged input allows.

        Capping in late blocks is the normal ToMe rule (DeiT-S at r = 16 keeps 10 in block 11 and ends with 11
        tokens) and stays silent; an r above half the input's patch tokens is most likely a mistake.
        """
        patches = num_tokens - self.num_prefix
        too_big = sorted({r for r in self.schedule if M.capped_r(r, patches) < r})
        if too_big:
            final = M.token_counts(num_tokens, self.num_prefix, self.schedule)[-1]
            warnings.warn(
                f"{type(self).__name__}: r={too_big} exceeds half of the {num_tokens - self.num_prefix} patch "
                f"tokens; merging is capped per block at half the patch tokens left ({final} tokens remain)",
                stacklevel=3,
            )

    def size(self, x: Tensor) -> Tensor:
        """[B, N, 1] sizes (ones while nothing merged)."""
        s = self.state.size
        return x.new_ones(x.shape[0], x.shape[1], 1) if s is None else s

    def attn_bias(self) -> Tensor | None:
        """Proportional attention bias log(s + eps), float32 or wider [B, 1, 1, N]; None while all sizes are 1."""
        use = self.prop_attn is True or (self.prop_attn == "train" and self.state.training)
        size = self.state.size
        if not use or size is None:
            return None
        size = size.to(torch.promote_types(size.dtype, torch.float32))  # float32 also under autocast
        return torch.log(size + M.SIZE_EPS)[:, None, :, 0][:, None]

    def step(self, layer: int, x: Tensor, u: Tensor, keys: Tensor | None = None) -> Tensor:
        """Block ``layer``'s merge, the one call a backend makes per block after attention.

        The metric is computed only when the block's r is not 0 (r = 0 costs nothing and changes nothing).

        Args:
            layer: block index.
            x: [B, N, C] residual stream after attention.
            u: [B, N, C] the block's normalised input (what attention saw).
            keys: [B, H, N, D] the block's attention keys (normalised where the model normalises them), or None.

        Returns:
            [B, N', C]: N' = N - r (hard) or N (soft: sizes change instead).
        """
        self.state.keys = keys
        return self.merge(layer, x, self.metric(layer, u) if self.schedule[layer] else None)

    def metric(self, layer: int, u: Tensor) -> Tensor | None:
        """Similarity features [B, N, C'] for block ``layer`` from its normalised input ``u`` (or
        ``state.keys``); None: no merge."""
        return None

    def merge(self, layer: int, x: Tensor, metric: Tensor | None) -> Tensor:
        """Hard bipartite merging of ``x`` [B, N, C] -> [B, N - r, C]; sizes and sources follow."""
        r = self.schedule[layer] if self.schedule else 0
        if metric is None or r == 0:
            self.state.tokens.append(x.shape[1])
            return x
        merge = M.bipartite_matching(metric, r, self.num_prefix)
        x, self.state.size = M.merge_weighted(merge, x, self.size(x))
        if self.state.source is not None:
            self.state.source = merge(self.state.source, "sum")
        self.state.active = x.shape[1]
        self.state.tokens.append(x.shape[1])
        return x

    def pool_avg(self, x: Tensor) -> Tensor:
        """Size-weighted mean of the patch tokens of x [B, N, C] -> [B, C]."""
        s = self.size(x)[:, self.num_prefix :]
        return (x[:, self.num_prefix :] * s).sum(1) / s.sum(1)

    def unmerge(self, x: Tensor) -> Tensor:
        """Copy tokens back to the input patch grid: [B, n, C] -> [B, N0, C] (prefix positions included)."""
        if self.state.source is None:
            raise RuntimeError("unmerge needs a policy created with trace_source=True")
        return M.unmerge_tokens(x, self.state.source)

    def extra_repr(self) -> str:
        return f"r={self.r}, prop_attn={self.prop_attn}, trace_source={self.trace_source}"


class NoMerge(MergePolicy):
    """The unmerged baseline: identity in every mode (any r is ignored)."""


class ToMe(MergePolicy):
    """ToMe: hard bipartite merging on the keys averaged over heads (Bolya et al., ICLR 2023).

    The backend hands the keys over in :meth:`step` (timm: the output of ``attn.k_norm``, an Identity unless
    the model uses qk-norm, so normalised keys are used where they exist).
    """

    def metric(self, layer: int, u: Tensor) -> Tensor | None:
        keys = self.state.keys
        if keys is None:
            raise RuntimeError("ToMe found no keys: is the policy bound with apply_policy()?")
        return keys.mean(1)


class DTEMHard(MergePolicy):
    """DTEM: merging on a decoupled embedding (Lee & Hong, NeurIPS 2024); hard or soft is a mode.

    One ``nn.Linear(C, embed_dim)`` per block maps the block's normalised input, detached so the embedding
    never sends gradients into the ViT, to the similarity metric. Evaluation always merges hard (ToMe's rule on
    the embedding). What training does is the policy's ``mode``: ``hard`` (this class: the same as evaluation;
    hard matching has no gradient, so it evaluates an embedding, e.g. an untrained control) or ``soft``
    (:class:`DTEMSoft`: DTEM's relaxation, which trains the embedding). A trained :class:`DTEMSoft` in eval mode
    computes exactly what a :class:`DTEMHard` with the same weights computes.

    Args:
        embed_dim: embedding width (at least 1); None gives the head dim (twice it when the ViT is 1024 wide or
            more).
        order: token order after a hard merge: ``tome`` (unmerged sources, then destinations, as ToMe) or
            ``size`` (patch tokens re-sorted by size, largest first, as soft training orders them, so the next
            block's alternating split pairs the same kind of tokens in both modes).
    """

    display_name = "DTEM"  # DTEMSoft too: both evaluate the same learned embedding with hard merging
    mode = "hard"  # what train mode does; DTEMSoft: "soft"
    SOFT_LAYOUTS = ("official", "consistent")

    def __init__(
        self,
        r: int | list[int] = 0,
        prop_attn: PropAttn = True,
        trace_source: bool = False,
        embed_dim: int | None = None,
        order: str = "tome",
    ) -> None:
        super().__init__(r=r, prop_attn=prop_attn, trace_source=trace_source)
        if order not in ("tome", "size"):
            raise ValueError(f"order must be 'tome' or 'size', got {order!r}")
        if embed_dim is not None and (isinstance(embed_dim, bool) or embed_dim < 1):
            raise ValueError(f"embed_dim must be >= 1 (or null for the head dim), got {embed_dim!r}")
        self.embed_dim = embed_dim
        self.order = order
        self.embed = nn.ModuleList()

    def bind(self, model: ModelInfo | nn.Module) -> None:
        super().bind(model)
        if self.embed_dim is None:
            self.embed_dim = self.head_dim * (2 if self.width >= 1024 else 1)
        info = self.info
        self.embed = nn.ModuleList(
            nn.Linear(self.width, self.embed_dim, device=info.device, dtype=info.dtype)
            for _ in range(self.depth)
        )

    def metric(self, layer: int, u: Tensor) -> Tensor | None:
        return self.embed[layer](u.detach())

    def merge(self, layer: int, x: Tensor, metric: Tensor | None) -> Tensor:
        """Soft in train mode when the mode is ``soft`` (docs/design.md §5), else hard (§3) in ``order``."""
        if self.mode == "soft" and self.state.training:
            return self._soft_merge(layer, x, metric)
        n = x.shape[1]
        x = super().merge(layer, x, metric)
        if self.order == "size" and x.shape[1] < n:
            x = self._sort_by_size(x, x.shape[1])
        return x

    def _sort_by_size(self, x: Tensor, n: int, before: Tensor | None = None) -> Tensor:
        """Re-sort patch tokens ``P..n`` of x [B, N, C] (with sizes and sources) by size, largest first, stably.

        ``before`` [n - P] lists those positions in the order that decides ties (default: their own order).
        """
        st, P = self.state, self.num_prefix
        size = self.size(x)
        before = torch.arange(P, n, device=x.device) if before is None else before
        order = before[size[:, before, 0].argsort(dim=1, descending=True, stable=True)]
        head = torch.arange(P, device=x.device).expand(x.shape[0], P)
        tail = torch.arange(n, x.shape[1], device=x.device).expand(x.shape[0], -1)
        perm = torch.cat([head, order, tail], dim=1)  # [B, N]
        st.size = size.gather(1, perm[..., None])
        if st.source is not None:
            st.source = st.source.gather(1, perm[..., None].expand_as(st.source))
        return x.gather(1, perm[..., None].expand_as(x))

    # ----------------------------------------------------------------- soft mode (DTEMSoft's hyper-parameters)
    def _soft_merge(self, layer: int, x: Tensor, metric: Tensor | None) -> Tensor:
        st = self.state
        src_idx, dst_idx = self.soft_split(st.active, x.device)
        # Soft grouping selects each source about once: r is capped by the sources, not by half the patches.
        r = min(self.schedule[layer], len(src_idx)) if len(dst_idx) else 0
        if metric is None or r == 0:
            st.tokens.append(st.active)
            return x
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._soft_step(x, metric, r, src_idx, dst_idx)

    def soft_split(self, n: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """Sequence positions of the sources and destinations among the ``n`` active tokens (prefix included)."""
        P = self.num_prefix
        dst_off = 1 if self.soft_layout == "official" else M.hard_split_offset(P)
        src = torch.arange(P + 1 - dst_off, n, 2, device=device)
        return src, torch.arange(P + dst_off, n, 2, device=device)

    def _soft_step(self, x: Tensor, metric: Tensor, r: int, src_idx: Tensor, dst_idx: Tensor) -> Tensor:
        st, n = self.state, self.state.active
        dtype, work = x.dtype, torch.promote_types(x.dtype, torch.float32)
        x, size = x.to(work), self.size(x).to(work)
        emb = M.normalize(metric.to(work))
        w = M.soft_grouping(emb[:, src_idx], emb[:, dst_idx], r, self.k, self.tau1, self.tau2)
        x_dst, s_dst, s_src = M.soft_merge(
            x[:, src_idx], x[:, dst_idx], size[:, src_idx], size[:, dst_idx], w
        )
        x = x.index_copy(1, dst_idx, x_dst)
        size = size.index_copy(1, dst_idx, s_dst).index_copy(1, src_idx, s_src)
        if st.source is not None:
            st.source = M.soft_merge_sources(st.source, w, src_idx, dst_idx)
        # Re-sort the active patch tokens by size (largest first): depleted sources drop out of the active set.
        # The published step sorts [all sources; all destinations], so tied sizes keep sources first.
        st.size = size
        x = self._sort_by_size(
            x, n, torch.cat([src_idx, dst_idx]) if self.soft_layout == "official" else None
        )
        st.active = n - r
        st.tokens.append(st.active)
        return x.to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, order={self.order}"


class DTEMSoft(DTEMHard):
    """DTEM in ``soft`` mode: DTEM's training relaxation in train mode, hard merging (as DTEMHard) in eval mode.

    Modifications in train mode (the backbone's mode decides): the sequence length stays N; tokens get
    fractional sizes through :func:`~dtem_lightning.merge.soft_grouping`, are re-sorted by size and the
    active count drops by r per block. Everything in the soft step runs in float32, also under autocast.

    Args:
        k: candidate destinations per source (at least 1); a block with fewer destinations uses them all.
        tau1: similarity temperature (finite, > 0).
        tau2: selection temperature (finite, > 0).
        soft_layout: ``official`` (default): the published training step — sources are the active patch
            positions 0, 2, 4, … (the opposite parity of the hard split), destinations 1, 3, 5, …, and after
            merging the sequence [all sources; all destinations] is stably re-sorted by size, so tied sizes keep
            sources first. ``consistent``: the hard split of inference (:func:`~dtem_lightning.merge.
            hard_split_offset`) also in training, tokens stably re-sorted by size from their own positions (an
            ablation: one split in both regimes; its effect on accuracy is unmeasured).
        r, prop_attn, trace_source, embed_dim, order: as :class:`DTEMHard`.
    """

    mode = "soft"

    def __init__(
        self,
        r: int | list[int] = 0,
        prop_attn: PropAttn = True,
        trace_source: bool = False,
        embed_dim: int | None = None,
        order: str = "tome",
        k: int = 3,
        tau1: float = 0.1,
        tau2: float = 0.1,
        soft_layout: str = "official",
    ) -> None:
        super().__init__(
            r=r, prop_attn=prop_attn, trace_source=trace_source, embed_dim=embed_dim, order=order
        )
        if isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be >= 1 candidate destinations, got k={k!r}")
        for name, tau in (("tau1", tau1), ("tau2", tau2)):
            if not (math.isfinite(tau) and tau > 0):
                raise ValueError(f"{name} must be a finite temperature > 0, got {name}={tau!r}")
        if soft_layout not in self.SOFT_LAYOUTS:
            raise ValueError(f"soft_layout must be 'official' or 'consistent', got {soft_layout!r}")
        self.k, self.tau1, self.tau2, self.soft_layout = k, tau1, tau2, soft_layout

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, tau1={self.tau1}, tau2={self.tau2}, soft_layout={self.soft_layout}"
