"""Run configuration: one dataclass tree, saved as YAML with every run and loaded back strictly.

``RunConfig`` groups the data, model, training, calibration and evaluation settings. ``to_dict`` /
``from_dict`` round-trip it through plain YAML; unknown keys raise :class:`ConfigError` naming the key,
its place in the tree and close matches, so a typo never silently falls back to a default.
:func:`quickstart_config` is the embedded default run (digits, 4-exit CNN).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..data import DataConfig
from ..errors import ConfigError
from ..io import atomic_write_text
from ..training import TrainConfig

__all__ = [
    "ModelConfig",
    "CalibrationConfig",
    "EvalConfig",
    "RunConfig",
    "load_config",
    "save_config",
    "quickstart_config",
    "dataclass_from_dict",
]


@dataclass
class ModelConfig:
    """Which registered model to build (``adaptnn.list_models()``) and its keyword arguments.

    ``num_classes`` is filled in from the dataset when the factory takes it and ``kwargs`` does not set it.
    """

    name: str = "mecnn_digits"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class CalibrationConfig:
    """How the operating point is chosen from the budgeted-batch sweep (on the validation split).

    Attributes:
        tolerance: largest validation-accuracy loss versus the last exit, as a fraction (0.01 = 1 point);
            the cheapest point within it is run for real.
        p_values: exit-distribution parameters of the sweep; default q/20 for q = 1..39.
    """

    tolerance: float = 0.01
    p_values: list[float] | None = None


@dataclass
class EvalConfig:
    """Evaluation settings: batch size of the logits pass and of the realised (timed) run, device."""

    batch_size: int = 256
    device: str = "auto"


@dataclass
class RunConfig:
    """Everything a run needs; saved as ``config.yaml`` in the run directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Strict inverse of :meth:`to_dict` (unknown keys raise :class:`ConfigError`)."""
        return dataclass_from_dict(cls, data)


def dataclass_from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, recursing into dataclass-typed fields.

    Raises:
        ConfigError: ``data`` is not a mapping, or holds a key ``cls`` does not have.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where or '<root>'!r} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        raise ConfigError(
            f"unknown config key {where + '.' if where else ''}{key!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; valid keys here: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        sub_cls = type(default()) if default is not None and dataclasses.is_dataclass(default()) else None
        if sub_cls is not None:
            kwargs[name] = dataclass_from_dict(sub_cls, value, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"config section {where or '<root>'!r}: {err}") from None


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run config (strict)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no config file at {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return RunConfig.from_dict(data or {})


def quickstart_config() -> RunConfig:
    """The embedded quickstart config (digits, 4-exit CNN) shipped inside the package."""
    text = resources.files("adaptnn").joinpath("configs/quickstart.yaml").read_text()
    return RunConfig.from_dict(yaml.safe_load(text))
