"""Lightning tasks: the base class and one subclass per task family."""

from dtem_lightning.tasks.base import BaseTask, CosineLR
from dtem_lightning.tasks.classification import ClassificationTask

__all__ = ["BaseTask", "ClassificationTask", "CosineLR"]
