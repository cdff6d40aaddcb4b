"""A run directory: loading a trained run back, and writing its config once.

A run directory holds everything about one run::

    config.yaml              resolved RunConfig (refuses to be overwritten by a different config)
    splits.json              dataset, split sizes, seed and the validation indices
    metrics.jsonl            one line per epoch
    checkpoints/last.*       resumable training state (atomic safetensors + JSON)
    model.safetensors/.json  final weights + model spec
    calibration.json         budgeted-batch sweep on validation/test and the chosen operating point
    report.json/.png         anytime, budgeted and realised results
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import DataSplits, build_datasets
from ..errors import ConfigError
from ..models import load_model
from ..runtime.staged import StagedModel
from ..training import resolve_device
from .config import RunConfig, load_config, save_config

__all__ = ["LoadedRun", "load_run", "write_config_once", "config_diff"]


@dataclass
class LoadedRun:
    """A trained run read back: its config, final model, data splits and the evaluation device."""

    config: RunConfig
    model: StagedModel
    splits: DataSplits
    device: torch.device


def load_run(run_dir: str | Path) -> LoadedRun:
    """Read ``config.yaml`` and ``model.safetensors`` of ``run_dir`` and rebuild its datasets."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    model = load_model(run_dir / "model.safetensors")
    return LoadedRun(config, model, build_datasets(config.data), resolve_device(config.eval.device))


def write_config_once(config: RunConfig, run_dir: Path, overwrite: bool) -> None:
    """Write ``config.yaml``, refusing to replace a different config unless ``overwrite``.

    Raises:
        ConfigError: ``run_dir`` holds a run with another config; the message lists the first differences.
    """
    path = run_dir / "config.yaml"
    if path.exists() and not overwrite:
        existing = load_config(path).to_dict()
        if existing != config.to_dict():
            diff = config_diff(existing, config.to_dict())
            raise ConfigError(
                f"{run_dir} already holds a run with a different config ({'; '.join(diff[:5])}). Fix: choose "
                "another run_dir, restore the same config to resume, or pass overwrite=True (--overwrite) to "
                "start that run over"
            )
    save_config(config, path)


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``"section.key: old -> new"`` for every leaf that differs between two nested config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
