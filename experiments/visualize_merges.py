"""Draw which patches a merge policy grouped: each final token's patches share one colour over the image.

Usage: python experiments/visualize_merges.py IMAGE [IMAGE ...] --out merges.png [--backbone NAME]
       [--checkpoint_path FILE] [--backbone_kwargs '{"img_size": 32, ...}'] [--policy ToMe] [--r 8 16]
Random-init weights unless --checkpoint_path is given (groups then follow random features).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import timm
import torch
from PIL import Image
from torchvision import transforms as T

from dtem_lightning import policy as policies
from dtem_lightning.merge import patch_groups
from dtem_lightning.patch import apply_policy


def group_image(
    img: np.ndarray, groups: np.ndarray, grid: tuple[int, int], alpha: float = 0.55
) -> np.ndarray:
    """Overlay a random colour per group on ``img`` [H, W, 3] uint8; ``groups`` [gh*gw] token ids."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 255, size=(int(groups.max()) + 1, 3))
    gh, gw = grid
    h, w = img.shape[0] // gh, img.shape[1] // gw
    tiles = colours[groups.reshape(gh, gw)].repeat(h, 0).repeat(w, 1)
    out = img[: gh * h, : gw * w].astype(np.float32) * (1 - alpha) + tiles * alpha
    return out.clip(0, 255).astype(np.uint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default="merges.png")
    p.add_argument("--backbone", default="deit_small_patch16_224")
    p.add_argument("--checkpoint_path", default=None)
    p.add_argument("--backbone_kwargs", default="{}", help="JSON dict for timm.create_model")
    p.add_argument("--policy", default="ToMe", choices=["ToMe", "DTEMHard"])
    p.add_argument("--r", type=int, nargs="+", default=[8, 16])
    args = p.parse_args()

    kwargs = json.loads(args.backbone_kwargs)
    if args.checkpoint_path:
        overlay = {"file": args.checkpoint_path, "hf_hub_id": None, "url": None}
        model = timm.create_model(args.backbone, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    else:
        model = timm.create_model(args.backbone, **kwargs)
    policy = getattr(policies, args.policy)(trace_source=True)
    apply_policy(model.eval(), policy)
    size = tuple(model.patch_embed.img_size)
    # crop_pct 1: the image shown is exactly the model's input (resize the short side, centre crop).
    cfg = {**timm.data.resolve_data_config({}, model=model), "crop_pct": 1.0, "input_size": (3, *size)}
    tf = timm.data.create_transform(**cfg)
    crop = T.Compose([T.Resize(min(size)), T.CenterCrop(size)])
    grid = model.patch_embed.grid_size
    rows = []
    for path in args.images:
        pil = Image.open(path).convert("RGB")
        x = tf(pil)[None]
        shown = np.asarray(crop(pil))
        row = [shown]
        for r in args.r:
            with torch.no_grad(), policy.reduce(r):
                model(x)
                groups = patch_groups(policy.state.source, model.num_prefix_tokens)[0].numpy()
            row.append(group_image(shown, groups, grid))
        rows.append(np.concatenate(row, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out)
    print(f"wrote {args.out}: columns = image, " + ", ".join(f"{args.policy} r={r}" for r in args.r))


if __name__ == "__main__":
    main()
