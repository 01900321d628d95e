"""Table 7 analysis (issue 20): Kendall's tau and merge agreement by hand, and the script on a `dtem fit`
checkpoint."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_vit

from dtem_lightning import apply_policy
from dtem_lightning import merge as M
from dtem_lightning.analysis import RecordingDTEM, kendall_tau, merge_agreement
from dtem_lightning.cli import main as dtem

sys.path.insert(0, str(ROOT / "experiments"))
import table7  # noqa: E402


def _tau_by_loops(a: list[float], b: list[float]) -> float:
    pairs = list(itertools.combinations(range(len(a)), 2))
    score = 0
    for i, j in pairs:
        s = (a[i] - a[j]) * (b[i] - b[j])
        score += (s > 0) - (s < 0)
    return score / len(pairs)


def test_kendall_tau_by_hand() -> None:
    a, b = torch.randn(3, 12, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    b[0, 3] = b[0, 5]  # a tie counts as neither concordant nor discordant
    got = kendall_tau(a, b)
    for k in range(3):
        assert got[k].item() == pytest.approx(_tau_by_loops(a[k].tolist(), b[k].tolist()))
    assert kendall_tau(a, a).tolist() == pytest.approx([1.0] * 3)
    assert kendall_tau(a, -a).tolist() == pytest.approx([-1.0] * 3)
    assert kendall_tau(a, a.exp()).tolist() == pytest.approx([1.0] * 3)  # ranks only
    with pytest.raises(ValueError, match="at least 2"):
        kendall_tau(a[:, :1], b[:, :1])


def test_split_similarities_and_agreement_by_hand() -> None:
    metric, other = torch.randn(2, 11, 6), torch.randn(2, 11, 6)
    P = 1
    sims = M.split_similarity(metric, P).flatten(1)
    off = M.hard_split_offset(P)
    patches = M.normalize(metric[:, P:])
    srcs, dsts = list(range(1 - off, 10, 2)), list(range(off, 10, 2))
    want = [[float(patches[b, s] @ patches[b, d]) for s in srcs for d in dsts] for b in range(2)]
    torch.testing.assert_close(sims, torch.tensor(want))
    assert merge_agreement(metric, metric, 3, P).tolist() == [1.0, 1.0]
    got = merge_agreement(metric, other, 3, P)
    for b in range(2):
        a = set(M.bipartite_pairs(metric, 3, P)[0][b].tolist())
        e = set(M.bipartite_pairs(other, 3, P)[0][b].tolist())
        assert got[b].item() == pytest.approx(len(a & e) / 3)


def test_recording_policy_merges_as_dtem_and_groups_blocks() -> None:
    model = tiny_vit(depth=6)
    rec = RecordingDTEM(r=[4, 4, 0, 4, 4, 4], pairs=50)
    apply_policy(model, rec)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert rec.state.tokens == [61, 57, 57, 53, 49, 45]  # recording does not change the merges
    assert sorted(rec.records) == [0, 1, 3, 4, 5]  # r = 0 blocks are left out
    rows = rec.summary()
    assert [r["blocks"] for r in rows] == ["1-2", "3-4", "5-6"]
    assert all(-1 <= r["tau"] <= 1 and 0 <= r["agree"] <= 1 for r in rows)
    taus = torch.cat(rec.records[0]["tau"] + rec.records[1]["tau"])
    assert rows[0]["tau"] == pytest.approx(taus.mean().item())


@pytest.fixture(scope="module")
def fit_ckpt(image_root: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `dtem fit` checkpoint of the CIFAR-10 DTEM config with the debug overlay (shared by the tests here)."""
    out, configs = tmp_path_factory.mktemp("fit"), ROOT / "configs"
    dtem(["fit", "-c", str(configs / "cifar10_dtem_modular.yaml"), "-c", str(configs / "debug.yaml"),
          f"--data.init_args.root={image_root}", f"--trainer.logger.init_args.save_dir={out}"])  # fmt: skip
    return next(out.rglob("last.ckpt"))


def test_table7_script_on_a_fit_checkpoint(fit_ckpt: Path, tmp_path: Path) -> None:
    ckpt = fit_ckpt
    out = tmp_path / "t7" / "table7.md"
    table7.main([str(ckpt), "--batches", "1", "--batch-size", "4", "--r", "4", "--out", str(out)])
    rows = out.with_suffix(".csv").read_text().splitlines()
    # The debug model has 2 blocks: three groups of blocks leave one empty, dropped.
    assert [row.split(",")[:2] for row in rows] == [
        ["embedding", "blocks"],
        ["untrained", "1-1"],
        ["untrained", "2-2"],
        ["trained", "1-1"],
        ["trained", "2-2"],
    ]
    assert "| trained | 2-2 |" in out.read_text()


def test_an_embedding_equal_to_the_keys_agrees_fully(fit_ckpt: Path) -> None:
    """Set the trained embedding to the keys' own projection (averaged over heads): tau = 1, every merge shared."""
    task, data = table7.load_task_and_data(str(fit_ckpt), None, 4)
    C, H = task.encoder.width, task.encoder.num_heads
    with torch.no_grad():
        for block, embed in zip(task.encoder.backbone.blocks, task.policy.embed, strict=True):
            qkv = block.attn.qkv
            embed.weight.copy_(qkv.weight[C : 2 * C].view(H, C // H, C).mean(0))
            embed.bias.copy_(qkv.bias[C : 2 * C].view(H, C // H).mean(0))
    data.setup("validate")
    rows = table7.table7(task, data.val_dataloader(), 4, 1)
    trained = [r for r in rows if r["embedding"] == "trained"]
    assert [r["tau"] for r in trained] == pytest.approx([1.0, 1.0], abs=1e-3)
    assert [r["agree"] for r in trained] == [1.0, 1.0]
    assert all(r["tau"] < 0.99 for r in rows if r["embedding"] == "untrained")


def test_old_checkpoint_data_settings_are_translated() -> None:
    from dtem_lightning.data import CamVidDataModule, ImageFolderDataModule
    from dtem_lightning.data.base import stored_settings

    old = {"root": "r", "max_per_class": 3, "_instantiator": "x", "_class_path": "y"}
    assert stored_settings(CamVidDataModule, old) == {"root": "r", "max_per_split": 3}
    assert stored_settings(ImageFolderDataModule, old) == {"root": "r", "max_per_class": 3}
    with pytest.raises(ValueError, match="both max_per_class and max_per_split"):
        stored_settings(CamVidDataModule, {**old, "max_per_split": 2})
