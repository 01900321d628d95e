"""Data modules: class folders, segmentation folders (your own, CamVid, ADE20K), captions (COCO-format JSON,
Karpathy JSON, Flickr8k) and synthetic images for tests. See docs/data.md for the layouts."""

from dtem_lightning.data.base import BaseDataModule
from dtem_lightning.data.captions import CocoCaptionDataModule, Flickr8kDataModule
from dtem_lightning.data.folder import ImageFolderDataModule
from dtem_lightning.data.seg_datasets import ADE20KDataModule, CamVidDataModule
from dtem_lightning.data.segmentation import SegmentationDataModule
from dtem_lightning.data.synthetic import SyntheticDataModule

__all__ = [
    "BaseDataModule",
    "CocoCaptionDataModule",
    "Flickr8kDataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "SegmentationDataModule",
    "CamVidDataModule",
    "ADE20KDataModule",
]
