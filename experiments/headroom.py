"""Headroom check: does the choice of merge metric matter at the target r? (ToMe keys, random embeddings, raw input;
for segmentation also an oracle that merges only inside ground-truth classes)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtem_lightning import stats
from dtem_lightning.encoder import MergingEncoder, r_label
from dtem_lightning.encoder import parse_r as parse_schedule
from dtem_lightning.io import write_text
from dtem_lightning.policy import DTEMHard, MergePolicy, NoMerge, ToMe
from dtem_lightning.tasks.sweep import sweep_rows


class RawInput(MergePolicy):
    """Hard merging on the block's normalised input u itself (no projection): a parameter-free control metric."""

    def metric(self, layer: int, u: Tensor) -> Tensor | None:
        return u


class OracleLabels(MergePolicy):
    """Hard merging on each token's ground-truth label histogram: merges stay inside one class (analysis only).

    The histogram of a token is the sum of its patches' per-class pixel fractions, carried through merges by the
    source map; set :attr:`patch_hist` [B, N0, K] (:func:`patch_histograms`) before each forward. It bounds what
    a learned metric could win by merge choice alone.
    """

    def __init__(self, r: int | list[int] = 0, prop_attn: bool = True) -> None:
        super().__init__(r=r, prop_attn=prop_attn, trace_source=True)
        self.patch_hist: Tensor | None = None

    def metric(self, layer: int, u: Tensor) -> Tensor | None:
        if self.patch_hist is None:
            raise RuntimeError("OracleLabels needs patch_hist (the labels) before each forward")
        return self.state.source.to(self.patch_hist.dtype) @ self.patch_hist


def patch_histograms(
    labels: Tensor, patch: int, num_classes: int, ignore_index: int, num_prefix: int
) -> Tensor:
    """Per-class pixel fractions of every patch: labels [B, H, W] -> [B, num_prefix + h·w, K] (prefix rows 0).

    Ignored pixels count for no class, so an all-void patch has a zero histogram (similar to nothing).
    """
    valid = labels != ignore_index
    onehot = F.one_hot(labels.masked_fill(~valid, 0), num_classes).float() * valid[..., None]  # [B, H, W, K]
    hist = F.avg_pool2d(onehot.permute(0, 3, 1, 2), patch).flatten(2).transpose(1, 2)  # [B, h·w, K]
    return F.pad(hist, (0, 0, num_prefix, 0))


def candidate_policies(
    encoder: MergingEncoder, seeds: int, trained: dict[str, Tensor] | None = None
) -> list[tuple[str, MergePolicy]]:
    """Bind NoMerge, ToMe, ``seeds`` untrained DTEM embeddings (seeds 0..seeds-1) and RawInput to ``encoder``.

    With ``trained`` (a DTEM policy state dict, ``embed.*``), the trained embedding is added twice, with
    ToMe's token order and with tokens sorted by size (``DTEMHard.order``): the validation check of a training.
    """
    pols: list[tuple[str, MergePolicy]] = []

    def add(name: str, policy: MergePolicy) -> MergePolicy:
        encoder.add_policies([policy])
        pols.append((name, policy))
        return policy

    add("NoMerge", NoMerge())
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
    return r_label(parse_schedule(text))


def _r_key(r: int | str) -> tuple[bool, int, str]:
    return isinstance(r, str), r if isinstance(r, int) else 0, str(r)


def trained_embedding(ckpt_path: str) -> dict[str, Tensor]:
    """The ``policy.embed.*`` tensors of a DTEM training checkpoint (Lightning ``.ckpt``), prefix removed."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    out = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.embed.")}
    if not out:
        raise ValueError(f"{ckpt_path} holds no DTEM embedding (no policy.embed.* tensors)")
    return out


Row = tuple[int, str, MergePolicy, int | str]


def _each_row(encoder: MergingEncoder, rows: list[Row]) -> Iterator[int]:
    """Yield the index of every sweep row with its policy in use at its r (the caller runs the model)."""
    for j, (_, _, p, r) in enumerate(rows):
        with encoder.running(p, parse_schedule(r)):
            yield j


@torch.inference_mode()
def evaluate(
    encoder: MergingEncoder,
    batches: Iterable[tuple[Tensor, Tensor]],
    rs: list[int | str],
    seeds: int = 5,
    trained: dict[str, Tensor] | None = None,
) -> list[dict[str, object]]:
    """Top-1 of every candidate metric at every r, in one pass over ``batches``.

    Args:
        encoder: a timm ViT classifier behind a :class:`~dtem_lightning.encoder.MergingEncoder`; the candidate
            policies are added to it.
        batches: (images [B, 3, H, W], labels [B]) pairs.
        rs: reduction rates to evaluate: ints, or per-block schedules as labels "a,b,c" (see :func:`parse_r`).
        seeds: number of random untrained embeddings.
        trained: a trained DTEM embedding to add (see :func:`candidate_policies`).

    Returns:
        Rows ``{"metric", "r", "acc1", "n"}`` (NoMerge once, at r = 0); accuracies in percent.
    """
    encoder.eval()
    rows = sweep_rows(candidate_policies(encoder, seeds, trained), rs)
    correct = [0] * len(rows)
    n = 0
    for x, y in batches:
        n += len(y)
        for j in _each_row(encoder, rows):
            correct[j] += int((encoder.forward_head(encoder(x)).argmax(-1) == y).sum())
    return [
        {"metric": name, "r": r, "acc1": 100.0 * c / max(n, 1), "n": n}
        for (_, name, _, r), c in zip(rows, correct)
    ]


@torch.inference_mode()
def evaluate_segmentation(
    task: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    rs: list[int | str],
    seeds: int = 5,
    trained: dict[str, Tensor] | None = None,
    crop: int | None = None,
    resamples: int = 1000,
) -> list[dict[str, object]]:
    """mIoU of every candidate metric (and the label oracle) at every r, one window per image, in one pass.

    Args:
        task: a trained :class:`~dtem_lightning.tasks.segmentation.SegmentationTask`.
        batches: (images [B, 3, H, W], labels [B, H, W]) pairs; each image is centre-cropped to ``crop`` × ``crop``
            (default: the task's window) so that one window covers it and the oracle sees that window's labels.
        rs, seeds, trained: as in :func:`evaluate`.
        resamples: bootstrap resamples over images for the standard error of each mIoU.

    Returns:
        Rows ``{"metric", "r", "miou", "stderr", "n"}`` (NoMerge once, at r = 0); mIoU in percent.
    """
    task.eval()
    encoder, K, ig = task.encoder, task.num_classes, task.ignore_index
    crop = crop or task.window
    pols = candidate_policies(encoder, seeds, trained)
    oracle = OracleLabels()
    encoder.add_policies([oracle])
    pols.append(("oracle (ground-truth labels)", oracle))
    encoder.trace_sources()  # segmentation unmerges through the source map
    rows = sweep_rows(pols, rs)
    counts: list[list[Tensor]] = [[] for _ in rows]
    for x, y in batches:
        top, left = (x.shape[-2] - crop) // 2, (x.shape[-1] - crop) // 2
        x, y = x[..., top : top + crop, left : left + crop], y[..., top : top + crop, left : left + crop]
        oracle.patch_hist = patch_histograms(y, task.patch[0], K, ig, encoder.num_prefix)
        for j in _each_row(encoder, rows):
            counts[j].append(stats.class_counts(task(x).argmax(1), y, K, ig))
    per_image = {str(j): torch.cat(c) for j, c in enumerate(counts)}  # [n, 3, K] per job
    boot = stats.bootstrap(per_image, stats.miou_of_counts, resamples, seed=0)
    out = []
    for j, (_, name, _, r) in enumerate(rows):
        c = per_image[str(j)]
        score = 100 * float(stats.miou_of_counts(c.sum(0)))
        out.append(
            {"metric": name, "r": r, "miou": score, "stderr": 100 * float(boot[str(j)].std()), "n": len(c)}
        )
    return out


def score_key(rows: list[dict[str, object]]) -> str:
    """The score column of headroom rows: ``miou`` (segmentation) or ``acc1`` (classification)."""
    return "miou" if "miou" in rows[0] else "acc1"


def summarize(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per r: best and worst merging metric, their spread and the standard error of one score.

    The standard error is the binomial one of an accuracy, or for mIoU the mean of the rows' bootstrap errors.
    The verdict is "no headroom" when the spread is within 2 standard errors (no learned metric can be shown to
    win), "small" within 1 point beyond that, else "headroom".
    """
    key, out = score_key(rows), []
    for r in sorted({row["r"] for row in rows if row["r"]}, key=_r_key):
        at_r = [row for row in rows if row["r"] == r]
        accs = {row["metric"]: row[key] for row in at_r}
        if key == "miou":
            se = sum(row["stderr"] for row in at_r) / len(at_r)
        else:
            mean = sum(accs.values()) / len(accs) / 100
            se = 100 * math.sqrt(max(mean * (1 - mean), 1e-12) / max(at_r[0]["n"], 1))
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
    key = score_key(rows)
    acc = {(row["metric"], row["r"]): row[key] for row in rows}
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
    ap.add_argument(
        "--seg-ckpt",
        help="segmentation instead: a CamVid SegmentationTask checkpoint (.ckpt); --root is then the CamVid root; "
        "every image is centre-cropped to one window and an oracle row (ground-truth label histograms) is added",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seg_ckpt:
        return _main_segmentation(args)

    from dtem_lightning.data.folder import ImageFolderDataModule

    dm = ImageFolderDataModule(
        root=args.root, backbone=args.backbone, img_size=args.img_size, batch_size=args.batch_size,
        max_per_class=args.max_per_class, train_transform="simple",
    )  # fmt: skip
    kwargs = {**json.loads(args.backbone_kwargs), "img_size": args.img_size, "num_classes": dm.num_classes}
    encoder = MergingEncoder(args.backbone, create_kwargs=kwargs, checkpoint_path=args.checkpoint_path)
    if encoder.dropped_head:  # a new random head would make every row chance level
        raise ValueError(f"{encoder.dropped_head}: the headroom check needs the trained classifier head")
    dm.setup("validate" if args.split == "val" else "test")
    loader = dm.val_dataloader() if args.split == "val" else dm.test_dataloader()
    folder = dm.val_split if args.split == "val" else dm.test_split
    trained = trained_embedding(args.embedding) if args.embedding else None
    rows = evaluate(encoder, loader, args.r, args.seeds, trained)
    text = markdown(rows, summarize(rows))
    header = f"Headroom check: {args.backbone} {kwargs}, weights {args.checkpoint_path}, split {folder}/ "
    header += f"({rows[0]['n']} images), top-1 %.\n\n"
    print(header + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, header + text + "\n")
        write_text(args.out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    return 0


def _main_segmentation(args: argparse.Namespace) -> int:
    from dtem_lightning.data import CamVidDataModule
    from dtem_lightning.tasks.segmentation import SegmentationTask

    task = SegmentationTask.load_from_checkpoint(args.seg_ckpt, map_location="cpu", weights_only=True)
    dm = CamVidDataModule(root=args.root, img_size=task.window, batch_size=min(args.batch_size, 16))
    dm.setup("validate" if args.split == "val" else "test")
    loader = dm.val_dataloader() if args.split == "val" else dm.test_dataloader()
    trained = trained_embedding(args.embedding) if args.embedding else None
    rows = evaluate_segmentation(task, loader, args.r, args.seeds, trained)
    text = markdown(rows, summarize(rows))
    header = (
        f"Segmentation headroom check: {args.seg_ckpt}, CamVid {args.split} split ({rows[0]['n']} images, centre "
        f"{task.window}x{task.window} crop, one window each), mIoU % (standard error: bootstrap over images).\n\n"
    )
    print(header + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, header + text + "\n")
        write_text(args.out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
