"""Store: a data folder or a zip archive of one, listed once and read safely from loader workers; ``thin``, the
rule of ``max_per_split`` and ``max_per_class``."""

from __future__ import annotations

import io
import os
import posixpath
import zipfile
from collections.abc import Collection, Sequence
from typing import TypeVar

import numpy as np
from PIL import Image

T = TypeVar("T")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def thin(items: Sequence[T], k: int | None) -> list[T]:
    """At most ``k`` of ``items``, evenly spaced in their order (all of them when ``k`` is None or large enough):
    what ``max_per_split`` keeps of a split and ``max_per_class`` of a class folder, the same subset every run."""
    if k is None or len(items) <= k:
        return list(items)
    return [items[i * len(items) // k] for i in range(k)]


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


def _visible(name: str) -> bool:
    return not name.startswith(".")


class Store:
    """Files under a folder, or members of a ``.zip`` holding that folder (read in place).

    A *name* is what :meth:`read_bytes` and :meth:`open_image` read: a path for a folder, a member name for a zip;
    :meth:`name` builds one from parts relative to the data tree. A zip may wrap the tree in one top-level folder
    (``data.zip/cifar/train/...``): when ``anchors`` are given and none of them is at the archive's top level but
    one folder is, that folder is the tree. Each process opens its own zip handle (loader workers must not share
    a file offset), so a store pickles without it.

    Args:
        root: folder, or ``.zip`` file.
        anchors: top-level names of the tree (e.g. its split folders), to find a wrapping folder in a zip.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` is a file but not a zip archive.
    """

    def __init__(self, root: str | os.PathLike, anchors: Collection[str] = ()) -> None:
        self.root = os.fspath(root)
        if not os.path.exists(self.root):
            raise FileNotFoundError(f"data root {self.root} does not exist")
        self.is_zip = os.path.isfile(self.root)
        if self.is_zip and not zipfile.is_zipfile(self.root):
            raise ValueError(
                f"data root {self.root} is a file but not a zip archive; pass a folder or a .zip"
            )
        self.prefix = ""  # zip only: the folder wrapping the tree inside the archive
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        self._members: list[str] | None = None
        self._member_set: set[str] | None = None
        self._dirs: dict[str, tuple[list[str], set[str]]] | None = None  # zip: folder -> (files, sub-folders)
        if self.is_zip and anchors:
            tops = {n.split("/", 1)[0] for n in self.members()}
            if not tops & set(anchors) and len(tops) == 1:
                self.prefix = tops.pop() + "/"

    def members(self) -> list[str]:
        """Zip member names (files only, macOS metadata skipped), listed once."""
        if self._members is None:
            with zipfile.ZipFile(self.root) as zf:
                self._members = [
                    n for n in zf.namelist() if not n.startswith("__MACOSX/") and not n.endswith("/")
                ]
        return self._members

    def name(self, *parts: str) -> str:
        """The name of a file from path parts relative to the tree (``"train", "cat", "1.png"``)."""
        rel = posixpath.join(*[p for p in parts if p]) if any(parts) else ""
        return self.prefix + rel if self.is_zip else os.path.join(self.root, rel)

    def rel(self, name: str) -> str:
        """The path of a name relative to the tree, with ``/`` separators (the inverse of :meth:`name`)."""
        if self.is_zip:
            return name[len(self.prefix) :]
        return os.path.relpath(name, self.root).replace(os.sep, "/")

    def where(self, *parts: str) -> str:
        """Readable location of a folder or file relative to the tree, for messages."""
        return os.path.join(self.root, self.prefix + posixpath.join(*parts)) if parts else self.root

    def display(self, name: str) -> str:
        """Location of a name as a user would look for it."""
        return os.path.join(self.root, name) if self.is_zip else name

    def _zip_dirs(self) -> dict[str, tuple[list[str], set[str]]]:
        """Zip: each folder of the tree (``""`` the top) -> (its files' member names, sorted; its sub-folders)."""
        if self._dirs is None:
            dirs: dict[str, tuple[list[str], set[str]]] = {"": ([], set())}
            for member in self.members():
                if not member.startswith(self.prefix):
                    continue
                parts = member[len(self.prefix) :].split("/")
                for depth in range(len(parts) - 1):
                    dirs.setdefault("/".join(parts[: depth + 1]), ([], set()))
                    dirs["/".join(parts[:depth])][1].add(parts[depth])
                dirs["/".join(parts[:-1])][0].append(member)
            for files, _ in dirs.values():
                files.sort()
            self._dirs = dirs
        return self._dirs

    def isdir(self, *parts: str) -> bool:
        """Whether a folder exists (in a zip: whether a file lies under it)."""
        if self.is_zip:
            return posixpath.join("", *parts).strip("/") in self._zip_dirs()
        return os.path.isdir(self.name(*parts))

    def subdirs(self, *parts: str) -> list[str]:
        """Sorted names of the visible sub-folders of a folder (none when it does not exist)."""
        if self.is_zip:
            entry = self._zip_dirs().get(posixpath.join("", *parts).strip("/"))
            return sorted(d for d in entry[1] if _visible(d)) if entry else []
        if not os.path.isdir(path := self.name(*parts)):
            return []
        with os.scandir(path) as it:
            return sorted(e.name for e in it if e.is_dir() and _visible(e.name))

    def files(
        self, *parts: str, extensions: tuple[str, ...] | None = IMG_EXTENSIONS, recursive: bool = False
    ) -> list[str]:
        """Names of the visible files of a folder with one of ``extensions`` (any when None), sorted; with
        ``recursive`` also those of its visible sub-folders (a folder: each folder's files before its
        sub-folders'; a zip: sorted by member name). None when the folder does not exist."""

        def wanted(base: str) -> bool:
            return _visible(base) and (extensions is None or base.lower().endswith(extensions))

        if self.is_zip:
            dirs, top = self._zip_dirs(), posixpath.join("", *parts).strip("/")
            found, stack = [], [top] if top in dirs else []
            while stack:
                folder = stack.pop()
                found += [n for n in dirs[folder][0] if wanted(posixpath.basename(n))]
                if recursive:
                    stack += [posixpath.join(folder, d) for d in dirs[folder][1] if _visible(d)]
            return sorted(found)
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.name(*parts), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if _visible(d)) if recursive else []
            out += [os.path.join(dirpath, f) for f in sorted(filenames) if wanted(f)]
        return out

    def exists(self, name: str) -> bool:
        """Whether a file (path) or member (zip) exists."""
        if not self.is_zip:
            return os.path.isfile(name)
        if self._member_set is None:
            self._member_set = set(self.members())
        return name in self._member_set

    def read_bytes(self, name: str) -> bytes:
        """The bytes of one file (path) or member (zip)."""
        if not self.is_zip:
            with open(name, "rb") as f:
                return f.read()
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.root), os.getpid()
        return self._zip.read(name)

    def open_image(self, name: str) -> Image.Image:
        """Decode one image now (mode unchanged), so truncated files fail here and not inside a transform."""
        with Image.open(io.BytesIO(self.read_bytes(name)) if self.is_zip else name) as img:
            img.load()
            return img

    def load(self, name: str) -> Image.Image:
        """Decode one image to RGB; raises whatever PIL or the archive raises for a bad file."""
        return to_rgb(self.open_image(name))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zip"], state["_zip_pid"] = None, -1
        return state
