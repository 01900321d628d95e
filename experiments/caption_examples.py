"""Print captions of a trained CaptioningTask checkpoint next to their references, at several reduction rates.

Usage: python experiments/caption_examples.py CKPT --root FLICKR_OR_COCO_ROOT [--n 3] [--r 0 8] [--policy ToMe]
Reads the first ``--n`` test images of a Flickr8k root (``--coco`` for a Karpathy/COCO root).
"""

from __future__ import annotations

import argparse

import torch

from dtem_lightning import policy as policies
from dtem_lightning.data import CocoCaptionDataModule, Flickr8kDataModule
from dtem_lightning.patch import use_policy
from dtem_lightning.tasks import CaptioningTask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--root", required=True)
    p.add_argument("--coco", action="store_true", help="root is a COCO/Karpathy caption root")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--r", type=int, nargs="+", default=[0])
    p.add_argument("--policy", default=None, help="evaluate with a fresh policy of this class instead")
    args = p.parse_args()

    task = CaptioningTask.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True).eval()
    policy = task.policy
    if args.policy:
        policy = getattr(policies, args.policy)()
        policy.bind(task.backbone)
        use_policy(task.backbone, policy)
    dm_cls = CocoCaptionDataModule if args.coco else Flickr8kDataModule
    dm = dm_cls(
        root=args.root, img_size=task.hparams.img_size, backbone=task.hparams.backbone, batch_size=args.n
    )
    dm.setup("test")
    images, refs = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        for r in args.r:
            with policy.reduce(r):
                caps = task.generate(images[: args.n])
                tokens = policy.token_counts(task.num_input_tokens(tuple(images.shape[1:])))[-1]
            print(f"## {type(policy).__name__} r={r} ({tokens} visual tokens)")
            for i, cap in enumerate(caps):
                print(f"- image {i}: **{cap}**\n  references: " + " | ".join(refs[i]))


if __name__ == "__main__":
    main()
