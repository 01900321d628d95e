"""Bad input fails fast with one clear message; a fit killed or out of disk while writing last.ckpt leaves the
previous one; a re-run never mixes with an earlier fit's checkpoints; no silently wrong sweep (a random frozen head,
NaN weights, an untrained policy labelled as trained, impossible policy arguments)."""

from __future__ import annotations

import csv
import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from test_cli import CONFIGS, ROOT
from torch.utils.data import DataLoader, TensorDataset

from dtem_lightning.cli import main

HELPERS = Path(__file__).parent / "helpers"


def dtem(
    *args: str, cwd: Path = ROOT, prefix: list[str] | tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """``python -m dtem_lightning ARGS`` (run by the command ``prefix`` when given), test helpers importable."""
    pythonpath = os.pathsep.join(filter(None, [str(HELPERS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": pythonpath}
    env.pop("DTEM_DEBUG", None)
    return subprocess.run([*prefix, sys.executable, "-m", "dtem_lightning", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)  # fmt: skip


def modular_debug(tmp_path: Path, root: str, *extra: str) -> list[str]:
    return ["fit", "-c", str(CONFIGS / "deit_s_modular.yaml"), "-c", str(CONFIGS / "debug.yaml"),
            f"--data.init_args.root={root}", f"--trainer.logger.init_args.save_dir={tmp_path}", *extra]  # fmt: skip


CATALOGUE = {
    "unknown_config_key": (["--model.init_args.no_such_key=1"], "no_such_key"),
    "unknown_policy": (["--model.init_args.policy=ToMeee"], "ToMeee"),
    "r_list_wrong_length": (["--model.init_args.policy.r=[1,2,3]"], "3 entries but the model has 2 blocks"),
    "negative_test_r": (["--model.init_args.test_r=[0,-4]"], "-4"),
    "unsupported_backbone": (["--model.init_args.backbone=swin_tiny_patch4_window7_224"], "SwinTransformer"),
    "unknown_backbone": (["--model.init_args.backbone=deit_smal"], "deit_smal"),
    "missing_checkpoint": (["--model.init_args.checkpoint_path=/nope/w.safetensors"], "/nope/w.safetensors"),
    "img_size_not_divisible": (["--data.init_args.img_size=30"], "not divisible by the patch size"),
    "missing_data_root": (["--data.init_args.root=/nope/data"], "/nope/data"),
    "num_classes_contradicts_data": (
        ["--model.init_args.num_classes=5"],
        "num_classes=5 contradicts the data",
    ),
}


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_one_clear_message(name, image_root, tmp_path):
    extra, needle = CATALOGUE[name]
    proc = dtem(*modular_debug(tmp_path, image_root, *extra))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


def test_checkpoint_of_other_backbone_is_refused(image_root, tmp_path):
    run = tmp_path / "a"
    assert dtem(*modular_debug(run, image_root)).returncode == 0
    ckpt = next(run.rglob("last.ckpt"))
    proc = dtem("test", f"--ckpt_path={ckpt}", "--data=ImageFolderDataModule", f"--data.init_args.root={image_root}",
                "--data.init_args.img_size=32", "--model.init_args.backbone_kwargs.embed_dim=64",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'b'}")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "size mismatch" in proc.stderr, proc.stderr[-2000:]


def test_fit_killed_writing_the_final_last_ckpt_keeps_the_previous_one(image_root, tmp_path):
    """The process dies (SIGXFSZ: a file-size cap, whoever writes) midway through the end-of-fit ``last.ckpt``
    write of ``dtem fit``: the ``last.ckpt`` on disk is still the previous complete one, byte for byte, and loads."""
    args = modular_debug(
        tmp_path, image_root, "--trainer.max_epochs=2", "--trainer.callbacks+=killer.DieWritingLastCheckpoint"
    )
    proc = dtem(*args)
    # Killed inside a write after training ended (rc 0: nothing wrote last.ckpt after the cap was set).
    assert proc.returncode == -signal.SIGXFSZ, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
    (last,) = tmp_path.rglob("last.ckpt")
    before = last.with_name("last.ckpt.before")  # the killer's copy of last.ckpt, taken just before the cap
    assert last.read_bytes() == before.read_bytes()
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    # A checkpoint of this run's training (which epoch depends on whether val/acc1 improved in the second).
    assert ckpt["global_step"] >= 1 and any(k.startswith("policy.embed.") for k in ckpt["state_dict"])


# ------------------------------------------------------------------ nothing half-written replaces something good
def test_full_disk_writing_the_final_last_ckpt_keeps_the_previous_one_and_exits_2(image_root, tmp_path):
    """The end-of-fit ``last.ckpt`` write fails midway (a file-size cap: the write gets EFBIG, as it gets ENOSPC on
    a full disk): the previous ``last.ckpt`` stays, byte for byte, no temporary file is left, and ``dtem`` exits 2
    with one line."""
    args = modular_debug(
        tmp_path,
        image_root,
        "--trainer.max_epochs=2",
        "--trainer.callbacks+=killer.FullDiskWritingLastCheckpoint",
    )
    proc = dtem(*args)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dtem: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "last.ckpt; the previous file, if any, is kept" in errors[0], errors[0]
    (last,) = tmp_path.rglob("last.ckpt")
    assert last.read_bytes() == last.with_name("last.ckpt.before").read_bytes()
    assert not [p.name for p in last.parent.iterdir() if p.name.startswith(".")]


def _tmpfs_available(folder: Path) -> bool:
    """Whether this user can mount a tmpfs in a private mount namespace (``unshare -rm``)."""
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', str(folder)]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def test_run_folder_on_a_full_small_filesystem_never_holds_a_truncated_checkpoint(image_root, tmp_path):
    """The issue's reproduction: ``save_dir`` is a 600 KiB tmpfs, another filesystem than ``$TMPDIR``, with room for
    one checkpoint of the debug model but not two. The second write (``last.ckpt``) fails with ENOSPC: ``dtem``
    exits 2 with one line, and every checkpoint left in the folder loads (none is truncated)."""
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    if not _tmpfs_available(mnt):
        pytest.skip("cannot mount a tmpfs here (unshare -rm: no user namespaces)")
    script = 'mount -t tmpfs -o size=600k tmpfs "$0" || exit 99; "$@"; rc=$?; cp -a "$0/." "$OUT/"; exit $rc'
    prefix = ["env", f"OUT={out}", "unshare", "-rm", "sh", "-c", script, str(mnt)]
    proc = dtem(*modular_debug(mnt, image_root), prefix=prefix)
    ckpts = list(out.rglob("*.ckpt"))
    assert ckpts, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
    for path in ckpts:
        assert torch.load(path, weights_only=True, map_location="cpu")["global_step"] >= 1, path
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dtem: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    error = errors[0]
    assert "No space left on device: could not write" in error and "if any, is kept" in error, error


def test_cli_checkpoints_are_renamed_beside_their_destination(image_root, tmp_path, monkeypatch):
    """The checkpoint writer of the ``dtem`` trainer: a run folder on another filesystem than ``$TMPDIR`` turns a
    rename from elsewhere into EXDEV and a copy (which a kill or a full disk leaves half-written over the good
    file); the writer renames only within the destination folder and never copies."""
    from dtem_lightning.cli import DTEMCLI
    from dtem_lightning.data import BaseDataModule
    from dtem_lightning.tasks import BaseTask

    cli = DTEMCLI(BaseTask, BaseDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  auto_configure_optimizers=False, args=modular_debug(tmp_path, image_root)[1:], run=False)  # fmt: skip
    last = tmp_path / "elsewhere" / "last.ckpt"
    last.parent.mkdir()
    torch.save({"global_step": 1}, last)
    real_rename, renames = os.rename, []

    def rename(src: str, dst: str, *args: object, **kwargs: object) -> None:
        renames.append((Path(src), Path(dst)))
        if Path(src).resolve().parent != Path(dst).resolve().parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")  # the kernel's answer across filesystems
        real_rename(src, dst)

    def copy(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a checkpoint was copied, not renamed: {args}")

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", rename)
    monkeypatch.setattr(shutil, "copyfile", copy)
    cli.trainer.strategy.checkpoint_io.save_checkpoint({"global_step": 2}, last)
    assert torch.load(last, weights_only=True) == {"global_step": 2}
    assert renames and all(src.parent == last.parent for src, _ in renames), renames
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


def test_interrupted_result_writes_keep_the_previous_files(tmp_path, monkeypatch):
    """A full disk during the write of ``sweep.csv`` (the sweep callback's, and ``experiments/collect.py``'s):
    the previous file stays whole, not truncated, and the error names the file."""
    import importlib.util

    from dtem_lightning.callbacks import write_sweep

    spec = importlib.util.spec_from_file_location("collect", ROOT / "experiments" / "collect.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    rows = [
        {"policy": "ToMe", "r": r, "gflops": 1.0 / (1 + r), "tokens": 65 - r, "acc1": 0.5} for r in (0, 4, 8)
    ]
    run, results = tmp_path / "run", tmp_path / "results"
    write_sweep(rows, run)
    collect.collect([str(run / "sweep.csv")], results)
    before = {p: p.read_bytes() for p in (run / "sweep.csv", results / "sweep.csv")}
    real = csv.DictWriter.writerows

    def full_disk(self: csv.DictWriter, rowdicts: list[dict]) -> None:
        real(self, rowdicts[:1])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", full_disk)
    new = [{**row, "acc1": 0.25} for row in rows]
    with pytest.raises(OSError) as e:
        write_sweep(new, run)
    with pytest.raises(OSError):
        collect.collect([str(run / "sweep.csv")], results)
    for path, data in before.items():
        assert path.read_bytes() == data, path
        assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert f"could not write {run / 'sweep.csv'}; the previous file, if any, is kept" in str(e.value)


# ------------------------------------------------------------------ re-running a pipeline never tests an old run
def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtem: error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_fit_into_a_run_folder_with_checkpoints_refuses_unless_it_resumes(
    image_root, tmp_path, capsys, caplog
):
    """camvid-small's sequence (fit, then test into the same fixed version) works and keeps the fit's
    config.yaml; a second fit into that version refuses with one line that says how to resume; resuming with
    ``--ckpt_path=last`` (the Makefile's RESUME=1) continues in place."""
    fit = modular_debug(tmp_path, image_root, "--trainer.logger.init_args.version=make")
    folder = tmp_path / "debug" / "make"
    last = folder / "checkpoints" / "last.ckpt"
    main(fit)
    config = (folder / "config.yaml").read_text()
    main(["test", *fit[1:], f"--ckpt_path={last}"])
    assert (folder / "config.yaml").read_text() == config
    assert "ckpt_path" in (folder / "config_test.yaml").read_text() and (folder / "sweep.csv").is_file()
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in last.parent.iterdir()}
    with pytest.raises(SystemExit) as e:
        main(fit)
    assert e.value.code == 2
    error = _one_error_line(capsys)
    assert f"{last.parent} already holds checkpoints" in error and f"--ckpt_path={last}" in error, error
    assert {p.name: p.read_bytes() for p in last.parent.iterdir()} == before
    with caplog.at_level(logging.INFO):
        main([*fit, "--ckpt_path=last", "--trainer.max_epochs=2"])
    assert f"Restoring states from the checkpoint path at {last}" in caplog.text
    assert sorted(p.name for p in last.parent.glob("last*")) == ["last.ckpt"]
    assert torch.load(last, weights_only=True)["global_step"] == 4  # 2 epochs of 2 batches


def test_ckpt_path_last_with_nothing_to_resume_refuses(image_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(
            modular_debug(tmp_path, image_root, "--trainer.logger.init_args.version=run", "--ckpt_path=last")
        )
    assert e.value.code == 2
    error = _one_error_line(capsys)
    assert "--ckpt_path=last but" in error and "holds no last.ckpt to resume" in error, error
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("target", ["camvid-small", "caption-small"])
def test_make_targets_that_fit_and_test_in_one_folder_start_clean(target):
    """Targets whose fit and test share a fixed version folder remove it first: re-running them starts clean."""
    from test_benchmarks import make_n

    cmds = make_n(target)
    assert cmds[0][:2] == ["rm", "-rf"], cmds[0]
    run = Path(cmds[0][2])
    dtem_cmds = [c for c in cmds if Path(c[0]).name == "dtem"]
    assert [c[1] for c in dtem_cmds][:2] == ["fit", "test"]
    for c in dtem_cmds[1:]:
        (ckpt,) = [a.split("=", 1)[1] for a in c if a.startswith("--ckpt_path=")]
        assert Path(ckpt).is_relative_to(run), (ckpt, run)


# ------------------------------------------------------------------ silent wrong results
def _tiny_loader(num_classes: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, num_classes, (8,), generator=g)
    )
    return DataLoader(data, batch_size=4)


def _trainer(**kwargs: object) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)  # fmt: skip


TINY = dict(backbone="vit_tiny_patch16_224", img_size=32, num_classes=3,
            backbone_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))  # fmt: skip


def test_weights_with_another_head_and_a_frozen_head_are_refused(tmp_path):
    """timm drops a weights file's head of another class count; a frozen new head (train: policy, or
    freeze_backbone) would stay random: fit refuses, and so does a test that no checkpoint gives a head."""
    from safetensors.torch import save_file

    from dtem_lightning import DTEMSoft
    from dtem_lightning.tasks import ClassificationTask

    path = tmp_path / "w5.safetensors"
    save_file(ClassificationTask(**{**TINY, "num_classes": 5}).backbone.state_dict(), str(path))
    head = f"checkpoint_path {path} has a 5-class head but the model has 3 classes"
    for kwargs, why in (
        ({"train": "policy"}, "train: policy"),
        ({"freeze_backbone": True}, "freeze_backbone: true"),
    ):
        task = ClassificationTask(checkpoint_path=str(path), policy=DTEMSoft(r=2), **kwargs, **TINY)
        with pytest.raises(ValueError, match=re.escape(f"{head}: timm drops that head and the new one would never "
                                                       f"train ({why})")):  # fmt: skip
            _trainer(max_steps=1).fit(task, _tiny_loader())
    with pytest.raises(
        ValueError, match=re.escape(f"{head}: timm drops that head and no checkpoint brings a")
    ):
        _trainer().test(ClassificationTask(checkpoint_path=str(path), **TINY), _tiny_loader(), verbose=False)
    task = ClassificationTask(checkpoint_path=str(path), policy=DTEMSoft(r=2), train="policy+head", **TINY)
    trainer = _trainer(max_steps=1)
    trainer.fit(task, _tiny_loader())  # the head trains: allowed, and tested afterwards
    trainer.test(task, _tiny_loader(), verbose=False)


def test_non_finite_weights_are_refused_in_test(tmp_path):
    """NaN weights (here restored from a checkpoint) score every image as class 0: test refuses, naming them."""
    from dtem_lightning.tasks import ClassificationTask

    task = ClassificationTask(**TINY)
    trainer = _trainer(max_steps=1)
    trainer.fit(task, _tiny_loader())
    ckpt = tmp_path / "nan.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["backbone.blocks.1.mlp.fc1.weight"][0, :2] = float("nan")
    state["state_dict"]["backbone.head.bias"][0] = float("inf")
    torch.save(state, ckpt)
    message = f"backbone.blocks.1.mlp.fc1.weight holds 2 non-finite value(s) of 4096 (checkpoint {ckpt})"
    with pytest.raises(FloatingPointError, match=re.escape(message)):
        _trainer().test(ClassificationTask(**TINY), _tiny_loader(), ckpt_path=str(ckpt), verbose=False)


def test_untrained_learnable_policy_is_labelled_untrained(tmp_path):
    """Without trained policy weights (no ckpt_path, no init_from, no fit) the task's own DTEM row is
    "DTEM (untrained)"; a checkpoint with its weights or a fit makes it "DTEM (trained)"."""
    from dtem_lightning import DTEMSoft, ToMe
    from dtem_lightning.tasks import ClassificationTask

    def label(task: ClassificationTask) -> str:
        return task.policies()[0][0]

    task = ClassificationTask(policy=DTEMSoft(r=2), **TINY)
    assert label(task) == "DTEM (untrained)"
    assert label(ClassificationTask(policy=ToMe(r=2), **TINY)) == "ToMe"  # nothing to train
    _trainer().test(task, _tiny_loader(), verbose=False)
    assert [row["policy"] for row in task.sweep_results] == ["DTEM (untrained)"]
    state = task.state_dict()
    task.on_load_checkpoint({"state_dict": dict(state)})
    assert label(task) == "DTEM (trained)"
    with pytest.warns(UserWarning, match="no weights for DTEMSoft"):
        task.on_load_checkpoint(
            {"state_dict": {k: v for k, v in state.items() if not k.startswith("policy.")}}
        )
    assert label(task) == "DTEM (untrained)"
    _trainer(max_steps=1).fit(task, _tiny_loader())
    assert label(task) == "DTEM (trained)"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"embed_dim": 0}, "embed_dim must be >= 1 (or null for the head dim), got 0"),
        ({"embed_dim": -8}, "got -8"),
        ({"k": 0}, "k must be >= 1 candidate destinations, got k=0"),
        ({"tau1": float("inf")}, "tau1 must be a finite temperature > 0, got tau1=inf"),
        ({"tau2": float("nan")}, "tau2 must be a finite temperature > 0, got tau2=nan"),
        ({"tau1": 0.0}, "tau1=0.0"),
    ],
)
def test_bad_policy_arguments_fail_at_construction(kwargs, needle):
    from dtem_lightning import DTEMHard, DTEMSoft

    with pytest.raises(ValueError, match=re.escape(needle)):
        DTEMSoft(**kwargs)
    if "embed_dim" in kwargs:
        with pytest.raises(ValueError, match=re.escape(needle)):
            DTEMHard(**kwargs)
