"""Segmentation label constants shared by the data modules and the task: the ignore label, CamVid's classes and
colours, and label maps drawn as images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

IGNORE_INDEX = 255  # every data module maps its dataset's void/ignore value to this label
CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct RGB colours, one per class (the PASCAL VOC bit-interleaving colour map)."""
    out = []
    for c in range(num_classes):
        r = g = b = 0
        v = c + 1
        for shift in range(7, -1, -1):
            r |= (v & 1) << shift
            g |= ((v >> 1) & 1) << shift
            b |= ((v >> 2) & 1) << shift
            v >>= 3
        out.append((r, g, b))
    return out


def colorize(label: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> Image.Image:
    """Label map [H, W] -> RGB image; ignored (out-of-range) pixels are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return Image.fromarray(lut[np.clip(label, 0, 255).astype(np.uint8)])
