"""Shared fixtures: tiny random-init ViTs (nothing downloads), deterministic seeds, and the data sets of
../shared/data (tests that need one skip with the reason when it is absent; DTEM_SHARED_DATA names another folder)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

os.environ.setdefault("DTEM_TEST", "1")
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DTEM_SHARED_DATA") or ROOT.parent / "shared" / "data")
CIFAR = SHARED_DATA / "cifar10-jpeg-subset" / "cifar10_train2000pc_test500pc.zip"
CAMVID = SHARED_DATA / "camvid-segnet-halfres" / "camvid_240x180.zip"
FLICKR = SHARED_DATA / "flickr8k-1k" / "flickr8k_1k.zip"


def needs_shared(path: Path) -> pytest.MarkDecorator:
    """Skip marker for a test that reads ``path`` from the shared data folder (absent in a clone elsewhere)."""
    return pytest.mark.skipif(
        not path.is_file(),
        reason=f"needs {path.name} from the shared data folder, absent here ({path}); "
        "set DTEM_SHARED_DATA to the folder that holds it",
    )


def tiny_vit(**kwargs: object) -> VisionTransformer:
    """A 4-block, 64-wide ViT on 32x32 images with 4x4 patches (64 patch tokens)."""
    cfg = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    cfg.update(kwargs)
    return VisionTransformer(**cfg).eval()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_image_tree(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    """``train/`` and ``test/`` class folders of 32x32 PNGs whose brightness depends on the class."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                arr = (torch.rand(32, 32, 3, generator=g) * 80 + c * 80).byte().numpy()
                Image.fromarray(arr).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CIFAR-10 subset when present, else a small generated image tree in its layout (3 classes x 8)."""
    if CIFAR.is_file():
        return str(CIFAR)
    return str(make_image_tree(tmp_path_factory.mktemp("imgs")))


def read_sweep(out: Path) -> list[dict[str, str]]:
    """Rows of the newest ``sweep.csv`` under ``out``."""
    files = sorted(out.rglob("sweep.csv"), key=lambda p: p.stat().st_mtime)
    assert files, f"no sweep.csv under {out}"
    with files[-1].open() as f:
        return list(csv.DictReader(f))
