"""Shared fixtures: tiny random-init ViTs (nothing downloads) and deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

os.environ.setdefault("DTEM_TEST", "1")
torch.set_num_threads(2)


def tiny_vit(**kwargs: object) -> VisionTransformer:
    """A 4-block, 64-wide ViT on 32x32 images with 4x4 patches (64 patch tokens)."""
    cfg = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    cfg.update(kwargs)
    return VisionTransformer(**cfg).eval()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
