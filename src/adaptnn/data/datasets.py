"""Map-style datasets over in-memory arrays or lazily read image files.

Both classes are *views*: :meth:`view` returns a dataset sharing the same storage with other indices
and another transform, which is how train/validation splits read one training array with different
transforms.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from adaptnn.errors import DataError

__all__ = ["ArrayDataset", "ImageFolderDataset", "load_image", "open_image"]

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


#: serialises the few microseconds of header parsing in which decompression-bomb warnings are errors:
#: ``warnings.catch_warnings`` swaps process-wide state, so threads decoding images must not interleave there
_OPEN_LOCK = threading.Lock()
_PIXELS = re.compile(r"\((\d+) pixels\)")


def _too_large(path: str | Path, pixels: int | None, size: tuple[int, int] | None, limit: int | None) -> DataError:
    what = f"{size[0]}x{size[1]} ({size[0] * size[1]:,} pixels)" if size else f"{pixels:,} pixels" if pixels else "huge"
    return DataError(
        f"image {path} is too large: {what}, above the limit of {limit or 0:,} pixels (a decompression bomb?); "
        "remove or shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine"
    )


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """``PIL.Image.open`` (header only) refusing images above ``PIL.Image.MAX_IMAGE_PIXELS`` pixels.

    PIL's decompression-bomb *warning* is an error here (locally: the process-wide warning filters and PIL's
    limit are left as they were), so no image larger than the limit is ever decoded.

    Raises:
        DataError: The file cannot be opened or is above the pixel limit (the message names the file and size).
    """
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = _PIXELS.search(str(e))
        raise _too_large(path, int(found.group(1)) if found else None, None, limit) from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    with img:
        if limit is not None and img.width * img.height > limit:  # explicit, whatever PIL's own checks do
            raise _too_large(path, None, img.size, limit)
        yield img


def load_image(path: str | Path, image_size: int | None = None) -> np.ndarray:
    """Decode one image file to an RGB uint8 array [H, W, 3], resized to a square if asked.

    Raises:
        DataError: The file cannot be decoded or is above the pixel limit (see :func:`open_image`).
    """
    with open_image(path) as img:
        try:
            rgb = img.convert("RGB")
            if image_size is not None and rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.array(rgb, dtype=np.uint8)  # a writable copy
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
