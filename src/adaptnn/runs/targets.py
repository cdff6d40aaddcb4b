"""Resolve what a speed/latency command should run: a trained run directory or a registered model.

* a **run directory** (``model.safetensors`` + ``config.yaml``): its weights; inputs from its test split;
  calibration inputs (for choosing thresholds) from its validation split. A target that looks like a path
  (it has a ``/`` or starts with ``.`` or ``~``) but is no run directory is reported as such, never looked
  up as a model name;
* a **model name** (registered, or ``timm:NAME`` / ``torchvision:NAME``): random weights (seeded); random
  Gaussian inputs of the model's (or the given) input size. Timing depends on the exit distribution,
  not on accuracy, so this is a fair way to time architectures whose trained weights are not available
  offline.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import AdaptnnError, ConfigError
from ..models import create_model, resolve_model_name
from ..runtime.staged import StagedModel
from .rundir import load_run

__all__ = ["Target", "build_named_model", "looks_like_path", "resolve_target"]

#: most elements of one random input tensor built for a model name (4 GiB of float32)
MAX_INPUT_ELEMENTS = 1 << 30
_MODEL_PREFIXES = ("timm:", "torchvision:", "tv:", "hf:")


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


def looks_like_path(target: str) -> bool:
    """Whether ``target`` names a file system path rather than a model (``timm:NAME``, ``hf:PATH`` are models)."""
    if target.startswith(_MODEL_PREFIXES):
        return False
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(sep in target for sep in seps) or target.startswith((".", "~"))


def build_named_model(name: str, factory: str, kwargs: dict[str, Any]) -> StagedModel:
    """``create_model(factory, **kwargs)``; a factory failing on the arguments given is a one-line ConfigError."""
    try:
        return create_model(factory, **kwargs)
    except AdaptnnError:
        raise
    except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as err:
        reason = " ".join(str(err).split())[:300].rstrip(".") or type(err).__name__
        raise ConfigError(f"model {name!r} could not be built with arguments {kwargs}: {reason}") from None


def _run_directory(path: Path, num_samples: int, *, trust_code: bool, allow_data_change: bool) -> Target:
    """The :class:`Target` of the run directory ``path`` (checked to be one, read like every run: :func:`load_run`)."""
    missing = [f for f in ("config.yaml", "model.safetensors") if not (path / f).is_file()]
    if missing:
        raise ConfigError(
            f"{path} is not a run directory (no {' or '.join(missing)}); train one with `adaptnn train --run_dir "
            f"{path}`, or pass a registered model name"
        )
    run = load_run(path, trust_code=trust_code, allow_data_change=allow_data_change)
    splits = run.splits
    return Target(str(path), run.model.eval(), _stack(splits.test, num_samples), _stack(splits.val, num_samples), path)


def resolve_target(
    target: str,
    *,
    num_samples: int = 256,
    input_size: list[int] | None = None,
    model_kwargs: dict | None = None,
    seed: int = 0,
    trust_code: bool = False,
    allow_data_change: bool = False,
) -> Target:
    """Build the :class:`Target` for a run directory or a registered model name (see the module docstring).

    ``trust_code`` and ``allow_data_change`` apply to a run directory, as in :func:`~adaptnn.runs.rundir.load_run`.

    Raises:
        ConfigError: a path that is no run directory, an unknown model, bad model arguments or sizes.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
    path = Path(target).expanduser()
    if path.is_dir():
        return _run_directory(path, num_samples, trust_code=trust_code, allow_data_change=allow_data_change)
    if looks_like_path(target):
        what = "a file, not a directory" if path.exists() else "no such directory"
        raise ConfigError(f"no run directory at {target} ({what}); give a run directory or a registered model name")
    factory, naming = resolve_model_name(target)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same random weights every run: the exit distribution depends on them
        model = build_named_model(target, factory, {**naming, **(model_kwargs or {})}).eval()
    shape = input_size or (list(model.input_spec.shape) if model.input_spec is not None else None)
    if shape is None or any(s is None for s in shape):
        raise ConfigError(f"model {target!r} has no fixed input size; pass input_size (e.g. [3, 224, 224])")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ConfigError(f"input_size must hold positive sizes, got {list(shape)}")
    if num_samples * math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ConfigError(
            f"{num_samples} samples of shape {list(shape)} are more than {MAX_INPUT_ELEMENTS} values; "
            "use fewer samples or a smaller input_size"
        )
    if model.input_spec is not None and model.input_spec.dtype_kind != "float":
        raise ConfigError(f"model {target!r} takes token ids; benchmark it from a run directory instead")
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, *shape, generator=gen)
    calibration = torch.randn(num_samples, *shape, generator=gen)
    return Target(target, model, inputs, calibration)
