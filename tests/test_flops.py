"""gmacs(): the section-4 figures, analytic cross-checks, fused == eager, torch's FlopCounterMode, mode restore."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from dtem_lightning import DTEMHard, DTEMSoft, NoMerge, ToMe, apply_policy
from dtem_lightning.flops import gmacs

N0 = 197  # DeiT at 224: 196 patches + class token


def _vit(name: str, policy: torch.nn.Module) -> torch.nn.Module:
    return apply_policy(timm.create_model(name), policy)  # random init: FLOPs do not depend on weights


@pytest.fixture(scope="module")
def deit_s_tome() -> tuple[torch.nn.Module, ToMe]:
    policy = ToMe(r=0)
    return _vit("deit_small_patch16_224", policy), policy


@pytest.fixture(scope="module")
def deit_s_dtem() -> tuple[torch.nn.Module, DTEMHard]:
    policy = DTEMHard(r=0)
    return _vit("deit_small_patch16_224", policy), policy


def _set_fused(vit: torch.nn.Module, fused: bool) -> None:
    for blk in vit.blocks:
        blk.attn.fused_attn = fused


def _tokens_in(policy: ToMe) -> list[int]:
    """Tokens entering each block under the policy's current schedule."""
    return [N0, *policy.token_counts(N0)[:-1]]


def _analytic_macs(policy: ToMe, C: int, embed_dim: int = 0, classes: int = 1000) -> int:
    """DeiT MACs with bias adds, written out: patch conv, per block qkv/attention/proj/matching/MLP, head."""
    total = 196 * (3 * 16 * 16) * C + 196 * C + C * classes + classes
    for n, n_out, r in zip(_tokens_in(policy), policy.token_counts(N0), policy.schedule):
        total += 3 * n * C * C + 3 * n * C  # qkv
        total += 2 * n * n * C  # q·kᵀ and attn·v over all heads, pre-merge count
        total += n * C * C + n * C  # proj
        if r:
            d = embed_dim or 64  # metric width: DTEM's embedding or ToMe's head-averaged keys
            total += n * C * embed_dim + n * embed_dim  # DTEM's embedding Linear (0 for ToMe)
            src = (n - 1) // 2
            total += src * d * (n - 1 - src)  # matching similarity (sources x destinations)
        total += n_out * C * 4 * C + n_out * 4 * C + n_out * 4 * C * C + n_out * C  # MLP, post-merge count
    return total


# The reference figures of docs/flops.md (docs/design.md §10; bias adds included).
FIGURES = [
    ("tome", 0, 4.61),
    ("tome", 8, 3.42),
    ("tome", 11, 2.99),
    ("tome", 12, 2.85),
    ("tome", 13, 2.71),
    ("tome", 16, 2.30),
    ("dtem", 12, 2.89),
    ("dtem", 16, 2.33),
    # The design's DTEM r=0 (4.67) computes the embedding even at r=0; our blocks skip it when r=0.
    ("dtem", 0, 4.61),
]


@pytest.mark.parametrize(("kind", "r", "expected"), FIGURES)
def test_deit_s_figures(kind, r, expected, deit_s_tome, deit_s_dtem):
    vit, policy = deit_s_tome if kind == "tome" else deit_s_dtem
    with policy.reduce(r):
        assert gmacs(vit) == pytest.approx(expected, rel=0.01)


def test_deit_t_and_nomerge():
    vit = _vit("deit_tiny_patch16_224", NoMerge(r=8))  # NoMerge ignores r
    assert gmacs(vit) == pytest.approx(1.26, rel=0.01)


def test_deit_b_figures():
    policy = ToMe(r=16)
    vit = _vit("deit_base_patch16_224", policy)
    assert gmacs(vit) == pytest.approx(8.78, rel=0.01)
    with policy.reduce(0):
        assert gmacs(vit) == pytest.approx(17.58, rel=0.01)


@pytest.mark.parametrize("r", [0, 8, 16])
def test_matches_analytic_count(r, deit_s_tome, deit_s_dtem):
    for (vit, policy), embed_dim in ((deit_s_tome, 0), (deit_s_dtem, 64)):
        with policy.reduce(r):
            assert gmacs(vit) * 1e9 == pytest.approx(_analytic_macs(policy, 384, embed_dim), rel=1e-9)


def test_strictly_decreasing_in_r(deit_s_tome):
    vit, policy = deit_s_tome
    values = []
    for r in (0, 4, 8, 12, 16):
        with policy.reduce(r):
            values.append(gmacs(vit))
    assert all(a > b for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("r", [8, 13, 16])
def test_dtem_adds_embedding_gemm(r, deit_s_tome, deit_s_dtem):
    (tome_vit, tome), (dtem_vit, dtem) = deit_s_tome, deit_s_dtem
    with tome.reduce(r), dtem.reduce(r):
        diff = gmacs(dtem_vit) - gmacs(tome_vit)
        # Same token counts; DTEM adds Linear(384, 64) with bias on the block input of every merging block.
        # The matching bmm is the same size for both (embedding width 64 = ToMe's head dim).
        embed = sum(n * (384 * 64 + 64) for n, rb in zip(_tokens_in(dtem), dtem.schedule) if rb)
    assert diff * 1e9 == pytest.approx(embed, rel=1e-6)


@pytest.mark.parametrize("r", [0, 13])
def test_fused_equals_eager(r, deit_s_tome):
    vit, policy = deit_s_tome
    with policy.reduce(r):
        fused = gmacs(vit)
        _set_fused(vit, False)
        try:
            eager = gmacs(vit)
        finally:
            _set_fused(vit, True)
    assert eager == pytest.approx(fused, rel=1e-3)


@pytest.mark.parametrize("r", [0, 13])
def test_agrees_with_torch_flop_counter(r, deit_s_tome):
    vit, policy = deit_s_tome
    with policy.reduce(r):
        ours = gmacs(vit)
        # torch's counter knows the CUDA SDPA ops but not the CPU flash op: run it on eager attention.
        _set_fused(vit, False)
        vit.eval()
        policy.eval()
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                vit(torch.randn(1, 3, 224, 224))
        finally:
            _set_fused(vit, True)
    theirs = counter.get_total_flops() / 2 / 1e9  # torch counts FLOPs = 2 x MACs
    # torch counts no bias adds (9·N·C per block + conv and head biases, about 0.2 % here): ours is
    # slightly larger, within 1 %.
    assert theirs < ours
    assert ours == pytest.approx(theirs, rel=0.01)


def test_restores_modes_and_evaluates_policy():
    policy = DTEMSoft(r=13)  # soft merging in train mode keeps all tokens; gmacs must count eval (hard)
    vit = _vit("deit_small_patch16_224", policy)
    vit.train()
    policy.train()
    vit.blocks[3].eval()  # mixed modes must come back as they were
    before = {name: m.training for name, m in vit.named_modules()}
    rng = torch.get_rng_state()
    value = gmacs(vit)
    assert {name: m.training for name, m in vit.named_modules()} == before
    assert policy.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert value == pytest.approx(2.748, rel=0.005)  # DTEM r=13 (hard) on DeiT-S


def test_gmacs_inside_inference_mode():
    """Lightning's test loop runs under inference_mode, which hides ops from dispatch-mode counters."""
    model = timm.create_model("deit_tiny_patch16_224")
    with torch.inference_mode():
        assert gmacs(model) == pytest.approx(1.2578, rel=1e-3)


def test_gmacs_of_a_callable():
    """A bound method of a module counts what it runs, in eval mode (modes restored); any callable works."""

    class TwoPasses(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 4)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.lin(x))

        def twice(self, x: torch.Tensor) -> torch.Tensor:
            assert not self.training, "gmacs runs the owner of a bound method in eval mode"
            return self(x) + self(x)

    m = TwoPasses().train()
    once = gmacs(m, (1, 3, 8))  # x [1, 1, 3, 8]: 3 rows of an 8 -> 4 Linear, bias included
    assert once == pytest.approx(3 * (8 * 4 + 4) / 1e9)
    assert gmacs(m.twice, (1, 3, 8)) == pytest.approx(2 * once)
    assert m.training and m.drop.training  # modes restored
    assert gmacs(lambda x: m.lin(x) @ m.lin(x).mT, (1, 3, 8)) == pytest.approx(2 * once + 3 * 3 * 4 / 1e9)
