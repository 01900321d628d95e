"""The segmentation data sets with fixed layouts and label values: CamVid (SegNet layout) and ADE20K."""

from __future__ import annotations

import numpy as np

from dtem_lightning.data.segmentation import SegmentationDataModule
from dtem_lightning.labelmaps import CAMVID_CLASSES, CAMVID_PALETTE, IGNORE_INDEX


class CamVidDataModule(SegmentationDataModule):
    """CamVid in the SegNet layout: ``{train,val,test}/<name>.<img>`` with ``{train,val,test}annot/<name>.png``.

    Labels 0–10 are scored (sky … bicyclist), 11 (unlabelled) is ignored. ``root`` may be the zip of
    ../shared/data/camvid-segnet-halfres, read in place.

    Args:
        root: see :class:`SegmentationDataModule`.
        num_classes: see :class:`SegmentationDataModule` (11).
        ignore_index: see :class:`SegmentationDataModule` (11).
        **kwargs: see :class:`SegmentationDataModule`.
    """

    layout = {s: (s, f"{s}annot") for s in ("train", "val", "test")}
    class_names = CAMVID_CLASSES
    palette = CAMVID_PALETTE
    check_labels = False  # known values (0..11); a bad one still fails, naming its file, when it is read

    def __init__(self, root: str, num_classes: int = 11, ignore_index: int = 11, **kwargs: object) -> None:
        super().__init__(root, num_classes, ignore_index, **kwargs)


class ADE20KDataModule(SegmentationDataModule):
    """ADE20K (SceneParsing ADEChallengeData2016): ``images/{training,validation}``, ``annotations/...``.

    Label 0 ("other") is ignored and 1–150 become 0–149 (mmseg's ``reduce_zero_label``). The validation split
    serves validation and test (the test labels are not public).

    Args:
        root: see :class:`SegmentationDataModule` (the ADEChallengeData2016 folder or its zip).
        num_classes: see :class:`SegmentationDataModule` (150).
        ignore_index: see :class:`SegmentationDataModule` (0).
        **kwargs: see :class:`SegmentationDataModule`.
    """

    layout = {
        "train": ("images/training", "annotations/training"),
        "val": ("images/validation", "annotations/validation"),
        "test": ("images/validation", "annotations/validation"),
    }
    check_labels = False  # known values (0..150); a bad one still fails, naming its file, when it is read

    def __init__(self, root: str, num_classes: int = 150, ignore_index: int = 0, **kwargs: object) -> None:
        if kwargs.get("label_map") is not None:
            raise ValueError(
                "ADE20KDataModule maps its labels itself (v -> v - 1, 0 ignored): drop label_map"
            )
        super().__init__(root, num_classes, ignore_index, **kwargs)

    def label_lut(self) -> np.ndarray:
        """0 -> ignore, v -> v - 1 for 1..num_classes, anything else -> ignore."""
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        values = np.arange(256)
        keep = (values >= 1) & (values <= self.num_classes) & (values != self.ignore_index)
        lut[keep] = values[keep] - 1
        return lut
