"""Paper Table 7: how far DTEM's learned embedding departs from the keys, per group of blocks.

For a DTEM training checkpoint (any task), on its validation split: Kendall's tau between the similarities of the
(source, destination) pairs of the hard split on the keys and on the embedding, and the share of the embedding's
r merges that ToMe would also choose, for the untrained embedding (the policy's initialisation, seeded) and the
trained one. Each embedding merges along its own path (hard merging at r).

Usage: python experiments/table7.py CKPT [--root DATA] [--r 20] [--batches 8] --out results/table7/NAME.md
"""

from __future__ import annotations

import argparse
import csv
import importlib
from pathlib import Path
from typing import Any

import torch

from dtem_lightning.analysis import RecordingDTEM
from dtem_lightning.data.base import stored_settings
from dtem_lightning.io import load_weights_only, untrusted_class_paths
from dtem_lightning.merge import parse_r
from dtem_lightning.tasks import BaseTask


def _trusted_class(path: str, what: str) -> type:
    if untrusted_class_paths(path):
        raise ValueError(
            f"{what} class {path!r} is outside dtem_lightning, torch, timm and lightning: refused"
        )
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def load_task_and_data(ckpt_path: str, root: str | None, batch_size: int) -> tuple[BaseTask, Any]:
    """The task of a ``dtem fit`` checkpoint and its data module (settings from the checkpoint; ``root`` moves it)."""
    ckpt = load_weights_only(ckpt_path, "CKPT")
    hp = dict(ckpt.get("hyper_parameters") or {})
    data_hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    if "_class_path" not in hp or "_class_path" not in data_hp:
        raise ValueError(f"{ckpt_path} was not written by `dtem fit` (no task or data class stored)")
    task_cls = _trusted_class(hp["_class_path"], "task")
    task = task_cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True).eval()
    data_cls = _trusted_class(data_hp.pop("_class_path"), "data")
    data_hp.update({k: v for k, v in {"root": root, "batch_size": batch_size, "num_workers": 0}.items() if v})
    return task, data_cls(**stored_settings(data_cls, data_hp))


@torch.inference_mode()
def table7(
    task: BaseTask, loader: Any, r: int | list[int], batches: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Rows (embedding, blocks, tau, agree) for the untrained and the trained embedding of ``task.policy``."""
    trained = {k: v for k, v in task.policy.state_dict().items() if k.startswith("embed.")}
    if not trained:
        raise ValueError(
            f"the task's policy {type(task.policy).__name__} has no embedding (not a DTEM checkpoint)"
        )
    rows = []
    for name in ("untrained", "trained"):
        torch.manual_seed(seed)  # the untrained embedding: the policy's own initialisation, seeded
        rec = RecordingDTEM(
            r=r, embed_dim=task.policy.embed_dim, seed=seed, trace_source=task.policy.trace_source
        )
        task.encoder.add_policies([rec])
        if name == "trained":
            rec.load_state_dict(trained)
        with task.encoder.running(rec, r):
            for i, batch in enumerate(loader):
                if i == batches:
                    break
                task.evaluate(batch)
        rows += [{"embedding": name, **row} for row in rec.summary()]
        task.encoder.test_policies.pop(-1)
        task.encoder.use(task.policy)
    return rows


def write(rows: list[dict[str, Any]], out: Path, note: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Table 7: keys vs embedding\n\n{note}\n", "| embedding | blocks | Kendall tau | merges ToMe shares |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['embedding']} | {r['blocks']} | {r['tau']:.3f} | {r['agree']:.3f} |" for r in rows]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="a `dtem fit` checkpoint whose policy is DTEM")
    p.add_argument("--root", default=None, help="data location replacing the checkpoint's")
    p.add_argument("--r", default=None, help="reduction (int or 'a,b,...'); default: the policy's r")
    p.add_argument("--batches", type=int, default=8, help="validation batches (tau is O(pairs²) per image)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    task, data = load_task_and_data(args.ckpt, args.root, args.batch_size)
    data.setup("validate")
    r = parse_r(args.r) if args.r is not None else task.policy.r
    rows = table7(task, data.val_dataloader(), r, args.batches, args.seed)
    note = (f"Checkpoint `{args.ckpt}`, validation split, {args.batches} batches of {args.batch_size}, r = {r}; "
            "tau over up to 1024 sampled (source, destination) pairs per block and image; 'merges ToMe shares': "
            "the share of the embedding's r merged sources that ToMe's rule on the keys also merges.")  # fmt: skip
    write(rows, Path(args.out), note)


if __name__ == "__main__":
    main()
