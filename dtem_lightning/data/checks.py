"""Checks a data module runs in ``setup``, so bad files fail before training, not after an epoch or a test sweep.

A corrupt validation image otherwise surfaces at the end of the first training epoch (no checkpoint yet), and a
caption naming a missing image after the whole test sweep. :func:`check_images` opens every image of a split
cheaply: the file must exist and PIL must recognise its header (format and size; the pixels are not decoded,
so a file truncated after its header still fails later, where it is read).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from PIL import Image

from dtem_lightning.data.store import Store

# Names shown in the error; the rest are counted.
_SHOWN = 3


def _header_problem(source: Callable[[], str | IO[bytes]]) -> str | None:
    """None when ``source()`` (a path, which PIL opens and closes, or an open member of a zip) holds a readable
    image header, else the reason."""
    try:
        with Image.open(source()) as img:
            img.size  # noqa: B018 - the header must give a size
    except FileNotFoundError:
        return "no such file"
    except Exception as e:  # PIL raises UnidentifiedImageError, SyntaxError, ValueError, OSError...
        return type(e).__name__ if "cannot identify image file" in str(e) else f"{type(e).__name__}: {e}"
    return None


def image_problems(root: Store, names: Sequence[str], workers: int = 8) -> list[tuple[str, str]]:
    """(name, reason) of each image in ``names`` that is missing or has no readable image header.

    ``names`` are what ``root`` reads: paths for a folder root, member names for a zip root. Folder roots are
    read by ``workers`` threads (headers are small; the time is file-system latency); a zip is read in this
    thread through one handle of its own (zip handles must not be shared).
    """
    if root.is_zip:
        found = []
        with zipfile.ZipFile(root.root) as zf:
            for name in names:
                if not root.exists(name):
                    found.append((name, "no such member"))
                elif (why := _header_problem(lambda n=name: zf.open(n))) is not None:  # reads the header only
                    found.append((name, why))
        return found
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(lambda n: _header_problem(lambda: n), names))
    return [(n, why) for n, why in zip(names, reasons, strict=True) if why is not None]


def check_images(
    root: Store,
    names: Sequence[str],
    split: str,
    display: Callable[[str], str] | None = None,
    strict: bool = True,
    workers: int = 8,
) -> list[str]:
    """Refuse (``strict``) or list the images of ``split`` that are missing or unreadable, before any training.

    Args:
        root: the data module's folder or zip.
        names: every image name the split will read (for a caption set: every image a caption names).
        split: the split's name, for the message (``val``, ``test``...).
        display: name -> location a user would look for (default: ``root.display``).
        strict: raise; when False (a data module's ``skip_corrupt``), return the bad names for it to skip.
        workers: reader threads for a folder root.

    Returns:
        The bad names (empty when every image is fine).

    Raises:
        ValueError: ``strict`` and some images are missing or unreadable; one line naming the first few.
    """
    found = image_problems(root, names, workers)
    if not found or not strict:
        return [n for n, _ in found]
    show = display or root.display
    listed = "; ".join(f"{show(n)} ({why})" for n, why in found[:_SHOWN])
    more = f"; and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
    raise ValueError(
        f"{len(found)} of {len(names)} images of the {split} split cannot be read: {listed}{more}: fix or remove "
        "them (or set skip_corrupt: true where the data module has it)"
    )
