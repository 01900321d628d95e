"""Caption data: COCO / Karpathy-split JSON and Flickr8k ``captions.txt``; vocabulary from the train captions."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import posixpath
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dtem_lightning.data.base import SPLITS, TRAIN_TRANSFORMS, BaseDataModule
from dtem_lightning.data.store import Store, thin
from dtem_lightning.text import Vocabulary

Sample = tuple[str, list[str]]  # (image name for Store.load, reference captions)


def collate_captions(batch: list[tuple[Tensor, list[str]]]) -> tuple[Tensor, list[list[str]]]:
    """Stack images [B, 3, H, W]; keep the captions as one list of strings per image."""
    return torch.stack([img for img, _ in batch]), [list(caps) for _, caps in batch]


class CaptionDataset(Dataset):
    """(image tensor, reference captions) pairs read through a :class:`~dtem_lightning.data.store.Store`.

    Args:
        store: where the images live (folder or zip archive).
        samples: (image name, captions) pairs.
        transform: PIL image -> tensor [C, H, W].
    """

    def __init__(
        self, store: Store, samples: list[Sample], transform: Callable[[Image.Image], Tensor]
    ) -> None:
        self.store, self.samples, self.transform = store, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, list[str]]:
        name, captions = self.samples[index]
        try:
            img = self.store.load(name)
        except Exception as err:  # PIL and zipfile raise many types
            raise ValueError(f"cannot read image {self.store.display(name)}: {err!r}") from err
        return self.transform(img), captions


def split_by_name(samples: list[Sample], fractions: tuple[float, float]) -> dict[str, list[Sample]]:
    """Deterministic train/val/test split by sorted image name: the first ``fractions[0]`` train, the next val."""
    samples = sorted(samples)
    n_train = int(len(samples) * fractions[0])
    n_val = int(len(samples) * fractions[1])
    return {
        "train": samples[:n_train],
        "val": samples[n_train : n_train + n_val],
        "test": samples[n_train + n_val :],
    }


def image_key(name: str) -> str:
    """The file name of an image (its last path part), by which splits are compared."""
    return posixpath.basename(name.replace(os.sep, "/"))


def check_disjoint(splits: dict[str, list[Sample]], owner: str) -> None:
    """Refuse an image (compared by file name) that is in two splits; a split that *is* another (test = val)
    is not compared with it.

    Raises:
        ValueError: one line naming the split pair, how many images they share and one of them.
    """
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if a not in splits or b not in splits or splits[a] is splits[b]:
            continue
        shared = sorted({image_key(n) for n, _ in splits[a]} & {image_key(n) for n, _ in splits[b]})
        if shared:
            raise ValueError(
                f"{owner}: the {a} and {b} splits share {len(shared)} image(s) by file name (e.g. {shared[0]}); "
                f"an image must be in one split only: check the annotation files of the two splits"
            )


class CaptionDataModule(BaseDataModule):
    """Base of the caption data modules: splits, vocabulary, transforms, batches ``(images, captions)``.

    Subclasses implement :meth:`read_splits`. Annotations are read at construction, so the vocabulary (built
    from the train captions) and ``vocab_size`` exist before ``setup``, for the CLI link to the task.
    Batches are ``(images [B, 3, H, W], captions)`` with every reference caption of each image.
    An image (compared by file name) in two splits is refused at construction, and the first image of every
    split must exist; ``setup`` prints one line with root, split sizes and vocabulary size.

    Args:
        root: data location (folder or zip archive; see the subclass).
        min_freq: words seen fewer times in the train captions map to ``<unk>``.
        split: (train, val) fractions of the deterministic split by sorted image name, used when the data
            has no split of its own (the rest is test).
        train_transform: ``simple`` (crop/resize + flip), ``deit`` or ``eval`` (no augmentation).
        **kwargs: see :class:`~dtem_lightning.data.base.BaseDataModule` (batch and loader settings,
            ``max_per_split``: at most this many images per split, evenly spaced in name order).
    """

    collate_fn = staticmethod(collate_captions)
    fallback_note = None  # a test split that is the val split shows as test=N(=val) in the setup line

    def __init__(
        self,
        root: str,
        min_freq: int = 5,
        split: tuple[float, float] = (0.8, 0.1),
        train_transform: str = "simple",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()  # stored in checkpoints: examples and tests rebuild the same splits
        if train_transform not in (*TRAIN_TRANSFORMS, "eval"):
            raise ValueError(
                f"train_transform must be one of {(*TRAIN_TRANSFORMS, 'eval')}, got {train_transform!r}"
            )
        if not (0 < split[0] and 0 <= split[1] and split[0] + split[1] < 1):
            raise ValueError(f"split fractions must be positive and sum below 1, got {split}")
        self.root, self.min_freq, self.split = root, min_freq, tuple(split)
        self.train_transform = train_transform
        self.store = Store(root)
        splits = self.read_splits()
        for name in SPLITS:
            if name not in splits and name != "test":
                raise ValueError(f"{type(self).__name__} found no {name} split in {root}")
        splits.setdefault("test", splits["val"])
        self.test_is_val = splits["test"] is splits["val"]  # one evaluation set serving both stages
        check_disjoint(splits, type(self).__name__)
        self.samples = {k: thin(v, self.max_per_split) for k, v in splits.items()}
        for name, samples in self.samples.items():
            if not samples:
                raise ValueError(f"the {name} split of {root} is empty")
            first = samples[0][0]
            if not self.store.exists(first):  # a wrong image folder fails here, not at the first batch
                raise FileNotFoundError(
                    f"image {self.store.display(first)} of the {name} split not found{self.image_hint(name)}"
                )
        self.vocab = Vocabulary.build((c for _, caps in splits["train"] for c in caps), min_freq)
        self.vocab_size = len(self.vocab)

    def read_splits(self) -> dict[str, list[Sample]]:
        """(image name, captions) per split name (``train``, ``val`` and optionally ``test``)."""
        raise NotImplementedError

    def image_hint(self, split: str) -> str:
        """Advice appended to the error for a missing image of ``split`` (which setting names its folder)."""
        return ""

    def read_text(self, name: str) -> str:
        """A text file under ``root`` (a member name for zip roots); ``.gz`` files are decompressed."""
        data = self.store.read_bytes(self.store.name(name))
        if name.endswith(".gz"):
            data = gzip.decompress(data)
        return data.decode("utf-8")

    def image_name(self, *parts: str) -> str:
        """Name of an image for ``Store.load`` from path parts relative to ``root``."""
        return self.store.name(*parts)

    def source(self, split: str) -> str:
        return "val" if split == "test" and self.test_is_val else split

    def _dataset(self, split: str, train: bool) -> CaptionDataset:
        samples = self.samples[split]
        if not train:  # before any epoch, and before the test sweep
            self.check_images([name for name, _ in samples], split)
        return CaptionDataset(self.store, samples, self.transform(self.train_transform if train else "eval"))

    def split_sizes(self, built: Mapping[str, Dataset]) -> dict[str, int | str]:
        """Every split, whichever this ``setup`` built (they are listed at construction)."""
        sizes: dict[str, int | str] = {k: len(self.samples[k]) for k in SPLITS}
        if self.test_is_val:
            sizes["test"] = f"{sizes['test']}(=val)"
        return sizes

    def announce_fields(self) -> dict[str, object]:
        return {"vocab": self.vocab_size}


class Flickr8kDataModule(CaptionDataModule):
    """Flickr8k in the Kaggle layout: ``captions.txt`` (CSV ``image,caption``) beside an ``images``/``Images`` folder.

    ``root`` is that folder or a zip archive holding it (at any depth, e.g. ``data/captions.txt`` and
    ``data/images/``). The data has no split: it is split deterministically by sorted file name (``split``;
    800/100/100 for 1,000 images). See :class:`CaptionDataModule` for the arguments.
    """

    def read_splits(self) -> dict[str, list[Sample]]:
        members = [self.store.rel(n) for n in self.store.files(extensions=None, recursive=True)]
        found = sorted((m for m in members if posixpath.basename(m) == "captions.txt"), key=len)
        if not found:
            raise FileNotFoundError(f"no captions.txt in {self.root}")
        base = posixpath.dirname(found[0])
        folders = {posixpath.normpath(posixpath.dirname(m)) for m in members}
        image_dir = next((d for d in ("images", "Images") if posixpath.join(base, d) in folders), None)
        if image_dir is None:
            raise FileNotFoundError(f"no images/ or Images/ folder beside {found[0]} in {self.root}")
        caps: dict[str, list[str]] = defaultdict(list)
        for row in csv.DictReader(io.StringIO(self.read_text(found[0]))):
            caps[row["image"]].append(row["caption"].strip())
        samples = [(self.image_name(base, image_dir, k), v) for k, v in caps.items()]
        return split_by_name(samples, self.split)


class CocoCaptionDataModule(CaptionDataModule):
    """COCO-format caption JSON (``images`` + ``annotations``) or the Karpathy split JSON, over image folders.

    Three ways to give the data (paths relative to ``root``; files may be gzipped, ``.json.gz``):

    - **One COCO-format JSON holding every image** (``{"images": [{"id", "file_name"}], "annotations":
      [{"image_id", "caption"}]}``): set ``val_ann_file: null``. Its images are then split deterministically by
      sorted file name: the first ``split[0]`` (default 80 %) train, the next ``split[1]`` (10 %) val, the rest
      test; images at ``root/<image_dir>/<file_name>``. E.g. ``root/captions.json`` + ``root/images/``:
      ``--data=CocoCaptionDataModule --data.root=ROOT --data.ann_file=captions.json --data.val_ann_file=null
      --data.image_dir=images``.
    - **Two COCO JSONs** (the default, ``annotations/captions_{train,val}2017.json``): ``ann_file`` is train,
      ``val_ann_file`` serves both val and test (the COCO test captions are not public); images at
      ``root/<image_dir>/<file_name>`` and ``root/<val_image_dir>/<file_name>``.
    - **Karpathy split JSON** (``dataset_coco.json``: ``images[*].filepath/filename/split/sentences``) as
      ``ann_file``: its train + restval, val and test splits; images at ``root/<filepath>/<filename>``;
      ``val_ann_file`` and the image folders are not used.

    Whatever the source, an image whose file name is in two splits (e.g. an ``ann_file`` that also lists the
    val images) is refused, so a default file that happens to exist never puts evaluation images into training.

    Args:
        ann_file: Karpathy JSON, or COCO JSON of the train images (of every image when ``val_ann_file`` is null).
        val_ann_file: COCO JSON of the val/test images; null: split the images of ``ann_file`` by sorted file
            name (``split``) into train, val and test.
        image_dir: image folder of ``ann_file`` (COCO JSON), e.g. ``train2017``.
        val_image_dir: image folder of ``val_ann_file``, e.g. ``val2017``.
        **kwargs: see :class:`CaptionDataModule` (``root`` included).

    Raises:
        FileNotFoundError: a JSON file, or the first image of a split, is not found.
        ValueError: an image is in two splits, or a split is empty.
    """

    def __init__(
        self,
        root: str,
        ann_file: str = "annotations/captions_train2017.json",
        val_ann_file: str | None = "annotations/captions_val2017.json",
        image_dir: str = "train2017",
        val_image_dir: str = "val2017",
        **kwargs: Any,
    ) -> None:
        self.ann_file, self.val_ann_file = ann_file, val_ann_file
        self.image_dir, self.val_image_dir = image_dir, val_image_dir
        super().__init__(root, **kwargs)

    def _load(self, name: str, hint: str = "") -> dict[str, Any]:
        try:
            return json.loads(self.read_text(name))
        except (FileNotFoundError, KeyError) as err:
            raise FileNotFoundError(f"caption file {name} not found under {self.root}{hint}") from err

    def image_hint(self, split: str) -> str:
        if self._karpathy:
            return " (Karpathy JSON: images are at root/<filepath>/<filename>)"
        if split == "train" or self.val_ann_file is None:
            return f" (image_dir={self.image_dir!r} is the folder of ann_file's images, relative to root)"
        return f" (val_image_dir={self.val_image_dir!r} is the folder of val_ann_file's images, relative to root)"

    def read_splits(self) -> dict[str, list[Sample]]:
        data = self._load(self.ann_file)
        self._karpathy = bool(data.get("images")) and "sentences" in data["images"][0]
        if self._karpathy:  # Karpathy split JSON
            out: dict[str, list[Sample]] = {s: [] for s in SPLITS}
            for im in data["images"]:
                split = "train" if im["split"] == "restval" else im["split"]
                caps = [s.get("raw") or " ".join(s["tokens"]) for s in im["sentences"]]
                out[split].append((self.image_name(im.get("filepath", ""), im["filename"]), caps))
            return {k: sorted(v) for k, v in out.items() if v}
        train = self._coco(data, self.image_dir)
        if self.val_ann_file is None:
            return split_by_name(train, self.split)
        hint = " (for one JSON holding every image set val_ann_file: null: it is then split by file name)"
        val = self._coco(self._load(self.val_ann_file, hint), self.val_image_dir)
        return {"train": train, "val": val, "test": val}

    def _coco(self, data: dict[str, Any], image_dir: str) -> list[Sample]:
        caps: dict[int, list[str]] = defaultdict(list)
        for a in data["annotations"]:
            caps[a["image_id"]].append(a["caption"].strip())
        files = {im["id"]: im["file_name"] for im in data["images"]}
        return sorted((self.image_name(image_dir, files[i]), c) for i, c in caps.items() if i in files)
