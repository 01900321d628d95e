"""Segmentation label files: reading them, raw values -> classes (lookup tables), and checks of their values."""

from __future__ import annotations

import warnings

import numpy as np

from dtem_lightning.data.store import Store
from dtem_lightning.labelmaps import IGNORE_INDEX

LABEL_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp")  # lossless formats only: JPEG would blur class values
LABEL_MODES = ("1", "L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I")  # one channel of integer class values
MAX_LABEL_VALUE = 65535  # 16-bit label files
SCAN_FILES = 256  # label maps per split read at setup to check their values (evenly spaced)


class LabelMapper:
    """Raw label-file values -> training labels (classes 0 .. K-1, ignore 255) through a lookup table.

    Args:
        lut: uint8 [V]: the label of each raw value below V (255 = ignore).
        valid: bool [V]: raw values that are a class or ignored on purpose; any other value is an error.
        rest_ignored: values at or above V (16-bit files) are ignored rather than an error.
        hint: advice appended to the error for unexpected values.
    """

    def __init__(
        self, lut: np.ndarray, valid: np.ndarray, rest_ignored: bool = False, hint: str = ""
    ) -> None:
        if lut.shape != valid.shape:
            raise ValueError(f"lut and valid differ in shape: {lut.shape} vs {valid.shape}")
        self.lut, self.valid, self.rest_ignored, self.hint = lut, valid, rest_ignored, hint

    @classmethod
    def of(
        cls,
        lut: np.ndarray,
        num_classes: int,
        ignore_index: int | None,
        label_map: dict[int, int] | None,
        unmapped: str,
    ) -> LabelMapper:
        """The mapper of a segmentation data module's settings: the values ``lut`` maps to a class and
        ``ignore_index`` are valid (every value with ``unmapped="ignore"``), the error says how to fix others."""
        valid = lut != IGNORE_INDEX
        if ignore_index is not None and ignore_index < len(lut):
            valid[ignore_index] = True
        if unmapped == "ignore":
            valid[:] = True
        hint = (
            f" (classes: {'label_map ' + str(label_map) if label_map else f'0..{num_classes - 1}'}, "
            f"ignore_index={ignore_index}: map raw values to classes with label_map, e.g. {{0: 0, 255: 1}}, "
            "or set unmapped: ignore)"
        )
        return cls(lut, valid, unmapped == "ignore", hint)

    def bad_values(self, raw: np.ndarray) -> list[int]:
        """Sorted raw values of ``raw`` that are neither a class nor ignored on purpose."""
        values = np.unique(raw).astype(np.int64)
        inside = (values >= 0) & (values < len(self.lut))
        ok = np.zeros(len(values), dtype=bool)
        ok[inside] = self.valid[values[inside]]
        if self.rest_ignored:
            ok |= values >= len(self.lut)
        return [int(v) for v in values[~ok]]

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Label map [H, W] of raw values (any integer dtype) -> uint8 [H, W] labels.

        Raises:
            ValueError: a value is neither a class nor the ignore value (naming up to 8 of them).
        """
        bad = self.bad_values(raw)
        if bad:
            raise ValueError(f"label values {bad[:8]} are neither a class nor the ignore value{self.hint}")
        raw = raw.astype(np.int64, copy=False)
        if self.rest_ignored and raw.size and raw.max() >= len(self.lut):
            return np.where(raw < len(self.lut), self.lut[np.minimum(raw, len(self.lut) - 1)], IGNORE_INDEX)
        return self.lut[raw]


def read_label(store: Store, name: str) -> np.ndarray:
    """The raw values [H, W] of one label file (8-bit, palette indices, or 16/32-bit integers).

    Raises:
        ValueError: the file is not a one-channel integer image (e.g. colour-coded RGB labels).
    """
    label = store.open_image(name)
    if label.mode not in LABEL_MODES:
        raise ValueError(
            f"label map {name} has mode {label.mode}; expected one channel of class values (L, P, I;16 or I): "
            "convert colour-coded label maps to class indices"
        )
    return np.asarray(label).astype(np.int64) if label.mode == "1" else np.asarray(label)


def checked_label_map(
    label_map: dict[int, int] | None, num_classes: int, ignore_index: int | None
) -> dict[int, int] | None:
    """``label_map`` with int keys and values, every class reached, the ignore value not a key.

    Raises:
        ValueError: a key outside 0..65535, a class outside 0..num_classes - 1, a class no value maps to, or
            ``ignore_index`` among the keys.
    """
    if label_map is None:
        return None
    out = {int(k): int(v) for k, v in label_map.items()}  # YAML / JSON may give string keys
    for value, cls in out.items():
        if not 0 <= value <= MAX_LABEL_VALUE:
            raise ValueError(f"label_map key {value} is not a label-file value (0..{MAX_LABEL_VALUE})")
        if not 0 <= cls < num_classes:
            raise ValueError(f"label_map maps {value} to {cls}, outside the classes 0..{num_classes - 1}")
    if ignore_index is not None and ignore_index in out:
        raise ValueError(
            f"ignore_index={ignore_index} is also a key of label_map (-> class {out[ignore_index]}): a value is "
            "either a class or ignored; drop one"
        )
    unreached = sorted(set(range(num_classes)) - set(out.values()))
    if unreached:
        raise ValueError(
            f"label_map {out} maps no value to class(es) {unreached[:8]} of num_classes={num_classes}"
        )
    return dict(sorted(out.items()))


def label_lut(num_classes: int, ignore_index: int | None, label_map: dict[int, int] | None) -> np.ndarray:
    """uint8 lookup [V] from label-file values to labels (255 = ignore; V >= 256 covers the largest ``label_map``
    key and ``ignore_index``): ``label_map``, else the values 0 .. num_classes - 1 are classes.

    Raises:
        ValueError: without ``label_map``, ``ignore_index`` is also a class (it would silently lose it).
    """
    ig = ignore_index
    top = max([255, *(label_map or {}), *([ig] if ig is not None else [])])
    lut = np.full(top + 1, IGNORE_INDEX, dtype=np.uint8)
    if label_map is None:
        if ig is not None and ig < num_classes:
            raise ValueError(
                f"ignore_index={ig} is also class {ig} of num_classes={num_classes} (without label_map the "
                f"values 0..{num_classes - 1} are the classes): map the other values to classes with "
                f"label_map and lower num_classes, or choose another ignore_index"
            )
        lut[:num_classes] = np.arange(num_classes)
    else:
        for value, cls in label_map.items():
            lut[value] = cls
    if ig is not None:
        lut[ig] = IGNORE_INDEX
    return lut


def check_label_values(
    store: Store,
    mapper: LabelMapper,
    split: str,
    label_names: list[str],
    num_classes: int,
    ignore_index: int | None,
) -> None:
    """Read up to ``SCAN_FILES`` label maps of a split (evenly spaced) and refuse surprising values.

    Raises:
        ValueError: a value is neither a class nor ignored (naming the file); on train, ``ignore_index``
            occurs and at most one class does (the ignore value is then most likely a class, e.g. 255 on
            0/255 masks). When two or more classes occur but others never do, a warning says so.
    """
    n = len(label_names)
    picks = label_names if n <= SCAN_FILES else [label_names[i * n // SCAN_FILES] for i in range(SCAN_FILES)]
    counts = np.zeros(num_classes, dtype=np.int64)
    ignored = total = 0
    seen: set[int] = set()
    for name in picks:
        raw = read_label(store, name)
        bad = mapper.bad_values(raw)
        if bad:
            raise ValueError(
                f"label map {name}: label values {bad[:8]} are neither a class nor the ignore value{mapper.hint}"
            )
        if split != "train" or ignore_index is None:
            continue
        labels = mapper(raw)
        counts += np.bincount(labels[labels != IGNORE_INDEX], minlength=256)[:num_classes]
        ignored += int((raw == ignore_index).sum())
        total += raw.size
        seen.update(int(v) for v in np.unique(raw))
    missing = [int(c) for c in np.flatnonzero(counts == 0)]
    if not ignored or not missing:
        return
    guess = {v: i for i, v in enumerate(sorted(seen))}
    msg = (
        f"ignore_index={ignore_index} covers {100 * ignored / total:.1f} % of the pixels of {len(picks)} "
        f"train label map(s) and class(es) {missing[:8]} never occur: if {ignore_index} is a class, map "
        f"it with label_map (e.g. {guess}) instead of ignoring it"
    )
    if int((counts > 0).sum()) <= 1:
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=3)
