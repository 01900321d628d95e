"""Semantic segmentation data: your own image/label folders, CamVid and ADE20K layouts (folder or zip), label
maps (8-bit, palette, 16-bit) mapped to classes, joint image/label transforms."""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dtem_lightning.data.base import BaseDataModule
from dtem_lightning.data.checks import check_images
from dtem_lightning.data.folder import IMG_EXTENSIONS, to_rgb
from dtem_lightning.data.store import DataRoot, thin

IGNORE_INDEX = 255  # every data module maps its dataset's void/ignore value to this label
LABEL_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp")  # lossless formats only: JPEG would blur class values
LABEL_MODES = ("1", "L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I")  # one channel of integer class values
MAX_LABEL_VALUE = 65535  # 16-bit label files
SCAN_FILES = 256  # label maps per split read at setup to check their values (evenly spaced)
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


class LabelMapper:
    """Raw label-file values -> training labels (classes 0 .. K-1, ignore 255) through a lookup table.

    Args:
        lut: uint8 [V]: the label of each raw value below V (255 = ignore).
        valid: bool [V]: raw values that are a class or ignored on purpose; any other value is an error.
        rest_ignored: values at or above V (16-bit files) are ignored rather than an error.
        hint: advice appended to the error for unexpected values.
    """

    def __init__(
        self, lut: np.ndarray, valid: np.ndarray, rest_ignored: bool = False, hint: str = ""
    ) -> None:
        if lut.shape != valid.shape:
            raise ValueError(f"lut and valid differ in shape: {lut.shape} vs {valid.shape}")
        self.lut, self.valid, self.rest_ignored, self.hint = lut, valid, rest_ignored, hint

    def bad_values(self, raw: np.ndarray) -> list[int]:
        """Sorted raw values of ``raw`` that are neither a class nor ignored on purpose."""
        values = np.unique(raw).astype(np.int64)
        inside = (values >= 0) & (values < len(self.lut))
        ok = np.zeros(len(values), dtype=bool)
        ok[inside] = self.valid[values[inside]]
        if self.rest_ignored:
            ok |= values >= len(self.lut)
        return [int(v) for v in values[~ok]]

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Label map [H, W] of raw values (any integer dtype) -> uint8 [H, W] labels.

        Raises:
            ValueError: a value is neither a class nor the ignore value (naming up to 8 of them).
        """
        bad = self.bad_values(raw)
        if bad:
            raise ValueError(f"label values {bad[:8]} are neither a class nor the ignore value{self.hint}")
        raw = raw.astype(np.int64, copy=False)
        if self.rest_ignored and raw.size and raw.max() >= len(self.lut):
            return np.where(raw < len(self.lut), self.lut[np.minimum(raw, len(self.lut) - 1)], IGNORE_INDEX)
        return self.lut[raw]


def read_label(store: DataRoot, name: str) -> np.ndarray:
    """The raw values [H, W] of one label file (8-bit, palette indices, or 16/32-bit integers).

    Raises:
        ValueError: the file is not a one-channel integer image (e.g. colour-coded RGB labels).
    """
    label = store.open_image(name)
    if label.mode not in LABEL_MODES:
        raise ValueError(
            f"label map {name} has mode {label.mode}; expected one channel of class values (L, P, I;16 or I): "
            "convert colour-coded label maps to class indices"
        )
    return np.asarray(label).astype(np.int64) if label.mode == "1" else np.asarray(label)


def _checked_label_map(
    label_map: dict[int, int] | None, num_classes: int, ignore_index: int | None
) -> dict[int, int] | None:
    """``label_map`` with int keys and values, every class reached, the ignore value not a key.

    Raises:
        ValueError: a key outside 0..65535, a class outside 0..num_classes - 1, a class no value maps to, or
            ``ignore_index`` among the keys.
    """
    if label_map is None:
        return None
    out = {int(k): int(v) for k, v in label_map.items()}  # YAML / JSON may give string keys
    for value, cls in out.items():
        if not 0 <= value <= MAX_LABEL_VALUE:
            raise ValueError(f"label_map key {value} is not a label-file value (0..{MAX_LABEL_VALUE})")
        if not 0 <= cls < num_classes:
            raise ValueError(f"label_map maps {value} to {cls}, outside the classes 0..{num_classes - 1}")
    if ignore_index is not None and ignore_index in out:
        raise ValueError(
            f"ignore_index={ignore_index} is also a key of label_map (-> class {out[ignore_index]}): a value is "
            "either a class or ignored; drop one"
        )
    unreached = sorted(set(range(num_classes)) - set(out.values()))
    if unreached:
        raise ValueError(
            f"label_map {out} maps no value to class(es) {unreached[:8]} of num_classes={num_classes}"
        )
    return dict(sorted(out.items()))


class SegmentationDataset(Dataset):
    """(image, label map) pairs read from a :class:`FileStore`.

    Args:
        store: where the files live.
        pairs: (image name, label name) pairs.
        transform: the joint transform (given labels already mapped: uint8, 255 = ignore).
        mapper: raw label-file values -> labels; None: the files hold the labels (8-bit).
    """

    def __init__(
        self,
        store: FileStore,
        pairs: list[tuple[str, str]],
        transform: Callable[[Image.Image, Image.Image], tuple[Tensor, Tensor]],
        mapper: LabelMapper | None = None,
    ) -> None:
        self.store, self.pairs, self.transform, self.mapper = store, pairs, transform, mapper

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        img_name, label_name = self.pairs[index]
        img = to_rgb(self.store.open(img_name))
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


class SegmentationDataModule(BaseDataModule):
    """Segmentation on your own image and label-map folders (base of CamVidDataModule and ADE20KDataModule).

    :class:`CamVidDataModule` and :class:`ADE20KDataModule` fix the folders and the label values.

    Layout (``root`` a folder or a zip of one; a label map has its image's file name stem plus ``label_suffix``
    and is a PNG, TIFF or BMP):

    - split folders: ``root/images/{train,val,test}/<name>.<jpg|png|...>`` and
      ``root/labels/{train,val,test}/<name>.png``. ``train`` and one of ``val``/``test`` are needed; a missing
      one is served by the other, and ``setup`` prints one line saying so.
    - one flat set: ``root/images/<name>.*`` and ``root/labels/<name>.png``, split at random by ``split``
      (train, val fractions; the rest is test) with ``seed``: deterministic, disjoint, the same on every run.

    Label maps hold one integer per pixel: 8-bit grayscale (mode L), palette (P: the palette index is the
    value), or 16-bit (I;16 / I). Without ``label_map`` the values 0 .. ``num_classes`` - 1 are the classes; with
    it, the raw value -> class mapping is explicit, e.g. ``{0: 0, 255: 1}`` for 0/255 binary masks. Pixels with
    the value ``ignore_index`` count neither in the loss nor in the metrics. Any other value is an error naming
    it, unless ``unmapped: ignore``. ``setup`` reads up to 256 label maps of each split it builds to check their
    values, refuses an ``ignore_index`` that swallows a class (e.g. 255 on 0/255 masks), and prints one line with
    root, split sizes and classes. Batches are (images [B, 3, H, W], labels [B, H, W] int64) with ignored pixels
    at 255. E.g. binary masks in one flat set: ``dtem fit -c configs/seg_folder_example.yaml
    --data.root=ROOT --data.label_map='{0: 0, 255: 1}'``.

    Args:
        root: folder or zip archive with ``images/`` and ``labels/`` (see ``image_dir``), each either with
            ``train/ val/ [test/]`` split folders or one flat set split by ``split`` and ``seed``; a label map has
            its image's stem (+ ``label_suffix``) and is an 8-bit (L), palette (P) or 16-bit PNG/TIFF.
        num_classes: classes scored (labels 0 .. num_classes - 1 after mapping); default with ``label_map``:
            its largest class + 1.
        ignore_index: the value of void/unlabelled pixels in the label files (0 .. 65535); None: none.
        label_map: raw label-file value -> class index (0 .. num_classes - 1), e.g. ``{0: 0, 255: 1}``;
            None: the values 0 .. num_classes - 1 are the classes.
        unmapped: what label values that are neither a class nor ``ignore_index`` are: ``error`` (raised, naming
            the file and values) or ``ignore`` (left out of loss and metrics).
        class_names: one name per class, for the per-class IoU table; default ``class_0``, ``class_1``, ...
        image_dir: image folder under ``root`` (generic layout only).
        label_dir: label folder under ``root``, parallel to ``image_dir`` (generic layout only).
        label_suffix: ending of a label file's stem after the image's, e.g. ``_mask`` for ``a.jpg`` ->
            ``a_mask.png`` (generic layout only).
        split: (train, val) fractions of a flat set; the rest is test (generic layout only).
        seed: seed of the random split of a flat set (generic layout only).
        scale_range: random scale range of training images (shorter side relative to ``img_size``).
        eval_size: shorter side of evaluation images; None: ``img_size``; 0: native size.
        max_per_class: keep at most this many images per split, evenly spaced in name order (every image holds
            every class; the name matches :class:`ImageFolderDataModule` so ``configs/debug.yaml`` fits every task).
        batch_size: see ``BaseDataModule``.
        num_workers: see ``BaseDataModule``.
        backbone: see ``BaseDataModule``.
        img_size: training crop side (and sliding-window size of the task).
        pin_memory: see ``BaseDataModule``.

    Raises:
        FileNotFoundError: ``root`` or its image/label folders are missing.
        ValueError: contradicting label settings (a class index out of range, ``ignore_index`` also a class), an
            image without a label map, a split too small to be non-empty; in ``setup``: unexpected label values.
    """

    layout: dict[str, tuple[str, str]] = {}  # subclasses: fixed {split: (image folder, label folder)}
    class_names: tuple[str, ...] = ()
    palette: Sequence[tuple[int, int, int]] = ()
    check_labels = True  # read label maps at setup (off where the data set's label values are known)
    _GENERIC = {
        "image_dir": "images",
        "label_dir": "labels",
        "label_suffix": "",
        "split": (0.8, 0.1),
        "seed": 0,
    }

    def __init__(
        self,
        root: str,
        num_classes: int | None = None,
        ignore_index: int | None = None,
        label_map: dict[int, int] | None = None,
        unmapped: Literal["error", "ignore"] = "error",
        class_names: list[str] | None = None,
        image_dir: str = "images",
        label_dir: str = "labels",
        label_suffix: str = "",
        split: tuple[float, float] = (0.8, 0.1),
        seed: int = 0,
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
        # class_names is also a task argument: Lightning refuses to log two different values of one name
        self.save_hyperparameters(ignore=["class_names"])
        if num_classes is None:
            if not label_map:
                raise ValueError("num_classes is required (or give label_map: its largest class + 1 is used)")
            num_classes = max(int(v) for v in label_map.values()) + 1
            # the task gets this value through the CLI link; the logged hparams of both must agree
            self.save_hyperparameters({"num_classes": num_classes})
        fixed = bool(type(self).layout)
        given = {"image_dir": image_dir, "label_dir": label_dir, "label_suffix": label_suffix,
                 "split": tuple(split), "seed": seed}  # fmt: skip
        odd = [k for k, v in given.items() if fixed and v != self._GENERIC[k]]
        if odd:
            raise ValueError(
                f"{type(self).__name__} has fixed folders: {odd[0]}={given[odd[0]]!r} applies only to "
                "SegmentationDataModule (your own image/label folders)"
            )
        if not 1 <= num_classes <= 255:
            raise ValueError(f"num_classes must be in 1..255, got {num_classes}")
        if ignore_index is not None and not 0 <= ignore_index <= MAX_LABEL_VALUE:
            raise ValueError(f"ignore_index must be in 0..{MAX_LABEL_VALUE} or None, got {ignore_index}")
        if unmapped not in ("error", "ignore"):
            raise ValueError(f"unmapped must be 'error' or 'ignore', got {unmapped!r}")
        if not (0 < split[0] and 0 < split[1] and split[0] + split[1] <= 1):
            raise ValueError(f"split must be (train, val) fractions > 0 with a sum <= 1, got {tuple(split)}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (min, max) with 0 < min <= max, got {scale_range}")
        if max_per_class is not None and max_per_class < 1:
            raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.root, self.num_classes, self.ignore_index = root, num_classes, ignore_index
        self.label_map = _checked_label_map(label_map, num_classes, ignore_index)
        self.unmapped, self.label_suffix = unmapped, label_suffix
        self.split, self.seed = tuple(split), seed
        self.scale_range = tuple(scale_range)
        self.crop_size = self.input_size[1]
        self.eval_size = self.crop_size if eval_size is None else (eval_size or None)
        self.max_per_class = max_per_class
        self.collate_fn = pad_collate  # images of different sizes in one evaluation batch
        self.store = FileStore(root, anchor=next(iter(self.layout.values()))[0] if fixed else image_dir)
        self.folders = dict(self.layout) if fixed else self._find_folders(image_dir, label_dir)
        missing = [self.store.where(f) for f in self.folders[next(iter(self.folders))] if not self._exists(f)]
        if missing:
            raise FileNotFoundError(f"{type(self).__name__}: folder(s) not found: {', '.join(missing)}")
        self._split_stems: dict[str, list[str]] | None = None  # flat layout: the random split, made once
        if class_names is not None:
            self.class_names = tuple(class_names)
        elif not self.class_names or len(self.class_names) != num_classes:
            self.class_names = tuple(f"class_{i}" for i in range(num_classes))
        if len(self.palette) < num_classes:
            self.palette = default_palette(num_classes)
        self.label_lut()  # refuses contradicting label settings now rather than at the first batch

    def _exists(self, folder: str) -> bool:
        return bool(self.store.files(folder)) or os.path.isdir(self.store.where(folder))

    def _find_folders(self, image_dir: str, label_dir: str) -> dict[str, tuple[str, str]]:
        """{split: (image folder, label folder)} of split folders, or {"all": (...)} for one flat set."""
        expect = (
            f"expected {self.root}/{image_dir}/ and {self.root}/{label_dir}/, each with train/ val/ [test/] or "
            "one flat set of files; image_dir / label_dir name other folders"
        )
        for folder, what in ((image_dir, "image"), (label_dir, "label")):
            if not self._exists(folder):
                raise FileNotFoundError(f"{what} folder {self.store.where(folder)} not found ({expect})")
        present = [s for s in ("train", "val", "test") if self._exists(f"{image_dir}/{s}")]
        if not present:
            return {"all": (image_dir, label_dir)}
        if "train" not in present or len(present) < 2:
            raise FileNotFoundError(
                f"{self.store.where(image_dir)} has split folders {present} but needs train/ and one of val/, test/"
            )
        return {s: (f"{image_dir}/{s}", f"{label_dir}/{s}") for s in present}

    @property
    def flat(self) -> bool:
        """Whether the data is one flat set split by ``split`` and ``seed`` (no split folders)."""
        return "all" in self.folders

    def source(self, split: str) -> str:
        """The split whose files serve ``split`` (itself, or the other evaluation split when it is missing)."""
        if self.flat:
            return "val" if split == "test" and not self._stems()["test"] else split
        return split if split in self.folders else {"val": "test", "test": "val"}[split]

    def label_lut(self) -> np.ndarray:
        """uint8 lookup [V] from label-file values to labels (255 = ignore; V >= 256 covers the largest
        ``label_map`` key and ``ignore_index``): ``label_map``, else the values 0 .. num_classes - 1 are classes.

        Raises:
            ValueError: without ``label_map``, ``ignore_index`` is also a class (it would silently lose it).
        """
        ig = self.ignore_index
        top = max([255, *(self.label_map or {}), *([ig] if ig is not None else [])])
        lut = np.full(top + 1, IGNORE_INDEX, dtype=np.uint8)
        if self.label_map is None:
            if ig is not None and ig < self.num_classes:
                raise ValueError(
                    f"ignore_index={ig} is also class {ig} of num_classes={self.num_classes} (without label_map the "
                    f"values 0..{self.num_classes - 1} are the classes): map the other values to classes with "
                    f"label_map and lower num_classes, or choose another ignore_index"
                )
            lut[: self.num_classes] = np.arange(self.num_classes)
        else:
            for value, cls in self.label_map.items():
                lut[value] = cls
        if ig is not None:
            lut[ig] = IGNORE_INDEX
        return lut

    def valid_labels(self) -> np.ndarray:
        """bool [V]: label-file values that map to a class, or are ignored on purpose; others are an error."""
        lut = self.label_lut()
        valid = lut != IGNORE_INDEX
        if self.ignore_index is not None and self.ignore_index < len(lut):
            valid[self.ignore_index] = True
        if self.unmapped == "ignore":
            valid[:] = True
        return valid

    def label_mapper(self) -> LabelMapper:
        """Raw label-file values -> labels, with this module's settings."""
        hint = (
            f" (classes: {'label_map ' + str(self.label_map) if self.label_map else f'0..{self.num_classes - 1}'}, "
            f"ignore_index={self.ignore_index}: map raw values to classes with label_map, e.g. {{0: 0, 255: 1}}, "
            "or set unmapped: ignore)"
        )
        return LabelMapper(self.label_lut(), self.valid_labels(), self.unmapped == "ignore", hint)

    def _listing(self, img_dir: str, label_dir: str) -> dict[str, tuple[str, str]]:
        """Stem -> (image, label) of two parallel folders, every image with its label file."""
        images = self.store.files(img_dir)
        labels = self.store.files(label_dir, LABEL_EXTENSIONS)
        sfx = self.label_suffix
        if sfx and img_dir == label_dir:  # images and masks side by side: a.jpg + a_mask.png
            images = {s: n for s, n in images.items() if not s.endswith(sfx)}
        if not images:
            raise ValueError(
                f"no images in {self.store.where(img_dir)} (extensions {', '.join(IMG_EXTENSIONS)})"
            )
        unlabelled = sorted(s for s in images if s + sfx not in labels)
        if unlabelled:
            raise ValueError(
                f"{len(unlabelled)} image(s) in {self.store.where(img_dir)} have no label file in "
                f"{self.store.where(label_dir)} (e.g. {unlabelled[0]}: expected {unlabelled[0]}{sfx}.png)"
            )
        return {s: (images[s], labels[s + sfx]) for s in images}

    def _stems(self) -> dict[str, list[str]]:
        """Flat layout: the stems of each split, drawn once with ``seed`` (sorted within a split)."""
        if self._split_stems is None:
            stems = sorted(self._listing(*self.folders["all"]))
            random.Random(self.seed).shuffle(stems)
            n = len(stems)
            n_train = int(n * self.split[0] + 0.5)
            n_val = min(int(n * self.split[1] + 0.5), n - n_train)
            cut = {"train": stems[:n_train], "val": stems[n_train : n_train + n_val],
                   "test": stems[n_train + n_val :]}  # fmt: skip
            for name in ("train", "val"):
                if not cut[name]:
                    raise ValueError(
                        f"{n} image(s) in {self.store.where(self.folders['all'][0])} are too few for "
                        f"split={self.split}: the {name} split would be empty"
                    )
            self._split_stems = {k: sorted(v) for k, v in cut.items()}
        return self._split_stems

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """(image, label) names of ``split``, matched by file stem, sorted and optionally thinned."""
        split = self.source(split)
        if self.flat:
            listing = self._listing(*self.folders["all"])
            stems = self._stems()[split]
        else:
            listing = self._listing(*self.folders[split])
            stems = sorted(listing)
        return [listing[s] for s in thin(stems, self.max_per_class)]

    def check_values(self, split: str, pairs: list[tuple[str, str]]) -> None:
        """Read up to ``SCAN_FILES`` label maps of a split and refuse surprising values.

        Raises:
            ValueError: a value is neither a class nor ignored (naming the file); on train, ``ignore_index``
                occurs and at most one class does (the ignore value is then most likely a class, e.g. 255 on
                0/255 masks). When two or more classes occur but others never do, a warning says so.
        """
        mapper = self.label_mapper()
        n = len(pairs)
        picks = pairs if n <= SCAN_FILES else [pairs[i * n // SCAN_FILES] for i in range(SCAN_FILES)]
        counts = np.zeros(self.num_classes, dtype=np.int64)
        ignored = total = 0
        seen: set[int] = set()
        for _, name in picks:
            raw = read_label(self.store, name)
            bad = mapper.bad_values(raw)
            if bad:
                raise ValueError(
                    f"label map {name}: label values {bad[:8]} are neither a class nor the ignore value{mapper.hint}"
                )
            if split != "train" or self.ignore_index is None:
                continue
            labels = mapper(raw)
            counts += np.bincount(labels[labels != IGNORE_INDEX], minlength=256)[: self.num_classes]
            ignored += int((raw == self.ignore_index).sum())
            total += raw.size
            seen.update(int(v) for v in np.unique(raw))
        missing = [int(c) for c in np.flatnonzero(counts == 0)]
        if not ignored or not missing:
            return
        guess = {v: i for i, v in enumerate(sorted(seen))}
        msg = (
            f"ignore_index={self.ignore_index} covers {100 * ignored / total:.1f} % of the pixels of {len(picks)} "
            f"train label map(s) and class(es) {missing[:8]} never occur: if {self.ignore_index} is a class, map "
            f"it with label_map (e.g. {guess}) instead of ignoring it"
        )
        if int((counts > 0).sum()) <= 1:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)

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
            None,  # the dataset maps the raw values (LabelMapper) before this transform
            interp,
        )

    def _dataset(self, split: str, train: bool) -> SegmentationDataset:
        pairs = self.pairs(split)
        if not train:  # evaluation splits in full before any epoch (a training split is read as it goes)
            check_images(self.store, [n for pair in pairs for n in pair], split)
        if self.check_labels:
            self.check_values(split, pairs)
        return SegmentationDataset(self.store, pairs, self.joint_transform(train), self.label_mapper())

    def setup(self, stage: str | None = None) -> None:
        """Pair the files of the splits ``stage`` needs, check their label values, build their datasets, and
        print one line with root, split sizes and classes."""
        sizes: dict[str, int] = {}
        if stage in (None, "fit"):
            self.train_dataset = self._dataset("train", train=True)
            sizes["train"] = len(self.train_dataset)
        if stage in (None, "fit", "validate"):
            self.val_dataset = self._dataset("val", train=False)
            sizes["val"] = len(self.val_dataset)
        if stage in (None, "test", "predict"):
            self.test_dataset = self._dataset("test", train=False)
            sizes["test"] = len(self.test_dataset)
        extra: dict[str, object] = {"ignore_index": self.ignore_index}
        if self.label_map is not None:
            extra["label_map"] = self.label_map
        if self.flat:
            extra["split"] = f"{self.split[0]}/{self.split[1]}(seed={self.seed})"
        self.announce(sizes, self.num_classes, **extra)
        for split in ("val", "test"):
            if self.source(split) != split:
                self.note(
                    f"data: no {split} split in {self.root}: {split} uses the {self.source(split)} images"
                )
            elif split == "test" and not self.flat and self.folders.get("test") == self.folders.get("val"):
                self.note(f"data: {type(self).__name__} tests on the val images ({self.folders['val'][0]})")


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
    check_labels = False  # known values (0..11); a bad one still fails, naming its file, when it is read

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
    check_labels = False  # known values (0..150); a bad one still fails, naming its file, when it is read

    def __init__(self, root: str, num_classes: int = 150, ignore_index: int = 0, **kwargs: object) -> None:
        if kwargs.get("label_map") is not None:
            raise ValueError(
                "ADE20KDataModule maps its labels itself (v -> v - 1, 0 ignored): drop label_map"
            )
        super().__init__(root, num_classes, ignore_index, **kwargs)

    def label_lut(self) -> np.ndarray:
        """0 -> ignore, v -> v - 1 for 1..num_classes, anything else -> ignore."""
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        values = np.arange(256)
        keep = (values >= 1) & (values <= self.num_classes) & (values != self.ignore_index)
        lut[keep] = values[keep] - 1
        return lut
