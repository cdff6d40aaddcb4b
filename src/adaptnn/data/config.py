"""Dataset configuration (:class:`DataConfig`) and the registry of dataset names."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from adaptnn.errors import ConfigError

__all__ = ["DATASET_NAMES", "DataConfig", "check_name", "list_datasets"]

DATASET_NAMES: tuple[str, ...] = ("digits", "fashion_mnist", "cifar10", "cifar100", "image_folder")


def list_datasets() -> list[str]:
    """Return the names accepted by ``DataConfig.name``."""
    return list(DATASET_NAMES)


def check_name(name: object) -> str:
    """Return ``name`` if it is a known dataset, else raise ConfigError with close matches."""
    if isinstance(name, str) and name in DATASET_NAMES:
        return name
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name.lower().replace("-", "_"), DATASET_NAMES, n=2, cutoff=0.5)
        if close:
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?"
    raise ConfigError(f"unknown dataset name {name!r}; valid names: {', '.join(DATASET_NAMES)}.{hint}")


def check_val_size(val_size: object) -> None:
    """Validate the form of ``val_size`` (the range check against the set size is done later)."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ConfigError(f"val_size must be a fraction in (0, 1) or a count >= 1, got {val_size!r}")
    if not math.isfinite(val_size) or val_size <= 0:
        raise ConfigError(f"val_size must be > 0 (a fraction in (0, 1) or a count >= 1), got {val_size!r}")
    if isinstance(val_size, float) and val_size >= 1 and not val_size.is_integer():
        raise ConfigError(
            f"val_size={val_size!r} is neither a fraction in (0, 1) nor a whole count; "
            "use e.g. 0.1 (10%) or 5000 (samples)"
        )


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to load and how to split/augment it.

    Attributes:
        name: One of :func:`list_datasets` ("digits", "fashion_mnist", "cifar10", "cifar100",
            "image_folder").
        root: Directory holding the data files; its meaning depends on the dataset.
        val_size: Validation split carved from the training set: a fraction in (0, 1) or a count >= 1.
        seed: Seed of the validation split (and of the digits train/test split).
        augment: Whether training samples are augmented.
        download: Allow torchvision downloads (fashion_mnist, cifar10/100) when online.
        image_size: image_folder only: resize images to this square size; None keeps the size
            (all images must then share one size).
        crop_size: the standard ImageNet transforms instead of pad-and-crop: training takes a random-resized
            crop (8-100% of the area, aspect 3/4-4/3) of ``crop_size`` pixels and a random flip; evaluation
            resizes the shorter side to ``round(crop_size / 0.875)`` and takes the central ``crop_size``
            (:func:`adaptnn.data.transforms.resized_crop_transforms`). The model input is then
            ``crop_size`` square. None (the default): the dataset's own transforms at its full size.
    """

    name: str = "digits"
    root: str | None = None
    val_size: float | int = 0.1
    seed: int = 0
    augment: bool = True
    download: bool = False
    image_size: int | None = None
    crop_size: int | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        check_val_size(self.val_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.image_size is not None and (
            isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1
        ):
            raise ConfigError(f"image_size must be a positive integer or None, got {self.image_size!r}")
        if self.crop_size is not None and (
            isinstance(self.crop_size, bool) or not isinstance(self.crop_size, int) or self.crop_size < 1
        ):
            raise ConfigError(f"crop_size must be a positive integer or None, got {self.crop_size!r}")
        if self.root is not None and not isinstance(self.root, str):
            object.__setattr__(self, "root", str(self.root))  # accept pathlib.Path
