"""FLOPs as GMACs per image, counted on the executed aten ops with ptflops' aten backend plus fused SDPA."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from ptflops.aten_engine import FlopCounterMode as _AtenCounter
from torch import Tensor, nn

_aten = torch.ops.aten

# Fused scaled-dot-product attention ops (CPU flash; CUDA flash, memory-efficient, cuDNN). Each takes
# query [B, H, N_q, d_qk], key [B, H_kv, N_k, d_qk], value [B, H_kv, N_k, d_v] as its first three arguments.
_SDPA_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def sdpa_macs(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """MACs of fused attention: B·H·N_q·N_k·(d_qk + d_v) (q·kᵀ and attn·v; softmax and scaling not counted).

    Args:
        inputs: the op's arguments; the first three are query [B, H, N_q, d_qk], key [B, H_kv, N_k, d_qk]
            and value [B, H_kv, N_k, d_v] (H counts query heads, so grouped-query attention is covered).
        outputs: the op's outputs (unused).

    Returns:
        multiply-accumulates, in ptflops' counter signature.
    """
    q, k, v = inputs[:3]
    B, H, n_q, d_qk = q.shape
    return B * H * n_q * k.shape[-2] * (d_qk + v.shape[-1])


SDPA_HOOKS: dict[Any, Callable[[Sequence[Any], Sequence[Any]], int]] = {
    getattr(_aten, name): sdpa_macs for name in _SDPA_OPS if hasattr(_aten, name)
}


class _Call(nn.Module):
    """``fn`` as a module; a bound method's module is a submodule, so its parameters and modes are found."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn
        owner = getattr(fn, "__self__", None)
        self.owner = owner if isinstance(owner, nn.Module) else None

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def gmacs(
    model: nn.Module | Callable[[Tensor], Tensor], input_size: tuple[int, int, int] = (3, 224, 224)
) -> float:
    """Multiply-accumulates / 1e9 of one eval-mode forward of ``model`` on one image.

    Counts the aten ops that really run, so a merging ViT is counted on its merged token counts (attention on
    the pre-merge count, MLP on the post-merge count) and DTEM's embedding GEMM is included even though the
    embedding Linears are not submodules of the ViT. The counter is ptflops' aten backend (matmul, mm, bmm,
    addmm and convolution, bias adds included) with :data:`SDPA_HOOKS` added for the fused attention ops it
    does not know (it would count them as 0). Eager and fused attention give the same count. The matching
    similarity (a bmm of the normalised metric) is counted too; softmax, norms, GELU, gathers and
    element-wise ops are not, as in the ViT literature.

    The counter class is used directly rather than through ``ptflops.get_model_complexity_info``, which
    (0.7.5) registers forward hooks on the model's children and never removes them, swallows exceptions
    (returns None) and feeds an uninitialised input.

    The model (and so its merge policy) runs in eval mode under ``torch.no_grad``; every module's previous
    train/eval flag is restored afterwards. The input is on the model's device and dtype.

    Args:
        model: any module taking one [1, *input_size] image batch, e.g. a timm ViT patched by ``apply_policy``,
            or any callable ``f(x) -> Tensor``; a bound method of a module (``task.inference``) runs with that
            module's device, dtype and eval mode.
        input_size: (channels, height, width) of the image.

    Returns:
        GMACs per image.
    """
    if not isinstance(model, nn.Module):
        model = _Call(model)
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next(model.buffers(), torch.empty(0))
    # A local generator: counting FLOPs must not move the global RNG.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, *input_size, generator=gen).to(device=ref.device, dtype=ref.dtype)
    # Eval mode (merge policies follow the backbone's mode: hard merging), then restore every module's flag.
    modes = [(m, m.training) for m in model.modules()]
    counter = _AtenCounter(custom_hooks=SDPA_HOOKS)
    try:
        model.eval()
        # inference_mode (Lightning's test loop) hides ops from the dispatch-mode counter: switch it off.
        with torch.inference_mode(False), torch.no_grad(), counter:
            model(x)
    finally:
        for m, mode in modes:
            m.training = mode
    return counter.complexity / 1e9
