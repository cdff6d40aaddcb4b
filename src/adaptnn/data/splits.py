"""Validation split and the :func:`build_datasets` entry point."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from adaptnn.errors import ConfigError

from .config import DataConfig, check_name, check_val_size
from .sources import SOURCES
from .transforms import make_transforms, resized_crop_transforms

__all__ = ["DataSplits", "build_datasets", "carve_validation", "validation_count"]

logger = logging.getLogger(__name__)


def validation_count(n_train: int, val_size: float | int) -> int:
    """Number of validation samples that ``val_size`` (fraction or count) takes from ``n_train``.

    Raises:
        ConfigError: ``val_size`` is malformed or leaves no training or no validation samples.
    """
    check_val_size(val_size)
    if isinstance(val_size, float) and val_size < 1:
        count = round(val_size * n_train)
    else:
        count = int(val_size)
    if count < 1:
        raise ConfigError(f"val_size={val_size!r} of {n_train} training samples gives an empty validation set")
    if count >= n_train:
        raise ConfigError(
            f"val_size={val_size!r} takes {count} of {n_train} training samples; it must leave some to train on"
        )
    return count


def carve_validation(n_train: int, val_size: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n_train)`` into sorted (train, validation) index arrays by a seeded permutation."""
    count = validation_count(n_train, val_size)
    perm = np.random.default_rng(seed).permutation(n_train)
    return np.sort(perm[count:]), np.sort(perm[:count])


@dataclass
class DataSplits:
    """Train/validation/test datasets of one :class:`DataConfig`.

    Each item is ``(float32 image [C, H, W] normalised with mean/std, int label)``. ``val`` is carved
    from the training set (``val_indices`` index the original training set) and, like ``test``, uses
    evaluation transforms; ``train`` holds the remaining training samples with training transforms.
    ``fingerprint`` identifies the loaded samples (:mod:`adaptnn.data.fingerprint`); None when unknown.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_size: tuple[int, int, int]
    class_names: list[str]
    val_indices: list[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    seed: int = 0
    val_size: float | int = field(default=0.1)
    fingerprint: dict[str, Any] | None = None

    def split_info(self) -> dict[str, Any]:
        """Return a JSON-serialisable description of the split (with the data's fingerprint), saved with every run."""
        info: dict[str, Any] = {
            "dataset": self.name,
            "seed": self.seed,
            "val_size": self.val_size,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "num_classes": self.num_classes,
            "input_size": list(self.input_size),
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "val_indices": [int(i) for i in self.val_indices],
        }
        if self.fingerprint is not None:
            info["fingerprint"] = self.fingerprint
        return info


def build_datasets(cfg: DataConfig) -> DataSplits:
    """Load the dataset ``cfg`` names and split it into train/validation/test.

    Args:
        cfg: Which dataset, where its files are, the validation split and augmentation.

    Returns:
        The three datasets with their metadata.

    Raises:
        ConfigError: Unknown dataset name or an impossible ``val_size``.
        DataError: The dataset's files are missing, empty or corrupt.
    """
    if not isinstance(cfg, DataConfig):
        raise ConfigError(f"build_datasets needs a DataConfig, got {type(cfg).__name__}")
    source = SOURCES[check_name(cfg.name)](cfg)
    train_idx, val_idx = carve_validation(len(source.train), cfg.val_size, cfg.seed)
    input_size = tuple(source.input_size)
    if cfg.crop_size is not None:  # the standard ImageNet transforms; the model sees crop_size squares
        if cfg.crop_size > min(source.input_size[1:]):
            raise ConfigError(
                f"crop_size={cfg.crop_size} is larger than the {cfg.name} images ({source.input_size[1]}x"
                f"{source.input_size[2]}); use a crop_size <= {min(source.input_size[1:])} or a larger image_size"
            )
        train_tf, eval_tf = resized_crop_transforms(cfg.crop_size, source.mean, source.std, augment=cfg.augment)
        input_size = (source.input_size[0], cfg.crop_size, cfg.crop_size)
    else:
        train_tf, eval_tf = make_transforms(
            source.input_size[1:], source.mean, source.std, augment=cfg.augment, pad=source.pad, flip=source.flip
        )
    splits = DataSplits(
        train=source.train.view(train_idx, train_tf),
        val=source.train.view(val_idx, eval_tf),
        test=source.test.view(None, eval_tf),
        num_classes=len(source.class_names),
        input_size=input_size,
        class_names=source.class_names,
        val_indices=val_idx.tolist(),
        mean=tuple(source.mean),
        std=tuple(source.std),
        name=cfg.name,
        seed=cfg.seed,
        val_size=cfg.val_size,
        fingerprint=source.fingerprint,
    )
    logger.info(
        "dataset %s: %d train / %d val / %d test, input %s, %d classes",
        cfg.name, len(splits.train), len(splits.val), len(splits.test), splits.input_size, splits.num_classes,
    )  # fmt: skip
    return splits
