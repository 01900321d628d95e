"""MergingEncoder: the one seam between the tasks and the merging ViT (docs/design.md §1).

A task hands the encoder a backbone name and a policy and gets back merged tokens with their sizes; it never
touches the backend (``patch.py``), the per-forward state of a policy or the tensor functions of ``merge.py``.
The encoder owns:

- backbone creation and weight loading (timm hub, a local weights file loaded with ``weights_only=True``, the
  refusal of pickled code unless trusted, of another patch size, the note about a dropped classifier head);
- patching: the task's policy is applied, comparison policies (sweep rows) are bound to the same backbone and
  switched with :meth:`MergingEncoder.use` / :meth:`MergingEncoder.running`;
- the forward: :class:`Encoded` holds the merged tokens, their sizes and, when sources are traced, the map back
  to the input patches (:meth:`Encoded.patch_grid` unmerges).

The encoder's submodules are ``backbone``, ``policy`` and ``test_policies``. A task registers the same three
objects under the same names on itself (:class:`~dtem_lightning.tasks.base.BaseTask`), so its ``state_dict``
keys (``backbone.*``, ``policy.*``, ``test_policies.*``) are those of every earlier checkpoint.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from dtem_lightning import flops
from dtem_lightning import hf as hf_backend
from dtem_lightning import patch as timm_backend
from dtem_lightning.io import load_weights_only
from dtem_lightning.merge import SIZE_EPS, parse_r, r_key, r_label, r_schedule, unmerge_tokens
from dtem_lightning.policy import MergePolicy, ModelInfo, NoMerge

# Re-exported for the tasks (sweep keys and labels, the proportional-attention epsilon of a decoder's mask):
# tasks import the encoder, never merge.py.
__all__ = ["BACKENDS", "SIZE_EPS", "Encoded", "MergingEncoder", "parse_r", "r_key", "r_label"]

# The backends, asked in order: the first whose ``is_model(name)`` accepts a model name (or ``owns(model)`` a
# model) builds and patches it. A new backbone family is one module with the functions of ``patch.py`` (listed
# in docs/extending.md) and one entry here.
BACKENDS: tuple[ModuleType, ...] = (timm_backend, hf_backend)


def data_backbone(name: str) -> str:
    """The timm name whose data config (mean, std, crop) the data modules resolve for the model name ``name``:
    its backend's ``data_backbone``; a name no backend knows is returned unchanged (the data module refuses it)."""
    for backend in BACKENDS:
        if backend.is_model(name):
            return backend.data_backbone(name)
    return name


def backend_for(backbone: str | nn.Module) -> ModuleType:
    """The backend of a model name or a model; the error names the first backend's kind of names."""
    for backend in BACKENDS:
        if backend.is_model(backbone) if isinstance(backbone, str) else backend.owns(backbone):
            return backend
    if isinstance(backbone, str):
        raise ValueError(
            f"unknown backbone {backbone!r}: not a timm model name (see timm.list_models()) nor "
            "hf:<hub id or folder> (docs/hf.md)"
        )
    return BACKENDS[0]  # its apply_policy refuses the model with one line naming the class


# ---------------------------------------------------------------------- weight files
def _stored_shape(path: str | Path, key: str) -> tuple[int, ...] | None:
    """Shape of tensor ``key`` in a weights file (state dict, ``{"state_dict"|"model": ...}`` or safetensors)."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return tuple(f.get_slice(key).get_shape()) if key in f.keys() else None
    # Mapped, not read, where the format allows it (a legacy-format file is read: mmap would refuse it).
    state = load_weights_only(path, "checkpoint_path", mmap=True)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else {}
    tensor = state.get(key)
    return tuple(tensor.shape) if isinstance(tensor, Tensor) else None


def _head_rows(path: str | Path, key: str) -> int | None:
    """Classes of the classifier head (weight ``key``, timm: ``head.weight``) stored in a weights file, if any."""
    shape = _stored_shape(path, key)
    return int(shape[0]) if shape is not None else None


def _head_note(source: str, rows: int | None, kwargs: dict[str, Any]) -> str | None:
    """The line "SOURCE has a K-class head but the model has N classes" when timm drops the weights' head, else
    None (no head in the weights, or a model without a classifier head: ``num_classes`` 0)."""
    num_classes = kwargs.get("num_classes")
    if rows is None or not num_classes or rows == num_classes:
        return None
    return f"{source} has a {rows}-class head but the model has {num_classes} classes"


def _weights_only_copy(path: str | Path) -> Path:
    """Re-save a trusted pickled checkpoint's tensors to a temporary file that loads with weights_only=True."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    out = Path(tempfile.mkdtemp(prefix="dtem_weights_")) / Path(path).with_suffix(".pth").name
    torch.save(tensors, out)
    return out


def _check_patch_size(path: str | Path, name: str, kwargs: dict[str, Any], backend: ModuleType) -> None:
    """Refuse a weights file whose patch embedding has another kernel than the model's.

    timm would resample the file's patch embedding to the model's patch size without a word; weights trained at
    one patch size are not weights of another.
    """
    stored = _stored_shape(path, backend.PATCH_WEIGHT)
    if stored is None or len(stored) != 4:
        return
    own = backend.patch_kernel(name, kwargs)
    if stored[-2:] != own[-2:]:
        raise ValueError(
            f"checkpoint_path {path} has patch size {stored[-2]}x{stored[-1]} ({backend.PATCH_WEIGHT} "
            f"{list(stored)}) but the model has {own[-2]}x{own[-1]} ({list(own)}): refusing to resample; "
            f"set backbone_kwargs.patch_size={stored[-1]} or pass weights of the model's patch size"
        )


def create_backbone(
    name: str,
    kwargs: dict[str, Any],
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    trust_checkpoint: bool = False,
    weights_later: bool = False,
) -> tuple[nn.Module, str | None]:
    """Create the backbone, from the hub or a local weights file; nothing downloads unless asked.

    Args:
        name: model name of the backend (a timm model name).
        kwargs: extra creation arguments (``num_classes``, ``img_size``, ``depth``, ...).
        pretrained: load the hub weights (needs network access).
        checkpoint_path: local weights file, loaded with ``weights_only=True``; a file that needs pickled code
            is refused unless ``trust_checkpoint``.
        trust_checkpoint: allow a ``checkpoint_path`` that needs arbitrary pickled code.
        weights_later: another file (a task checkpoint, ``init_from``) replaces every weight: load none here.

    Returns:
        The model and, when the weights' classifier head has another class count than the model (timm starts
        that head afresh), one line saying so (else None).
    """
    backend = backend_for(name)
    if weights_later:  # its weights replace any others: nothing else to load
        return backend.create(name, kwargs), None
    path = checkpoint_path
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint_path {path!r} does not exist")
        try:
            rows = _head_rows(path, backend.HEAD_WEIGHT)
        except pickle.UnpicklingError as e:  # io.PickledCodeError: a readable file that needs pickled code
            if not trust_checkpoint:
                raise ValueError(
                    f"{e}. If you trust the file, set --model.init_args.trust_checkpoint=true (command line or "
                    "config; never taken from a checkpoint), or re-save it as safetensors"
                ) from e
            path = _weights_only_copy(path)
            rows = _head_rows(path, backend.HEAD_WEIGHT)
        _check_patch_size(path, name, kwargs, backend)
        dropped = _head_note(f"checkpoint_path {checkpoint_path}", rows, kwargs)
        return backend.create(name, kwargs, weights_file=path, file_classes=rows), dropped
    if pretrained:
        dropped = _head_note(f"the hub weights of {name}", backend.hub_classes(name), kwargs)
        try:
            return backend.create(name, kwargs, pretrained=True), dropped
        except Exception as e:  # network errors come in many types
            raise RuntimeError(
                f"could not load pretrained weights of {name!r} ({type(e).__name__}: {e}). Without network "
                "access, download them elsewhere and pass --model.init_args.checkpoint_path=/path/to/file"
            ) from e
    return backend.create(name, kwargs), None


# ---------------------------------------------------------------------- the encoder
@dataclass
class Encoded:
    """One forward of the encoder: the merged tokens and what a head needs to read them.

    Attributes:
        tokens: [B, n, C] output tokens (after the final norm), prefix tokens first; n = N0 - merged in hard
            merging, n = N0 in soft merging (training), where tokens carry fractional sizes instead.
        size: [B, n, 1] input patches each token stands for; None while nothing merged (all sizes 1).
        source: [B, n, N0] share of every input token each token holds, when the encoder traces sources
            (``trace_source``); else None.
        num_prefix: prefix tokens (class, distillation, registers) at the start of ``tokens``.
    """

    tokens: Tensor
    size: Tensor | None
    source: Tensor | None
    num_prefix: int

    def patch_grid(self) -> Tensor:
        """[B, N0 - P, C]: every input patch gets the (share-weighted) feature of the tokens that cover it.

        The unmerge of dense tasks: the decoder always sees the full h × w patch grid, whatever merged.
        """
        tokens = self.tokens
        if self.size is not None:  # merged: hard (fewer tokens) or soft (fractional sizes)
            if self.source is None:
                raise RuntimeError("unmerge needs a policy created with trace_source=True")
            tokens = unmerge_tokens(tokens, self.source)  # [B, N0, C]
        return tokens[:, self.num_prefix :]


class MergingEncoder(nn.Module):
    """A merging ViT behind one interface: created, loaded, patched with a policy, swept over other policies.

    Args:
        backbone: a model name of the backend (timm), or an existing model to patch in place.
        policy: the merge policy (NoMerge when omitted); applied to the backbone, it trains and saves with it.
        create_kwargs: extra creation arguments when ``backbone`` is a name.
        pretrained, checkpoint_path, trust_checkpoint, weights_later: where the weights come from
            (:func:`create_backbone`).
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        policy: MergePolicy | None = None,
        create_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        trust_checkpoint: bool = False,
        weights_later: bool = False,
    ) -> None:
        super().__init__()
        self.dropped_head: str | None = None  # the weights' classifier head had another class count
        if isinstance(backbone, str):
            backbone, self.dropped_head = create_backbone(
                backbone,
                dict(create_kwargs or {}),
                pretrained,
                checkpoint_path,
                trust_checkpoint,
                weights_later,
            )
        backend = backend_for(backbone)
        self.policy = policy if policy is not None else NoMerge()
        backend.apply_policy(backbone, self.policy)  # refuses unsupported models and blocks first
        patch, img = backend.patch_size(backbone), backend.img_size(backbone)
        if img is not None and (img[0] % patch[0] or img[1] % patch[1]):
            raise ValueError(f"image size {tuple(img)} is not divisible by the patch size {tuple(patch)}")
        self.backbone = backbone
        self.info: ModelInfo = self.policy.info  # what every policy binds to
        self.test_policies = nn.ModuleList()

    @property
    def backend(self) -> ModuleType:
        """The backend that patched the backbone (looked up, not stored: a module object does not deep-copy)."""
        return backend_for(self.backbone)

    # ------------------------------------------------------------------ policies
    def add_policies(self, policies: Sequence[MergePolicy]) -> None:
        """Bind comparison policies (sweep rows) to the backbone; the task's own policy stays in use."""
        for p in policies:
            p.bind(self.backend.describe(self.backbone))  # the model's device and dtype now
            self.test_policies.append(p)
        self.use(self.policy)

    def trace_sources(self) -> None:
        """Make every policy keep the map from tokens to input patches (:attr:`Encoded.source`, unmerging)."""
        for p in self.all_policies():
            p.trace_source = True

    def all_policies(self) -> list[MergePolicy]:
        """The task's policy, then the comparison policies."""
        return [self.policy, *self.test_policies]

    @property
    def active(self) -> MergePolicy:
        """The policy the backbone merges with now (a sweep switches it with :meth:`use`)."""
        return self.backend.active_policy(self.backbone)

    def use(self, policy: MergePolicy) -> None:
        """Merge with ``policy`` (one of :meth:`all_policies`) from now on."""
        self.backend.use_policy(self.backbone, policy)

    @contextmanager
    def running(self, policy: MergePolicy, r: int | list[int]) -> Iterator[None]:
        """Run with ``policy`` at reduction ``r`` (constant or schedule); the own policy is back afterwards."""
        self.use(policy)
        try:
            with policy.reduce(r):
                yield
        finally:
            self.use(self.policy)

    # ------------------------------------------------------------------ r
    def schedule(self, r: int | list[int] | str | None = None) -> list[int]:
        """One r per block: of ``r`` (parsed and checked against the depth), or the active policy's own."""
        if r is None:
            return list(self.active.schedule)
        return r_schedule(parse_r(r), self.depth)

    def token_counts(self, num_tokens: int) -> list[int]:
        """Tokens after each block with the active policy for an input of ``num_tokens`` (prefix included)."""
        return self.active.token_counts(num_tokens)

    @property
    def last_token_counts(self) -> list[int]:
        """Token count (active count in soft merging) after each block of the last forward."""
        return list(self.active.state.tokens)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Encoded:
        """Images [B, 3, H, W] -> :class:`Encoded` (merged tokens, sizes, sources) with the active policy."""
        tokens = self.backend.forward_features(self.backbone, x)
        state = self.active.state
        return Encoded(tokens, state.size, state.source, self.num_prefix)

    def forward_head(self, encoded: Encoded) -> Tensor:
        """The backbone's own classifier head on :meth:`forward`'s tokens (average pools weigh by size)."""
        return self.backend.forward_head(self.backbone, encoded.tokens)

    def gmacs(self, input_size: tuple[int, int, int]) -> float:
        """GMACs per image of the backbone with its own head and the active policy (docs/design.md §10)."""
        return flops.gmacs(self.backbone, input_size)

    # ------------------------------------------------------------------ description
    @property
    def depth(self) -> int:
        return self.info.depth

    @property
    def width(self) -> int:
        return self.info.width

    @property
    def num_heads(self) -> int:
        return self.info.num_heads

    @property
    def num_prefix(self) -> int:
        return self.info.num_prefix

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.backend.patch_size(self.backbone))

    @property
    def img_size(self) -> tuple[int, int] | None:
        """The input size the backbone was created for (None: any)."""
        img = self.backend.img_size(self.backbone)
        return tuple(img) if img is not None else None

    @property
    def global_pool(self) -> str:
        """How the classifier head pools: ``token`` (class token), ``avg`` or ``""`` (none)."""
        return self.backend.global_pool(self.backbone)

    def num_tokens(self, img_size: tuple[int, int] | None = None) -> int:
        """Tokens entering block 0 (prefix included) for an input of ``img_size`` (default: the model's)."""
        return self.backend.num_tokens(self.backbone, img_size)

    def head_modules(self) -> list[nn.Module]:
        """The backbone's classifier head (what :meth:`forward_head` runs besides pooling)."""
        return self.backend.head_modules(self.backbone)

    def set_merge_training(self, mode: bool) -> None:
        """Set the merging blocks' own training flag (it selects soft merging) whatever their contents' mode."""
        self.backend.set_merge_training(self.backbone, mode)
