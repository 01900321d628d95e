"""Print captions of a trained CaptioningTask checkpoint next to their references, at several reduction rates.

Usage: python experiments/caption_examples.py CKPT [--root ROOT] [--n 3] [--r 0 8] [--policy ToMe]
The data settings (data module class, ``ann_file``, ``val_ann_file``, image folders, ``split``, ``max_per_split``)
come from the checkpoint, so the examples are the test split the run was tested on; ``--root`` only moves the
data. A checkpoint without data settings (a fit outside ``dtem``) needs ``--root`` (a Flickr8k root, ``--coco`` for
a Karpathy/COCO root, default settings) and says so. Prints the first ``--n`` test images. With ``--grounding``
it captions the whole test split and prints whether the captions are about their own image: CIDEr-D and the share
of content words found in the references, against the image's own references and against those of another image
(the test split shifted by one). Generic captions score the same on both.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

import torch

from dtem_lightning import policy as policies
from dtem_lightning.data import CocoCaptionDataModule, Flickr8kDataModule
from dtem_lightning.data.base import stored_settings
from dtem_lightning.data.captions import CaptionDataModule
from dtem_lightning.patch import use_policy
from dtem_lightning.tasks import CaptioningTask
from dtem_lightning.text import STOPWORDS, cider_d, tokenize


def word_precision(caps: list[str], refs: list[list[str]]) -> float:
    """Share of the captions' content words (not in STOPWORDS) that occur in the paired references."""
    hits = total = 0
    for cap, rs in zip(caps, refs, strict=True):
        ref_words = {w for r in rs for w in tokenize(r)}
        words = [w for w in tokenize(cap) if w not in STOPWORDS]
        hits += sum(w in ref_words for w in words)
        total += len(words)
    return hits / max(total, 1)


def grounding(caps: list[str], refs: list[list[str]]) -> str:
    """One line comparing the captions with their own and with another image's references."""
    other = refs[1:] + refs[:1]
    cands = [tokenize(c) for c in caps]
    own_c = cider_d(cands, [[tokenize(r) for r in rs] for rs in refs])
    other_c = cider_d(cands, [[tokenize(r) for r in rs] for rs in other])
    return (
        f"grounding on {len(caps)} test images: CIDEr-D {own_c:.3f} with their own references vs {other_c:.3f} "
        f"with another image's; content words in the references {100 * word_precision(caps, refs):.1f} % vs "
        f"{100 * word_precision(caps, other):.1f} %; {len(set(caps))} distinct captions"
    )


def data_from_checkpoint(
    ckpt_path: str, root: str | None = None, coco: bool = False, **overrides: Any
) -> CaptionDataModule:
    """The caption data module a checkpoint was trained and tested with, rebuilt from its stored settings.

    Lightning stores the data module's ``save_hyperparameters`` under ``datamodule_hyper_parameters``; the
    ``dtem`` CLI adds its ``_class_path``.

    Args:
        ckpt_path: a CaptioningTask checkpoint.
        root: data location replacing the stored one (data moved); required without stored settings.
        coco: without a stored class: CocoCaptionDataModule (else Flickr8kDataModule).
        **overrides: other settings replacing the stored ones (e.g. ``batch_size``).

    Raises:
        ValueError: the checkpoint has no data settings and no ``root`` is given, or its class is not caption data.
    """
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    class_path = hp.get("_class_path")
    if class_path is not None:
        module, name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
    else:
        cls = CocoCaptionDataModule if coco else Flickr8kDataModule
    hp = stored_settings(cls, hp)
    if not hp:
        if root is None:
            raise ValueError(
                f"{ckpt_path} holds no data settings: pass --root (and --coco for a COCO/Karpathy root)"
            )
        print(f"{ckpt_path} holds no data settings: using {cls.__name__} with default settings on {root}")
    if not (isinstance(cls, type) and issubclass(cls, CaptionDataModule)):
        raise ValueError(f"{ckpt_path} was trained on {class_path}, not caption data")
    hp.update({k: v for k, v in {"root": root, **overrides}.items() if v is not None})
    if hp.get("img_size") is None:
        hp["img_size"] = ckpt.get("hyper_parameters", {}).get("img_size")
    return cls(**hp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--root", default=None, help="data location replacing the checkpoint's (data moved)")
    p.add_argument(
        "--coco", action="store_true", help="without stored data settings: root is a COCO/Karpathy root"
    )
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--r", type=int, nargs="+", default=[0])
    p.add_argument("--policy", default=None, help="evaluate with a fresh policy of this class instead")
    p.add_argument(
        "--grounding", action="store_true", help="caption the whole test split, print the grounding line"
    )
    args = p.parse_args()

    task = CaptioningTask.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True).eval()
    policy = task.policy
    if args.policy:
        policy = getattr(policies, args.policy)()
        policy.bind(task.backbone)
        use_policy(task.backbone, policy)
    dm = data_from_checkpoint(
        args.ckpt,
        args.root,
        args.coco,
        backbone=task.hparams.backbone,
        batch_size=max(args.n, 50),
        num_workers=0,
    )
    dm.setup("test")  # prints the data line: root, split sizes
    print(f"examples from the test split ({len(dm.test_dataset)} images) of {type(dm).__name__} on {dm.root}")
    batches = list(dm.test_dataloader()) if args.grounding else [next(iter(dm.test_dataloader()))]
    refs = [list(rs) for _, b in batches for rs in b]
    with torch.no_grad():
        for r in args.r:
            with policy.reduce(r):
                caps = [c for images, _ in batches for c in task.generate(images)]
                tokens = policy.token_counts(task.num_input_tokens(tuple(batches[0][0].shape[1:])))[-1]
            print(f"## {type(policy).__name__} r={r} ({tokens} visual tokens)")
            for i, cap in enumerate(caps[: args.n]):
                print(f"- image {i}: **{cap}**\n  references: " + " | ".join(refs[i]))
            if args.grounding:
                print(grounding(caps, refs))


if __name__ == "__main__":
    main()
