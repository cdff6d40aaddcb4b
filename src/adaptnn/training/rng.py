"""The RNG-state codec of checkpoints: Python, NumPy, torch and CUDA generator states as JSON + tensors.

A resumed run must draw the same augmentation as an uninterrupted one, so every checkpoint carries the
state of every generator. Safetensors holds tensors only: what is small and structured goes to the JSON
metadata, the large key arrays go to tensors.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["capture_rng_state", "preserved_rng", "restore_rng_state"]


def capture_rng_state() -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The generators' states now: ``(json_part, tensors)`` for a checkpoint's metadata and tensor sections."""
    np_state = np.random.get_state()
    json_part = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[2], np_state[3], np_state[4]],
    }
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    return json_part, tensors


def restore_rng_state(json_part: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Set every generator to what :func:`capture_rng_state` returned (CUDA devices absent from it are left alone)."""
    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda{i}"], i)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block and put every generator back as it was (work that must not shift a run's random stream)."""
    json_part, tensors = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(json_part, tensors)
