"""Bad input fails fast with one clear message; a fit killed while writing last.ckpt leaves the previous one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import CONFIGS, ROOT

HELPERS = Path(__file__).parent / "helpers"


def dtem(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join(filter(None, [str(HELPERS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": pythonpath}
    env.pop("DTEM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "dtem_lightning", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)  # fmt: skip


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
