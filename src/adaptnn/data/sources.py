"""Loaders of the raw training/test samples of each dataset (no split, no transforms)."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptnn.errors import ConfigError, DataError

from .config import DataConfig
from .datasets import ArrayDataset, ImageFolderDataset
from .fingerprint import array_fingerprint, file_fingerprint, folder_fingerprint
from .folder import image_size_of, load_or_build_cache, scan_split
from .idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx

__all__ = ["SOURCES", "Source"]

logger = logging.getLogger(__name__)

DEFAULT_DOWNLOAD_ROOT = Path("~/.cache/adaptnn")
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)  # over all 1797 images scaled to [0, 1]
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass
class Source:
    """All samples of a dataset before splitting, with the facts the transforms need.

    ``train``/``test`` have no transform; ``pad``/``flip`` describe the training augmentation;
    ``fingerprint`` identifies the samples (see :mod:`.fingerprint`).
    """

    train: ArrayDataset | ImageFolderDataset
    test: ArrayDataset | ImageFolderDataset
    class_names: list[str]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int
    flip: bool
    fingerprint: dict[str, Any] | None = None


def _root(cfg: DataConfig) -> Path | None:
    return None if cfg.root is None else Path(cfg.root).expanduser()


def load_digits_source(cfg: DataConfig) -> Source:
    """scikit-learn's 8x8 digits with a seeded stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=cfg.seed % 2**32, stratify=labels
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    train_x, train_y, test_x, test_y = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
    return Source(
        train=ArrayDataset(train_x, train_y),
        test=ArrayDataset(test_x, test_y),
        class_names=[str(d) for d in range(10)],
        input_size=(1, 8, 8),
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        pad=1,
        flip=False,
        fingerprint=array_fingerprint("arrays", {"train": (train_x, train_y), "test": (test_x, test_y)}),
    )


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in FASHION_FILES.items():
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                found[key] = candidate
                break
    return found if len(found) == len(FASHION_FILES) else None


def _read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{labels_path} has labels outside 0..{num_classes - 1}")
    return images, labels


def load_fashion_mnist_source(cfg: DataConfig) -> Source:
    """Fashion-MNIST from gzipped (or plain) IDX files; see :class:`DataConfig` for the search order."""
    root = _root(cfg)
    download_root = (root or DEFAULT_DOWNLOAD_ROOT).expanduser()
    searched = [root, root / "FashionMNIST" / "raw"] if root else [DEBIAN_FASHION_DIR]
    searched.append(download_root / "FashionMNIST" / "raw")
    searched = list(dict.fromkeys(searched))
    files = next((f for d in searched if (f := _find_idx_files(d)) is not None), None)
    if files is None and cfg.download:
        import torchvision

        logger.info("downloading Fashion-MNIST to %s", download_root)
        try:
            for train in (True, False):
                torchvision.datasets.FashionMNIST(str(download_root), train=train, download=True)
        except (RuntimeError, OSError, ValueError) as e:
            raise DataError(f"could not download Fashion-MNIST to {download_root}: {e}") from e
        files = _find_idx_files(download_root / "FashionMNIST" / "raw")
    if files is None:
        places = "\n".join(f"  {d}" for d in searched)
        raise DataError(
            "Fashion-MNIST files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) not found in:\n{places}\n"
            "Fix: `apt-get install dataset-fashion-mnist` (installs them in "
            f"{DEBIAN_FASHION_DIR}), set root=<directory with the files>, or set download=True when online."
        )
    logger.info("loading Fashion-MNIST from %s", files["train_images"].parent)
    train_x, train_y = _read_idx_pair(files["train_images"], files["train_labels"], len(FASHION_CLASSES))
    test_x, test_y = _read_idx_pair(files["test_images"], files["test_labels"], len(FASHION_CLASSES))
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"Fashion-MNIST train images are {train_x.shape[1:]} but test images {test_x.shape[1:]}")
    h, w = train_x.shape[1:]
    arrays = {"train_images": train_x, "train_labels": train_y, "test_images": test_x, "test_labels": test_y}
    # decoded arrays (dtype, shape, bytes) named after their files: a .gz and a plain copy agree
    fingerprint = array_fingerprint("idx", {FASHION_FILES[k]: (a,) for k, a in arrays.items()})
    return Source(
        train=ArrayDataset(torch.from_numpy(train_x).unsqueeze(1), train_y),
        test=ArrayDataset(torch.from_numpy(test_x).unsqueeze(1), test_y),
        class_names=list(FASHION_CLASSES),
        input_size=(1, h, w),
        mean=FASHION_MEAN,
        std=FASHION_STD,
        pad=2,
        flip=True,
        fingerprint=fingerprint,
    )


def _load_cifar_source(cfg: DataConfig, num_classes: int) -> Source:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
    base = _root(cfg) or DEFAULT_DOWNLOAD_ROOT.expanduser()
    if base.name == cls.base_folder:  # root pointing at the extracted folder itself
        base = base.parent
    try:
        train = cls(str(base), train=True, download=cfg.download)
        test = cls(str(base), train=False, download=False)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(
            f"CIFAR-{num_classes} not found or corrupt in {base / cls.base_folder} ({e}). Fix: set root to "
            f"the directory that contains {cls.base_folder}/ (torchvision's python format), or set "
            "download=True when online."
        ) from e

    folder = base / cls.base_folder
    names = [name for name, _md5 in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    try:
        fingerprint = file_fingerprint("cifar_files", {name: folder / name for name in names})
    except OSError as e:
        raise DataError(f"cannot read CIFAR-{num_classes} file in {folder}: {e}") from e

    def to_dataset(ds: torchvision.datasets.CIFAR10) -> ArrayDataset:
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        return ArrayDataset(images, np.asarray(ds.targets, dtype=np.int64))

    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    return Source(
        train=to_dataset(train),
        test=to_dataset(test),
        class_names=list(train.classes),
        input_size=(3, 32, 32),
        mean=mean,
        std=std,
        pad=4,
        flip=True,
        fingerprint=fingerprint,
    )


def load_cifar10_source(cfg: DataConfig) -> Source:
    """CIFAR-10 in torchvision's format under ``root``."""
    return _load_cifar_source(cfg, 10)


def load_cifar100_source(cfg: DataConfig) -> Source:
    """CIFAR-100 in torchvision's format under ``root``."""
    return _load_cifar_source(cfg, 100)


def load_image_folder_source(cfg: DataConfig) -> Source:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` images, decoded once into a cache if small."""
    root = _root(cfg)
    if root is None:
        raise ConfigError("dataset 'image_folder' needs root=<directory with train/ and test/>")
    if not root.is_dir():
        raise DataError(f"image folder root {root} does not exist")
    train, test = scan_split(root / "train"), scan_split(root / "test")
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise DataError(
            f"class folders of {train.directory} and {test.directory} differ: only in train: {only_train}, "
            f"only in test: {only_test}"
        )
    size = (cfg.image_size, cfg.image_size) if cfg.image_size else image_size_of(train.paths[0])
    array = load_or_build_cache(root, train.paths + test.paths, train.stats + test.stats, size, cfg.image_size)
    if array is not None:
        images, n = torch.from_numpy(array), len(train.paths)
        train_ds: ArrayDataset | ImageFolderDataset = ArrayDataset(images[:n], train.labels)
        test_ds: ArrayDataset | ImageFolderDataset = ArrayDataset(images[n:], test.labels)
    else:
        train_ds = ImageFolderDataset(train.paths, train.labels, size, cfg.image_size)
        test_ds = ImageFolderDataset(test.paths, test.labels, size, cfg.image_size)
    return Source(
        train=train_ds,
        test=test_ds,
        class_names=train.classes,
        input_size=(3, *size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pad=min(size) // 8,
        flip=True,
        fingerprint=folder_fingerprint([train, test]),
    )


SOURCES: dict[str, Callable[[DataConfig], Source]] = {
    "digits": load_digits_source,
    "fashion_mnist": load_fashion_mnist_source,
    "cifar10": load_cifar10_source,
    "cifar100": load_cifar100_source,
    "image_folder": load_image_folder_source,
}
