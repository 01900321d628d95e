"""Lightning tasks: the base class and one subclass per task family."""

# Saved hyper-parameters (checkpoints/camvid_seg_vit.ckpt) name dtem_lightning.tasks.CosineLR: keep it here.
from dtem_lightning.optim import CosineLR
from dtem_lightning.tasks.base import BaseTask
from dtem_lightning.tasks.captioning import CaptioningTask
from dtem_lightning.tasks.classification import ClassificationTask
from dtem_lightning.tasks.git import GitCaptioningTask
from dtem_lightning.tasks.segmentation import SegmentationTask

__all__ = [
    "BaseTask",
    "CaptioningTask",
    "ClassificationTask",
    "CosineLR",
    "GitCaptioningTask",
    "SegmentationTask",
]
