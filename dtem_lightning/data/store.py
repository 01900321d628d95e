"""DataRoot: a data folder or a zip archive of one, listed once and read safely from loader workers."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from typing import TypeVar

from PIL import Image

T = TypeVar("T")


def thin(items: Sequence[T], k: int | None) -> list[T]:
    """At most ``k`` of ``items``, evenly spaced in their order (all of them when ``k`` is None or large enough):
    what ``max_per_class`` keeps of a class folder or a split, the same subset on every run."""
    if k is None or len(items) <= k:
        return list(items)
    return [items[i * len(items) // k] for i in range(k)]


class DataRoot:
    """Files under a folder, or members of a ``.zip`` holding that folder.

    Names passed to :meth:`read_bytes` / :meth:`open_image` are paths for a folder root and member names for a
    zip root. Each process opens its own zip handle (loader workers must not share a file offset).

    Args:
        root: folder, or ``.zip`` file.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` is a file but not a zip archive.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.fspath(root)
        if not os.path.exists(self.root):
            raise FileNotFoundError(f"data root {self.root} does not exist")
        self.is_zip = os.path.isfile(self.root)
        if self.is_zip and not zipfile.is_zipfile(self.root):
            raise ValueError(
                f"data root {self.root} is a file but not a zip archive; pass a folder or a .zip"
            )
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        self._members: list[str] | None = None
        self._member_set: set[str] | None = None

    def members(self) -> list[str]:
        """Zip member names (files only, macOS metadata skipped), listed once."""
        if self._members is None:
            with zipfile.ZipFile(self.root) as zf:
                self._members = [
                    n for n in zf.namelist() if not n.startswith("__MACOSX/") and not n.endswith("/")
                ]
        return self._members

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

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zip"], state["_zip_pid"] = None, -1
        return state
