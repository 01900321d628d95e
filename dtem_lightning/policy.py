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
    mode = "hard"  # what train mode does: "hard", or "soft" (DTEM's relaxation; needs init_soft's parameters)
    SOFT_LAYOUTS = ("official", "consistent")

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

    def measured_schedules(self) -> list[tuple[list[int] | None, float]]:
        """The merge schedules FLOPs are counted at, with their shares: ``[(None, 1.0)]`` (the configured r) for
        a policy whose token count does not depend on the data; :class:`ATM` returns what its forwards ran."""
        return [(None, 1.0)]

    @contextmanager
    def replaying(self, schedule: list[int] | None) -> Iterator[None]:
        """Merge exactly ``schedule`` (one of :meth:`measured_schedules`); None: as configured."""
        yield

    def reset_measurements(self) -> None:
        """Forget the recorded schedules (the sweep calls it at the start of a test run)."""

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
        """Hard bipartite merging of ``x`` [B, N, C] -> [B, N - r, C]; sizes and sources follow. In train mode a
        policy whose ``mode`` is ``soft`` merges softly instead (docs/design.md §5): N stays, sizes change."""
        if self.mode == "soft" and self.state.training:
            return self._soft_merge(layer, x, metric)
        r = self.schedule[layer] if self.schedule else 0
        if metric is not None and r:
            x, self.state.size, self.state.source = self.hard_merge(layer, x, metric, r)
            self.state.active = x.shape[1]
        self.state.tokens.append(x.shape[1])
        return x

    def hard_merge(
        self, layer: int, x: Tensor, metric: Tensor, r: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One block's hard merge of ``x`` [B, N, C] on ``metric``: tokens [B, N', C], their sizes [B, N', 1] and
        the source map (None when not traced). ToMe's rule: bipartite matching, size-weighted mean."""
        merge = M.bipartite_matching(metric, r, self.num_prefix)
        x, size = M.merge_weighted(merge, x, self.size(x))
        return x, size, None if self.state.source is None else merge(self.state.source, "sum")

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
        st.size = M.take_rows(size, perm)
        if st.source is not None:
            st.source = M.take_rows(st.source, perm)
        return M.take_rows(x, perm)

    # ----------------------------------------------------------------- soft mode (k, tau1, tau2, soft_layout)
    def init_soft(self, k: int, tau1: float, tau2: float, soft_layout: str) -> None:
        """Check and store the soft mode's hyper-parameters (documented on :class:`DTEMSoft`)."""
        if isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be >= 1 candidate destinations, got k={k!r}")
        for name, tau in (("tau1", tau1), ("tau2", tau2)):
            if not (math.isfinite(tau) and tau > 0):
                raise ValueError(f"{name} must be a finite temperature > 0, got {name}={tau!r}")
        if soft_layout not in self.SOFT_LAYOUTS:
            raise ValueError(f"soft_layout must be 'official' or 'consistent', got {soft_layout!r}")
        self.k, self.tau1, self.tau2, self.soft_layout = k, tau1, tau2, soft_layout

    def _soft_merge(self, layer: int, x: Tensor, metric: Tensor | None) -> Tensor:
        st = self.state
        src, dst = self.soft_split(st.active)
        num_src, num_dst = len(range(st.active)[src]), len(range(st.active)[dst])
        # Soft grouping selects each source about once: r is capped by the sources, not by half the patches.
        r = min(self.schedule[layer], num_src) if num_dst else 0
        if metric is None or r == 0:
            st.tokens.append(st.active)
            return x
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._soft_step(x, metric, r, src, dst)

    def soft_split(self, n: int) -> tuple[slice, slice]:
        """The sources and destinations among the ``n`` active tokens (prefix included), as slices of the sequence
        (views: no copies, and a cheap backward)."""
        P = self.num_prefix
        dst_off = 1 if self.soft_layout == "official" else M.hard_split_offset(P)
        return slice(P + 1 - dst_off, n, 2), slice(P + dst_off, n, 2)

    def _soft_step(self, x: Tensor, metric: Tensor, r: int, src: slice, dst: slice) -> Tensor:
        st, n, P = self.state, self.state.active, self.num_prefix
        dtype, work = x.dtype, torch.promote_types(x.dtype, torch.float32)
        x, size = x.to(work), self.size(x).to(work)
        emb = M.normalize(metric.to(work))
        w = M.soft_grouping(emb[:, src], emb[:, dst], r, self.k, self.tau1, self.tau2)
        x_dst, s_dst, s_src = M.soft_merge(x[:, src], x[:, dst], size[:, src], size[:, dst], w)

        # Tokens regrouped as [prefix, sources, destinations, inactive] (one copy), then re-sorted by size.
        def regroup(t: Tensor, t_src: Tensor, t_dst: Tensor) -> Tensor:
            return torch.cat([t[:, :P], t_src, t_dst, t[:, n:]], dim=1)

        if st.source is not None:
            m_dst, m_src = M.soft_merge_sources(st.source[:, src], st.source[:, dst], w)
            st.source = regroup(st.source, m_src, m_dst)
        st.size = regroup(size, s_src, s_dst)
        x = regroup(x, x[:, src], x_dst)
        # Re-sort the active patch tokens by size (largest first): depleted sources drop out of the active set.
        # The published step sorts [all sources; all destinations] (the regrouped order), so tied sizes keep
        # sources first; the consistent layout breaks ties in sequence order.
        before = None
        if self.soft_layout != "official":
            seq = torch.arange(n, device=x.device)
            before = P + torch.cat([seq[src], seq[dst]]).argsort()
        x = self._sort_by_size(x, n, before)
        st.active = n - r
        st.tokens.append(st.active)
        return x.to(dtype)

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
        text = f"r={self.r}, prop_attn={self.prop_attn}, trace_source={self.trace_source}"
        if self.mode == "soft":
            text += f", k={self.k}, tau1={self.tau1}, tau2={self.tau2}, soft_layout={self.soft_layout}"
        return text


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
        """The base class's merge (soft or hard by mode); hard merges leave tokens in ``order``."""
        n = x.shape[1]
        x = super().merge(layer, x, metric)
        if self.order == "size" and x.shape[1] < n:
            x = self._sort_by_size(x, x.shape[1])
        return x

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
        self.init_soft(k, tau1, tau2, soft_layout)


class ToMeSoft(ToMe):
    """ToMe's metric (the keys averaged over heads) with DTEM's soft merging in train mode: the paper's Table 6
    middle row. There is no decoupled embedding: the soft merge's gradient reaches the keys, so the backbone
    must train (``train: all``); with a frozen backbone nothing learns. Eval mode merges hard, exactly as ToMe.

    Args:
        k, tau1, tau2, soft_layout: the soft mode's hyper-parameters, as :class:`DTEMSoft`.
        r, prop_attn, trace_source: as :class:`MergePolicy`.
    """

    mode = "soft"

    def __init__(
        self,
        r: int | list[int] = 0,
        prop_attn: PropAttn = True,
        trace_source: bool = False,
        k: int = 3,
        tau1: float = 0.1,
        tau2: float = 0.1,
        soft_layout: str = "official",
    ) -> None:
        super().__init__(r=r, prop_attn=prop_attn, trace_source=trace_source)
        self.init_soft(k, tau1, tau2, soft_layout)


class _PairMerging(ToMe):
    """A training-free policy on ToMe's metric (keys averaged over heads) with its own pairs and merge rule:
    subclasses give :meth:`pairs` and :meth:`how`; :meth:`hard_merge` is :func:`~dtem_lightning.merge.merge_pairs`."""

    def pairs(self, layer: int, metric: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """``src``, ``dst`` [B, r] and ``keep`` [B, Np - r] patch indices (see ``merge.merge_pairs``)."""
        return M.bipartite_pairs(metric, r, self.num_prefix)

    def how(self, layer: int) -> str:
        return "mean"

    def hard_merge(
        self, layer: int, x: Tensor, metric: Tensor, r: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        src, dst, keep = self.pairs(layer, metric, r)
        x, size = M.merge_pairs(x, self.size(x), src, dst, keep, self.num_prefix, self.how(layer))
        source = self.state.source
        return (
            x,
            size,
            None if source is None else M.merge_pair_sources(source, src, dst, keep, self.num_prefix),
        )


class PiToMe(_PairMerging):
    """PiToMe (Tran et al., NeurIPS 2024): protect informative tokens, merge inside large clusters.

    Each block ranks the patch tokens by an energy score over their similarity graph (keys averaged over heads)
    and merges only among the 2r highest-energy ones (:func:`~dtem_lightning.merge.energy_pairs`); the others
    are protected. The margin falls with depth: block l of L uses ``margin * (1 - l / L)``.

    Args:
        margin: the margin of block 0 (in [-1, 1]).
        alpha: the scale of the energy below the margin (> 0).
        r, prop_attn, trace_source: as :class:`MergePolicy`.
    """

    def __init__(
        self,
        r: int | list[int] = 0,
        prop_attn: PropAttn = True,
        trace_source: bool = False,
        margin: float = 0.9,
        alpha: float = 1.0,
    ) -> None:
        super().__init__(r=r, prop_attn=prop_attn, trace_source=trace_source)
        if not -1 <= margin <= 1:
            raise ValueError(f"margin must be a cosine similarity in [-1, 1], got margin={margin!r}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be finite and > 0, got alpha={alpha!r}")
        self.margin, self.alpha = margin, alpha

    def pairs(self, layer: int, metric: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
        margin = self.margin * (1 - layer / self.depth)
        return M.energy_pairs(metric, r, self.num_prefix, margin, self.alpha)


class ToFu(_PairMerging):
    """Token Fusion (Kim et al., WACV 2024): prune in early blocks, merge norm-preservingly in later ones.

    Pairs are ToMe's. In the first ``prune_blocks`` blocks the destination keeps its feature and the source's is
    dropped (pruning; sizes still add, so proportional attention and the source map count every patch); later
    blocks merge with MLERP, the size-weighted average rescaled to the largest norm among the merged tokens
    (:func:`~dtem_lightning.merge.merge_pairs`).

    Args:
        prune_blocks: blocks that prune; None: a quarter of the blocks (our default, not the paper's).
        r, prop_attn, trace_source: as :class:`MergePolicy`.
    """

    def __init__(
        self,
        r: int | list[int] = 0,
        prop_attn: PropAttn = True,
        trace_source: bool = False,
        prune_blocks: int | None = None,
    ) -> None:
        super().__init__(r=r, prop_attn=prop_attn, trace_source=trace_source)
        if prune_blocks is not None and (isinstance(prune_blocks, bool) or prune_blocks < 0):
            raise ValueError(
                f"prune_blocks must be >= 0 (or null for a quarter of the blocks), got {prune_blocks!r}"
            )
        self.prune_blocks = prune_blocks

    def how(self, layer: int) -> str:
        prune = self.depth // 4 if self.prune_blocks is None else self.prune_blocks
        return "prune" if layer < prune else "mlerp"


class ATM(_PairMerging):
    """Adaptive token merging (after Lee & Choi, arXiv 2505.15160): merge only pairs above a per-block similarity
    threshold, so simple images lose more tokens than complex ones.

    Block l merges, with ToMe's pairs on the keys, the sources whose best cosine similarity is at least
    ``threshold[l]``, at most r of them. Batches stay rectangular: a block merges the smallest count any image of
    the batch allows (:func:`~dtem_lightning.merge.bipartite_pairs`), so no image merges a pair below its
    threshold, and at batch size 1 the count is the image's own (evaluate with ``batch_size: 1`` for the
    per-image method). The token count therefore depends on the data: the schedule of every forward is recorded
    per configured r, and the sweep counts FLOPs and tokens at those schedules (:meth:`measured_schedules`,
    :meth:`replaying`), not at a probe input. Not implemented: the paper's size-aware matching of the final
    blocks.

    Args:
        threshold: one cosine similarity for every block or one per block; -1 merges like ToMe at every r.
        r, prop_attn, trace_source: as :class:`MergePolicy` (r caps the merges per block).
    """

    def __init__(
        self,
        r: int | list[int] = 0,
        prop_attn: PropAttn = True,
        trace_source: bool = False,
        threshold: float | list[float] = 0.9,
    ) -> None:
        super().__init__(r=r, prop_attn=prop_attn, trace_source=trace_source)
        values = threshold if isinstance(threshold, list) else [threshold]
        if not values or any(isinstance(t, bool) or not -1 <= t <= 1 for t in values):
            raise ValueError(
                f"threshold must be a cosine similarity in [-1, 1] or a list of them, got {threshold!r}"
            )
        self.threshold = threshold
        # configured schedule -> {merges per block that a forward ran: forwards}
        self.measured: dict[tuple[int, ...], dict[tuple[int, ...], int]] = {}
        self._replay: list[int] | None = None
        self._running: list[int] = []

    def bind(self, model: ModelInfo | nn.Module) -> None:
        super().bind(model)
        if isinstance(self.threshold, list) and len(self.threshold) != self.depth:
            raise ValueError(
                f"threshold has {len(self.threshold)} entries but the model has {self.depth} blocks: {self.threshold}"
            )

    def block_threshold(self, layer: int) -> float:
        return self.threshold[layer] if isinstance(self.threshold, list) else self.threshold

    def pairs(self, layer: int, metric: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
        if self._replay is not None:
            return M.bipartite_pairs(metric, self._replay[layer], self.num_prefix)
        return M.bipartite_pairs(metric, r, self.num_prefix, self.block_threshold(layer))

    def merge(self, layer: int, x: Tensor, metric: Tensor | None) -> Tensor:
        n = x.shape[1]
        x = super().merge(layer, x, metric)
        if self._replay is None:
            self._running = [] if layer == 0 else self._running
            self._running.append(n - x.shape[1])
            if layer == self.depth - 1:
                runs = self.measured.setdefault(tuple(self.schedule), {})
                runs[tuple(self._running)] = runs.get(tuple(self._running), 0) + 1
        return x

    def reset_measurements(self) -> None:
        self.measured.clear()

    def measured_schedules(self) -> list[tuple[list[int] | None, float]]:
        runs = self.measured.get(tuple(self.schedule))
        if not runs:
            return [(None, 1.0)]  # nothing ran at this r yet: the configured cap
        total = sum(runs.values())
        return [(list(s), n / total) for s, n in sorted(runs.items())]

    def token_counts(self, num_tokens: int) -> list[int]:
        """Tokens after each block: of the schedule replayed, else the mean over the forwards run at this r."""
        if self._replay is not None:
            return M.token_counts(num_tokens, self.num_prefix, self._replay)
        mix = [(M.token_counts(num_tokens, self.num_prefix, s), w) for s, w in self.measured_schedules() if s]
        if not mix:
            return super().token_counts(num_tokens)
        return [round(sum(c[i] * w for c, w in mix)) for i in range(self.depth)]

    @contextmanager
    def replaying(self, schedule: list[int] | None) -> Iterator[None]:
        old = self._replay
        self._replay = None if schedule is None else list(schedule)
        try:
            yield
        finally:
            self._replay = old
