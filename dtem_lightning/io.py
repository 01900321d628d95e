"""Atomic file writes: a checkpoint or result file is written beside its destination, then renamed over it.

A kill or a full disk during the write leaves the previous file as it was (and at most a hidden ``.NAME.*.tmp``
file beside it after a kill); the rename never crosses a filesystem, so it is never a copy.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import re
import secrets
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
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
    remote paths (``s3://``...) are left to Lightning. Checkpoints are read from local files only and always with
    ``weights_only=True`` (:func:`load_weights_only`): Lightning itself loads ``http(s)://`` checkpoints with
    ``weights_only=False``, which runs whatever code the file pickles. The ``dtem`` CLI installs it on every trainer.
    """

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at the local ``path``, loaded with ``weights_only=True`` whatever ``weights_only`` says.

        Raises:
            ValueError: ``path`` is a URL, a folder or not a readable PyTorch file, or it needs pickled code
                (:class:`PickledCodeError`).
        """
        # Lightning's default map_location keeps storages where they are; CPU is where a checkpoint is read anyway.
        return load_weights_only(
            path, "checkpoint", map_location="cpu" if map_location is None else map_location
        )

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()  # serialised first: a write error is then an OSError, not torch's RuntimeError
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


# ---------------------------------------------------------------------------------------------- loading, safely
# Module prefixes a class path read from a checkpoint may name: importing any other module could run its code.
TRUSTED_CLASS_PREFIXES: tuple[str, ...] = ("dtem_lightning.", "torch.", "timm.", "lightning.")


class PickledCodeError(pickle.UnpicklingError, ValueError):
    """A file that ``torch.load(weights_only=True)`` refuses: it needs arbitrary pickled code, not just tensors.

    A ``pickle.UnpicklingError`` (what torch raises) and a ``ValueError`` (what the ``dtem`` CLI prints as one line).
    """


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a remote location (``http://``, ``s3://``... any ``scheme://``), not a local file."""
    return "://" in str(path)


def torch_file_format(path: str | Path) -> str | None:
    """``"zip"`` for ``torch.save``'s default format, ``"legacy"`` for the older pickle stream
    (``_use_new_zipfile_serialization=False``), None for anything else (text, safetensors, an image...)."""
    if zipfile.is_zipfile(path):
        return "zip"
    with open(path, "rb") as f:
        head = f.read(2)
    # The legacy format starts with a pickled magic number: protocol 2+ opcode PROTO (0x80) and its version.
    return "legacy" if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5 else None


def _unsupported_global(message: str) -> str:
    """The class or function a weights-only load refused (``posix.system``), from torch's message."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else "an object that is not a tensor"


def load_weights_only(path: str | Path, what: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` of a local file, every failure one line naming ``what`` and ``path``.

    Never runs pickled code: torch's weights-only unpickler accepts tensors, containers and plain values only.
    ``mmap`` maps the file instead of reading it, where the format allows it (not the legacy format).

    Raises:
        ValueError: ``path`` is a URL, a folder, not a PyTorch file, or unreadable (truncated, corrupt).
        PickledCodeError: the file needs arbitrary pickled code (a ``ValueError`` too).
        FileNotFoundError: ``path`` does not exist.
    """
    if is_url(path):
        raise ValueError(
            f"{what} {path} is a URL: dtem loads only local files (download it, then pass its path; it is "
            "then loaded with weights_only=True)"
        )
    path = Path(path)
    if path.is_dir():
        found = [str(p) for p in sorted(path.rglob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", p))][:2]
        hint = f" such as {' or '.join(found)}" if found else ""
        raise ValueError(f"{what} {path} is a folder, not a file: pass a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    fmt = torch_file_format(path)
    if fmt is None:
        raise ValueError(
            f"{what} {path} is not a PyTorch file (neither torch.save's zip format nor its legacy pickle format)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and fmt == "zip")
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise PickledCodeError(
                f"refusing to load {what} {path}: it needs arbitrary pickled code "
                f"({_unsupported_global(str(e))}), not just tensors"
            ) from e
        raise ValueError(f"{what} {path} is not a readable PyTorch file ({str(e).splitlines()[0]})") from e
    except (RuntimeError, KeyError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"{what} {path} is not a readable PyTorch file (truncated or corrupt? {type(e).__name__}: {first})"
        ) from e


def untrusted_class_paths(value: Any, where: str = "") -> list[tuple[str, str]]:
    """(location, import path) of every class path in ``value`` outside :data:`TRUSTED_CLASS_PREFIXES`.

    Looks at every string of nested dicts and lists that reads as a dotted import path (``class_path`` entries,
    and plain strings: jsonargparse imports one given for a callable or class argument such as ``optimizer``).
    A short name without a dot (``ToMe``) is resolved among known subclasses only, so it imports nothing new.
    """
    found: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            found += untrusted_class_paths(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found += untrusted_class_paths(v, f"{where}[{i}]")
    elif (
        isinstance(value, str)
        and _IMPORT_PATH.fullmatch(value)
        and not value.startswith(TRUSTED_CLASS_PREFIXES)
    ):
        found.append((where, value))
    return found


_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
