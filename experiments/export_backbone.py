"""Export a trained task checkpoint's backbone to a timm-loadable safetensors file (fp16 by default), or with
``--task`` the whole task's weights as a slim Lightning checkpoint (no optimizer or loop state) for ``init_from``."""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
from safetensors.torch import save

from dtem_lightning.io import atomic_write


def backbone_state(ckpt_path: str | Path) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` tensors of a Lightning checkpoint, prefix removed (timm's own key names).

    Args:
        ckpt_path: a ``.ckpt`` written by ``dtem fit``.

    Raises:
        KeyError: the checkpoint has no ``backbone.*`` weights.
    """
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    out = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if not out:
        raise KeyError(f"{ckpt_path} has no backbone.* weights")
    return out


def export(ckpt_path: str | Path, out: str | Path, dtype: torch.dtype = torch.float16) -> str:
    """Write the backbone weights of ``ckpt_path`` to ``out`` (safetensors); returns the file's sha256.

    Floating-point tensors are stored as ``dtype`` (fp16 halves the file; timm loads them into fp32
    parameters). Load with ``--model.init_args.checkpoint_path=OUT`` and the same backbone name and kwargs.
    """
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
        for k, v in backbone_state(ckpt_path).items()
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = save(state, metadata={"source": Path(ckpt_path).name, "format": "pt"})
    atomic_write(out, lambda tmp: tmp.write_bytes(data))
    return hashlib.sha256(out.read_bytes()).hexdigest()


TASK_KEYS = ("state_dict", "hyper_parameters", "pytorch-lightning_version", "epoch", "global_step")


def export_task(ckpt_path: str | Path, out: str | Path) -> str:
    """Write ``ckpt_path`` without its optimizer, scheduler, loop and callback state (float32 weights kept as they
    are): loadable with ``Task.load_from_checkpoint`` and as ``--model.init_args.init_from``; returns its sha256."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    missing = [k for k in TASK_KEYS[:2] if k not in ckpt]
    if missing:
        raise KeyError(f"{ckpt_path} is not a task checkpoint written by dtem fit: no {missing[0]}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: torch.save({k: ckpt[k] for k in TASK_KEYS if k in ckpt}, tmp))
    return hashlib.sha256(out.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python experiments/export_backbone.py CKPT OUT [--dtype float32]``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    ap.add_argument("--task", action="store_true", help="the whole task's weights as a slim .ckpt instead")
    args = ap.parse_args(argv)
    if args.task:
        digest = export_task(args.ckpt, args.out)
        print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB, task weights), sha256 {digest}")
        return 0
    digest = export(args.ckpt, args.out, getattr(torch, args.dtype))
    size = args.out.stat().st_size / 2**20
    print(f"wrote {args.out} ({size:.2f} MiB, {args.dtype}), sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
