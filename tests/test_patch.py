"""apply_policy on timm ViTs: exactness at r = 0, schedules, soft training, gradients, fused attention, errors."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import tiny_vit
from timm.models.vision_transformer import VisionTransformer

from dtem_lightning import DTEMHard, DTEMSoft, MergePolicy, NoMerge, ToMe, apply_policy
from dtem_lightning.patch import MergeBlock

POLICIES = [NoMerge, ToMe, DTEMHard, DTEMSoft]


def _models() -> dict[str, callable]:
    return {
        "deit_s": lambda: timm.create_model("deit_small_patch16_224").eval(),
        "layerscale": lambda: tiny_vit(init_values=1e-1),
        "qknorm_reg4": lambda: tiny_vit(qk_norm=True, reg_tokens=4, no_embed_class=True),
        "avgpool": lambda: tiny_vit(global_pool="avg", class_token=False, fc_norm=True),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_r0_is_bit_identical(name):
    model = _models()[name]()
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = model(x)
    keys = set(model.state_dict())
    for i, cls in enumerate(POLICIES):
        m = model if i == 0 else _models()[name]()
        if i:
            m.load_state_dict(model.state_dict())
        policy = cls(r=0)
        apply_policy(m, policy)
        assert set(m.state_dict()) == keys  # backbone keys never change
        with torch.no_grad():
            assert torch.equal(m(x), ref), cls.__name__
        m.train(), policy.train()
        torch.manual_seed(1)
        out_train = m(x)
        m.eval(), policy.eval()
        assert torch.isfinite(out_train).all()


def test_deit_s_token_schedule_r16():
    model = timm.create_model("deit_small_patch16_224").eval()
    policy = ToMe(r=16)
    apply_policy(model, policy)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert policy.state.tokens == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    assert policy.token_counts(197)[-1] == 11
    assert policy.state.size.sum().item() == pytest.approx(197)


@pytest.mark.parametrize("cls", [ToMe, DTEMHard])
def test_prefix_tokens_never_merge(cls):
    model = tiny_vit(reg_tokens=4)
    policy = cls(r=20, trace_source=True)
    apply_policy(model, policy)
    with torch.no_grad():
        model.forward_features(torch.randn(2, 3, 32, 32))
    src = policy.state.source  # [B, n, N0]
    assert torch.equal(src[:, :5, :5], torch.eye(5).expand(2, 5, 5))
    assert torch.equal(policy.state.size[:, :5, 0], torch.ones(2, 5))
    assert torch.equal(src.sum(1), torch.ones(2, 69))  # every input token in exactly one output token


def test_tome_matches_reference_on_model_keys():
    """ToMe on a real block equals the reference rule applied to that block's averaged keys."""
    from test_merge import reference_tome

    model = tiny_vit(depth=1)
    policy = ToMe(r=9)
    apply_policy(model, policy)
    x = torch.randn(2, 3, 32, 32)
    blk = model.blocks[0]
    captured = {}
    blk.attn.k_norm.register_forward_hook(lambda m, a, o: captured.setdefault("k", o))
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        out = blk(tokens)
        h = tokens + blk.attn(blk.norm1(tokens))
        ref_x, _ = reference_tome(h, torch.ones(2, 65, 1), captured["k"].mean(1), 9, 1)
        ref = ref_x + blk.mlp(blk.norm2(ref_x))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_soft_training_keeps_length_and_conserves():
    model = tiny_vit()
    policy = DTEMSoft(r=12)
    apply_policy(model, policy)
    model.train(), policy.train()
    feats = {}
    model.blocks[-1].register_forward_hook(lambda m, a, o: feats.setdefault("x", o))
    out = model.forward_features(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 65, 64)
    assert policy.state.tokens == [53, 41, 29, 17]  # active counts
    torch.testing.assert_close(policy.state.size.sum(1).flatten(), torch.full((3,), 65.0))
    assert (policy.state.size >= 0).all()


def test_soft_step_conserves_weighted_features():
    """One soft step leaves sum(size) and sum(size * x) unchanged (re-sorting only permutes)."""
    policy = DTEMSoft(r=5)
    apply_policy(tiny_vit(depth=1), policy)
    policy.train()
    x = torch.randn(2, 65, 64)
    policy.begin(x)
    y = policy.merge(0, x, torch.randn(2, 65, 16))
    s = policy.state.size
    torch.testing.assert_close(s.sum(1), torch.full((2, 1), 65.0))
    torch.testing.assert_close((y * s).sum(1), x.sum(1), atol=1e-4, rtol=1e-4)
    assert torch.equal(y[:, 0], x[:, 0])  # prefix untouched


def test_dtem_parameter_count_and_gradients():
    model = timm.create_model("deit_small_patch16_224")
    policy = DTEMSoft(r=16)
    apply_policy(model, policy)
    model.requires_grad_(False)
    trainable = sum(
        p.numel() for p in list(model.parameters()) + list(policy.parameters()) if p.requires_grad
    )
    assert trainable == 295_680 == 12 * (384 * 64 + 64)
    model.train(), policy.train()
    model(torch.randn(2, 3, 224, 224)).logsumexp(-1).sum().backward()
    grads = [e.weight.grad for e in policy.embed]
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:11])
    # Block 11 merges after the last attention: the class token cannot see it, so its gradient is zero.
    assert grads[11] is None or grads[11].abs().sum() == 0


def test_no_backbone_gradient_through_embedding():
    model = tiny_vit()
    policy = DTEMSoft(r=8)
    apply_policy(model, policy)
    model.train(), policy.train()
    outs = []
    for e in policy.embed:
        e.register_forward_hook(lambda m, a, o: outs.append(o))
    model(torch.randn(2, 3, 32, 32))
    torch.stack([o.sum() for o in outs]).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(e.weight.grad is not None for e in policy.embed)


@pytest.mark.parametrize("cls", [ToMe, DTEMHard, DTEMSoft])
def test_fused_matches_eager(cls):
    # float64: with random weights some matching scores nearly tie, and fp32 rounding differences between
    # the two attention kernels can flip such a tie (a different, equally valid merge).
    model = timm.create_model("deit_small_patch16_224").eval().double()
    policy = cls(r=13)
    apply_policy(model, policy)
    policy.double()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        fused = model(x)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        eager = model(x)
    assert (fused - eager).abs().max() <= 1e-5


def test_fused_matches_eager_in_soft_training():
    model = tiny_vit().double()
    policy = DTEMSoft(r=10)
    apply_policy(model, policy)
    policy.double()
    model.train(), policy.train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fused = model(x)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    assert (fused - model(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("cls", [ToMe, DTEMHard])
def test_alone_equals_in_batch(cls):
    model = tiny_vit()
    apply_policy(model, cls(r=10))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        batch = model(x)
        alone = model(x[2:3])
    torch.testing.assert_close(alone, batch[2:3], atol=1e-5, rtol=1e-5)


def test_avg_pool_is_size_weighted():
    model = tiny_vit(global_pool="avg", class_token=False)
    policy = ToMe(r=10)
    apply_policy(model, policy)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
        pooled = model.pool(feats)
    s = policy.state.size
    torch.testing.assert_close(pooled, (feats * s).sum(1) / s.sum(1))
    assert not torch.allclose(pooled, feats.mean(1))


def test_reduce_is_temporary():
    model = tiny_vit()
    policy = ToMe(r=2)
    apply_policy(model, policy)
    with policy.reduce(8):
        assert policy.schedule == [8, 8, 8, 8]
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        assert policy.state.tokens == [57, 49, 41, 33]
    assert policy.r == 2 and policy.schedule == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="-3"), policy.reduce(-3):
        pass


def test_large_r_is_capped():
    model = tiny_vit()
    policy = ToMe(r=1000)
    apply_policy(model, policy)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert policy.state.tokens == [33, 17, 9, 5]


def test_bad_inputs():
    with pytest.raises(ValueError, match="-1"):
        ToMe(r=-1)
    with pytest.raises(ValueError, match="3 entries but the model has 4 blocks"):
        apply_policy(tiny_vit(), ToMe(r=[1, 2, 3]))
    with pytest.raises(ValueError, match="ResNet"):
        apply_policy(timm.create_model("resnet18"), ToMe(r=1))
    with pytest.raises(ValueError, match="ResPostBlock"):
        apply_policy(tiny_vit(block_fn=timm.models.vision_transformer.ResPostBlock), ToMe(r=1))
    with pytest.raises(ValueError, match="Eva"):
        apply_policy(timm.create_model("eva02_tiny_patch14_224"), ToMe(r=1))
    with pytest.raises(ValueError, match="map"):
        apply_policy(tiny_vit(global_pool="map"), ToMe(r=1))
    model = tiny_vit()
    apply_policy(model, ToMe(r=1))
    with pytest.raises(RuntimeError, match="already applied"):
        apply_policy(model, ToMe(r=1))
    with pytest.raises(ValueError, match="prop_attn"):
        ToMe(prop_attn="sometimes")


def test_blocks_are_swapped_and_policy_not_a_submodule():
    model = tiny_vit()
    policy = DTEMHard(r=2)
    apply_policy(model, policy)
    assert all(type(b) is MergeBlock for b in model.blocks)
    assert isinstance(model, VisionTransformer)
    assert not any(isinstance(m, MergePolicy) for m in model.modules())
    assert sorted(n for n, _ in policy.named_parameters())[:2] == ["embed.0.bias", "embed.0.weight"]


def test_unmerge_after_merge():
    model = tiny_vit()
    policy = ToMe(r=8, trace_source=True)
    apply_policy(model, policy)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
    full = policy.unmerge(feats)
    assert full.shape == (2, 65, 64)
    src = policy.state.source
    assert torch.equal(src.sum(1), torch.ones(2, 65))
    owner = src.argmax(1)  # [B, N0]
    torch.testing.assert_close(full, feats.gather(1, owner[..., None].expand(-1, -1, 64)))
    with pytest.raises(RuntimeError, match="trace_source"):
        p = ToMe(r=1)
        apply_policy(tiny_vit(), p)
        p.unmerge(feats)


def test_soft_source_map_tracks_sizes():
    model = tiny_vit()
    policy = DTEMSoft(r=8, trace_source=True)
    apply_policy(model, policy)
    model.train(), policy.train()
    model.forward_features(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(
        policy.state.source.sum(-1, keepdim=True), policy.state.size, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast_soft_training(fused):
    """Under bf16 autocast the soft step and sizes stay float32 and the embeddings still get gradients."""
    model = tiny_vit()
    policy = DTEMSoft(r=8)
    apply_policy(model, policy)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert policy.state.size.dtype == torch.float32
    out.float().logsumexp(-1).sum().backward()
    assert all(e.weight.grad is not None and e.weight.grad.abs().sum() > 0 for e in policy.embed[:3])


def test_capped_r_warns_once():
    model = tiny_vit()
    policy = ToMe(r=40)
    apply_policy(model, policy)
    with pytest.warns(
        UserWarning, match=r"r=\[40\] exceeds half of the 64 patch tokens.*\(5 tokens remain\)"
    ):
        model(torch.randn(1, 3, 32, 32))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(1, 3, 32, 32))  # same setting: no second warning
        with policy.reduce(20):  # late-block capping is the normal rule: silent
            model(torch.randn(1, 3, 32, 32))


def test_hard_order_by_size():
    """order="size" re-sorts merged tokens by size; it changes nothing when only the last block merges."""
    x = torch.randn(2, 3, 32, 32)
    outs, maps = {}, {}
    for order in ("tome", "size"):
        torch.manual_seed(1)
        model = tiny_vit()
        policy = DTEMHard(r=[0, 0, 0, 12], order=order, trace_source=True)
        apply_policy(model, policy)
        with torch.no_grad():
            feats = model.forward_features(x)
            outs[order] = model.forward_head(feats)
            maps[order] = policy.unmerge(feats)
        sizes = policy.state.size[:, 1:, 0]
        if order == "size":
            assert (sizes[:, :-1] >= sizes[:, 1:]).all()
        else:
            assert not (sizes[:, :-1] >= sizes[:, 1:]).all()  # ToMe's order: unmerged sources first
    torch.testing.assert_close(outs["size"], outs["tome"])
    torch.testing.assert_close(maps["size"], maps["tome"])  # sources follow the permutation

    torch.manual_seed(1)
    model = tiny_vit()
    policy = DTEMHard(r=8, order="size")
    apply_policy(model, policy)
    with torch.no_grad():
        model(x)
    assert policy.state.tokens == [57, 49, 41, 33]
    assert torch.equal(policy.state.size.sum(1), torch.full((2, 1), 65.0))
    sizes = policy.state.size[:, 1:, 0]
    assert (sizes[:, :-1] >= sizes[:, 1:]).all()
    with pytest.raises(ValueError, match="order"):
        DTEMHard(order="random")
