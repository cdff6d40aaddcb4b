"""Resolve what a speed/latency command should run: a trained run directory or a registered model.

* a **run directory** (``model.safetensors`` + ``config.yaml``): its weights; inputs from its test split;
  calibration inputs (for choosing thresholds) from its validation split;
* a **model name** (registered, or ``timm:NAME`` / ``torchvision:NAME``): random weights (seeded); random
  Gaussian inputs of the model's (or the given) input size. Timing depends on the exit distribution,
  not on accuracy, so this is a fair way to time architectures whose trained weights are not available
  offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..data import build_datasets
from ..errors import ConfigError
from ..models import create_model, load_model, resolve_model_name
from ..runtime.staged import StagedModel
from .config import load_config

__all__ = ["Target", "resolve_target"]


@dataclass
class Target:
    """A model with inputs to time it on and separate inputs to calibrate its thresholds on."""

    name: str
    model: StagedModel
    inputs: Tensor
    calibration_inputs: Tensor
    run_dir: Path | None = None


def _stack(dataset, n: int) -> Tensor:
    n = min(n, len(dataset))
    return torch.stack([dataset[i][0] for i in range(n)])


def resolve_target(
    target: str,
    *,
    num_samples: int = 256,
    input_size: list[int] | None = None,
    model_kwargs: dict | None = None,
    seed: int = 0,
) -> Target:
    """Build the :class:`Target` for a run directory or a registered model name (see the module docstring)."""
    path = Path(target)
    if path.is_dir():
        config = load_config(path / "config.yaml")
        model = load_model(path / "model.safetensors").eval()
        splits = build_datasets(config.data)
        return Target(str(path), model, _stack(splits.test, num_samples), _stack(splits.val, num_samples), path)
    factory, naming = resolve_model_name(target)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same random weights every run: the exit distribution depends on them
        model = create_model(factory, **naming, **(model_kwargs or {})).eval()
    shape = input_size or (list(model.input_spec.shape) if model.input_spec is not None else None)
    if shape is None or any(s is None for s in shape):
        raise ConfigError(f"model {target!r} has no fixed input size; pass input_size (e.g. [3, 224, 224])")
    if model.input_spec is not None and model.input_spec.dtype_kind != "float":
        raise ConfigError(f"model {target!r} takes token ids; benchmark it from a run directory instead")
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, *shape, generator=gen)
    calibration = torch.randn(num_samples, *shape, generator=gen)
    return Target(target, model, inputs, calibration)
