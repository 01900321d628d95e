"""BaseDataModule: batch and loader settings, transforms resolved from the backbone's timm config, and the
``setup`` every data module shares (datasets through ``_dataset(split, train)``, fallback splits, one line)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import lightning as L
import timm
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageOps
from timm.data import create_transform, resolve_data_config
from timm.data.auto_augment import RandAugment
from timm.data.transforms import str_to_interp_mode
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from dtem_lightning.data.checks import check_images
from dtem_lightning.data.sampling import (
    ResumableDataLoader,
    ResumableSampler,
    SeededDataset,
    samples_done_this_epoch,
)
from dtem_lightning.data.store import Store, thin
from dtem_lightning.encoder import data_backbone

TINY_SIZE = 64  # at or below this side length images are resized, never randomly cropped from a large canvas
TRAIN_TRANSFORMS = ("deit", "simple")
SPLITS = ("train", "val", "test")
STAGE_SPLITS = {None: SPLITS, "fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                "predict": ("test",)}  # fmt: skip


def resolve_backbone_config(backbone: str) -> dict[str, Any]:
    """Data config (input_size, mean, std, crop_pct, interpolation, crop_mode) of a timm model name, or of the
    timm model with the same image statistics for another backend's name (:func:`dtem_lightning.encoder.data_backbone`).

    Reads the registered pretrained config, which needs no weights and no model; only a model registered without
    one is built, on the meta device (no memory, no init cost).

    Args:
        backbone: timm model name, optionally with a pretrained tag (``vit_base_patch16_224.mae``).

    Raises:
        ValueError: the name is not a timm model, or its pretrained tag is unknown.
    """
    backbone = data_backbone(backbone)
    if not timm.is_model(backbone.split(".")[0]):
        raise ValueError(f"backbone {backbone!r} is not a timm model name (see timm.list_models())")
    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except RuntimeError as err:  # unknown pretrained tag
        raise ValueError(f"backbone {backbone!r}: {err}") from err
    if cfg is not None:
        return resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False)
    return resolve_data_config({}, model=model)


def stored_settings(data_cls: type, stored: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's stored data-module settings (``datamodule_hyper_parameters``) as ``data_cls`` takes them.

    Checkpoints from before ``max_per_split`` store it as ``max_per_class`` (per split outside class folders):
    translated for a class that has no ``max_per_class`` of its own.

    Raises:
        ValueError: both names are stored.
    """
    hp = {k: v for k, v in stored.items() if k not in ("_class_path", "_instantiator")}
    if "max_per_class" in hp and "max_per_class" not in inspect.signature(data_cls.__init__).parameters:
        if "max_per_split" in hp:
            raise ValueError("the stored data settings hold both max_per_class and max_per_split; drop one")
        hp["max_per_split"] = hp.pop("max_per_class")
    return hp


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, also for 0 bits: a black image, as older Pillow and the TF reference gave.

    RandAugment ``rand-m9-mstd0.5-inc1`` draws 0 bits whenever the sampled magnitude reaches 10 (about 2 % of its
    posterize calls), and current Pillow rejects 0, which would crash a training run at a random step.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


class BaseDataModule(L.LightningDataModule):
    """Loader settings, timm-style transforms and the ``setup`` shared by every data module.

    Subclasses take these arguments through ``**kwargs``, set ``num_classes`` (where it applies) in
    ``__init__`` and implement :meth:`_dataset`; ``setup`` builds the datasets the stage needs through it
    (``train_dataset``, ``val_dataset``, ``test_dataset``, which the dataloaders read), lets one evaluation
    split serve the other where :meth:`source` says so (one line, ``fallback_note``), and prints one line with
    root, split sizes and classes.

    Args:
        batch_size: samples per batch (per device), for every split.
        num_workers: loader worker processes; workers persist between epochs when > 0.
        backbone: timm model name; only its data config is used (mean, std, crop_pct, interpolation, size).
        img_size: square input side overriding the backbone's (small images, e.g. 32 for CIFAR).
        crop_pct: eval center-crop fraction (resize to ``img_size / crop_pct``, then crop); default: the
            backbone's pretrained config, or 1.0 (no crop) when ``img_size`` <= 64.
        pin_memory: pin host memory for faster copies; default: only when CUDA is available.
        max_per_split: keep at most this many samples per split, evenly spaced in the split's sorted order (the
            same subset every run; image folders are sorted by class, then name, so it stays class-balanced).
            Use it, not ``--trainer.limit_*_batches``, to run on a fraction of the data: a batch limit on the
            unshuffled evaluation loaders evaluates only the first classes, and ``1`` is one batch.
        test_on: the split ``dtem test`` evaluates: ``test``, or ``val`` to choose settings (a policy's
            threshold, r) on validation data without reading the test split.
        train_fraction: train on this fraction of the training split (at least one sample, evenly spaced in its
            order, the same subset every run; applied after ``max_per_split``); val and test stay whole, so runs
            on 1 % and 100 % of the data are evaluated on the same images.
    """

    num_classes: int
    collate_fn: Callable | None = None  # batch assembly of the loaders (None: PyTorch's default collate)
    store: Store  # where the files are (data modules that read files)
    # the line when ``source`` lets one evaluation split serve another; None: no line
    fallback_note: ClassVar[str | None] = "data: no {split} split in {root}: {split} uses the {used} images"
    _announced: ClassVar[set[str]] = set()  # data lines this process printed (setup runs once per stage)

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        backbone: str = "vit_tiny_patch16_224",
        img_size: int | None = None,
        crop_pct: float | None = None,
        pin_memory: bool | None = None,
        max_per_split: int | None = None,
        test_on: str = "test",
        train_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 < train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        self.train_fraction = train_fraction
        if test_on not in ("test", "val"):
            raise ValueError(f"test_on must be 'test' or 'val', got {test_on!r}")
        self.test_on = test_on
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if img_size is not None and img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if max_per_split is not None and max_per_split < 1:
            raise ValueError(f"max_per_split must be >= 1 or None, got {max_per_split}")
        self.max_per_split = max_per_split
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.backbone = backbone
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        cfg = resolve_backbone_config(backbone)
        if img_size is not None:
            cfg["input_size"] = (3, img_size, img_size)
        side = min(cfg["input_size"][1:])
        if crop_pct is not None:
            cfg["crop_pct"] = crop_pct
        elif img_size is not None and side <= TINY_SIZE:
            cfg["crop_pct"] = 1.0  # tiny images are evaluated whole (DeiT's CIFAR transforms do not crop)
        self.data_config = cfg
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self._datasets: dict[tuple[str, bool], Dataset] = {}  # (source split, train) -> dataset, built once

    def _dataset(self, split: str, train: bool) -> Dataset:
        """The dataset of ``split`` (a split :meth:`source` returns), with training or evaluation transforms.

        Evaluation splits should be checked in full here (:meth:`check_images`), a training split is read as it
        goes."""
        raise NotImplementedError(f"{type(self).__name__} must implement _dataset(split, train) or setup()")

    def _fraction(self, dataset: Dataset) -> Dataset:
        """``train_fraction`` of the training ``dataset`` (evenly spaced, at least one sample), said in one line."""
        n = len(dataset)
        keep = thin(range(n), max(1, round(self.train_fraction * n)))
        self.note(f"data: train_fraction={self.train_fraction}: training on {len(keep)} of {n} samples")
        return Subset(dataset, keep)

    def source(self, split: str) -> str:
        """The split whose data serves ``split``: itself, or the other evaluation split where it is missing."""
        return split

    def split_sizes(self, built: Mapping[str, Dataset]) -> dict[str, int | str]:
        """The ``split=N`` fields of the setup line (default: the splits this ``setup`` built)."""
        return {split: len(ds) for split, ds in built.items()}

    def announce_fields(self) -> dict[str, object]:
        """More ``key=value`` fields of the setup line, after the classes."""
        return {}

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of the splits ``stage`` needs (all splits when None), each source split once, and
        print one line with root, split sizes and classes (and one per evaluation split served by another)."""
        if stage not in STAGE_SPLITS:
            raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGE_SPLITS)}")
        built = {}
        for split in STAGE_SPLITS[stage]:
            key = (self.source(self.test_on if split == "test" else split), split == "train")
            if key not in self._datasets:
                self._datasets[key] = self._dataset(*key)
                if split == "train" and self.train_fraction < 1:
                    self._datasets[key] = self._fraction(self._datasets[key])
            built[split] = self._datasets[key]
            setattr(self, f"{split}_dataset", built[split])
        self.announce(self.split_sizes(built), getattr(self, "num_classes", None), **self.announce_fields())
        # said at every stage: a fit validating on test images matters as much as a test on val images
        if self.test_on == "val" and "test" in built:
            self.note(
                f"data: test_on=val: the sweep evaluates the {len(built['test'])} validation samples (test unread)"
            )
        for split in ("val", "test"):
            if (used := self.source(split)) != split and self.fallback_note is not None:
                self.note(self.fallback_note.format(split=split, used=used, root=getattr(self, "root", None)))

    def check_images(self, names: Sequence[str], split: str, strict: bool = True) -> list[str]:
        """Refuse (``strict``) or list the missing or unreadable images of an evaluation split, before any epoch
        (see :func:`~dtem_lightning.data.checks.check_images`)."""
        return check_images(self.store, names, split, self.store.display, strict)

    def announce(
        self,
        sizes: Mapping[str, int | str],
        classes: int | None = None,
        root: str | None = None,
        **extra: object,
    ) -> str:
        """Print ``data: <Class> root=... train=N val=N test=N classes=K`` once per process, on rank zero.

        A plain ``print`` (Lightning's ``rank_zero_info`` goes through logging, which the CLI does not show); the
        same line is printed once per process however often ``setup`` runs.

        Args:
            sizes: samples per split built by this ``setup`` (a string for a note such as ``"= val"``).
            classes: number of classes, where it applies.
            root: data location; default: the module's ``root`` attribute.
            **extra: more ``key=value`` fields, in order (e.g. ``vocab=812``).

        Returns:
            The line (printed or not).
        """
        root = root if root is not None else getattr(self, "root", None)
        fields = [f"data: {type(self).__name__}"]
        fields += [f"root={root}"] if root is not None else []
        fields += [f"{k}={v}" for k, v in sizes.items()]
        fields += [f"classes={classes}"] if classes is not None else []
        fields += [f"{k}={v}" for k, v in extra.items()]
        line = " ".join(fields)
        self.note(line)
        return line

    @staticmethod
    def note(line: str) -> None:
        """Print one line about the data once per process, on rank zero only (e.g. a split that stands in for
        another)."""
        if rank_zero_only.rank == 0 and line not in BaseDataModule._announced:
            BaseDataModule._announced.add(line)
            print(line, flush=True)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) of the tensors in a batch."""
        return tuple(self.data_config["input_size"])

    @property
    def tiny(self) -> bool:
        """Whether images are small enough to be resized rather than crop-augmented."""
        return min(self.input_size[1:]) <= TINY_SIZE

    def transform(self, kind: str) -> Callable:
        """PIL image -> normalised float tensor [C, H, W] for ``kind`` in ``deit``, ``simple``, ``eval``.

        ``deit``: RandAugment rand-m9-mstd0.5-inc1, bicubic random-resized crop, flip, random erasing 0.25
        (pixel); colour jitter 0.4 is passed but, as in timm and DeiT, unused when RandAugment is on. Tiny
        images get resize (shorter side) + random crop with 4-pixel padding instead of the random-resized crop
        (DeiT's CIFAR rule). ``simple``: random-resized crop + flip, or resize + center crop + flip for tiny
        images. ``eval``: timm's eval transform (resize to size / crop_pct, center crop).
        """
        cfg = self.data_config
        size = self.input_size[1:]
        interp = str_to_interp_mode(cfg["interpolation"])
        norm = [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
        if kind == "eval":
            return create_transform(
                size,
                is_training=False,
                interpolation=cfg["interpolation"],
                mean=cfg["mean"],
                std=cfg["std"],
                crop_pct=cfg["crop_pct"],
                crop_mode=cfg.get("crop_mode"),
            )
        resize = T.Resize(min(size), interpolation=interp)  # shorter side, as the eval transform does
        if kind == "simple":
            first = (
                T.Compose([resize, T.CenterCrop(size)])
                if self.tiny
                else T.RandomResizedCrop(size, interpolation=interp)
            )
            return T.Compose([first, T.RandomHorizontalFlip(), *norm])
        if kind == "deit":
            tf = create_transform(
                size,
                is_training=True,
                auto_augment="rand-m9-mstd0.5-inc1",
                color_jitter=0.4,
                re_prob=0.25,
                re_mode="pixel",
                re_count=1,
                interpolation="bicubic",
                mean=cfg["mean"],
                std=cfg["std"],
            )
            for t in tf.transforms:
                if isinstance(t, RandAugment):
                    for op in t.ops:
                        if op.name.startswith("Posterize"):
                            op.aug_fn = _posterize
            if self.tiny:
                tf.transforms[0] = T.Compose([resize, T.RandomCrop(size, padding=4)])
            return tf
        raise ValueError(f"unknown transform {kind!r}; expected one of {(*TRAIN_TRANSFORMS, 'eval')}")

    def _loader(self, dataset: Dataset | None, split: str, train: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__} has no {split} dataset; call setup() for that stage first"
            )
        sampler, loader_cls = None, DataLoader
        if train:
            # Resumable, per-sample-seeded order: an interrupted fit resumes mid-epoch on the same batches.
            # ResumableDataLoader: workers take their first indices only once Lightning has set the epoch and
            # restored the batch progress, so the skip is right with num_workers > 0 too.
            sampler = ResumableSampler(dataset, skip_fn=self._samples_done_this_epoch)
            loader_cls = ResumableDataLoader
            dataset = SeededDataset(dataset)
        return loader_cls(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # equal batches (timm's Mixup needs an even one); a dataset of one batch or less is kept whole
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def _samples_done_this_epoch(self) -> int:
        """Training samples this process already consumed in the current epoch (non-zero after a resume)."""
        return samples_done_this_epoch(getattr(self, "trainer", None), self.batch_size)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches; the last partial batch is dropped when the dataset exceeds one batch."""
        return self._loader(self.train_dataset, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Batches in dataset order, none dropped."""
        return self._loader(self.val_dataset, "val")

    def test_dataloader(self) -> DataLoader:
        """Batches in dataset order, none dropped."""
        return self._loader(self.test_dataset, "test")

    def predict_dataloader(self) -> DataLoader:
        """The test batches (``setup("predict")`` builds the test dataset)."""
        return self._loader(self.test_dataset, "test")
