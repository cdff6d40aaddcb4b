"""Map-style datasets over in-memory arrays or lazily read image files.

Both classes are *views*: :meth:`view` returns a dataset sharing the same storage with other indices
and another transform, which is how train/validation splits read one training array with different
transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from adaptnn.errors import DataError

__all__ = ["ArrayDataset", "ImageFolderDataset", "load_image"]

Transform = Callable[[torch.Tensor], torch.Tensor]


class _ViewDataset(Dataset):
    """Shared index/transform/label handling of the datasets below."""

    def __init__(
        self, labels: Sequence[int] | np.ndarray, transform: Transform | None, indices: Sequence[int] | None
    ) -> None:
        self._labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.indices = np.arange(len(self._labels)) if indices is None else np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        """Labels of the samples of this view, in order."""
        return self._labels[self.indices]

    def _load(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for dataset of size {len(self)}")
        i = int(self.indices[idx])
        image = self._load(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self._labels[i])


class ArrayDataset(_ViewDataset):
    """Samples ``(transform(images[i]), labels[i])`` from an in-memory tensor.

    Args:
        images: Tensor [N, C, H, W] (uint8 or float).
        labels: N integer labels.
        transform: Applied to each [C, H, W] image; None returns the stored tensor.
        indices: Which of the N samples this dataset exposes (default: all).
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        transform: Transform | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        images = torch.as_tensor(images)
        if images.ndim != 4 or len(images) != len(labels):
            raise DataError(
                f"ArrayDataset needs images [N,C,H,W] and N labels, got {tuple(images.shape)} and {len(labels)}"
            )
        super().__init__(labels, transform, indices)
        self.images = images

    def _load(self, i: int) -> torch.Tensor:
        return self.images[i]

    def view(self, indices: Sequence[int] | None = None, transform: Transform | None = None) -> ArrayDataset:
        """Return a dataset over the same storage with other ``indices`` and ``transform``."""
        return ArrayDataset(self.images, self._labels, transform, indices)


def load_image(path: str | Path, image_size: int | None = None) -> np.ndarray:
    """Decode one image file to an RGB uint8 array [H, W, 3], resized to a square if asked.

    Raises:
        DataError: The file cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if image_size is not None and img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.array(img, dtype=np.uint8)  # a writable copy
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


class ImageFolderDataset(_ViewDataset):
    """Images read lazily from files, as RGB uint8 tensors [3, H, W].

    Args:
        paths: Image files.
        labels: One integer label per file.
        size: Expected (H, W) of every decoded image; a mismatch raises DataError.
        image_size: Resize every image to this square size (then ``size`` is (image_size, image_size)).
        transform: Applied to each [3, H, W] uint8 image.
        indices: Which files this dataset exposes (default: all).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | np.ndarray,
        size: tuple[int, int],
        image_size: int | None = None,
        transform: Transform | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise DataError(f"ImageFolderDataset got {len(paths)} paths but {len(labels)} labels")
        super().__init__(labels, transform, indices)
        self.paths = list(paths)
        self.size = tuple(size)
        self.image_size = image_size

    def _load(self, i: int) -> torch.Tensor:
        array = load_image(self.paths[i], self.image_size)
        if array.shape[:2] != self.size:
            raise DataError(
                f"image {self.paths[i]} is {array.shape[1]}x{array.shape[0]}, expected "
                f"{self.size[1]}x{self.size[0]}; set DataConfig.image_size to resize all images"
            )
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def view(self, indices: Sequence[int] | None = None, transform: Transform | None = None) -> ImageFolderDataset:
        """Return a dataset over the same files with other ``indices`` and ``transform``."""
        return ImageFolderDataset(self.paths, self._labels, self.size, self.image_size, transform, indices)
