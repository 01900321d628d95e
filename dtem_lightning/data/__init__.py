"""Data modules: ImageNet-style class folders and synthetic images for tests."""

from dtem_lightning.data.base import BaseDataModule
from dtem_lightning.data.captions import CocoCaptionDataModule, Flickr8kDataModule
from dtem_lightning.data.folder import ImageFolderDataModule
from dtem_lightning.data.segmentation import ADE20KDataModule, CamVidDataModule
from dtem_lightning.data.synthetic import SyntheticDataModule

__all__ = [
    "BaseDataModule",
    "CocoCaptionDataModule",
    "Flickr8kDataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "CamVidDataModule",
    "ADE20KDataModule",
]
