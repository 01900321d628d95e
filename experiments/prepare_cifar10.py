"""Prepare CIFAR-10 as an image-folder tree ``data/cifar10/{train,val,test}/<class>/*.jpg`` for the demo."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zipfile
from pathlib import Path

# ../shared/data next to the repository checkout
SHARED_ZIP = (
    Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg-subset/cifar10_train2000pc_test500pc.zip"
)
SHARED_SHA256 = "466b825531719e531703e484e69e77e20c9caf560a5cb6deaa5028af3eebd7a5"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MANIFEST = "MANIFEST.json"


class PrepareError(RuntimeError):
    """A source archive or target tree that cannot be used; the message says why and what to do."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_digest(root: Path) -> tuple[int, str]:
    """(number of .jpg files, SHA-256 over their relative paths and bytes) of a prepared tree."""
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*.jpg") if p.is_file())
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return len(files), h.hexdigest()


def is_prepared(out: Path, source_id: str) -> bool:
    """Whether ``out`` already holds a complete tree from ``source_id`` whose files match the manifest."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        return False
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("source") != source_id:
        return False
    return tree_digest(out)[1] == meta.get("tree_sha256")


def split_of(name: str, index: int, val_per_class: int, n_train: int) -> str:
    """Target split of a member: the last ``val_per_class`` train images of each class become ``val``."""
    if name == "train" and index >= n_train - val_per_class:
        return "val"
    return name


def from_zip(archive: Path, out: Path, val_per_class: int, expected_sha256: str | None) -> dict:
    """Extract the shared CIFAR-10 JPEG zip into ``out`` after verifying it.

    Args:
        archive: zip holding ``{train,test}/<class>/NNNN.jpg``.
        out: target folder (created; existing images are overwritten).
        val_per_class: train images per class held out as ``val/`` (0 keeps them all in ``train/``).
        expected_sha256: checksum the archive must have; None skips the check (a user-supplied archive).

    Returns:
        Manifest fields describing the source and the split.

    Raises:
        PrepareError: wrong checksum, not a zip, a corrupt member (CRC) or an unexpected layout.
    """
    if expected_sha256 is not None:
        got = sha256_file(archive)
        if got != expected_sha256:
            raise PrepareError(
                f"{archive} is corrupted or not the expected file: sha256 {got}, expected {expected_sha256}. "
                "Copy it again, or delete it to fall back to the torchvision download."
            )
    if not zipfile.is_zipfile(archive):
        raise PrepareError(f"{archive} is not a zip archive")
    with zipfile.ZipFile(archive) as zf:
        bad = zf.testzip()
        if bad is not None:
            raise PrepareError(f"{archive} is corrupted: member {bad} fails its CRC check")
        members: dict[tuple[str, str], list[str]] = {}
        for n in zf.namelist():
            parts = n.split("/")
            if len(parts) == 3 and parts[0] in ("train", "test") and parts[2].endswith(".jpg"):
                members.setdefault((parts[0], parts[1]), []).append(n)
        found = sorted({c for _, c in members})
        if found != sorted(CLASSES):
            raise PrepareError(f"{archive}: expected CIFAR-10 class folders {list(CLASSES)}, found {found}")
        counts: dict[str, int] = {}
        for (split, cls), names in sorted(members.items()):
            names.sort()
            if split == "train" and val_per_class >= len(names):
                raise PrepareError(f"val_per_class={val_per_class} leaves no train images of {cls}")
            for i, n in enumerate(names):
                target = split_of(split, i, val_per_class, len(names))
                dest = out / target / cls / Path(n).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(n))
                counts[target] = counts.get(target, 0) + 1
    return {"source": f"zip:{expected_sha256 or sha256_file(archive)}:val{val_per_class}", "counts": counts}


def from_torchvision(download_root: Path, out: Path, val_per_class: int, per_class: dict[str, int]) -> dict:
    """Download CIFAR-10 with torchvision and write it in the same layout (JPEG, quality 95).

    Not exercised on the offline development machines; torchvision verifies the download's MD5 itself.

    Args:
        download_root: where torchvision keeps its download.
        out: target folder.
        val_per_class: train images per class held out as ``val/``.
        per_class: images per class to keep for ``train`` and ``test`` (the shared subset's 2000 / 500).

    Returns:
        Manifest fields describing the source and the split.
    """
    from torchvision.datasets import CIFAR10  # imported here: only this fallback needs it

    counts: dict[str, int] = {}
    for split, train in (("train", True), ("test", False)):
        ds = CIFAR10(str(download_root), train=train, download=True)
        seen: dict[int, int] = {}
        limit = per_class[split]
        for img, label in ds:
            i = seen.get(label, 0)
            if i >= limit:
                continue
            seen[label] = i + 1
            target = split_of(split, i, val_per_class, limit)
            dest = out / target / CLASSES[label] / f"{i:04d}.jpg"
            dest.parent.mkdir(parents=True, exist_ok=True)
            img.save(dest, quality=95)
            counts[target] = counts.get(target, 0) + 1
    return {
        "source": f"torchvision:{per_class['train']}/{per_class['test']}:val{val_per_class}",
        "counts": counts,
    }


def prepare(
    out: Path,
    archive: Path | None = SHARED_ZIP,
    val_per_class: int = 200,
    expected_sha256: str | None = SHARED_SHA256,
    allow_download: bool = True,
) -> Path:
    """Write (or verify) the CIFAR-10 tree; idempotent: a complete, unchanged tree is left as it is.

    Args:
        out: target folder, e.g. ``data/cifar10``.
        archive: the shared zip; used when it exists.
        val_per_class: train images per class held out as ``val/`` (for choices made on data that is
            neither trained on nor the test split).
        expected_sha256: checksum of ``archive`` (None: not checked).
        allow_download: fall back to torchvision's download when ``archive`` is missing.

    Returns:
        ``out``.

    Raises:
        PrepareError: corrupted archive, or neither the archive nor a download is available.
    """
    out = Path(out)
    use_zip = archive is not None and Path(archive).is_file()
    if use_zip:
        source_id = f"zip:{expected_sha256 or sha256_file(Path(archive))}:val{val_per_class}"
    else:
        source_id = f"torchvision:2000/500:val{val_per_class}"
    if is_prepared(out, source_id):
        print(f"{out} is ready (manifest and checksums match); nothing to do")
        return out
    if use_zip:
        print(f"extracting {archive} -> {out}")
        meta = from_zip(Path(archive), out, val_per_class, expected_sha256)
    elif allow_download:
        print(f"{archive} not found; downloading CIFAR-10 with torchvision into {out}/download")
        meta = from_torchvision(out / "download", out, val_per_class, {"train": 2000, "test": 500})
    else:
        raise PrepareError(f"{archive} not found and downloading is disabled (--no-download)")
    n, digest = tree_digest(out)
    meta.update({"files": n, "tree_sha256": digest, "val_per_class": val_per_class})
    (out / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {n} images to {out}: " + ", ".join(f"{k} {v}" for k, v in sorted(meta["counts"].items())))
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python experiments/prepare_cifar10.py [--out data/cifar10] [--zip FILE]``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("data/cifar10"))
    ap.add_argument(
        "--zip", type=Path, default=SHARED_ZIP, help="CIFAR-10 JPEG zip (default: the shared subset)"
    )
    ap.add_argument(
        "--sha256", default=None, help="expected checksum of --zip (default: the shared subset's)"
    )
    ap.add_argument("--val-per-class", type=int, default=200, help="train images per class held out as val/")
    ap.add_argument(
        "--no-download", action="store_true", help="fail instead of downloading when --zip is missing"
    )
    args = ap.parse_args(argv)
    sha = args.sha256 or (SHARED_SHA256 if args.zip.resolve() == SHARED_ZIP.resolve() else None)
    try:
        prepare(args.out, args.zip, args.val_per_class, sha, allow_download=not args.no_download)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
