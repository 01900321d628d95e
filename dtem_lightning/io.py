"""Atomic file writes: a checkpoint or result file is written beside its destination, then renamed over it.

A kill or a full disk during the write leaves the previous file as it was (and at most a hidden ``.NAME.*.tmp``
file beside it after a kill); the rename never crosses a filesystem, so it is never a copy.
"""

from __future__ import annotations

import csv
import io
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from PIL import Image


def atomic_write(path: str | Path, write_fn: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write_fn(tmp)``, which writes the whole file to the path ``tmp`` it is given.

    ``tmp`` is a hidden file in the same folder (``.NAME.<random>.tmp``, no telling suffix: writers that infer a
    format from the name need it passed explicitly). Once ``write_fn`` returns, the file is flushed to disk and
    renamed over ``path`` (``os.replace``: atomic on POSIX). If anything fails, the temporary file is removed and
    ``path`` is untouched.

    Raises:
        OSError: the write failed (a full disk, a file-size limit); the message names ``path`` and says the
            previous file is kept. Other errors of ``write_fn`` propagate as they are.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write_fn(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        message = f"{e.strerror or e}: could not write {path}; the previous file, if any, is kept"
        raise (OSError(e.errno, message) if e.errno is not None else OSError(message)) from e
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse to open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    """``Path.write_text`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_csv(path: str | Path, rows: list[dict[str, Any]], fieldnames: list[str], restval: Any = "") -> Path:
    """A CSV file with a header through :func:`atomic_write` (None and missing cells are written empty)."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames, restval=restval)
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def save_image(path: str | Path, image: Image.Image) -> Path:
    """A PIL image through :func:`atomic_write`, in the format its file extension names (PNG when unknown)."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with the file written beside its destination and renamed over it.

    Modifications: local checkpoints go through :func:`atomic_write` (Lightning's own writer stages the file in
    ``$TMPDIR`` and moves it, which is a copy, not a rename, when the run folder is on another filesystem);
    remote paths (``s3://``...) are left to Lightning. The ``dtem`` CLI installs it on every trainer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()  # serialised first: a write error is then an OSError, not torch's RuntimeError
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))
