"""The timm backend: the only module that knows timm. Creates timm ViTs, swaps their blocks to merging blocks,
binds a policy and answers the encoder's questions about the model (docs/design.md §1, docs/extending.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from dtem_lightning import merge as M
from dtem_lightning.policy import MergePolicy, ModelInfo

_POOLS = ("token", "avg", "")

# Where a timm weights file keeps the classifier head and the patch embedding (the encoder checks both).
HEAD_WEIGHT = "head.weight"
PATCH_WEIGHT = "patch_embed.proj.weight"


class MergeBlock(Block):
    """timm ``Block`` that merges tokens between attention and MLP.

    Modifications: block 0 resets the policy's state; attention gets the proportional-attention bias
    (log size) through timm's own ``attn_mask`` so fused attention is kept; after attention one
    :meth:`~dtem_lightning.policy.MergePolicy.step` merges tokens, handed the normalised input and the keys
    (the output of ``attn.k_norm``, kept by the hook :func:`apply_policy` installs).
    """

    _merge_policy: MergePolicy
    _merge_layer: int

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        policy, layer = self._merge_policy, self._merge_layer
        if is_causal:
            raise ValueError("merging blocks do not support is_causal=True")
        if layer == 0:
            policy.begin(x, self.training)
        bias = policy.attn_bias()
        if bias is not None:
            bias = bias if attn_mask is None else bias + attn_mask
        else:
            bias = attn_mask
        if bias is not None and bias.dtype.is_floating_point and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)  # SDPA wants the mask in the query's dtype
        u = self.norm1(x)
        if (
            self.training
            and RECOMPUTE_ATTENTION
            and bias is not None
            and bias.requires_grad
            and _plain_attention(self.attn, u)
        ):
            a = _attention_recomputed(self.attn, u, bias)  # soft training: no attention matrix kept per block
        else:
            a = self.attn(u, attn_mask=bias)
        x = x + self.drop_path1(self.ls1(a))
        # Popped, not read: the keys must not outlive the block (memory) nor reach another forward.
        x = policy.step(layer, x, u, self.attn.k_norm.__dict__.pop("_merge_keys", None))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


# Soft training's attention bias (log sizes) needs a gradient, which fused attention does not give: autograd would
# keep every block's [B, H, N, N] attention matrix. Off: timm's own attention (the equivalence test flips it).
RECOMPUTE_ATTENTION = True


def _plain_attention(attn: nn.Module, u: Tensor) -> bool:
    """timm's Attention without a gate, attention dropout or autocast: what :func:`_attention_recomputed`
    reproduces."""
    return (
        getattr(attn, "gate", None) is None
        and not (attn.training and attn.attn_drop.p > 0)
        and not torch.is_autocast_enabled(u.device.type)
    )


def _attention_recomputed(attn: nn.Module, u: Tensor, bias: Tensor) -> Tensor:
    """timm ``Attention.forward`` (timm 1.0.31) with :func:`~dtem_lightning.merge.biased_attention` for the
    attention itself."""
    B, N, _ = u.shape
    q, k, v = attn.qkv(u).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)  # k_norm's hook keeps the keys for the merge step
    x = M.biased_attention(q, k, v, bias.to(q.dtype), attn.scale)
    x = attn.norm(x.transpose(1, 2).reshape(B, N, attn.attn_dim))
    return attn.proj_drop(attn.proj(x))


class MergeVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose average pooling weights tokens by size.

    Modifications: ``pool`` computes the size-weighted mean of the patch tokens for ``global_pool='avg'``
    once tokens have merged (unchanged otherwise, so r = 0 is bit-identical).
    """

    _merge_policy: MergePolicy

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        policy = self._merge_policy
        if pool_type == "avg" and policy.state.size is not None and not self.pool_include_prefix:
            return policy.pool_avg(x)
        return super().pool(x, pool_type)

    def merge_info(self) -> ModelInfo:
        """The description a policy binds to (``policy.bind(model)``)."""
        return describe(self)


def describe(vit: nn.Module) -> ModelInfo:
    """The plain description of a timm ViT that policies bind to (depth, width, heads, head dim, prefix tokens,
    and where its parameters live)."""
    attn = vit.blocks[0].attn
    p = next(vit.parameters())
    return ModelInfo(
        depth=len(vit.blocks),
        width=vit.embed_dim,
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        num_prefix=vit.num_prefix_tokens,
        device=p.device,
        dtype=p.dtype,
    )


def _keep_keys(module: nn.Module, args: tuple, out: Tensor) -> None:
    """Forward hook on ``attn.k_norm``: keep the keys [B, H, N, D] for the block's merge step."""
    module.__dict__["_merge_keys"] = out  # a plain attribute: never a buffer, never saved


def _unsupported(what: str) -> ValueError:
    return ValueError(
        f"apply_policy supports timm VisionTransformer models made of timm Block layers; found {what}. "
        "EVA, BEiT, Swin, ResPost/parallel blocks and attention-pool heads are not supported."
    )


def apply_policy(vit: nn.Module, policy: MergePolicy) -> nn.Module:
    """Turn an existing timm ViT into a merging one, in place.

    Checks the model, swaps each ``Block`` to :class:`MergeBlock` and the model to
    :class:`MergeVisionTransformer` (only ``forward``/``pool`` differ; the state_dict keys do not change),
    keeps each block's keys for the merge step, and binds ``policy`` to the model's description (it builds its
    embeddings there). Works on a loaded model, not only at creation.

    Args:
        vit: a timm ``VisionTransformer``.
        policy: the merge policy; held by the blocks as a plain reference (register it on your own module).

    Returns:
        ``vit`` itself.
    """
    if not isinstance(vit, VisionTransformer):
        raise _unsupported(f"model class {type(vit).__name__}")
    if isinstance(vit, MergeVisionTransformer) or policy.bound:
        raise RuntimeError(
            f"a merge policy is already applied to this {type(vit).__name__} (or policy bound)"
        )
    for i, blk in enumerate(vit.blocks):
        if type(blk) is not Block:
            raise _unsupported(f"block {i} of class {type(blk).__name__}")
    if vit.attn_pool is not None or vit.global_pool not in _POOLS:
        raise _unsupported(f"global_pool={vit.global_pool!r}")
    if vit.grad_checkpointing:
        raise ValueError(
            "gradient checkpointing re-runs blocks and would corrupt the merge state; disable it"
        )
    policy.bind(describe(vit))
    for i, blk in enumerate(vit.blocks):
        blk.attn.k_norm.register_forward_hook(_keep_keys)
        blk.__class__ = MergeBlock
        # Plain attributes, not submodules: the policy is registered once by its owner.
        object.__setattr__(blk, "_merge_policy", policy)
        object.__setattr__(blk, "_merge_layer", i)
    cls = type(vit)
    vit.__class__ = (
        MergeVisionTransformer
        if cls is VisionTransformer
        else type(f"Merge{cls.__name__}", (MergeVisionTransformer, cls), {})
    )
    object.__setattr__(vit, "_merge_policy", policy)
    return vit


def use_policy(vit: nn.Module, policy: MergePolicy) -> None:
    """Point a patched ViT at another policy already bound to it (sweeps over several policies)."""
    if not isinstance(vit, MergeVisionTransformer):
        raise RuntimeError("use_policy needs a model patched by apply_policy()")
    if policy.depth != len(vit.blocks):
        raise RuntimeError(f"{type(policy).__name__} is not bound to this model: call policy.bind(vit) first")
    for blk in vit.blocks:
        object.__setattr__(blk, "_merge_policy", policy)
    object.__setattr__(vit, "_merge_policy", policy)


def active_policy(vit: nn.Module) -> MergePolicy:
    """The policy a patched ViT merges with right now (sweeps switch it with :func:`use_policy`)."""
    if not isinstance(vit, MergeVisionTransformer):
        raise RuntimeError("active_policy needs a model patched by apply_policy()")
    return vit._merge_policy


def num_tokens(vit: nn.Module, img_size: tuple[int, int] | None = None) -> int:
    """Tokens entering block 0 (prefix included) for an input of ``img_size`` (default: the model's)."""
    grid = vit.patch_embed.dynamic_feat_size(img_size) if img_size else vit.patch_embed.grid_size
    return grid[0] * grid[1] + vit.num_prefix_tokens


# ---------------------------------------------------------------------- creation and weights (the encoder calls these)
def is_model(name: str) -> bool:
    """Whether ``name`` is a timm model name."""
    return timm.is_model(name)


def data_backbone(name: str) -> str:
    """The timm name whose data config the data modules use: a timm name is its own."""
    return name


def owns(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ViT this backend patches."""
    return isinstance(model, VisionTransformer)


def create(
    name: str,
    kwargs: dict[str, Any],
    pretrained: bool = False,
    weights_file: str | Path | None = None,
    file_classes: int | None = None,
) -> nn.Module:
    """``timm.create_model``: random weights, the hub's (``pretrained``) or a local file's.

    Args:
        name: timm model name.
        kwargs: extra ``timm.create_model`` arguments.
        pretrained: load the hub weights.
        weights_file: a local file that loads with ``weights_only=True`` (the caller checked it).
        file_classes: classes of the file's classifier head (timm keeps it only when the count matches).
    """
    if weights_file is not None:
        overlay: dict[str, Any] = {"file": str(weights_file), "hf_hub_id": None, "url": None}
        if file_classes is not None:
            overlay["num_classes"] = file_classes
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def hub_classes(name: str) -> int | None:
    """Classes of the classifier head of the hub weights of ``name``."""
    return getattr(timm.models.get_pretrained_cfg(name), "num_classes", None)


def patch_kernel(name: str, kwargs: dict[str, Any]) -> tuple[int, ...]:
    """Shape of the patch embedding's weight of the model ``name`` would create (on the meta device: no memory)."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = timm.create_model(name, pretrained=False, **kwargs)
    return tuple(model.patch_embed.proj.weight.shape)


# ---------------------------------------------------------------------- what the encoder reads
def patch_size(vit: nn.Module) -> tuple[int, int]:
    return tuple(vit.patch_embed.patch_size)


def img_size(vit: nn.Module) -> tuple[int, int] | None:
    return vit.patch_embed.img_size


def global_pool(vit: nn.Module) -> str:
    return vit.global_pool


def forward_features(vit: nn.Module, x: Tensor) -> Tensor:
    """Images [B, 3, H, W] -> output tokens [B, n, C] after the final norm (merged by the active policy)."""
    return vit.forward_features(x)


def forward_head(vit: nn.Module, tokens: Tensor) -> Tensor:
    """timm's classifier head (pooling, fc_norm, head) on ``forward_features``' tokens."""
    return vit.forward_head(tokens)


def head_modules(vit: nn.Module) -> list[nn.Module]:
    """timm's classifier head (what ``forward_head`` runs): attention pool if any, fc_norm, dropout, head."""
    parts = [getattr(vit, n, None) for n in ("attn_pool", "fc_norm", "head_drop", "head")]
    return [m for m in parts if m is not None]


def set_merge_training(vit: nn.Module, mode: bool) -> None:
    """Set the training flag of the merging blocks only: it selects the policy's training behaviour (soft)."""
    for m in vit.modules():
        if isinstance(m, MergeBlock):
            m.training = mode
