"""Run configuration: one dataclass tree, saved as YAML with every run and loaded back strictly.

``RunConfig`` groups the data, model, training, calibration and evaluation settings. ``to_dict`` /
``from_dict`` round-trip it through plain YAML; unknown keys raise :class:`ConfigError` naming the key,
its place in the tree and close matches, so a typo never silently falls back to a default.
:meth:`RunConfig.validate` checks every value of every section. :func:`load_config` reads YAML through
:func:`adaptnn.io.yamlfile.read_yaml` (size-limited, no anchors/aliases, plain values only) and validates it,
so a run directory's ``config.yaml`` is never trusted. :func:`quickstart_config` is the embedded default run
(digits, 4-exit CNN).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..calibration import check_p_values
from ..data import DataConfig
from ..errors import AdaptnnError, ConfigError
from ..io import atomic_write_text
from ..io.yamlfile import load_yaml_text, read_yaml, require_mapping
from ..models import list_models, model_accepts
from ..training import TrainConfig
from ..training.config import check_device, check_flag, check_int, check_number

__all__ = [
    "ModelConfig",
    "CalibrationConfig",
    "EvalConfig",
    "RunConfig",
    "load_config",
    "save_config",
    "quickstart_config",
    "dataclass_from_dict",
    "CONFIG_EXPECTED",
]

#: what a config file must hold, for error messages
CONFIG_EXPECTED = "a mapping of config sections (data, model, train, calibration, eval)"


@dataclass
class ModelConfig:
    """Which registered model to build (``adaptnn.list_models()``) and its keyword arguments.

    ``num_classes`` is filled in from the dataset when the factory takes it and ``kwargs`` does not set it.
    ``init_from`` names an adaptnn checkpoint (``.safetensors``) whose weights a new run starts from instead of
    the factory's initialisation (fine-tuning; IMTA's stage two starts an MSDNet with ``collaboration: inline``
    from a stage-one checkpoint of the plain architecture). A resumed run ignores it: its weights come from its
    own last checkpoint.
    """

    name: str = "mecnn_digits"
    kwargs: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an unregistered name or arguments its factory does not take."""
        if not isinstance(self.name, str) or self.name not in list_models():
            close = difflib.get_close_matches(str(self.name), list_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (see `adaptnn models`)"
            raise ConfigError(f"model.name must be a registered model, got {self.name!r}{hint}")
        if not isinstance(self.kwargs, dict) or not all(isinstance(k, str) for k in self.kwargs):
            raise ConfigError(f"model.kwargs must be a mapping of argument names, got {type(self.kwargs).__name__}")
        unknown = sorted(k for k in self.kwargs if not model_accepts(self.name, k))
        if unknown:
            raise ConfigError(f"model {self.name!r} does not take argument(s) {unknown} (model.kwargs)")
        try:
            json.dumps(self.kwargs, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.kwargs must be plain JSON values (saved with checkpoints): {err}") from None
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise ConfigError(f"model.init_from must be the path of a .safetensors checkpoint, got {self.init_from!r}")


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

    def validate(self) -> None:
        """Raise :class:`ConfigError` unless ``tolerance`` is in [0, 1) and ``p_values`` are finite and > 0."""
        check_number("calibration.tolerance", self.tolerance, 0, 1, high_open=True)
        if self.p_values is not None:
            if not isinstance(self.p_values, list) or not self.p_values:
                raise ConfigError(
                    f"calibration.p_values must be null or a non-empty list of numbers > 0, got {self.p_values!r}"
                )
            for i, p in enumerate(self.p_values):
                check_number(f"calibration.p_values[{i}]", p, 0, low_open=True)
            check_p_values(self.p_values)


@dataclass
class EvalConfig:
    """Evaluation settings: batch size of the logits pass and of the realised (timed) run, device."""

    batch_size: int = 256
    device: str = "auto"

    def validate(self) -> None:
        """Raise :class:`ConfigError` unless ``batch_size`` >= 1 and ``device`` is a device string."""
        check_int("eval.batch_size", self.batch_size, 1)
        check_device("eval.device", self.device)


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
        """Strict inverse of :meth:`to_dict` (unknown keys raise :class:`ConfigError`); see also :meth:`validate`."""
        return dataclass_from_dict(cls, data)

    def validate(self) -> RunConfig:
        """Check every section (types and ranges) before anything is written or trained; returns ``self``.

        Raises:
            ConfigError: the first invalid value, named by its place (``train.momentum``), with what was received
                and what is expected.
        """
        sections = {
            "data": DataConfig, "model": ModelConfig, "train": TrainConfig, "calibration": CalibrationConfig,
            "eval": EvalConfig,
        }  # fmt: skip
        for name, expected in sections.items():
            if not isinstance(getattr(self, name), expected):
                got = type(getattr(self, name)).__name__
                raise ConfigError(f"config section {name!r} must be a {expected.__name__}, got {got}")
        check_flag("data.augment", self.data.augment)
        check_flag("data.download", self.data.download)
        if self.data.root is not None and not isinstance(self.data.root, str):
            raise ConfigError(f"data.root must be a path or null, got {type(self.data.root).__name__}")
        self.model.validate()
        self.train.validate()
        self.calibration.validate()
        self.eval.validate()
        return self


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
    except AdaptnnError:
        raise
    except (TypeError, ValueError, ArithmeticError) as err:  # e.g. a section's own checks choking on a type
        raise ConfigError(f"config section {where or '<root>'!r}: {' '.join(str(err).split())}") from None


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config: strict keys, every value checked (:meth:`RunConfig.validate`).

    The file is untrusted (it may come from anyone's run directory): it is read with
    :func:`~adaptnn.io.yamlfile.read_yaml` (1 MiB at most, no anchors or aliases, plain values only).

    Raises:
        ConfigError: missing, empty, not a mapping, refused by the reader, an unknown key or an invalid value.
    """
    path = Path(path)
    data = require_mapping(read_yaml(path), str(path), CONFIG_EXPECTED)
    try:
        return RunConfig.from_dict(data).validate()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def quickstart_config() -> RunConfig:
    """The embedded quickstart config (digits, 4-exit CNN) shipped inside the package."""
    source = "configs/quickstart.yaml"
    text = resources.files("adaptnn").joinpath(source).read_text()
    return RunConfig.from_dict(require_mapping(load_yaml_text(text, source), source, CONFIG_EXPECTED)).validate()
