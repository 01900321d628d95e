"""Pure merging functions: bipartite matching against a reference, soft grouping, conservation, tracing."""

from __future__ import annotations

import pytest
import torch

from dtem_lightning import merge as M


def reference_tome(x, size, metric, r, num_prefix):
    """Loop-per-image reference of the ToMe rule written from its description (docs/design.md §3).

    ToMe alternates over the whole sequence: tokens at even sequence index are sources, at odd index
    destinations; prefix tokens (class, distillation) never merge. Unmerged sources keep their original order.
    """
    out_x, out_s = [], []
    for b in range(x.shape[0]):
        pre, pat = list(range(num_prefix)), list(range(num_prefix, x.shape[1]))
        dst, src = [i for i in pat if i % 2 == 1], [i for i in pat if i % 2 == 0]
        rr = min(r, len(pat) // 2)
        m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        best = {i: max(dst, key=lambda j: float(m[i] @ m[j])) for i in src}
        score = {i: float(m[i] @ m[best[i]]) for i in src}
        merged = sorted(src, key=lambda i: -score[i])[:rr]
        xs = {i: x[b, i] * size[b, i] for i in range(x.shape[1])}
        ss = {i: size[b, i].clone() for i in range(x.shape[1])}
        for i in merged:
            xs[best[i]] = xs[best[i]] + xs[i]
            ss[best[i]] = ss[best[i]] + ss[i]
        order = pre + [i for i in src if i not in merged] + dst
        out_x.append(torch.stack([xs[i] / ss[i] for i in order]))
        out_s.append(torch.stack([ss[i] for i in order]))
    return torch.stack(out_x), torch.stack(out_s)


@pytest.mark.parametrize(
    "num_prefix,n,r",
    [(1, 17, 5), (1, 17, 100), (5, 20, 4), (0, 9, 3), (0, 10, 4), (2, 12, 0), (2, 12, 4), (2, 13, 3),
     (2, 13, 100), (4, 15, 5)],
)  # fmt: skip
def test_bipartite_matches_reference(num_prefix, n, r):
    x, metric = torch.randn(3, n, 8, dtype=torch.float64), torch.randn(3, n, 6, dtype=torch.float64)
    size = torch.rand(3, n, 1, dtype=torch.float64) + 0.5
    merge = M.bipartite_matching(metric, r, num_prefix)
    got_x, got_s = M.merge_weighted(merge, x, size)
    ref_x, ref_s = reference_tome(x, size, metric, r, num_prefix)
    assert got_x.shape == ref_x.shape == (3, n - min(r, (n - num_prefix) // 2), 8)
    torch.testing.assert_close(got_x, ref_x)
    torch.testing.assert_close(got_s, ref_s)


def _scatter_merge(x, merged_src, kept_src, merged_dst, num_prefix, reduce):
    """ToMe's own formulation of the merge: split, gather with expanded indices, ``scatter_reduce`` along tokens."""
    off = M.hard_split_offset(num_prefix)
    pre, pat = x[:, :num_prefix], x[:, num_prefix:]
    s, d = pat[:, 1 - off :: 2], pat[:, off::2]
    c = x.shape[-1]
    kept = s.gather(1, kept_src[..., None].expand(-1, -1, c))
    moved = s.gather(1, merged_src[..., None].expand(-1, -1, c))
    d = d.scatter_reduce(1, merged_dst[..., None].expand(-1, -1, c), moved, reduce=reduce)
    return torch.cat([pre, kept, d], dim=1)


@pytest.mark.parametrize(
    "batch,num_prefix,n,r", [(1, 1, 197, 16), (3, 1, 101, 40), (2, 0, 64, 30), (2, 2, 51, 20)]
)
def test_merge_is_bit_identical_to_scatter_reduce(batch, num_prefix, n, r):
    # A 2-d metric makes many sources pick the same destination, so a different order of additions would show
    # up in the last bits (float32): the row-index merge must add in ToMe's order exactly.
    g = torch.Generator().manual_seed(n)
    metric, x = torch.randn(batch, n, 2, generator=g), torch.randn(batch, n, 385, generator=g)
    merge = M.bipartite_matching(metric, r, num_prefix)
    choice = M._tome_choice(metric, r, num_prefix)
    shared = (choice[2][:, :, None] == choice[2][:, None, :]).sum(-1)
    assert shared.max() >= 2  # two sources share a destination
    for reduce in ("sum", "mean", "amax"):
        assert torch.equal(merge(x, reduce), _scatter_merge(x, *choice, num_prefix, reduce)), reduce
    src, dst, keep = M.bipartite_pairs(metric, r, num_prefix)
    pat = x[:, num_prefix:]
    ref = pat.scatter_reduce(
        1, dst[..., None].expand(-1, -1, 385), pat.gather(1, src[..., None].expand(-1, -1, 385)), "sum"
    )
    before = pat.clone()
    assert torch.equal(M._into_dst(pat, src, dst, "sum"), ref)
    assert torch.equal(pat, before)  # the merge writes into a copy (pat is a view of x without prefix tokens)


def test_hard_split_offset_follows_sequence_parity():
    # destinations are the patches at odd sequence index: P = 1 -> patch 0 (index 1); P = 0, 2 -> patch 1
    assert [M.hard_split_offset(p) for p in range(6)] == [1, 0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="-1"):
        M.hard_split_offset(-1)


@pytest.mark.parametrize("num_prefix,n", [(2, 12), (2, 13), (0, 9), (1, 2), (2, 3), (0, 1)])
def test_unmerge_inverts_the_layout_for_every_prefix(num_prefix, n):
    x, metric = torch.randn(2, n, 3), torch.randn(2, n, 4)
    eye = torch.eye(n).expand(2, n, n).clone()
    merge0 = M.bipartite_matching(metric, 0, num_prefix)
    assert torch.equal(
        M.unmerge_tokens(merge0(x), merge0(eye, "sum")), x
    )  # r = 0 only reorders: undone exactly
    merge = M.bipartite_matching(metric, (n - num_prefix) // 2, num_prefix)
    _check_unmerge(x, merge(x, "mean"), merge(eye, "sum"))


def _check_unmerge(x: torch.Tensor, y: torch.Tensor, source: torch.Tensor) -> None:
    """unmerge_tokens gives every input position the mean of the inputs merged with it, found by hand."""
    assert torch.equal(source.sum(1), torch.ones(source.shape[0], source.shape[2]))  # one token per input
    back = M.unmerge_tokens(y, source)
    assert back.shape == x.shape
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            group = source[b, int(source[b, :, i].argmax())].nonzero().flatten()
            torch.testing.assert_close(back[b, i], x[b, group].mean(0))


def test_merge_conserves_size_and_weighted_sum():
    x, size, metric = (
        torch.randn(2, 33, 4, dtype=torch.float64),
        torch.rand(2, 33, 1).double() + 1,
        torch.randn(2, 33, 5),
    )
    merge = M.bipartite_matching(metric, 10, 1)
    y, s = M.merge_weighted(merge, x, size)
    torch.testing.assert_close(s.sum(1), size.sum(1))
    torch.testing.assert_close((y * s).sum(1), (x * size).sum(1))


def test_unmerge_copies_merged_tokens_back():
    x, metric = torch.randn(2, 21, 4), torch.randn(2, 21, 5)
    merge = M.bipartite_matching(metric, 7, 1)
    source = merge(torch.eye(21).expand(2, 21, 21).clone(), "sum")
    _check_unmerge(x, merge(x, "mean"), source)
    assert torch.equal(M.unmerge_tokens(merge(x, "mean"), source)[:, 0], x[:, 0])  # the class token is itself


def test_unmerge_identity_is_exact():
    x = torch.randn(2, 10, 3)
    assert torch.equal(M.unmerge_tokens(x, torch.eye(10).expand(2, 10, 10)), x)


def test_r_schedule_and_counts():
    assert M.r_schedule(3, 4) == [3, 3, 3, 3]
    assert M.r_schedule([1, 0, 2], 3) == [1, 0, 2]
    counts = M.token_counts(197, 1, M.r_schedule(16, 12))
    assert counts == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    assert M.token_counts(9, 1, [100, 100]) == [5, 3]
    with pytest.raises(ValueError, match="-1"):
        M.r_schedule(-1, 3)
    with pytest.raises(ValueError, match="2 entries but the model has 3"):
        M.r_schedule([1, 2], 3)
    with pytest.raises(TypeError, match="1.5"):
        M.r_schedule([1.5, 2], 2)


def test_soft_grouping_rows_and_total():
    src, dst = M.normalize(torch.randn(2, 16, 8)), M.normalize(torch.randn(2, 17, 8))
    w = M.soft_grouping(src, dst, r=5)
    assert w.shape == (2, 16, 17) and w.dtype == torch.float32
    assert (w.sum(-1) <= 1 + 1e-6).all() and (w >= 0).all()
    assert ((w > 0).sum(-1) <= 3).all()  # only top-k candidates
    torch.testing.assert_close(w.sum((1, 2)), torch.full((2,), 5.0), atol=0.05, rtol=0)


def _separated_embedding(n_src=8, n_dst=9, dim=24, seed=0):
    """Embeddings whose best scores are well separated (gaps ≫ tau1·tau2) and span < 15.9·tau1."""
    g = torch.Generator().manual_seed(seed)
    dst = M.normalize(torch.randn(n_dst, dim, generator=g))
    targets = torch.randint(0, n_dst, (n_src,), generator=g)
    # Best score of source i is 0.95 - 0.05 i: distinct, separated by 0.05 (≫ 1e-4), spanning 0.35 (< 1.59).
    cos = 0.95 - 0.05 * torch.arange(n_src, dtype=torch.float32)
    noise = M.normalize(torch.randn(n_src, dim, generator=g))
    noise = M.normalize(noise - (noise * dst[targets]).sum(-1, keepdim=True) * dst[targets])
    src = cos[:, None] * dst[targets] + (1 - cos[:, None] ** 2).sqrt() * noise
    perm = torch.randperm(n_src, generator=g)
    return src[perm][None], dst[None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_grouping_reduces_to_hard_matching(seed):
    src, dst = _separated_embedding(seed=seed)
    r = 4
    # Hard rule (docs/design.md §3) on the same embedding, in the interleaved layout the matcher expects: one
    # prefix token, destinations at odd sequence index (1, 3, ..., 17), sources at even index (2, 4, ..., 16).
    tokens = torch.zeros(1, 18, src.shape[-1])
    tokens[:, 1::2], tokens[:, 2::2] = dst, src
    merge = M.bipartite_matching(tokens, r, 1)
    source = merge(torch.eye(18).double()[None], "sum")
    hard = torch.zeros(8, 9)
    for row in source[0]:
        members = row.nonzero().flatten().tolist()
        if len(members) > 1:
            d = [m for m in members if m % 2 == 1][0] // 2
            for m in members:
                if m % 2 == 0:
                    hard[m // 2 - 1, d] = 1
    assert hard.sum() == r
    for tau2 in (1e-2, 1e-3):
        w = M.soft_grouping(src, dst, r, k=3, tau1=0.1, tau2=tau2)[0]
        assert torch.allclose(w, hard, atol=1e-3), (tau2, w, hard)


def test_soft_merge_conserves_and_differentiates():
    x_a, x_b = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 7, 4, dtype=torch.float64)
    s_a, s_b = torch.rand(2, 6, 1).double() + 0.5, torch.rand(2, 7, 1).double() + 0.5
    emb_a = torch.randn(2, 6, 5, requires_grad=True)
    w = M.soft_grouping(M.normalize(emb_a), M.normalize(torch.randn(2, 7, 5)), r=3).double()
    nx_b, ns_b, ns_a = M.soft_merge(x_a, x_b, s_a, s_b, w)
    torch.testing.assert_close(ns_a.sum(1) + ns_b.sum(1), s_a.sum(1) + s_b.sum(1))
    torch.testing.assert_close(
        (ns_a * x_a).sum(1) + (ns_b * nx_b).sum(1), (s_a * x_a).sum(1) + (s_b * x_b).sum(1)
    )
    ((nx_b**2).sum() + ns_a.sum()).backward()
    assert emb_a.grad is not None and emb_a.grad.abs().sum() > 0


def test_clamp_straight_through():
    v = torch.tensor([-0.5, 0.3, 1.5], requires_grad=True)
    out = M.clamp01_st(v)
    assert out.tolist() == [0.0, pytest.approx(0.3), 1.0]
    out.sum().backward()
    assert v.grad.tolist() == [1.0, 1.0, 1.0]


def test_patch_groups_from_source_map():
    metric = torch.randn(2, 17, 4)
    merge = M.bipartite_matching(metric, 5, 1)
    source = merge(torch.eye(17).expand(2, 17, 17).clone(), "sum")
    groups = M.patch_groups(source, 1)
    assert groups.shape == (2, 16)
    assert all(len(set(g.tolist())) == 16 - 5 for g in groups)  # 16 patches in 11 tokens
    assert torch.equal(M.patch_groups(torch.eye(5)[None], 1), torch.tensor([[1, 2, 3, 4]]))


def reference_tome_vit(vit, images, r):
    """Whole-model ToMe forward written from docs/design.md §2/§3: eager attention with a log(size) bias per key,
    keys averaged over heads as the metric, :func:`reference_tome` after attention, the timm head."""
    P = vit.num_prefix_tokens
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    size = torch.ones(x.shape[0], x.shape[1], 1)
    for blk in vit.blocks:
        a = blk.attn
        B, N, C = x.shape
        u = blk.norm1(x)
        q, k, v = a.qkv(u).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(q), a.k_norm(k)
        logits = q @ k.transpose(-2, -1) * a.scale + torch.log(size)[:, None, None, :, 0]
        h = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + blk.ls1(a.proj(a.norm(h)))
        x, size = reference_tome(x, size, k.mean(1), r, P)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return vit.forward_head(vit.norm(x)), size


def test_tome_on_distilled_deit_matches_reference():
    """Class + distillation token: both protected, the split alternates over the whole sequence (ToMe's rule)."""
    import timm

    from dtem_lightning import ToMe, apply_policy

    kw = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    vit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **kw).eval()
    assert vit.num_prefix_tokens == 2
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, ref_size = reference_tome_vit(vit, images, r=10)
        policy = ToMe(r=10, trace_source=True)
        apply_policy(vit, policy)
        out = vit(images)
    assert policy.state.tokens == [56, 46, 36]
    torch.testing.assert_close(policy.state.size, ref_size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # class and distillation tokens stay first, unmerged, each standing for itself
    assert torch.equal(policy.state.source[:, :2, :2], torch.eye(2).expand(2, 2, 2))
    assert torch.equal(policy.state.source[:, :2].sum(-1), torch.ones(2, 2))
