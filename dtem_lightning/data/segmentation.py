"""Semantic segmentation data: your own image/label folders, CamVid and ADE20K layouts (folder or zip). Label
files are read and mapped in ``seg_labels``, samples made and batched in ``seg_samples``, CamVid and ADE20K
in ``seg_datasets``."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image

from dtem_lightning.data.base import BaseDataModule
from dtem_lightning.data.seg_labels import (
    LABEL_EXTENSIONS,
    MAX_LABEL_VALUE,
    LabelMapper,
    check_label_values,
    checked_label_map,
    label_lut,
)
from dtem_lightning.data.seg_samples import JointTransform, SegmentationDataset, pad_collate
from dtem_lightning.data.store import IMG_EXTENSIONS, Store, thin
from dtem_lightning.labelmaps import default_palette


def _by_stem(names: list[str]) -> dict[str, str]:
    """File name stem -> name."""
    return {os.path.splitext(os.path.basename(n))[0]: n for n in names}


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
        batch_size: samples per batch (per device), for every split.
        **kwargs: see :class:`~dtem_lightning.data.base.BaseDataModule` (loader settings; ``img_size`` is the
            training crop side and the task's sliding-window size; ``max_per_split``: at most this many images
            per split, evenly spaced in name order).

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
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, crop_pct=1.0, **kwargs)
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
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.root, self.num_classes, self.ignore_index = root, num_classes, ignore_index
        self.label_map = checked_label_map(label_map, num_classes, ignore_index)
        self.unmapped, self.label_suffix = unmapped, label_suffix
        self.split, self.seed = tuple(split), seed
        self.scale_range = tuple(scale_range)
        self.crop_size = self.input_size[1]
        self.eval_size = self.crop_size if eval_size is None else (eval_size or None)
        self.collate_fn = pad_collate  # images of different sizes in one evaluation batch
        anchor = next(iter(self.layout.values()))[0] if fixed else image_dir
        self.store = Store(root, anchors=(anchor.split("/", 1)[0],))
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
        return self.store.isdir(folder)

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
        """uint8 lookup from label-file values to labels (255 = ignore), with this module's settings (see
        :func:`~dtem_lightning.data.seg_labels.label_lut`)."""
        return label_lut(self.num_classes, self.ignore_index, self.label_map)

    def label_mapper(self) -> LabelMapper:
        """Raw label-file values -> labels, with this module's settings."""
        return LabelMapper.of(
            self.label_lut(), self.num_classes, self.ignore_index, self.label_map, self.unmapped
        )

    def _listing(self, img_dir: str, label_dir: str) -> dict[str, tuple[str, str]]:
        """Stem -> (image, label) of two parallel folders, every image with its label file."""
        images = _by_stem(self.store.files(img_dir))
        labels = _by_stem(self.store.files(label_dir, extensions=LABEL_EXTENSIONS))
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
        return [listing[s] for s in thin(stems, self.max_per_split)]

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
            self.check_images([n for pair in pairs for n in pair], split)
        if self.check_labels:  # refuses surprising label values (naming the file) before any epoch
            labels = [label for _, label in pairs]
            check_label_values(
                self.store, self.label_mapper(), split, labels, self.num_classes, self.ignore_index
            )
        return SegmentationDataset(self.store, pairs, self.joint_transform(train), self.label_mapper())

    def announce_fields(self) -> dict[str, object]:
        extra: dict[str, object] = {"ignore_index": self.ignore_index}
        if self.label_map is not None:
            extra["label_map"] = self.label_map
        if self.flat:
            extra["split"] = f"{self.split[0]}/{self.split[1]}(seed={self.seed})"
        return extra

    def setup(self, stage: str | None = None) -> None:
        """Pair the files of the splits ``stage`` needs, check their label values, build their datasets, and
        print one line with root, split sizes and classes."""
        super().setup(stage)
        if not self.flat and "test" in self.folders and self.folders["test"] == self.folders.get("val"):
            self.note(f"data: {type(self).__name__} tests on the val images ({self.folders['val'][0]})")
