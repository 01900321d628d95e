"""ImageNet-style class folders (``root/{train,val[,test]}/<class>/*``) on disk or in a zip archive."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dtem_lightning.data.base import TRAIN_TRANSFORMS, BaseDataModule
from dtem_lightning.data.checks import check_images
from dtem_lightning.data.store import DataRoot, thin

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLITS = ("train", "val", "test")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    PIL's own ``convert("RGB")`` clips 16- and 32-bit integer pixels at 255 (a white image), so those are rescaled
    first; palette images with transparency go through RGBA to avoid PIL's warning; alpha is dropped.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max() > 255:
            arr = arr / 257.0  # 16-bit range (PIL opens some 16-bit files as 32-bit "I")
        elif img.mode == "F" and arr.max() <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


class ImageTree(DataRoot):
    """The ``<split>/<class>/**/<image>`` tree under a folder or inside a zip archive.

    Only names are scanned here; images are read by ``load``. A zip may hold the tree at its top level or inside one
    top-level folder. Each process opens its own zip handle (workers must not share a file offset).

    Args:
        root: folder, or ``.zip`` file.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` is a file but not a zip archive.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root)
        self.prefix = ""  # zip only: folder wrapping the tree inside the archive
        self._index: dict[str, dict[str, list[str]]] = {}  # zip only: split -> class -> member names
        if self.is_zip:
            self._index_zip()

    def _index_zip(self) -> None:
        names = self.members()
        tops = {n.split("/", 1)[0] for n in names}
        if not tops & set(SPLITS) and len(tops) == 1:  # tree wrapped in one folder: data.zip/cifar/train/...
            self.prefix = tops.pop() + "/"
        for name in names:
            parts = name[len(self.prefix) :].split("/")
            if len(parts) < 3 or parts[0] not in SPLITS or parts[1].startswith("."):
                continue
            files = self._index.setdefault(parts[0], {}).setdefault(parts[1], [])
            if _is_image(parts[-1]):
                files.append(name)
        for classes in self._index.values():
            for files in classes.values():
                files.sort()

    def path(self, *parts: str) -> str:
        """Readable location of a split, class folder or member, for messages."""
        return os.path.join(self.root, *parts)

    def has_split(self, split: str) -> bool:
        """Whether ``<split>/`` exists."""
        return split in self._index if self.is_zip else os.path.isdir(self.path(split))

    def classes(self, split: str) -> list[str]:
        """Sorted class folder names of a split (hidden folders ignored)."""
        if self.is_zip:
            return sorted(self._index.get(split, {}))
        with os.scandir(self.path(split)) as it:
            return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))

    def files(self, split: str, cls: str) -> list[str]:
        """Sorted image names of one class folder, searched recursively; pass them to ``load``."""
        if self.is_zip:
            return list(self._index.get(split, {}).get(cls, []))
        found = []
        for dirpath, dirnames, filenames in os.walk(self.path(split, cls), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
        return found

    def display(self, name: str) -> str:
        """Location of an image name as a user would look for it."""
        return os.path.join(self.root, name) if self.is_zip else name

    def load(self, name: str) -> Image.Image:
        """Decode one image to RGB; raises whatever PIL or the archive raises for a bad file."""
        return to_rgb(self.open_image(name))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


class ImageFileDataset(Dataset):
    """(image, label) pairs read through an ``ImageTree``.

    Args:
        tree: where the images live.
        samples: (image name, class index) pairs.
        transform: PIL image -> tensor [C, H, W].
        skip_corrupt: replace an unreadable image by the next readable one (with a warning) instead of raising.
    """

    def __init__(
        self,
        tree: ImageTree,
        samples: list[tuple[str, int]],
        transform: Callable[[Image.Image], Tensor],
        skip_corrupt: bool = False,
    ) -> None:
        self.tree = tree
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self._bad: set[int] = set()  # per process; a bad file is reported and tried once

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        n = len(self.samples)
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                continue
            name, label = self.samples[j]
            try:
                img = self.tree.load(name)
            except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
                where = self.tree.display(name)
                if not self.skip_corrupt:
                    raise ValueError(
                        f"cannot read image {where}: {err!r}; fix or delete it, or set skip_corrupt: true"
                    ) from err
                warnings.warn(f"skipping unreadable image {where}: {err!r}", stacklevel=2)
                self._bad.add(j)
                continue
            return self.transform(img), label
        raise ValueError(f"no readable image among the {n} files of this split under {self.tree.root}")


class ImageFolderDataModule(BaseDataModule):
    """Classification on ImageNet-style class folders: ``root/{train,val,test}/<class>/**/<image>``.

    Split folders: ``train/`` (required; its sorted sub-folder names are the classes), ``val/`` (validation during
    fit) and ``test/`` (``dtem test``); at least one of ``val/`` and ``test/`` must exist. When one of them is
    missing the other serves both stages, and ``setup`` prints one line saying so (``no test/ folder: test uses
    val/``). ``val/`` and ``test/`` must hold the same class folders as ``train/``. ``root`` may also be a zip
    archive holding that tree (read in place, e.g. the CIFAR-10 JPEG subset). The folder structure is checked at
    construction (so ``num_classes`` is known before ``setup``, for the CLI link to the task); image files are
    listed in ``setup`` for the splits the stage needs, and ``setup`` prints one line with root, split sizes and
    classes.

    To run on a fraction of the data set ``max_per_class`` (e.g. ``--data.init_args.max_per_class=20``: 20 images
    of every class in every split), not ``--trainer.limit_*_batches``: files are listed class by class, so a
    batch limit on the (unshuffled) val/test loaders evaluates only the first classes, and a limit of ``1`` means
    one batch while ``1.0`` means 100 %.

    Args:
        root: folder or zip archive with ``train/<class>/<image>`` (its class folders are the classes), ``val/``
            and optional ``test/`` (the same class folders); when one of ``val/``, ``test/`` is missing the other
            serves both stages, said in one line at setup.
        train_transform: ``deit`` (RandAugment, random erasing, as in DeiT) or ``simple`` (crop/resize + flip).
        skip_corrupt: replace unreadable images by readable ones with a warning instead of raising.
        max_per_class: keep at most this many images per class and split, evenly spaced in name order
            (deterministic). Use it, not ``--trainer.limit_*_batches``, to run on a fraction of the data: files are
            listed class by class, so a batch limit evaluates only the first classes (and ``1`` is one batch).
        batch_size: see ``BaseDataModule``.
        num_workers: see ``BaseDataModule``.
        backbone: see ``BaseDataModule``.
        img_size: see ``BaseDataModule``.
        crop_pct: see ``BaseDataModule``.
        pin_memory: see ``BaseDataModule``.

    Raises:
        FileNotFoundError: ``root``, ``root/train`` or both of ``root/val`` and ``root/test`` are missing.
        ValueError: no class folders, or eval class folders differing from train's, or bad arguments; in
            ``setup``: a class folder or split without images.
    """

    def __init__(
        self,
        root: str,
        train_transform: str = "deit",
        skip_corrupt: bool = False,
        max_per_class: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        backbone: str = "vit_tiny_patch16_224",
        img_size: int | None = None,
        crop_pct: float | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, backbone, img_size, crop_pct, pin_memory)
        self.save_hyperparameters()
        if train_transform not in TRAIN_TRANSFORMS:
            raise ValueError(f"train_transform must be one of {TRAIN_TRANSFORMS}, got {train_transform!r}")
        if max_per_class is not None and max_per_class < 1:
            raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
        self.root = root
        self.train_transform = train_transform
        self.skip_corrupt = skip_corrupt
        self.max_per_class = max_per_class
        self.tree = ImageTree(root)
        if not self.tree.has_split("train"):
            hint = ""
            if not self.tree.is_zip and (zips := sorted(Path(root).glob("*.zip"))):
                hint = f"; to read the archive in place pass root: {zips[0]}"
            raise FileNotFoundError(
                f"{self.tree.path('train')} not found (expected {root}/train/<class>/*){hint}"
            )
        self.classes = self.tree.classes("train")
        if not self.classes:
            raise ValueError(
                f"no class folders in {self.tree.path('train')} (expected train/<class>/<image>)"
            )
        have = [s for s in ("val", "test") if self.tree.has_split(s)]
        if not have:
            raise FileNotFoundError(f"neither {self.tree.path('val')} nor {self.tree.path('test')} exists")
        self.val_split = "val" if "val" in have else "test"
        self.test_split = "test" if "test" in have else "val"
        for split in have:
            self._check_classes(split)
        self.num_classes = len(self.classes)
        self._datasets: dict[tuple[str, bool], ImageFileDataset] = {}

    def _check_classes(self, split: str) -> None:
        other = self.tree.classes(split)
        if other == self.classes:
            return
        only_train = sorted(set(self.classes) - set(other))
        only_other = sorted(set(other) - set(self.classes))
        raise ValueError(
            f"class folders differ between {self.tree.path('train')} and {self.tree.path(split)}: "
            f"only in train: {only_train}; only in {split}: {only_other}"
        )

    def _dataset(self, split: str, train: bool) -> ImageFileDataset:
        key = (split, train)
        if key in self._datasets:
            return self._datasets[key]
        samples, empty = [], []
        for label, cls in enumerate(self.classes):
            files = self.tree.files(split, cls)
            if not files:
                empty.append(self.tree.path(split, cls))
            samples += [(f, label) for f in thin(files, self.max_per_class)]
        if not samples:
            raise ValueError(
                f"{self.tree.path(split)} has no images (extensions {', '.join(IMG_EXTENSIONS)})"
            )
        if empty:
            raise ValueError(f"class folders without images: {', '.join(empty)}")
        if not train:  # evaluation splits in full before any epoch (a training split is read as it goes)
            bad = set(
                check_images(
                    self.tree, [f for f, _ in samples], split, self.tree.display, not self.skip_corrupt
                )
            )
            samples = [s for s in samples if s[0] not in bad]
        tf = self.transform(self.train_transform if train else "eval")
        self._datasets[key] = ImageFileDataset(self.tree, samples, tf, self.skip_corrupt)
        return self._datasets[key]

    def setup(self, stage: str | None = None) -> None:
        """List the images of the splits ``stage`` needs (all splits when None) and build their datasets."""
        sizes: dict[str, int] = {}
        if stage in (None, "fit"):
            self.train_dataset = self._dataset("train", train=True)
            sizes["train"] = len(self.train_dataset)
        if stage in (None, "fit", "validate"):
            self.val_dataset = self._dataset(self.val_split, train=False)
            sizes["val"] = len(self.val_dataset)
        if stage in (None, "test", "predict"):
            self.test_dataset = self._dataset(self.test_split, train=False)
            sizes["test"] = len(self.test_dataset)
        self.announce(sizes, self.num_classes)
        # said at every stage: a fit validating on test/ matters as much as a test on val/
        for split, used in (("val", self.val_split), ("test", self.test_split)):
            if used != split:
                self.note(f"data: no {split}/ folder in {self.root}: {split} uses {used}/")
