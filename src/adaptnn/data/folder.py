"""Image-folder trees (``root/{train,test}/<class>/*``) and their decoded uint8 cache."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptnn.errors import DataError

from .datasets import load_image, open_image

__all__ = ["IMAGE_EXTENSIONS", "FolderSplit", "load_or_build_cache", "scan_split"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
CACHE_DIR_NAME = ".adaptnn_cache"
CACHE_MAX_IMAGES = 200_000
CACHE_MAX_BYTES = 4 << 30  # never build a cache bigger than 4 GiB
_CACHE_VERSION = "1"


@dataclass
class FolderSplit:
    """The image files of one split directory, sorted by class then file name.

    ``stats`` holds (size in bytes, mtime in ns) per file, for the cache key.
    """

    directory: Path
    classes: list[str]
    paths: list[str]
    labels: list[int]
    stats: list[tuple[int, int]]


def scan_split(directory: Path) -> FolderSplit:
    """List the images of ``directory/<class>/*`` (hidden entries ignored).

    Raises:
        DataError: The directory is missing, has no class folders, or a class folder has no images.
    """
    if not directory.is_dir():
        raise DataError(f"image folder {directory} does not exist (expected {directory}/<class>/<image>)")
    with os.scandir(directory) as it:
        classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {directory} has no class sub-directories (expected <class>/<image>)")
    split = FolderSplit(directory, classes, [], [], [])
    for label, name in enumerate(classes):
        with os.scandir(directory / name) as it:
            entries = sorted(
                (e for e in it if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
                 and not e.name.startswith(".") and e.is_file()),
                key=lambda e: e.name,
            )  # fmt: skip
        if not entries:
            raise DataError(
                f"class folder {directory / name} has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        for e in entries:
            st = e.stat()
            split.paths.append(e.path)
            split.stats.append((st.st_size, st.st_mtime_ns))
        split.labels += [label] * len(entries)
    return split


def image_size_of(path: str | Path) -> tuple[int, int]:
    """Return (H, W) of an image from its header (no full decode)."""
    with open_image(path) as img:
        return img.size[1], img.size[0]


def _cache_key(root: Path, paths: list[str], stats: list[tuple[int, int]], image_size: int | None) -> str:
    digest = hashlib.sha256(f"v{_CACHE_VERSION} size={image_size}\n".encode())
    prefix = len(str(root)) + 1
    for p, (n_bytes, mtime) in zip(paths, stats, strict=True):
        digest.update(f"{p[prefix:]}\t{n_bytes}\t{mtime}\n".encode())
    return digest.hexdigest()[:20]


def _decode_all(paths: list[str], size: tuple[int, int], image_size: int | None) -> np.ndarray:
    out = np.empty((len(paths), 3, *size), dtype=np.uint8)

    def decode(i: int) -> None:
        array = load_image(paths[i], image_size)
        if array.shape[:2] != size:
            raise DataError(
                f"image {paths[i]} is {array.shape[1]}x{array.shape[0]}, expected {size[1]}x{size[0]} "
                "like the others; set DataConfig.image_size to resize all images"
            )
        out[i] = array.transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(len(paths)), chunksize=256))
    return out


def load_or_build_cache(
    root: Path,
    paths: list[str],
    stats: list[tuple[int, int]],
    size: tuple[int, int],
    image_size: int | None,
) -> np.ndarray | None:
    """Return all ``paths`` decoded as uint8 [N, 3, H, W], from/into ``root/.adaptnn_cache``.

    The cache file name holds a hash of the file list (paths under ``root``) with their ``stats``
    (size, mtime_ns), so any change of the tree rebuilds it; stale cache files of the same
    ``image_size`` are then removed.

    Returns:
        The array, or None when the tree is too big to cache (then the caller reads images lazily).
        When ``root`` is not writable the decoded array is returned without being saved.
    """
    n_bytes = len(paths) * 3 * size[0] * size[1]
    if len(paths) > CACHE_MAX_IMAGES or n_bytes > CACHE_MAX_BYTES:
        logger.info("image folder %s: %d images (%d MB) too big to cache", root, len(paths), n_bytes >> 20)
        return None
    cache_dir = root / CACHE_DIR_NAME
    prefix = f"images-{image_size or 'orig'}-"
    cache_file = cache_dir / f"{prefix}{_cache_key(root, paths, stats, image_size)}.npy"
    if cache_file.is_file():
        try:
            array = np.load(cache_file)
            if array.shape == (len(paths), 3, *size) and array.dtype == np.uint8:
                logger.info("image folder %s: loaded decoded cache %s", root, cache_file)
                return array
        except (OSError, ValueError, EOFError) as e:
            logger.warning("ignoring unreadable cache %s: %s", cache_file, e)
    start = time.perf_counter()
    array = _decode_all(paths, size, image_size)
    logger.info("image folder %s: decoded %d images in %.1fs", root, len(paths), time.perf_counter() - start)
    tmp = cache_dir / f".tmp-{os.getpid()}-{cache_file.name}"
    try:
        cache_dir.mkdir(exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, cache_file)
    except OSError as e:
        logger.info("image folder %s: not caching decoded images (%s)", root, e)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return array
    for stale in cache_dir.glob(f"{prefix}*.npy"):
        if stale != cache_file:
            with contextlib.suppress(OSError):
                stale.unlink()
    logger.info("image folder %s: wrote decoded cache %s", root, cache_file)
    return array
