"""Headroom check: does the choice of merge metric matter at the target r? (ToMe keys, random embeddings, raw input)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from dtem_lightning import merge as M
from dtem_lightning.patch import MergeVisionTransformer, apply_policy, use_policy
from dtem_lightning.policy import DTEMHard, MergePolicy, NoMerge, ToMe


class RawInput(MergePolicy):
    """Hard merging on the block's normalised input u itself (no projection): a parameter-free control metric."""

    def metric(self, layer: int, u: Tensor) -> Tensor | None:
        return u


def candidate_policies(
    vit: nn.Module, seeds: int, trained: dict[str, Tensor] | None = None
) -> list[tuple[str, MergePolicy]]:
    """Bind NoMerge, ToMe, ``seeds`` untrained DTEM embeddings (seeds 0..seeds-1) and RawInput to ``vit``.

    With ``trained`` (a DTEM policy state dict, ``embed.*``), the trained embedding is added twice, with
    ToMe's token order and with tokens sorted by size (``DTEMHard.order``): the validation check of a training.
    ``vit`` gets patched with the first policy (NoMerge) when it is not patched yet.
    """
    base = NoMerge()
    if isinstance(vit, MergeVisionTransformer):
        base.bind(vit)
    else:
        apply_policy(vit, base)
    pols: list[tuple[str, MergePolicy]] = [("NoMerge", base)]

    def add(name: str, policy: MergePolicy) -> MergePolicy:
        policy.bind(vit)
        pols.append((name, policy))
        return policy

    add("ToMe (keys)", ToMe())
    for s in range(seeds):
        # The embedding's weights are drawn in bind, right after the seed: seed s is the same metric every run.
        torch.manual_seed(s)
        add(f"random embedding (seed {s})", DTEMHard())
    add("raw block input", RawInput())
    if trained is not None:
        for o in ("tome", "size"):
            add(f"trained embedding (order {o})", DTEMHard(order=o)).load_state_dict(trained)
    return pols


def parse_r(text: str) -> int | str:
    """A constant r (``"16"`` -> 16) or a per-block schedule, kept as its label (``"96,48,24"``).

    Parsed by :func:`dtem_lightning.merge.parse_r`, the form ``test_r`` of the tasks accepts too.
    """
    return M.r_label(M.parse_r(text))


def _schedule(r: int | str) -> int | list[int]:
    return M.parse_r(r)


def _r_key(r: int | str) -> tuple[bool, int, str]:
    return isinstance(r, str), r if isinstance(r, int) else 0, str(r)


def trained_embedding(ckpt_path: str) -> dict[str, Tensor]:
    """The ``policy.embed.*`` tensors of a DTEM training checkpoint (Lightning ``.ckpt``), prefix removed."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    out = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.embed.")}
    if not out:
        raise ValueError(f"{ckpt_path} holds no DTEM embedding (no policy.embed.* tensors)")
    return out


@torch.inference_mode()
def evaluate(
    vit: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    rs: list[int | str],
    seeds: int = 5,
    trained: dict[str, Tensor] | None = None,
) -> list[dict[str, object]]:
    """Top-1 of every candidate metric at every r, in one pass over ``batches``.

    Args:
        vit: a timm ViT classifier (unpatched; it is patched here).
        batches: (images [B, 3, H, W], labels [B]) pairs.
        rs: reduction rates to evaluate: ints, or per-block schedules as labels "a,b,c" (see :func:`parse_r`).
        seeds: number of random untrained embeddings.
        trained: a trained DTEM embedding to add (see :func:`candidate_policies`).

    Returns:
        Rows ``{"metric", "r", "acc1", "n"}`` (NoMerge once, at r = 0); accuracies in percent.
    """
    vit.eval()
    pols = candidate_policies(vit, seeds, trained)
    jobs = [(name, p, r) for name, p in pols for r in ([0] if isinstance(p, NoMerge) else rs)]
    correct = [0] * len(jobs)
    n = 0
    for x, y in batches:
        n += len(y)
        for j, (_, p, r) in enumerate(jobs):
            use_policy(vit, p)
            with p.reduce(_schedule(r)):
                correct[j] += int((vit(x).argmax(-1) == y).sum())
    use_policy(vit, pols[0][1])
    return [
        {"metric": name, "r": r, "acc1": 100.0 * c / max(n, 1), "n": n}
        for (name, _, r), c in zip(jobs, correct)
    ]


def summarize(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per r: best and worst merging metric, their spread and the binomial standard error of one accuracy.

    The verdict is "no headroom" when the spread is within 2 standard errors (no learned metric can be shown to
    win), "small" within 1 point beyond that, else "headroom".
    """
    out = []
    for r in sorted({row["r"] for row in rows if row["r"]}, key=_r_key):
        accs = {row["metric"]: row["acc1"] for row in rows if row["r"] == r}
        n = next(row["n"] for row in rows if row["r"] == r)
        mean = sum(accs.values()) / len(accs) / 100
        se = 100 * math.sqrt(max(mean * (1 - mean), 1e-12) / max(n, 1))
        best, worst = max(accs, key=accs.get), min(accs, key=accs.get)
        spread = accs[best] - accs[worst]
        verdict = "no headroom" if spread <= 2 * se else "small" if spread <= 2 * se + 1 else "headroom"
        out.append(
            {"r": r, "best": best, "best_acc1": accs[best], "worst": worst, "worst_acc1": accs[worst],
             "spread": spread, "stderr": se, "verdict": verdict}
        )  # fmt: skip
    return out


def markdown(rows: list[dict[str, object]], summary: list[dict[str, object]]) -> str:
    """Two Markdown tables: top-1 per metric (rows) and r (columns), then the per-r summary."""
    rs = sorted({row["r"] for row in rows if row["r"]}, key=_r_key)
    names = list(dict.fromkeys(row["metric"] for row in rows))
    acc = {(row["metric"], row["r"]): row["acc1"] for row in rows}
    lines = ["| metric | " + " | ".join(f"r={r}" for r in rs) + " |", "|---|" + "---|" * len(rs)]
    for name in names:
        if name == "NoMerge":
            lines.append(f"| NoMerge (r=0) | {acc[(name, 0)]:.2f} |" + " |" * (len(rs) - 1))
        else:
            lines.append(f"| {name} | " + " | ".join(f"{acc[(name, r)]:.2f}" for r in rs) + " |")
    lines += [
        "",
        "| r | best | worst | spread (pt) | std. error (pt) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['r']} | {s['best']} {s['best_acc1']:.2f} | {s['worst']} {s['worst_acc1']:.2f} | "
            f"{s['spread']:.2f} | {s['stderr']:.2f} | {s['verdict']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: see ``--help``; writes a Markdown table (and JSON rows) to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="vit_tiny_patch16_224", help="timm model name")
    ap.add_argument(
        "--backbone-kwargs",
        default='{"patch_size": 4, "depth": 6, "embed_dim": 128, "num_heads": 2}',
        help="JSON kwargs of create_model",
    )
    ap.add_argument(
        "--checkpoint-path", help="local weights file (safetensors or state dict) for the backbone"
    )
    ap.add_argument("--root", default="data/cifar10", help="image-folder tree or zip")
    ap.add_argument(
        "--split", choices=("val", "test"), default="val", help="evaluate on val (default) or test"
    )
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument(
        "--r", type=parse_r, nargs="+", default=[4, 8, 10],
        help="target reduction rates: ints, or per-block schedules such as 96,48,24,12,6,3",
    )  # fmt: skip
    ap.add_argument("--seeds", type=int, default=5, help="number of random untrained embeddings")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--max-per-class", type=int, default=None, help="fewer images per class (quick runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--embedding", help="a DTEM training checkpoint (.ckpt): add its trained embedding as rows"
    )
    ap.add_argument("--out", type=Path, help="write the Markdown tables here (and rows as .json beside it)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import timm

    from dtem_lightning.data.folder import ImageFolderDataModule

    dm = ImageFolderDataModule(
        root=args.root, backbone=args.backbone, img_size=args.img_size, batch_size=args.batch_size,
        max_per_class=args.max_per_class, train_transform="simple",
    )  # fmt: skip
    kwargs = {**json.loads(args.backbone_kwargs), "img_size": args.img_size, "num_classes": dm.num_classes}
    if args.checkpoint_path:
        # num_classes in the overlay: timm keeps the file's head only when it matches the model's class count
        overlay = {
            "file": args.checkpoint_path,
            "hf_hub_id": None,
            "url": None,
            "num_classes": dm.num_classes,
        }
        vit = timm.create_model(args.backbone, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    else:
        vit = timm.create_model(args.backbone, pretrained=False, **kwargs)
    dm.setup("validate" if args.split == "val" else "test")
    loader = dm.val_dataloader() if args.split == "val" else dm.test_dataloader()
    folder = dm.val_split if args.split == "val" else dm.test_split
    trained = trained_embedding(args.embedding) if args.embedding else None
    rows = evaluate(vit, loader, args.r, args.seeds, trained)
    text = markdown(rows, summarize(rows))
    header = f"Headroom check: {args.backbone} {kwargs}, weights {args.checkpoint_path}, split {folder}/ "
    header += f"({rows[0]['n']} images), top-1 %.\n\n"
    print(header + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
