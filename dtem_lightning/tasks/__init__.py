"""Lightning tasks: the base class and one subclass per task family."""

from dtem_lightning.tasks.base import BaseTask, CosineLR
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
