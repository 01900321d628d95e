"""ImageNet-style class folders (``root/{train,val[,test]}/<class>/*``) on disk or in a zip archive."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dtem_lightning.data.base import TRAIN_TRANSFORMS, BaseDataModule
from dtem_lightning.data.store import IMG_EXTENSIONS, Store, thin

SPLITS = ("train", "val", "test")


class ImageFileDataset(Dataset):
    """(image, label) pairs read through a :class:`~dtem_lightning.data.store.Store`.

    Args:
        store: where the images live.
        samples: (image name, class index) pairs.
        transform: PIL image -> tensor [C, H, W].
        skip_corrupt: replace an unreadable image by the next readable one (with a warning) instead of raising.
    """

    def __init__(
        self,
        store: Store,
        samples: list[tuple[str, int]],
        transform: Callable[[Image.Image], Tensor],
        skip_corrupt: bool = False,
    ) -> None:
        self.store = store
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
                img = self.store.load(name)
            except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
                where = self.store.display(name)
                if not self.skip_corrupt:
                    raise ValueError(
                        f"cannot read image {where}: {err!r}; fix or delete it, or set skip_corrupt: true"
                    ) from err
                warnings.warn(f"skipping unreadable image {where}: {err!r}", stacklevel=2)
                self._bad.add(j)
                continue
            return self.transform(img), label
        raise ValueError(f"no readable image among the {n} files of this split under {self.store.root}")


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

    To run on a fraction of the data set ``max_per_split`` or ``max_per_class`` (e.g.
    ``--data.init_args.max_per_class=20``: 20 images of every class in every split), not
    ``--trainer.limit_*_batches``: files are listed class by class, so a batch limit on the (unshuffled) val/test
    loaders evaluates only the first classes, and a limit of ``1`` means one batch while ``1.0`` means 100 %.

    Args:
        root: folder or zip archive with ``train/<class>/<image>`` (its class folders are the classes), ``val/``
            and optional ``test/`` (the same class folders); when one of ``val/``, ``test/`` is missing the other
            serves both stages, said in one line at setup.
        train_transform: ``deit`` (RandAugment, random erasing, as in DeiT) or ``simple`` (crop/resize + flip).
        skip_corrupt: replace unreadable images by readable ones with a warning instead of raising.
        max_per_class: keep at most this many images per class and split, evenly spaced in name order
            (deterministic; applied before ``max_per_split``).
        **kwargs: see :class:`~dtem_lightning.data.base.BaseDataModule` (batch and loader settings,
            ``max_per_split``).

    Raises:
        FileNotFoundError: ``root``, ``root/train`` or both of ``root/val`` and ``root/test`` are missing.
        ValueError: no class folders, or eval class folders differing from train's, or bad arguments; in
            ``setup``: a class folder or split without images.
    """

    fallback_note = "data: no {split}/ folder in {root}: {split} uses {used}/"

    def __init__(
        self,
        root: str,
        train_transform: str = "deit",
        skip_corrupt: bool = False,
        max_per_class: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if train_transform not in TRAIN_TRANSFORMS:
            raise ValueError(f"train_transform must be one of {TRAIN_TRANSFORMS}, got {train_transform!r}")
        if max_per_class is not None and max_per_class < 1:
            raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
        self.root = root
        self.train_transform = train_transform
        self.skip_corrupt = skip_corrupt
        self.max_per_class = max_per_class
        self.store = Store(root, anchors=SPLITS)
        if not self.store.isdir("train"):
            hint = ""
            if not self.store.is_zip and (zips := sorted(Path(root).glob("*.zip"))):
                hint = f"; to read the archive in place pass root: {zips[0]}"
            raise FileNotFoundError(
                f"{self.store.where('train')} not found (expected {root}/train/<class>/*){hint}"
            )
        self.classes = self.store.subdirs("train")
        if not self.classes:
            raise ValueError(
                f"no class folders in {self.store.where('train')} (expected train/<class>/<image>)"
            )
        have = [s for s in ("val", "test") if self.store.isdir(s)]
        if not have:
            raise FileNotFoundError(
                f"neither {self.store.where('val')} nor {self.store.where('test')} exists"
            )
        self.val_split = "val" if "val" in have else "test"
        self.test_split = "test" if "test" in have else "val"
        for split in have:
            self._check_classes(split)
        self.num_classes = len(self.classes)

    def _check_classes(self, split: str) -> None:
        other = self.store.subdirs(split)
        if other == self.classes:
            return
        only_train = sorted(set(self.classes) - set(other))
        only_other = sorted(set(other) - set(self.classes))
        raise ValueError(
            f"class folders differ between {self.store.where('train')} and {self.store.where(split)}: "
            f"only in train: {only_train}; only in {split}: {only_other}"
        )

    def source(self, split: str) -> str:
        return {"val": self.val_split, "test": self.test_split}.get(split, split)

    def _dataset(self, split: str, train: bool) -> ImageFileDataset:
        samples, empty = [], []
        for label, cls in enumerate(self.classes):
            files = self.store.files(split, cls, recursive=True)
            if not files:
                empty.append(self.store.where(split, cls))
            samples += [(f, label) for f in thin(files, self.max_per_class)]
        if not samples:
            raise ValueError(
                f"{self.store.where(split)} has no images (extensions {', '.join(IMG_EXTENSIONS)})"
            )
        if empty:
            raise ValueError(f"class folders without images: {', '.join(empty)}")
        samples = thin(samples, self.max_per_split)  # in (class, name) order: class-balanced
        if not train:  # evaluation splits in full before any epoch (a training split is read as it goes)
            bad = set(self.check_images([f for f, _ in samples], split, strict=not self.skip_corrupt))
            samples = [s for s in samples if s[0] not in bad]
        tf = self.transform(self.train_transform if train else "eval")
        return ImageFileDataset(self.store, samples, tf, self.skip_corrupt)
