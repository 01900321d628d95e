"""Draw which patches a merge policy grouped: each final token's patches share one colour over the image.

Usage: python experiments/visualize_merges.py IMAGE [IMAGE ...] --out merges.png [--backbone NAME]
       [--checkpoint_path FILE] [--backbone_kwargs '{"img_size": 32, ...}'] [--policy ToMe] [--r 8 16]
Random-init weights unless --checkpoint_path is given (groups then follow random features).
Segmentation: python experiments/visualize_merges.py --seg-ckpt TASK.ckpt --root CAMVID --embedding DTEM.ckpt
       --r 32 --n 3 --out merges.png: CamVid test images (centre window) | ground truth | ToMe | trained DTEM.
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
from dtem_lightning.io import save_image
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


@torch.no_grad()
def segmentation_rows(
    task: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    pols: list[policies.MergePolicy],
    r: int,
    data_config: dict,
) -> np.ndarray:
    """One picture row per image: the image, its ground truth and each policy's merge groups at ``r``.

    Args:
        task: a SegmentationTask; ``pols`` are bound to its backbone (``policy.bind``) and trace sources.
        images: [B, 3, S, S] windows normalised with ``data_config``'s mean and std; labels: [B, S, S].
    """
    from dtem_lightning.labelmaps import colorize, default_palette
    from dtem_lightning.patch import use_policy

    vit = task.backbone
    mean, std = (torch.tensor(data_config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    shown = ((images * std + mean).clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy()
    palette = default_palette(task.num_classes)
    grid = (images.shape[-2] // task.patch[0], images.shape[-1] // task.patch[1])
    columns = [list(shown), [np.asarray(colorize(y.numpy(), palette)) for y in labels]]
    for policy in pols:
        use_policy(vit, policy)
        with policy.reduce(r):
            task(images)
            groups = patch_groups(policy.state.source, vit.num_prefix_tokens).numpy()
        columns.append([group_image(img, g, grid) for img, g in zip(shown, groups, strict=True)])
    use_policy(vit, task.policy)
    return np.concatenate([np.concatenate(row, axis=1) for row in zip(*columns, strict=True)], axis=0)


def _main_segmentation(args: argparse.Namespace) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from headroom import trained_embedding

    from dtem_lightning.data import CamVidDataModule
    from dtem_lightning.tasks.segmentation import SegmentationTask

    task = SegmentationTask.load_from_checkpoint(args.seg_ckpt, map_location="cpu", weights_only=True).eval()
    dm = CamVidDataModule(root=args.root, img_size=task.window, batch_size=args.n)
    dm.setup("test")
    data = dm.test_dataloader().dataset
    picks = np.linspace(0, len(data) - 1, args.n).round().astype(int)  # spread over the (video-ordered) split
    x, y = (torch.stack(t) for t in zip(*(data[int(i)] for i in picks), strict=True))
    top, left = (x.shape[-2] - task.window) // 2, (x.shape[-1] - task.window) // 2
    x, y = (t[..., top : top + task.window, left : left + task.window] for t in (x, y))
    pols, names = [policies.ToMe(trace_source=True)], ["ToMe"]
    for path in args.embedding or []:
        pols.append(policies.DTEMHard(trace_source=True))
        names.append(f"DTEM ({Path(path).parent.parent.name})")
    for i, policy in enumerate(pols):
        policy.bind(task.backbone)
        if i:
            policy.load_state_dict(trained_embedding(args.embedding[i - 1]))
    for r in args.r:
        out = Path(args.out) if len(args.r) == 1 else Path(args.out).with_stem(f"{Path(args.out).stem}_r{r}")
        save_image(out, Image.fromarray(segmentation_rows(task, x, y, pols, r, dm.data_config)))
        print(f"wrote {out}: columns = image, ground truth, " + ", ".join(f"{n} r={r}" for n in names))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="*")
    p.add_argument("--out", default="merges.png")
    p.add_argument("--backbone", default="deit_small_patch16_224")
    p.add_argument("--checkpoint_path", default=None)
    p.add_argument("--backbone_kwargs", default="{}", help="JSON dict for timm.create_model")
    p.add_argument("--policy", default="ToMe", choices=["ToMe", "DTEMHard"])
    p.add_argument("--r", type=int, nargs="+", default=[8, 16])
    p.add_argument(
        "--seg-ckpt", help="segmentation: a SegmentationTask checkpoint; --root is the CamVid root"
    )
    p.add_argument("--root", help="CamVid root (folder or zip) for --seg-ckpt")
    p.add_argument(
        "--embedding", nargs="*", help="DTEM training checkpoints whose embeddings get a column each"
    )
    p.add_argument(
        "--n", type=int, default=3, help="test images, evenly spread over the split (segmentation)"
    )
    args = p.parse_args()
    if args.seg_ckpt:
        return _main_segmentation(args)
    if not args.images:
        p.error("give image files, or --seg-ckpt")

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
    save_image(args.out, Image.fromarray(np.concatenate(rows, axis=0)))
    print(f"wrote {args.out}: columns = image, " + ", ".join(f"{args.policy} r={r}" for r in args.r))


if __name__ == "__main__":
    main()
