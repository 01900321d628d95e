"""Soft training's attention (issue 21): the bias (log sizes) gets its gradient from a backward that recomputes
the attention matrix (merge.biased_attention) instead of autograd keeping one per block. Equal to the unfused
attention in value and gradient; the equivalence is tested by flipping patch.RECOMPUTE_ATTENTION."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit

from dtem_lightning import DTEMSoft, ToMeSoft, apply_policy, patch
from dtem_lightning import merge as M


def test_biased_attention_equals_sdpa_in_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    bias = torch.log(torch.rand(2, 1, 1, 17, generator=g, dtype=torch.float64) + 1e-6).requires_grad_()
    grad = torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    got = M.biased_attention(q, k, v, bias, 0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad(got, (q, k, v, bias), grad), torch.autograd.grad(want, (q, k, v, bias), grad)
    ):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_biased_attention_forward_is_fused() -> None:
    """SDPA takes its unfused path (a [B, H, N, N] matrix) whenever an input requires grad, even with grad mode
    off: the forward must hand it detached inputs so the fused CPU kernel runs."""
    from torch.profiler import profile

    q, k, v = (torch.randn(2, 3, 17, 8, requires_grad=True) for _ in range(3))
    bias = torch.zeros(2, 1, 1, 17, requires_grad=True)
    with profile() as prof:
        M.biased_attention(q, k, v, bias, 0.3)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops, sorted(ops)
    assert "aten::_scaled_dot_product_attention_math" not in ops


@pytest.mark.parametrize("cls, trains", [(DTEMSoft, "policy"), (ToMeSoft, "all")])
def test_soft_step_gradients_equal_with_and_without_recompute(monkeypatch, cls: type, trains: str) -> None:
    """One soft training step, float64: loss and every gradient equal with the recomputing attention and with
    timm's own; the recomputing path really runs (once per block after the first merge)."""
    calls = []
    real = M.biased_attention
    monkeypatch.setattr(M, "biased_attention", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 3, 7])
    results = []
    for recompute in (True, False):
        monkeypatch.setattr(patch, "RECOMPUTE_ATTENTION", recompute)
        torch.manual_seed(0)
        model = tiny_vit().double().train()
        policy = cls(r=8)
        apply_policy(model, policy)
        policy.double()
        if trains == "policy":
            model.requires_grad_(False)
        params = [p for p in [*policy.parameters(), *model.parameters()] if p.requires_grad]
        loss = F.cross_entropy(model(x), y)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
        if recompute:
            assert len(calls) == 3  # blocks 1-3 (block 0 has no sizes yet); timm's path never calls it
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert len(calls) == 3 and len(grads_a) > 0
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-12)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert any(float(g.abs().sum()) > 0 for g in grads_a)


def test_eval_and_plain_training_keep_timm_attention(monkeypatch) -> None:
    """Without a bias that needs a gradient (eval, hard training, NoMerge) nothing changes: timm's path."""
    calls = []
    monkeypatch.setattr(M, "biased_attention", lambda *a: calls.append(1))
    model = tiny_vit()
    apply_policy(model, DTEMSoft(r=8))
    model(torch.randn(2, 3, 32, 32))  # eval: hard merging, sizes without gradient
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 32, 32))
    assert calls == []


def test_soft_training_uses_it_by_default(monkeypatch) -> None:
    calls = []
    real = M.biased_attention
    monkeypatch.setattr(M, "biased_attention", lambda *a: calls.append(1) or real(*a))
    model = tiny_vit().train()
    apply_policy(model, DTEMSoft(r=8))
    model.requires_grad_(False)
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # the embedding's gradient reaches the sizes
    assert len(calls) == 3
