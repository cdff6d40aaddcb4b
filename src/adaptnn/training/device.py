"""Where and from which seed a run starts: the device a config names and one seed for every RNG."""

from __future__ import annotations

import random

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["resolve_device", "seed_everything"]


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
