"""The Hugging Face backend: the only module that knows ``transformers`` internals (docs/hf.md).

Patches, in place, the vision encoders of ``ViTModel`` / ``ViTForImageClassification``, ``CLIPVisionModel`` and
GIT (``GitVisionModel``, ``GitModel``, ``GitForCausalLM``: its image encoder; the text decoder is left as it
is and told how many visual tokens it gets). Each encoder layer's class is swapped for a subclass whose
``forward`` drives the policy exactly as the timm backend does (docs/extending.md "A backbone family"):
block 0 begins, the proportional-attention bias goes through the model's own ``attention_mask`` argument (so
SDPA stays SDPA), and one ``policy.step`` per layer merges between attention and MLP. None of these models
averages tokens: their heads read the class token, which never merges, so no pooling changes.

``transformers`` is an optional extra (``pip install dtem-lightning[hf]``): this module imports it only when a
model is created or patched, so the timm backend works without it. Model names are ``hf:<hub id or folder>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dtem_lightning.policy import MergePolicy, ModelInfo

PREFIX = "hf:"
# Weight-file checks of the encoder (checkpoint_path): hf models take their weights from their folder instead.
HEAD_WEIGHT = "classifier.weight"
PATCH_WEIGHT = "vit.embeddings.patch_embeddings.projection.weight"
# The attention implementations that take an additive float mask (flash and flex kernels do not).
_ATTN_IMPLS = ("eager", "sdpa")
SUPPORTED = (
    "ViTModel",
    "ViTForImageClassification",
    "CLIPVisionModel",
    "GitVisionModel",
    "GitModel",
    "GitForCausalLM",
)
# timm models whose data config (mean, std, interpolation) is that of the hf image processors: the data modules
# resolve transforms from a timm name (see :func:`data_backbone`).
_DATA_TWINS = {
    (0.5, 0.5, 0.5): "vit_base_patch16_224.augreg_in21k",
    (0.48145466, 0.4578275, 0.40821073): "vit_base_patch16_clip_224.openai",
}
_DEFAULT_MEAN = {"vit": (0.5, 0.5, 0.5), "clip_vision_model": (0.48145466, 0.4578275, 0.40821073)}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # the optional extra
        raise ImportError(
            "hf: backbones need transformers: pip install 'dtem-lightning[hf]' (transformers==5.18.0)"
        ) from e
    return transformers


# ---------------------------------------------------------------------- the parts of a supported model
@dataclass
class _Parts:
    """Where a supported model keeps what the backend drives.

    Attributes:
        layers: its encoder layers, in order.
        config: the vision config (image size, patch size, width, heads, attention implementation).
        encoder: the module whose ``forward(pixel_values)`` returns the output tokens (``last_hidden_state``).
    """

    layers: nn.ModuleList
    config: Any
    encoder: nn.Module


def _parts(model: nn.Module) -> _Parts:
    """The vision parts of a supported model; any other class is refused by name."""
    name = type(model).__name__
    if name not in SUPPORTED or not owns(model):
        raise _unsupported(f"model class {type(model).__name__}")
    if name == "ViTForImageClassification":
        model = model.vit
    if name in ("ViTModel", "ViTForImageClassification"):
        return _Parts(model.layers, model.config, model)
    if name == "CLIPVisionModel":
        return _Parts(model.encoder.layers, model.config, model)
    git = model.git if name == "GitForCausalLM" else model
    if name != "GitVisionModel":
        if git.config.num_image_with_embedding is not None:
            raise _unsupported(f"num_image_with_embedding={git.config.num_image_with_embedding} (video GIT)")
        git = git.image_encoder
    return _Parts(git.vision_model.encoder.layers, git.config, git)


def _unsupported(what: str) -> ValueError:
    return ValueError(
        f"the hf backend supports {', '.join(SUPPORTED)} made of their own encoder layers; found {what}"
    )


# Per layer class: (first norm, attention, second norm, MLP, dropout after attention and MLP or None).
_LAYOUTS = {
    "ViTLayer": ("layernorm_before", "attention", "layernorm_after", "mlp", "dropout"),
    "CLIPEncoderLayer": ("layer_norm1", "self_attn", "layer_norm2", "mlp", None),
    "GitVisionEncoderLayer": ("layer_norm1", "self_attn", "layer_norm2", "mlp", None),
}


class _MergeLayer(nn.Module):
    """Mixin of a merging hf encoder layer (mixed into a subclass of the layer's own class).

    Modifications to the pre-norm layer ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``: block 0 resets the
    policy's state; the proportional-attention bias (log size) is added to the layer's ``attention_mask``, the
    model's own additive-mask path (SDPA or eager); between attention and MLP one ``policy.step`` merges,
    handed the normalised input and the keys [B, H, N, D] (the output of ``k_proj``, kept by a hook).
    """

    _merge_policy: MergePolicy
    _merge_layer: int
    _merge_layout: tuple[str, str, str, str, str | None]

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        policy, layer = self._merge_policy, self._merge_layer
        norm1, attn, norm2, mlp, drop = self._merge_layout
        x = hidden_states
        if layer == 0:
            policy.begin(x, self.training)
        mask = _with_bias(policy.attn_bias(), attention_mask, x.dtype)
        u = getattr(self, norm1)(x)
        a = getattr(self, attn)(u, mask, **kwargs)[0]
        x = x + (getattr(self, drop)(a) if drop else a)
        x = policy.step(layer, x, u, getattr(self, attn).__dict__.pop("_merge_keys", None))
        h = getattr(self, mlp)(getattr(self, norm2)(x))
        return x + (getattr(self, drop)(h) if drop else h)


def _with_bias(bias: Tensor | None, mask: Tensor | None, dtype: Any) -> Tensor | None:
    """The layer's additive mask plus the size bias [B, 1, 1, N], in the activations' dtype (SDPA wants it)."""
    if bias is None:
        return mask
    if mask is not None:
        if not mask.dtype.is_floating_point:
            raise ValueError(f"merging needs an additive float attention_mask, got dtype {mask.dtype}")
        bias = bias + mask
    return bias.to(dtype) if bias.dtype != dtype else bias


def _keep_keys(module: nn.Module, args: tuple, out: Tensor) -> None:
    """Forward hook on ``k_proj``: keep the keys [B, H, N, D] on the attention module for the merge step."""
    attn = module.__dict__["_merge_attn"]
    B, N, _ = out.shape
    attn.__dict__["_merge_keys"] = out.view(B, N, -1, attn.__dict__["_merge_head_dim"]).transpose(1, 2)


_CLASSES: dict[tuple[type, type], type] = {}


def _merge_class(mixin: type, cls: type) -> type:
    """``Merge<cls>``: ``cls`` with ``mixin``'s changes, made once per class and named in this module (pickles)."""
    if (mixin, cls) not in _CLASSES:
        new = type(f"Merge{cls.__name__}", (mixin, cls), {"__module__": __name__})
        _CLASSES[mixin, cls] = globals()[new.__name__] = new
    return _CLASSES[mixin, cls]


def _git_decoder(model: nn.Module) -> nn.Module | None:
    name = type(model).__name__
    return model.git if name == "GitForCausalLM" else model if name == "GitModel" else None


class _ImageTokens:
    """GIT's ``image_patch_tokens`` as a property: the visual tokens of the image encoder's last output.

    GIT's decoder assumes a fixed count (widening the padding mask over the cached image tokens during
    ``generate``, slicing the loss); a merging encoder changes it with r.
    """

    @property
    def image_patch_tokens(self) -> int:
        tower = self.__dict__["_merge_tower"]
        return tower.__dict__.get("_merge_out_tokens", self.__dict__["image_patch_tokens"])

    @image_patch_tokens.setter
    def image_patch_tokens(self, value: int) -> None:
        self.__dict__["image_patch_tokens"] = value


def _count_tokens(module: nn.Module, args: tuple, out: Any) -> None:
    """Forward hook on GIT's vision tower: keep the number of visual tokens it passed on."""
    module.__dict__["_merge_out_tokens"] = int(out.last_hidden_state.shape[1])


# ---------------------------------------------------------------------- patching
def describe(model: nn.Module) -> ModelInfo:
    """The plain description of a supported model's vision encoder that policies bind to."""
    parts = _parts(model)
    cfg = parts.config
    p = next(model.parameters())
    return ModelInfo(
        depth=len(parts.layers),
        width=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        num_prefix=1,  # the class token
        device=p.device,
        dtype=p.dtype,
    )


def apply_policy(model: nn.Module, policy: MergePolicy) -> nn.Module:
    """Turn a supported Hugging Face model into a merging one, in place (state_dict keys unchanged).

    Refuses other model classes, other layer classes, attention implementations without an additive mask
    (flash, flex) and gradient checkpointing (re-running a layer would corrupt the merge state).

    Args:
        model: one of :data:`SUPPORTED`.
        policy: the merge policy; held by the layers as a plain reference (register it on your own module).

    Returns:
        ``model`` itself.
    """
    parts = _parts(model)
    if "_merge_policy" in model.__dict__ or policy.bound:
        raise RuntimeError(
            f"a merge policy is already applied to this {type(model).__name__} (or policy bound)"
        )
    for i, layer in enumerate(parts.layers):
        if type(layer).__name__ not in _LAYOUTS:
            raise _unsupported(f"layer {i} of class {type(layer).__name__}")
    impl = parts.config._attn_implementation
    if impl not in _ATTN_IMPLS:
        raise ValueError(
            f"attn_implementation {impl!r} takes no additive mask; use 'sdpa' or 'eager' to merge"
        )
    if getattr(model, "is_gradient_checkpointing", False):
        raise ValueError(
            "gradient checkpointing re-runs layers and would corrupt the merge state; disable it"
        )
    policy.bind(describe(model))
    for i, layer in enumerate(parts.layers):
        layout = _LAYOUTS[type(layer).__name__]
        attn = getattr(layer, layout[1])
        object.__setattr__(attn.k_proj, "_merge_attn", attn)
        attn.__dict__["_merge_head_dim"] = policy.head_dim
        attn.k_proj.register_forward_hook(_keep_keys)
        layer.__class__ = _merge_class(_MergeLayer, type(layer))
        object.__setattr__(layer, "_merge_policy", policy)
        object.__setattr__(layer, "_merge_layer", i)
        layer._merge_layout = layout
    git = _git_decoder(model)
    if git is not None:
        git.image_encoder.register_forward_hook(_count_tokens)
        for dec in git.encoder.layer:
            attn = dec.attention.self
            attn.__class__ = _merge_class(_ImageTokens, type(attn))
            object.__setattr__(attn, "_merge_tower", git.image_encoder)
    object.__setattr__(model, "_merge_policy", policy)
    return model


def _layers(model: nn.Module) -> nn.ModuleList:
    if "_merge_policy" not in model.__dict__:
        raise RuntimeError(f"{type(model).__name__} is not patched: call apply_policy() first")
    return _parts(model).layers


def use_policy(model: nn.Module, policy: MergePolicy) -> None:
    """Point a patched model at another policy already bound to it (sweeps over several policies)."""
    layers = _layers(model)
    if policy.depth != len(layers):
        raise RuntimeError(f"{type(policy).__name__} is not bound to this model: bind it first")
    for layer in layers:
        object.__setattr__(layer, "_merge_policy", policy)
    object.__setattr__(model, "_merge_policy", policy)


def active_policy(model: nn.Module) -> MergePolicy:
    """The policy a patched model merges with right now."""
    _layers(model)
    return model.__dict__["_merge_policy"]


def set_merge_training(model: nn.Module, mode: bool) -> None:
    """Set the training flag of the merging layers only: it selects the policy's training behaviour (soft)."""
    for m in model.modules():
        if isinstance(m, _MergeLayer):
            m.training = mode


# ---------------------------------------------------------------------- creation (the encoder calls these)
def is_model(name: str) -> bool:
    """Whether ``name`` is an hf model name: ``hf:<hub id or local folder>``."""
    return name.startswith(PREFIX)


def owns(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model (supported classes are checked when patching)."""
    return type(model).__module__.startswith("transformers.")


def _source(name: str) -> str:
    src = name.removeprefix(PREFIX)
    if not src:
        raise ValueError(f"backbone {name!r}: give hf:<hub id or local folder>")
    return src


def create(
    name: str,
    kwargs: dict[str, Any],
    pretrained: bool = False,
    weights_file: str | Path | None = None,
    file_classes: int | None = None,
) -> nn.Module:
    """The model of ``hf:<hub id or folder>`` with that folder's (or hub's) weights, its class taken from the
    config's ``architectures`` (one of :data:`SUPPORTED`).

    The name names the weights: they are always loaded (``pretrained`` changes nothing); a local folder never
    touches the network. ``kwargs`` may hold ``num_classes`` and ``img_size`` only as checks: a different class
    count or image size than the weights' is refused (a new head or resampled position embeddings would be
    silent changes of the model).
    """
    if weights_file is not None:
        raise ValueError(
            f"{name}: hf models take their weights from their folder; checkpoint_path is not used"
        )
    tf = _transformers()
    src = _source(name)
    local = Path(src).is_dir()
    config = tf.AutoConfig.from_pretrained(src, local_files_only=local)
    arch = (config.architectures or [None])[0]
    if arch not in SUPPORTED:
        raise _unsupported(f"architectures={config.architectures} in {src}")
    vision = getattr(config, "vision_config", config)
    extra = dict(kwargs)
    classes = extra.pop("num_classes", None)
    if classes and arch == "ViTForImageClassification" and classes != config.num_labels:
        raise ValueError(f"{name} has {config.num_labels} labels but the task has num_classes={classes}")
    size = extra.pop("img_size", None)
    if size is not None and size != vision.image_size:
        raise ValueError(f"{name} was trained at image_size={vision.image_size}, got img_size={size}")
    if extra:
        raise ValueError(
            f"{name}: unknown backbone_kwargs {sorted(extra)} (hf models are configured by folder)"
        )
    return getattr(tf, arch).from_pretrained(src, local_files_only=local)


def hub_classes(name: str) -> int | None:
    return None  # the encoder's head check is for timm weights; create checks the class count itself


def patch_kernel(name: str, kwargs: dict[str, Any]) -> tuple[int, ...]:
    raise ValueError(f"{name}: hf models take their weights from their folder; checkpoint_path is not used")


def data_backbone(name: str) -> str:
    """A timm name whose data config (mean, std) is that of the hf model's image processor, for the data
    modules, which resolve transforms from timm names; timm names pass through.

    Read from the folder's ``preprocessor_config.json`` when there is one, else the model type's usual
    processor (ViT: mean = std = 0.5; CLIP and GIT: CLIP's). Image size comes from the data's ``img_size``.
    """
    if not is_model(name):
        return name
    src = Path(_source(name))
    mean = None
    if (src / "preprocessor_config.json").is_file():
        mean = json.loads((src / "preprocessor_config.json").read_text()).get("image_mean")
    elif (src / "config.json").is_file():
        model_type = json.loads((src / "config.json").read_text()).get("model_type")
        mean = _DEFAULT_MEAN.get(model_type, _DEFAULT_MEAN["clip_vision_model"])
    else:  # a hub id: CLIP's statistics, those of CLIP and GIT (ViT folders name theirs in the config)
        mean = _DEFAULT_MEAN["clip_vision_model"]
    for twin_mean, twin in _DATA_TWINS.items():
        if mean is not None and all(abs(a - b) < 1e-4 for a, b in zip(mean, twin_mean)):
            return twin
    raise ValueError(f"{name}: image_mean {mean} is none of {list(_DATA_TWINS)}; no timm data config matches")


# ---------------------------------------------------------------------- what the encoder reads
def patch_size(model: nn.Module) -> tuple[int, int]:
    p = _parts(model).config.patch_size
    return (p, p) if isinstance(p, int) else tuple(p)


def img_size(model: nn.Module) -> tuple[int, int] | None:
    s = _parts(model).config.image_size
    return (s, s) if isinstance(s, int) else tuple(s)


def global_pool(model: nn.Module) -> str:
    return "token"  # every supported head reads the class token


def num_tokens(model: nn.Module, img_size: tuple[int, int] | None = None) -> int:
    """Tokens entering layer 0 (class token included) for an input of ``img_size`` (default: the model's)."""
    h, w = img_size or globals()["img_size"](model)
    p = patch_size(model)
    return (h // p[0]) * (w // p[1]) + 1


def forward_features(model: nn.Module, x: Tensor) -> Tensor:
    """Images [B, 3, H, W] -> output tokens [B, n, C] of the vision encoder (after its final norm where it norms
    every token: ViT and GIT; CLIP norms only the pooled token, in :func:`forward_head`)."""
    return _parts(model).encoder(x).last_hidden_state


def forward_head(model: nn.Module, tokens: Tensor) -> Tensor:
    """The model's own head on the class token: ViT's classifier or pooler, CLIP's post-layernorm."""
    name = type(model).__name__
    if name == "ViTForImageClassification":
        return model.classifier(tokens[:, 0])
    if name == "ViTModel":
        return model.pooler(tokens) if model.pooler is not None else tokens[:, 0]
    if name == "CLIPVisionModel":
        return model.post_layernorm(tokens[:, 0])
    raise ValueError(f"{name} has no classifier head")


def head_modules(model: nn.Module) -> list[nn.Module]:
    """What :func:`forward_head` runs."""
    name = type(model).__name__
    parts = {
        "ViTForImageClassification": "classifier",
        "ViTModel": "pooler",
        "CLIPVisionModel": "post_layernorm",
    }
    head = getattr(model, parts.get(name, ""), None)
    return [head] if head is not None else []
