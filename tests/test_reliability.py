"""Bad input fails fast with one clear message; checkpoint writes are atomic."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_cli import CIFAR, CONFIGS, ROOT


def dtem(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("DTEM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "dtem_lightning", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)  # fmt: skip


def modular_debug(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "-c", str(CONFIGS / "deit_s_modular.yaml"), "-c", str(CONFIGS / "debug.yaml"),
            f"--data.init_args.root={CIFAR}", f"--trainer.logger.init_args.save_dir={tmp_path}", *extra]  # fmt: skip


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
def test_bad_input_one_clear_message(name, tmp_path):
    extra, needle = CATALOGUE[name]
    proc = dtem(*modular_debug(tmp_path, *extra))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


def test_checkpoint_of_other_backbone_is_refused(tmp_path):
    run = tmp_path / "a"
    assert dtem(*modular_debug(run)).returncode == 0
    ckpt = next(run.rglob("last.ckpt"))
    proc = dtem("test", f"--ckpt_path={ckpt}", "--data=ImageFolderDataModule", f"--data.init_args.root={CIFAR}",
                "--data.init_args.img_size=32", "--model.init_args.backbone_kwargs.embed_dim=64",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'b'}")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "size mismatch" in proc.stderr, proc.stderr[-2000:]


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    """SIGKILL in the middle of writing a checkpoint over an existing one leaves the old file loadable."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "global_step": 1}, path)
    script = textwrap.dedent(f"""
        import os, signal, builtins
        import fsspec.implementations.local as local
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
        real_write = local.LocalFileOpener.write
        def dying_write(self, data):
            real_write(self, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        local.LocalFileOpener.write = dying_write
        import torch
        TorchCheckpointIO().save_checkpoint({{"state_dict": {{"w": torch.ones(1000)}}, "global_step": 2}}, r"{path}")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.zeros(3))
