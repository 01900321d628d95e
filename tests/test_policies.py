"""The comparison policies of issue 20 against references written from their papers' equations, one image at a
time: ToMeSoft (soft merging as a mode of ToMe's metric), PiToMe (energy-protected merging), ToFu (prune early,
MLERP late)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

from dtem_lightning import ATM, DTEMSoft, NoMerge, PiToMe, ToFu, ToMe, ToMeSoft, apply_policy
from dtem_lightning import merge as M
from dtem_lightning.flops import gmacs

NEW = [ToMeSoft, PiToMe, ToFu, ATM]


def _patched(cls: type, model_state: dict | None = None, **kwargs: object) -> tuple[torch.nn.Module, object]:
    model = tiny_vit()
    if model_state is not None:
        model.load_state_dict(model_state)
    policy = cls(**kwargs)
    apply_policy(model, policy)
    return model, policy


@pytest.mark.parametrize("cls", NEW)
@pytest.mark.parametrize("train", [False, True])
def test_r0_is_bit_identical_to_timm(cls: type, train: bool) -> None:
    ref = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    model, _ = _patched(cls, ref.state_dict(), r=0)
    ref.train(train), model.train(train)
    torch.manual_seed(1)
    a = ref(x)
    torch.manual_seed(1)
    assert torch.equal(model(x), a)


def test_tomesoft_evaluates_as_tome_and_trains_softly_through_the_keys() -> None:
    x = torch.randn(2, 3, 32, 32)
    tome, _ = _patched(ToMe, r=8)
    soft, policy = _patched(ToMeSoft, tome.state_dict(), r=8)
    with torch.no_grad():
        assert torch.equal(soft(x), tome(x))
    # Train mode: DTEM's soft step on the keys, i.e. DTEMSoft whose metric is ToMe's (soft is a mode).
    dtem, dpolicy = _patched(DTEMSoft, tome.state_dict(), r=8)
    dpolicy.metric = lambda layer, u: dpolicy.state.keys.mean(1)
    soft.train(), dtem.train()
    y = soft(x)
    torch.testing.assert_close(y, dtem(x), rtol=0, atol=0)
    assert policy.state.tokens == [57, 49, 41, 33]  # active counts: the sequence keeps 65 tokens
    y.sum().backward()
    qkv = [b.attn.qkv.weight.grad for b in soft.blocks]
    # The soft merge's gradient reaches the keys (the key rows of qkv), unlike DTEM's detached embedding.
    assert all(g is not None and g[64:128].abs().sum() > 0 for g in qkv[:3])


# ---------------------------------------------------------------------------- references, one image at a time
def _energy_reference(m: torch.Tensor, r: int, margin: float, alpha: float) -> tuple[list, list, list]:
    """PiToMe §3 by loops: energies, the 2r highest in energy order alternate sources / destinations, each
    source goes to its most similar destination. m: [Np, C]."""
    n = m.shape[0]
    u = [m[i] / m[i].norm() for i in range(n)]
    energy = []
    for i in range(n):
        total = 0.0
        for j in range(n):
            s = float(u[i] @ u[j])
            total += s if s >= margin else alpha * (torch.exp(torch.tensor(s - margin)).item() - 1)
        energy.append(total / n)
    ranked = sorted(range(n), key=lambda i: -energy[i])[: 2 * r]
    src, dsts = ranked[0::2], ranked[1::2]
    dst = [max(dsts, key=lambda d: float(u[s] @ u[d])) for s in src]
    keep = [i for i in range(n) if i not in src]
    return src, dst, keep


def _merge_reference(
    x: torch.Tensor, size: torch.Tensor, src: list, dst: list, keep: list, how: str
) -> tuple:
    """Merge one image's patch tokens x [Np, C] (sizes [Np]) by loops: mean, prune or MLERP."""
    groups = {d: [d] for d in dst}
    for s, d in zip(src, dst, strict=True):
        groups[d].append(s)
    out, sizes = [], []
    for i in keep:
        members = groups.get(i, [i])
        total = sum(float(size[j]) for j in members)
        if how == "prune":
            feat = x[i]
        else:
            feat = sum(size[j] * x[j] for j in members) / total
            if how == "mlerp":
                feat = feat / feat.norm() * max(float(x[j].norm()) for j in members)
        out.append(feat)
        sizes.append(total)
    return torch.stack(out), torch.tensor(sizes, dtype=x.dtype)


def _tome_pairs_reference(m: torch.Tensor, r: int, off: int) -> tuple[list, list, list]:
    """ToMe's bipartite matching by loops: alternate split, best destination per source, top r by score."""
    n = m.shape[0]
    u = [m[i] / m[i].norm() for i in range(n)]
    srcs, dsts = list(range(1 - off, n, 2)), list(range(off, n, 2))
    best = {s: max(dsts, key=lambda d: float(u[s] @ u[d])) for s in srcs}
    score = {s: float(u[s] @ u[best[s]]) for s in srcs}
    chosen = sorted(srcs, key=lambda s: -score[s])[:r]
    kept = [s for s in srcs if s not in chosen]
    return chosen, [best[s] for s in chosen], kept + dsts


@pytest.mark.parametrize("how", ["mean", "prune", "mlerp"])
@pytest.mark.parametrize("selection", ["tome", "energy"])
def test_pairs_and_merge_match_the_loop_reference(how: str, selection: str) -> None:
    B, P, Np, C, r = 3, 1, 20, 8, 6
    metric, x = torch.randn(B, P + Np, C, dtype=torch.float64), torch.randn(B, P + Np, C, dtype=torch.float64)
    size = torch.rand(B, P + Np, 1, dtype=torch.float64) + 0.5
    if selection == "tome":
        src, dst, keep = M.bipartite_pairs(metric, r, P)
    else:
        src, dst, keep = M.energy_pairs(metric, r, P, margin=0.3, alpha=1.0)
    y, s = M.merge_pairs(x, size, src, dst, keep, P, how)
    assert y.shape == (B, P + Np - r, C)
    for b in range(B):
        if selection == "tome":
            ref = _tome_pairs_reference(metric[b, P:], r, M.hard_split_offset(P))
        else:
            ref = _energy_reference(metric[b, P:], r, margin=0.3, alpha=1.0)
        assert (src[b].tolist(), dst[b].tolist(), keep[b].tolist()) == ref
        want, want_size = _merge_reference(x[b, P:], size[b, P:, 0], *ref, how)
        torch.testing.assert_close(y[b, P:], want)
        torch.testing.assert_close(s[b, P:, 0], want_size)
        assert torch.equal(y[b, :P], x[b, :P])


def test_bipartite_pairs_equal_tomes_merge() -> None:
    """The pair form of ToMe's matching merges exactly what :func:`bipartite_matching` merges, in its order."""
    metric, x, size = torch.randn(2, 17, 8), torch.randn(2, 17, 5), torch.rand(2, 17, 1) + 0.5
    for P in (0, 1, 2):
        merge = M.bipartite_matching(metric, 5, P)
        want, want_size = M.merge_weighted(merge, x, size)
        got, got_size = M.merge_pairs(x, size, *M.bipartite_pairs(metric, 5, P), P, "mean")
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_size, want_size)


def test_tofu_with_mean_merging_is_tome() -> None:
    """Flip a flag: ToFu whose every block merges by the mean is ToMe."""
    x = torch.randn(2, 3, 32, 32)
    tome, _ = _patched(ToMe, r=8)
    tofu, policy = _patched(ToFu, tome.state_dict(), r=8, prune_blocks=0)
    policy.how = lambda layer: "mean"
    with torch.no_grad():
        torch.testing.assert_close(tofu(x), tome(x))


def test_pitome_margin_falls_with_depth() -> None:
    policy = PiToMe(r=6, margin=0.8)
    apply_policy(tiny_vit(), policy)
    metric = torch.randn(2, 65, 16)
    for layer, margin in enumerate([0.8, 0.6, 0.4, 0.2]):
        got = policy.pairs(layer, metric, 6)
        want = M.energy_pairs(metric, 6, 1, margin=margin, alpha=1.0)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_tofu_prunes_then_merges_with_mlerp() -> None:
    policy = ToFu(r=4, prune_blocks=2)
    apply_policy(tiny_vit(), policy)
    assert [policy.how(layer) for layer in range(4)] == ["prune", "prune", "mlerp", "mlerp"]
    default = ToFu(r=4)
    apply_policy(tiny_vit(depth=8), default)
    assert [default.how(layer) for layer in range(8)].count("prune") == 2


@pytest.mark.parametrize("cls", [PiToMe, ToFu])
def test_bookkeeping_sizes_sources_and_token_counts(cls: type) -> None:
    model, policy = _patched(cls, r=8, trace_source=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert policy.state.tokens == policy.token_counts(65) == [57, 49, 41, 33]
    torch.testing.assert_close(policy.state.size.sum(1).flatten(), torch.full((2,), 65.0))
    # Hard merging: every input patch is in exactly one token, and a token's row sums to its size.
    assert torch.equal(policy.state.source.sum(1), torch.ones(2, 65))
    torch.testing.assert_close(policy.state.source.sum(-1, keepdim=True), policy.state.size)


@pytest.mark.parametrize("cls", [PiToMe, ToFu, ToMeSoft])
def test_flops_against_an_analytic_count(cls: type) -> None:
    """The FLOPs column counts what runs: the blocks at the same token counts as ToMe, plus the matching's
    matrix products. ToMe's split compares Np/2 sources with Np/2 destinations; PiToMe's energy compares all
    Np x Np pairs of patch tokens on the keys averaged over heads (head dim D = 16)."""
    size = (3, 32, 32)
    base, tome = gmacs(tiny_vit(), size), gmacs(_patched(ToMe, r=8)[0], size)
    got = gmacs(_patched(cls, r=8)[0], size)
    patches = [64, 56, 48, 40]  # patch tokens entering each block at r = 8
    extra = sum(n * n - (n // 2) * (n // 2) for n in patches) * 16 / 1e9 if cls is PiToMe else 0.0
    assert got == pytest.approx(tome + extra, rel=1e-4)
    assert got < 0.8 * base
    assert gmacs(_patched(NoMerge, r=8)[0], size) == pytest.approx(base, rel=1e-9)


def test_bad_arguments_fail_with_the_value() -> None:
    with pytest.raises(ValueError, match="margin=2"):
        PiToMe(margin=2)
    with pytest.raises(ValueError, match="alpha=0"):
        PiToMe(alpha=0)
    with pytest.raises(ValueError, match="prune_blocks"):
        ToFu(prune_blocks=-1)
    with pytest.raises(ValueError, match="tau1"):
        ToMeSoft(tau1=0)
    with pytest.raises(ValueError, match="how must be"):
        M.merge_pairs(
            torch.zeros(1, 3, 2),
            torch.ones(1, 3, 1),
            *[torch.zeros(1, 1, dtype=torch.long)] * 2,
            torch.zeros(1, 1, dtype=torch.long),
            1,
            "max",
        )


@pytest.mark.parametrize("overlay", ["tome_e2e", "tome_soft_e2e"])
def test_table6_overlays_fit_the_backbone_and_sweep(overlay: str, image_root: str, tmp_path) -> None:
    """configs/table6: end-to-end training with the keys as the metric changes the backbone; the sweep has the
    policy's rows and NoMerge's."""
    from conftest import ROOT, read_sweep

    from dtem_lightning.cli import main

    configs = ROOT / "configs"
    args = ["-c", str(configs / "cifar10_dtem_modular.yaml"), "-c", str(configs / "table6" / f"{overlay}.yaml"),
            "-c", str(configs / "debug.yaml"), f"--data.init_args.root={image_root}",
            f"--trainer.logger.init_args.save_dir={tmp_path}"]  # fmt: skip
    main(["fit", *args])
    (ckpt,) = tmp_path.rglob("last.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    backbone = [k for k in saved["state_dict"] if k.startswith("backbone.")]
    # End to end: the optimizer holds every backbone tensor (ToMe and ToMeSoft have no parameters of their own).
    assert len(saved["optimizer_states"][0]["state"]) == len(backbone) > 10
    main(["test", *args, f"--ckpt_path={ckpt}"])
    rows = read_sweep(tmp_path)
    label = "ToMeSoft" if overlay == "tome_soft_e2e" else "ToMe"
    assert [(r["policy"], r["r"]) for r in rows] == [(label, "2"), (label, "4"), ("NoMerge", "0")]
    assert rows[0]["d_acc1"] != ""  # paired against NoMerge


@pytest.mark.parametrize("cls", [PiToMe, ToFu])
def test_works_in_segmentation_and_captioning(cls: type) -> None:
    """Segmentation unmerges through the source map; captioning decodes from the merged visual tokens."""
    from dtem_lightning.tasks import CaptioningTask, SegmentationTask
    from dtem_lightning.text import Vocabulary

    tiny = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)
    seg = SegmentationTask(num_classes=5, decoder="linear", backbone="vit_tiny_patch16_224", img_size=32,
                           backbone_kwargs=tiny, policy=cls(r=8)).eval()  # fmt: skip
    cap = CaptioningTask(backbone="vit_tiny_patch16_224", backbone_kwargs=dict(img_size=32, **tiny), policy=cls(r=8),
                         decoder_width=32, decoder_depth=1, decoder_heads=2, max_len=5, use_meteor=False)  # fmt: skip
    cap.set_vocab(Vocabulary.build(["a dog runs", "a cat sits"], min_freq=1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        grid = seg.encode(x)
        visual, size = cap.eval().encode(x)
        captions = cap.greedy(x)
    assert grid.shape == (2, 64, 32)  # every patch back on the grid
    assert (
        visual.shape[1] == 65 - 2 * 8 and size is not None and size.sum(1).flatten().tolist() == [65.0, 65.0]
    )
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_throughput_table_has_every_policy(capsys) -> None:
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "experiments"))
    import throughput

    throughput.main(["--tiny", "--model", "vit_tiny_patch16_224", "--r", "0", "4", "--runs", "1", "--warmup", "0",
                     "--batch", "2", "--compile", "--compile-backend", "eager", "--bound"])  # fmt: skip
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    got = [(row[0].strip("| "), row[1], row[2], row[3]) for row in rows]
    want = []
    for compiled in ("no", "yes"):
        want += [("NoMerge", "0", "65", compiled)]
        for name in throughput.POLICIES[1:]:
            if compiled == "no" or name not in throughput.NOT_COMPILED:
                want += [(name, r, n, compiled) for r, n in (("0", "65"), ("4", "57"))]
        if compiled == "no":  # the free merge's ceiling, eager only
            want += [(throughput.BOUND, r, n, "no") for r, n in (("0", "65"), ("4", "57"))]
    # ATM merges only pairs above its threshold: at most r per block, what the image allows (tokens measured)
    atm = [i for i, w in enumerate(want) if w[:2] == ("ATM", "4")]
    assert atm and all(57 <= int(got[i][2]) <= 65 for i in atm)
    for i in atm:
        want[i] = (*want[i][:2], got[i][2], want[i][3])
    assert got == want
    assert all(row[6] == "n/a" for row in rows if row[3] == "yes")  # no merge clock inside a compiled graph


# ---------------------------------------------------------------------------- ATM
def test_atm_threshold_rule_by_hand() -> None:
    """Per image: the sources whose best similarity reaches the threshold; per batch: the smallest such count
    (capped at r), so no image merges a pair below the threshold."""
    metric = torch.randn(3, 21, 6, dtype=torch.float64)
    P, t = 1, 0.6
    off = M.hard_split_offset(P)
    counts = []
    for b in range(3):
        m = metric[b, P:] / metric[b, P:].norm(dim=-1, keepdim=True)
        srcs, dsts = range(1 - off, 20, 2), range(off, 20, 2)
        counts.append(sum(max(float(m[s] @ m[d]) for d in dsts) >= t for s in srcs))
    for r in (2, 5, 10):
        src, dst, keep = M.bipartite_pairs(metric, r, P, threshold=t)
        assert src.shape[1] == min(r, min(counts)), (counts, r)
        want = M.bipartite_pairs(metric, min(r, min(counts)), P)
        assert all(torch.equal(a, b) for a, b in zip((src, dst, keep), want, strict=True))


def test_atm_without_threshold_is_tome() -> None:
    """Flip a flag: threshold -1 (every pair qualifies) merges exactly as ToMe at every r."""
    x = torch.randn(2, 3, 32, 32)
    tome, _ = _patched(ToMe, r=8)
    atm, policy = _patched(ATM, tome.state_dict(), r=8, threshold=-1.0)
    with torch.no_grad():
        torch.testing.assert_close(atm(x), tome(x))
    assert policy.state.tokens == [57, 49, 41, 33]


def test_atm_counts_tokens_and_flops_of_what_ran() -> None:
    model, policy = _patched(ATM, r=8, threshold=[0.99, 0.9, 0.5, 0.0])
    images = [torch.randn(2, 3, 32, 32), torch.zeros(2, 3, 32, 32)]  # the blank batch merges more
    with torch.no_grad():
        ran = []
        for x in images:
            model(x)
            ran.append([a - b for a, b in zip([65, *policy.state.tokens], policy.state.tokens, strict=False)])
    mix = policy.measured_schedules()
    assert sorted(s for s, _ in mix) == sorted(ran) and sum(w for _, w in mix) == pytest.approx(1.0)
    assert all(all(n <= 8 for n in s) for s in ran)
    want = [round(sum(c) / 2) for c in zip(*(M.token_counts(65, 1, s) for s in ran), strict=True)]
    assert policy.token_counts(65) == want
    tome, tome_policy = _patched(ToMe, r=8)
    for schedule, _ in mix:
        with policy.replaying(schedule), tome_policy.reduce(schedule):
            assert policy.token_counts(65) == M.token_counts(65, 1, schedule)
            # What ran: ToMe at that schedule, plus the similarities ATM computed in blocks that merged nothing
            # (ToMe skips a block with r = 0; ATM's threshold had to look): (Np/2)^2 pairs x head dim 16.
            patches = [n - 1 for n in [65, *M.token_counts(65, 1, schedule)][:-1]]
            extra = sum((n // 2) ** 2 * 16 for n, k in zip(patches, schedule, strict=True) if k == 0) / 1e9
            assert gmacs(model, (3, 32, 32)) == pytest.approx(gmacs(tome, (3, 32, 32)) + extra, rel=1e-6)
    with policy.reduce(4):  # another cap: its own measurements (none yet: the cap's counts)
        assert policy.measured_schedules() == [(None, 1.0)]
        assert policy.token_counts(65) == [61, 57, 53, 49]


def test_atm_bad_thresholds() -> None:
    with pytest.raises(ValueError, match="threshold must be"):
        ATM(threshold=1.5)
    with pytest.raises(ValueError, match="3 entries but the model has 4 blocks"):
        apply_policy(tiny_vit(), ATM(r=2, threshold=[0.5, 0.5, 0.5]))


def test_atm_sweep_row_counts_what_ran(tmp_path) -> None:
    """In `dtem test`'s sweep, ATM's gflops and tokens are those of the schedules its forwards ran."""
    import lightning as L

    from dtem_lightning.data import SyntheticDataModule
    from dtem_lightning.tasks import ClassificationTask

    task = ClassificationTask(backbone="vit_tiny_patch16_224", img_size=32, num_classes=3, policy=ToMe(r=4),
                              test_policies=[ATM(threshold=0.995)], test_r=[4], bootstrap=0,
                              backbone_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))  # fmt: skip
    dm = SyntheticDataModule(num_classes=3, num_samples=24, img_size=32, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.test(task, dm)
    rows = {row["policy"]: row for row in task.sweep_results}
    atm = task.test_policies[0]
    with task.running(atm, 4):
        mix = atm.measured_schedules()
        assert sum(w for _, w in mix) == pytest.approx(1.0) and all(s is not None for s, _ in mix)
        want = 0.0
        for schedule, share in mix:
            with atm.replaying(schedule):
                want += share * task.gmacs((3, 32, 32))
    assert rows["ATM"]["gflops"] == pytest.approx(want)
    assert (
        sum(atm.measured[(4, 4)].values()) == 6
    )  # the 6 test batches; counting FLOPs ran no forward of its own
    assert rows["ATM"]["tokens"] > rows["ToMe"]["tokens"]  # a high threshold merges less than the cap
    assert rows["ATM"]["gflops"] > rows["ToMe"]["gflops"]


def test_repeated_rows_name_their_settings() -> None:
    """A bare label means the class defaults: the first of several PiToMe rows is named by its margin when that
    is not the default, and stays bare when it is; the task's own policy (row 0) keeps its label."""
    from dtem_lightning.tasks.sweep import distinct_labels

    rows = [
        ToMe(),
        PiToMe(margin=0.5),
        PiToMe(margin=0.7),
        PiToMe(),
        ToMe(prop_attn=False),
        ATM(),
        ATM(threshold=0.5),
    ]
    assert distinct_labels([type(p).__name__ for p in rows], rows) == [
        "ToMe", "PiToMe (margin=0.5)", "PiToMe (margin=0.7)", "PiToMe (margin=0.9)", "ToMe (prop_attn=False)",
        "ATM", "ATM (threshold=0.5)",
    ]  # fmt: skip
