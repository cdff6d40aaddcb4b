"""Where and from which seed a run starts: the device a config names and one seed for every RNG."""

from __future__ import annotations

import ctypes
import os
import platform
import random

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["keep_freed_memory", "resolve_device", "seed_everything"]

#: glibc's own switches for the same settings; a user who sets one keeps the allocator as they chose
GLIBC_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # the largest glibc accepts on 64-bit platforms


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; otherwise ``torch.device(device)`` (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"invalid device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of handing it back to the OS (process-wide).

    By default glibc serves large blocks by ``mmap`` below a threshold that moves with the allocation history, and
    trims the top of its heap, so a training step's activations can be returned to the OS when the step frees them
    and faulted in again (zeroed page by page) in the next step. PyTorch's CUDA allocator caches freed blocks for
    this reason; on CPU the Trainer asks glibc for the same: a fixed 32 MiB ``mmap`` threshold (the largest glibc
    allows) and no trimming. Measured on an elastic family trained member by member (``benchmarks/elastic.py``,
    1,700 steps): 8.1M minor page faults and 1.18x the separate members' CPU time by default, 21k faults and 1.03x
    with this. Returns ``False`` (and changes nothing) off glibc or when ``MALLOC_TRIM_THRESHOLD_`` /
    ``MALLOC_MMAP_THRESHOLD_`` is set: setting one of them (e.g. ``MALLOC_TRIM_THRESHOLD_=131072``, glibc's default)
    is how to keep glibc's own behaviour.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in GLIBC_MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
