"""Semantic segmentation data: CamVid and ADE20K layouts (folder or zip), joint image/label transforms."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dtem_lightning.data.base import BaseDataModule
from dtem_lightning.data.folder import IMG_EXTENSIONS, to_rgb
from dtem_lightning.data.store import DataRoot

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


class FileStore(DataRoot):
    """Files under a folder or inside a zip archive (optionally wrapped in one top-level folder).

    Each process opens its own zip handle (loader workers must not share a file offset).

    Args:
        root: folder or ``.zip`` file.
        anchor: a relative folder the tree must contain (used to find a wrapping folder inside a zip).

    Raises:
        FileNotFoundError: ``root`` does not exist.
    """

    def __init__(self, root: str | os.PathLike, anchor: str) -> None:
        super().__init__(root)
        self.prefix = ""
        self._names: list[str] = self.members() if self.is_zip else []
        if self.is_zip:
            tops = {n.split("/", 1)[0] for n in self._names}
            first = anchor.split("/", 1)[0]
            if first not in tops and len(tops) == 1:
                self.prefix = tops.pop() + "/"

    def files(self, folder: str, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> dict[str, str]:
        """Stem -> readable name of the files directly under ``folder`` with one of ``extensions``."""
        out = {}
        if self.is_zip:
            start = self.prefix + folder.rstrip("/") + "/"
            for n in self._names:
                if n.startswith(start) and "/" not in n[len(start) :] and n.lower().endswith(extensions):
                    out[PurePosixPath(n).stem] = n
            return out
        path = os.path.join(self.root, folder)
        if not os.path.isdir(path):
            return out
        for name in sorted(os.listdir(path)):
            if name.lower().endswith(extensions) and not name.startswith("."):
                out[os.path.splitext(name)[0]] = os.path.join(path, name)
        return out

    def where(self, folder: str) -> str:
        """Readable location of a folder, for messages."""
        return os.path.join(self.root, self.prefix + folder)

    def open(self, name: str) -> Image.Image:
        """Decode one image (mode unchanged)."""
        return self.open_image(name)


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
    """(image, label map) pairs read from a :class:`FileStore`.

    Args:
        store: where the files live.
        pairs: (image name, label name) pairs.
        transform: the joint transform.
    """

    def __init__(
        self,
        store: FileStore,
        pairs: list[tuple[str, str]],
        transform: Callable[[Image.Image, Image.Image], tuple[Tensor, Tensor]],
    ) -> None:
        self.store, self.pairs, self.transform = store, pairs, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        img_name, label_name = self.pairs[index]
        img = to_rgb(self.store.open(img_name))
        label = self.store.open(label_name)
        if label.mode not in ("L", "P"):
            raise ValueError(f"label map {label_name} has mode {label.mode}; expected 8-bit (L or P)")
        try:
            return self.transform(img, label)
        except ValueError as e:
            raise ValueError(f"label map {label_name}: {e} (check num_classes / ignore_index)") from e


class SegmentationDataModule(BaseDataModule):
    """Base of the segmentation data modules: paired image/label folders, joint transforms, padded batches.

    Subclasses define ``layout`` ({split: (image folder, label folder)}) and may override ``label_lut``.
    Batches are (images [B, 3, H, W], labels [B, H, W] int64) with the ignore label mapped to 255.

    Args:
        root: dataset folder or zip archive.
        num_classes: classes scored (labels 0 .. num_classes - 1 after mapping).
        ignore_index: the value of void/unlabelled pixels in the label files.
        scale_range: random scale range of training images (shorter side relative to ``img_size``).
        eval_size: shorter side of evaluation images; None: ``img_size``; 0: native size.
        max_per_class: keep at most this many images per split, evenly spaced in name order (every image holds
            every class; the name matches :class:`ImageFolderDataModule` so ``configs/debug.yaml`` fits every task).
        batch_size: see ``BaseDataModule``.
        num_workers: see ``BaseDataModule``.
        backbone: see ``BaseDataModule``.
        img_size: training crop side (and sliding-window size of the task).
        pin_memory: see ``BaseDataModule``.
    """

    layout: dict[str, tuple[str, str]] = {}
    class_names: tuple[str, ...] = ()
    palette: Sequence[tuple[int, int, int]] = ()

    def __init__(
        self,
        root: str,
        num_classes: int,
        ignore_index: int,
        scale_range: tuple[float, float] = (0.5, 2.0),
        eval_size: int | None = None,
        max_per_class: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        backbone: str = "vit_tiny_patch16_224",
        img_size: int | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, backbone, img_size, crop_pct=1.0, pin_memory=pin_memory)
        self.save_hyperparameters()
        if not 1 <= num_classes <= 255:
            raise ValueError(f"num_classes must be in 1..255, got {num_classes}")
        if not 0 <= ignore_index <= 255:
            raise ValueError(f"ignore_index must be in 0..255 (8-bit label files), got {ignore_index}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (min, max) with 0 < min <= max, got {scale_range}")
        if max_per_class is not None and max_per_class < 1:
            raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
        self.root, self.num_classes, self.ignore_index = root, num_classes, ignore_index
        self.scale_range = tuple(scale_range)
        self.crop_size = self.input_size[1]
        self.eval_size = self.crop_size if eval_size is None else (eval_size or None)
        self.max_per_class = max_per_class
        self.collate_fn = pad_collate  # images of different sizes in one evaluation batch
        self.store = FileStore(root, anchor=next(iter(self.layout.values()))[0])
        missing = [
            self.store.where(f) for split in ("train",) for f in self.layout[split] if not self._exists(f)
        ]
        if missing:
            raise FileNotFoundError(f"{type(self).__name__}: folder(s) not found: {', '.join(missing)}")
        if not self.class_names or len(self.class_names) != num_classes:
            self.class_names = tuple(f"class_{i}" for i in range(num_classes))
        if len(self.palette) < num_classes:
            self.palette = default_palette(num_classes)

    def _exists(self, folder: str) -> bool:
        return bool(self.store.files(folder)) or os.path.isdir(self.store.where(folder))

    def label_lut(self) -> np.ndarray:
        """uint8 lookup [256] from label-file values to labels: ``ignore_index`` and values >= classes -> 255."""
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[: self.num_classes] = np.arange(self.num_classes)
        lut[self.ignore_index] = IGNORE_INDEX
        return lut

    def valid_labels(self) -> np.ndarray:
        """bool [256]: label-file values that map to a class, or are the ignore value; others are an error."""
        valid = self.label_lut() != IGNORE_INDEX
        valid[self.ignore_index] = True
        return valid

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """(image, label) names of ``split``, matched by file stem, sorted and optionally thinned."""
        img_dir, label_dir = self.layout[split]
        images, labels = self.store.files(img_dir), self.store.files(label_dir, (".png",))
        if not images:
            raise ValueError(f"no images in {self.store.where(img_dir)}")
        unlabelled = sorted(set(images) - set(labels))
        if unlabelled:
            raise ValueError(
                f"{len(unlabelled)} image(s) in {self.store.where(img_dir)} have no label PNG in "
                f"{self.store.where(label_dir)} (e.g. {unlabelled[0]})"
            )
        stems = sorted(images)
        if self.max_per_class is not None and len(stems) > self.max_per_class:
            k = self.max_per_class
            stems = [stems[i * len(stems) // k] for i in range(k)]
        return [(images[s], labels[s]) for s in stems]

    def joint_transform(self, train: bool) -> JointTransform:
        """The training (random scale, crop, flip) or evaluation (shorter-side resize) transform."""
        cfg = self.data_config
        interp = Image.BICUBIC if cfg.get("interpolation") == "bicubic" else Image.BILINEAR
        return JointTransform(
            self.crop_size,
            cfg["mean"],
            cfg["std"],
            train,
            self.scale_range,
            self.eval_size,
            self.label_lut(),
            interp,
            self.valid_labels(),
        )

    def _dataset(self, split: str, train: bool) -> SegmentationDataset:
        return SegmentationDataset(self.store, self.pairs(split), self.joint_transform(train))

    def setup(self, stage: str | None = None) -> None:
        """Pair the files of the splits ``stage`` needs and build their datasets."""
        if stage in (None, "fit"):
            self.train_dataset = self._dataset("train", train=True)
        if stage in (None, "fit", "validate"):
            self.val_dataset = self._dataset("val", train=False)
        if stage in (None, "test", "predict"):
            self.test_dataset = self._dataset("test", train=False)


class CamVidDataModule(SegmentationDataModule):
    """CamVid in the SegNet layout: ``{train,val,test}/<name>.<img>`` with ``{train,val,test}annot/<name>.png``.

    Labels 0–10 are scored (sky … bicyclist), 11 (unlabelled) is ignored. ``root`` may be the zip of
    ../shared/data/camvid-segnet-halfres, read in place.

    Args:
        root: see :class:`SegmentationDataModule`.
        num_classes: see :class:`SegmentationDataModule` (11).
        ignore_index: see :class:`SegmentationDataModule` (11).
        **kwargs: see :class:`SegmentationDataModule`.
    """

    layout = {s: (s, f"{s}annot") for s in ("train", "val", "test")}
    class_names = CAMVID_CLASSES
    palette = CAMVID_PALETTE

    def __init__(self, root: str, num_classes: int = 11, ignore_index: int = 11, **kwargs: object) -> None:
        super().__init__(root, num_classes, ignore_index, **kwargs)


class ADE20KDataModule(SegmentationDataModule):
    """ADE20K (SceneParsing ADEChallengeData2016): ``images/{training,validation}``, ``annotations/...``.

    Label 0 ("other") is ignored and 1–150 become 0–149 (mmseg's ``reduce_zero_label``). The validation split
    serves validation and test (the test labels are not public).

    Args:
        root: see :class:`SegmentationDataModule` (the ADEChallengeData2016 folder or its zip).
        num_classes: see :class:`SegmentationDataModule` (150).
        ignore_index: see :class:`SegmentationDataModule` (0).
        **kwargs: see :class:`SegmentationDataModule`.
    """

    layout = {
        "train": ("images/training", "annotations/training"),
        "val": ("images/validation", "annotations/validation"),
        "test": ("images/validation", "annotations/validation"),
    }

    def __init__(self, root: str, num_classes: int = 150, ignore_index: int = 0, **kwargs: object) -> None:
        super().__init__(root, num_classes, ignore_index, **kwargs)

    def label_lut(self) -> np.ndarray:
        """0 -> ignore, v -> v - 1 for 1..num_classes, anything else -> ignore."""
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        values = np.arange(256)
        keep = (values >= 1) & (values <= self.num_classes) & (values != self.ignore_index)
        lut[keep] = values[keep] - 1
        return lut
