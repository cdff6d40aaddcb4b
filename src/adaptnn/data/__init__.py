"""Datasets for adaptnn: digits, Fashion-MNIST, CIFAR-10/100 and image folders.

Use :func:`build_datasets` with a :class:`DataConfig`; it returns :class:`DataSplits` whose
``train``/``val``/``test`` datasets yield ``(float32 image [C, H, W], int label)``.
"""

from .config import DataConfig, list_datasets
from .datasets import ArrayDataset, ImageFolderDataset
from .idx import read_idx
from .splits import DataSplits, build_datasets, carve_validation

__all__ = [
    "ArrayDataset",
    "DataConfig",
    "DataSplits",
    "ImageFolderDataset",
    "build_datasets",
    "carve_validation",
    "list_datasets",
    "read_idx",
]
