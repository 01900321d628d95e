"""One segmentation sample: image and label map read, mapped to labels, transformed together (resize, random
crop, flip, normalise); samples of different sizes padded into one batch."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dtem_lightning.data.seg_labels import LabelMapper, read_label
from dtem_lightning.data.store import Store
from dtem_lightning.labelmaps import IGNORE_INDEX


def _resize_pair(
    img: Image.Image, label: Image.Image, size: tuple[int, int], interp: int
) -> tuple[Image.Image, Image.Image]:
    """Resize image (``interp``) and label (NEAREST only: labels are never interpolated) to (W, H)."""
    if img.size == size:
        return img, label
    return img.resize(size, interp), label.resize(size, Image.NEAREST)


def _short_side_size(w: int, h: int, short: float) -> tuple[int, int]:
    scale = short / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


class JointTransform:
    """Image and label map together: resize, random crop, flip; then normalise and map labels.

    Training: the shorter side is resized to ``size · s`` with s ~ U(``scale_range``), a ``size`` × ``size``
    window is cropped at random (padding with the mean colour / the ignore label where the image is smaller),
    and the pair is flipped horizontally with probability 0.5. Evaluation: the shorter side is resized to
    ``eval_size`` (None keeps the native size). The label always goes through NEAREST resampling.

    Args:
        size: training crop side.
        mean: normalisation mean (RGB, 0–1).
        std: normalisation std.
        train: random augmentation (True) or deterministic evaluation resize.
        scale_range: (min, max) random scale of the shorter side relative to ``size``.
        eval_size: evaluation shorter side; None keeps the native size.
        label_map: uint8 lookup table [256] from file values to training labels (ignore -> 255).
        interpolation: PIL resampling filter of the image.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        scale_range: tuple[float, float] = (0.5, 2.0),
        eval_size: int | None = None,
        label_map: np.ndarray | None = None,
        interpolation: int = Image.BILINEAR,
        valid: np.ndarray | None = None,
    ) -> None:
        self.size, self.train, self.scale_range, self.eval_size = size, train, scale_range, eval_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.label_map = label_map if label_map is not None else np.arange(256, dtype=np.uint8)
        self.interpolation = interpolation
        self.valid = valid  # bool [256]: label-file values that are a class or the ignore value

    def __call__(self, img: Image.Image, label: Image.Image) -> tuple[Tensor, Tensor]:
        if img.size != label.size:
            raise ValueError(f"image size {img.size} differs from its label map's {label.size}")
        if self.train:
            s = random.uniform(*self.scale_range)
            img, label = _resize_pair(
                img, label, _short_side_size(*img.size, self.size * s), self.interpolation
            )
        elif self.eval_size is not None:
            img, label = _resize_pair(
                img, label, _short_side_size(*img.size, self.eval_size), self.interpolation
            )
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - self.mean) / self.std
        raw = np.asarray(label, dtype=np.uint8)
        if self.valid is not None and not self.valid[raw].all():
            bad = sorted({int(v) for v in np.unique(raw) if not self.valid[v]})
            raise ValueError(f"label values {bad[:8]} are neither a class nor the ignore value")
        y = torch.from_numpy(self.label_map[raw].astype(np.int64))
        if self.train:
            x, y = self._crop(x, y)
            if random.random() < 0.5:
                x, y = x.flip(-1), y.flip(-1)
        return x, y

    def _crop(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Random ``size`` × ``size`` window; zero (= mean colour) / ignore padding where the image is smaller."""
        H, W = y.shape
        S = self.size
        ph, pw = max(0, S - H), max(0, S - W)
        if ph or pw:
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=0.0)
            y = torch.nn.functional.pad(y, (0, pw, 0, ph), value=IGNORE_INDEX)
            H, W = y.shape
        top, left = random.randint(0, H - S), random.randint(0, W - S)
        return x[:, top : top + S, left : left + S], y[top : top + S, left : left + S]


def pad_collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack (image [3, H, W], label [H, W]) pairs of any sizes, padding to the largest (image 0, label ignore)."""
    H = max(y.shape[0] for _, y in batch)
    W = max(y.shape[1] for _, y in batch)
    xs = torch.zeros(len(batch), 3, H, W)
    ys = torch.full((len(batch), H, W), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        xs[i, :, : y.shape[0], : y.shape[1]] = x
        ys[i, : y.shape[0], : y.shape[1]] = y
    return xs, ys


class SegmentationDataset(Dataset):
    """(image, label map) pairs read from a :class:`~dtem_lightning.data.store.Store`.

    Args:
        store: where the files live.
        pairs: (image name, label name) pairs.
        transform: the joint transform (given labels already mapped: uint8, 255 = ignore).
        mapper: raw label-file values -> labels; None: the files hold the labels (8-bit).
    """

    def __init__(
        self,
        store: Store,
        pairs: list[tuple[str, str]],
        transform: Callable[[Image.Image, Image.Image], tuple[Tensor, Tensor]],
        mapper: LabelMapper | None = None,
    ) -> None:
        self.store, self.pairs, self.transform, self.mapper = store, pairs, transform, mapper

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        img_name, label_name = self.pairs[index]
        img = self.store.load(img_name)
        raw = read_label(self.store, label_name)
        try:
            labels = self.mapper(raw) if self.mapper is not None else raw.astype(np.uint8)
        except ValueError as e:
            raise ValueError(f"label map {label_name}: {e}") from e
        # mapped before resizing: NEAREST resampling needs no 16-bit support and never invents a value
        label = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))  # 2-D uint8: mode L
        if img.size != label.size:
            raise ValueError(
                f"image {img_name} has size {img.size} but its label map {label_name} {label.size}"
            )
        return self.transform(img, label)
