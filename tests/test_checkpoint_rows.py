"""test_checkpoints (issue 20): rows of other ``dtem fit`` checkpoints in the same sweep, each with its own policy
and weights, paired with this model's rows on the same test samples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_sweep

from dtem_lightning import NoMerge, PiToMe, ToMe, ToMeSoft
from dtem_lightning.callbacks import tradeoff_series
from dtem_lightning.cli import main as dtem
from dtem_lightning.tasks import ClassificationTask
from dtem_lightning.tasks.sweep import policy_config, policy_from_config

sys.path.insert(0, str(ROOT / "experiments"))
import collect  # noqa: E402

CONFIGS = ROOT / "configs"
SOFT_E2E = ["-c", str(CONFIGS / "table6" / "tome_soft_e2e.yaml")]
METRICS = ("r", "gflops", "tokens", "acc1", "acc5")
# ATM merges fewer than r = 4 on the debug model at this threshold: its token counts are measured, not configured.
ATM_THRESHOLD = 0.97


def _args(image_root: str, out: Path, *extra: str) -> list[str]:
    """The demo's CIFAR-10 config with the debug overlay (2-block ViT, r 0/2/4, 2 test batches of 8)."""
    return ["-c", str(CONFIGS / "cifar10_dtem_modular.yaml"), *extra, "-c", str(CONFIGS / "debug.yaml"),
            f"--data.init_args.root={image_root}", f"--trainer.logger.init_args.save_dir={out}"]  # fmt: skip


def _rows(out: Path) -> dict[str, list[tuple[str, ...]]]:
    """Label -> (r, gflops, tokens, acc1, acc5) of each of its rows in the sweep under ``out``."""
    rows: dict[str, list[tuple[str, ...]]] = {}
    for row in read_sweep(out):
        rows.setdefault(row["policy"], []).append(tuple(row[c] for c in METRICS))
    return rows


def test_policy_rebuilt_from_saved_hyper_parameters() -> None:
    """A checkpoint's ``policy`` as the CLI saves it (class path or short name, init_args) gives that policy."""
    saved = {"class_path": "dtem_lightning.PiToMe", "init_args": {"r": 4, "prop_attn": False, "margin": 0.5}}
    got = policy_from_config(saved, "p")
    assert policy_config(got) == policy_config(PiToMe(r=4, prop_attn=False, margin=0.5)) and got.r == 4
    assert type(policy_from_config({"class_path": "ToMe"}, "p")) is ToMe
    assert type(policy_from_config(None, "p")) is NoMerge  # a fit without a policy
    with pytest.raises(ValueError, match="p names 'os.system', outside dtem_lightning"):
        policy_from_config({"class_path": "os.system"}, "p")
    with pytest.raises(ValueError, match="not a merge policy class"):
        policy_from_config({"class_path": "torch.nn.Linear"}, "p")
    with pytest.raises(ValueError, match="p: ValueError: margin must be"):
        policy_from_config({"class_path": "PiToMe", "init_args": {"margin": 2}}, "p")


@pytest.fixture(scope="module")
def fits(image_root: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``dtem``: modular DTEM on a random frozen backbone; ``soft``: ToMeSoft end to end from another seed (the same
    architecture, other weights everywhere)."""
    out = {}
    for name, extra in (("dtem", []), ("soft", [*SOFT_E2E, "--seed_everything=1"])):
        folder = tmp_path_factory.mktemp(name)
        dtem(["fit", *_args(image_root, folder, *extra)])
        out[name] = next(folder.rglob("last.ckpt"))
    return out


@pytest.fixture(scope="module")
def sweeps(
    fits: dict[str, Path], image_root: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Run folders of ``dtem test``: ``plain`` (the DTEM fit with ToMe and ATM rows), ``combined`` (the same with
    the checkpoints ``self`` = the DTEM fit, ``atm`` = its weights with ATM as the saved policy, and ``soft``) and
    ``alone`` (the ToMeSoft fit by itself)."""
    runs = {k: tmp_path_factory.mktemp(k) for k in ("plain", "combined", "alone")}
    ckpt = torch.load(fits["dtem"], weights_only=True)
    atm = {"class_path": "dtem_lightning.ATM", "init_args": {"r": 4, "threshold": ATM_THRESHOLD}}
    ckpt["hyper_parameters"]["policy"] = atm
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("policy.")}
    torch.save(ckpt, runs["combined"] / "atm.ckpt")
    rows = ["--model.init_args.test_policies+=ToMe", f"--model.init_args.test_policies+={json.dumps(atm)}"]
    named = {"self": str(fits["dtem"]), "atm": str(runs["combined"] / "atm.ckpt"), "soft": str(fits["soft"])}
    checkpoints = f"--model.init_args.test_checkpoints={json.dumps(named)}"
    dtem(["test", *_args(image_root, runs["plain"], *rows), f"--ckpt_path={fits['dtem']}"])
    dtem(["test", *_args(image_root, runs["combined"], *rows, checkpoints), f"--ckpt_path={fits['dtem']}"])
    dtem(["test", *_args(image_root, runs["alone"], *SOFT_E2E), f"--ckpt_path={fits['soft']}"])
    return runs


def test_own_checkpoint_rows_equal_the_own_rows(sweeps: dict[str, Path]) -> None:
    """Flip a flag: the task's own checkpoint as a test checkpoint (same policy, same weights) gives its rows."""
    rows = _rows(sweeps["combined"])
    assert rows["DTEM (trained) [self]"] == rows["DTEM (trained)"]
    assert rows["NoMerge [self]"] == rows["NoMerge"]
    assert [r[0] for r in rows["DTEM (trained)"]] == ["2", "4"]
    # ATM's rows count the tokens and FLOPs its forwards ran, a checkpoint's ATM too.
    assert rows["ATM [atm]"] == rows["ATM"]
    assert rows["ATM"] != rows["ToMe"]


def test_checkpoint_rows_equal_a_test_of_that_checkpoint_and_leave_the_own_rows(
    sweeps: dict[str, Path],
) -> None:
    combined, alone, plain = (_rows(sweeps[k]) for k in ("combined", "alone", "plain"))
    assert list(combined) == [
        "DTEM (trained)", "ToMe", "ATM", "NoMerge", "DTEM (trained) [self]", "NoMerge [self]", "ATM [atm]",
        "NoMerge [atm]", "ToMeSoft [soft]", "NoMerge [soft]",
    ]  # fmt: skip
    assert combined["ToMeSoft [soft]"] == alone["ToMeSoft"]
    assert combined["NoMerge [soft]"] == alone["NoMerge"]
    # The other weights give other predictions: the rows above test the swap, not a coincidence.
    assert (
        combined["NoMerge [soft]"] != combined["NoMerge"] or combined["ToMeSoft [soft]"] != combined["ToMe"]
    )
    # The own weights are back after every checkpoint row.
    assert {k: v for k, v in combined.items() if "[" not in k} == plain


def test_checkpoint_rows_are_paired_with_the_reference(sweeps: dict[str, Path]) -> None:
    """interval_reference ToMe (the config's) pairs the end-to-end ToMeSoft rows with ToMe at the same r, on the
    same test samples; NoMerge rows have no interval."""
    rows = read_sweep(sweeps["combined"])
    tome = {row["r"]: float(row["acc1"]) for row in rows if row["policy"] == "ToMe"}
    soft = [row for row in rows if row["policy"] == "ToMeSoft [soft]"]
    assert len(soft) == 2
    for row in soft:
        assert row["d_ref"] == "ToMe"
        assert float(row["d_acc1"]) == pytest.approx(float(row["acc1"]) - tome[row["r"]], abs=1e-6)
        assert float(row["d_acc1_lo"]) <= float(row["d_acc1"]) <= float(row["d_acc1_hi"])
    assert all(row["d_acc1"] == "" for row in rows if row["policy"].startswith("NoMerge"))
    note = (next(sweeps["combined"].rglob("sweep.md"))).read_text()
    assert "- ToMeSoft [soft]: the policy and weights of checkpoint " in note
    assert "evaluated with hard merging." in note


def test_swap_runs_every_weight_of_the_checkpoint_and_restores_the_own(fits: dict[str, Path]) -> None:
    """Logits of a checkpoint row are those of that checkpoint loaded as a task, bit for bit; the own weights are
    back after the row, also after an error, and the checkpoint's policies stay out of the task's state_dict."""
    task = ClassificationTask.load_from_checkpoint(
        fits["dtem"], weights_only=True, test_checkpoints={"soft": str(fits["soft"])}
    ).eval()
    other = ClassificationTask.load_from_checkpoint(fits["soft"], weights_only=True).eval()
    plain = ClassificationTask.load_from_checkpoint(fits["dtem"], weights_only=True)
    assert list(task.state_dict()) == list(plain.state_dict())
    own = {k: v.clone() for k, v in task.state_dict().items()}
    task.prepare_test_checkpoints()
    (label, soft), (_, no_merge) = [(k, p) for k, p in task.policies() if "[soft]" in k]
    assert label == "ToMeSoft [soft]" and isinstance(soft, ToMeSoft)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for policy, theirs, r in ((soft, other.policy, 4), (no_merge, other.test_policies[0], 0)):
            with task.running(policy, r):
                got = task(x)
            with other.running(theirs, r):
                want = other(x)
            assert torch.equal(got, want)
            assert all(torch.equal(v, own[k]) for k, v in task.state_dict().items())
        with pytest.raises(RuntimeError, match="a row failed"), task.running(soft, 4):
            raise RuntimeError("a row failed")
    assert all(torch.equal(v, own[k]) for k, v in task.state_dict().items())


@pytest.mark.parametrize("case", ["architecture", "missing", "name", "no_policy"])
def test_bad_test_checkpoints_are_refused_in_one_line(
    case: str, fits: dict[str, Path], image_root: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = torch.load(fits["dtem"], weights_only=True)
    name, path = "other", tmp_path / "other.ckpt"
    head = ckpt["state_dict"]["backbone.head.weight"]
    if case == "architecture":
        ckpt["state_dict"]["backbone.head.weight"] = head[:, :-1]  # another width
        want = (
            f"test_checkpoints['other'] {path} does not match the model: backbone.head.weight has shape "
            f"[{head.shape[0]}, {head.shape[1] - 1}] in the file, {list(head.shape)} in the model"
        )
    elif case == "missing":
        path = tmp_path / "gone.ckpt"
        want = f"test_checkpoints['other'] {path} does not exist"
    elif case == "name":
        name, want = "a,b", "test_checkpoints name 'a,b' must be non-empty"
    else:
        del ckpt["hyper_parameters"]["policy"]
        want = f"test_checkpoints['other'] {path} has no saved policy"
    if case != "missing":
        torch.save(ckpt, path)
    arg = f'--model.init_args.test_checkpoints={{"{name}": "{path}"}}'
    with pytest.raises(SystemExit) as e:
        dtem(["test", *_args(image_root, tmp_path / "runs", arg), f"--ckpt_path={fits['dtem']}"])
    assert e.value.code == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtem: error:")]
    assert want in error, error


def test_collect_and_the_figure_read_checkpoint_rows(sweeps: dict[str, Path], tmp_path: Path) -> None:
    """collect.py says what ``X [name]`` rows are; the figure draws each checkpoint's NoMerge as a level line."""
    rows = collect.collect([f"t6={next(sweeps['combined'].rglob('sweep.csv'))}"], tmp_path)
    assert (
        "X [name]: the policy and weights of the run's test checkpoint name"
        in (tmp_path / "sweep.md").read_text()
    )
    _, baselines, differences, _ = tradeoff_series(rows, "acc1")
    assert set(baselines) == {"NoMerge", "NoMerge [self]", "NoMerge [atm]", "NoMerge [soft]"}
    assert "ToMeSoft [soft]" in differences


def test_a_caption_checkpoint_with_another_vocabulary_is_refused() -> None:
    """Same tensor shapes, other words: its captions would be decoded wrongly, so the test start refuses it."""
    from dtem_lightning.tasks import CaptioningTask
    from dtem_lightning.text import Vocabulary

    tiny = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    task = CaptioningTask(backbone="vit_tiny_patch16_224", backbone_kwargs=tiny, decoder_width=32, decoder_depth=1,
                          decoder_heads=2, max_len=5, use_meteor=False)  # fmt: skip
    task.set_vocab(Vocabulary.build(["a dog runs", "a cat sits"], min_freq=1))
    task.check_test_checkpoint({"vocab": task.vocab.state_dict()}, "x")
    other = Vocabulary.build(["a bird flies", "a fish swims"], min_freq=1)
    assert len(other) == len(task.vocab)
    with pytest.raises(ValueError, match="x was trained with another vocabulary"):
        task.check_test_checkpoint({"vocab": other.state_dict()}, "x")
