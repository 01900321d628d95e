"""Data modules: ImageNet-style class folders and synthetic images for tests."""

from dtem_lightning.data.base import BaseDataModule
from dtem_lightning.data.folder import ImageFolderDataModule
from dtem_lightning.data.synthetic import SyntheticDataModule

__all__ = ["BaseDataModule", "ImageFolderDataModule", "SyntheticDataModule"]
