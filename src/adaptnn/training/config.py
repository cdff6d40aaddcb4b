"""The Trainer's settings (:class:`TrainConfig`) and the strategy they name (:func:`build_strategy`)."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import AdaptnnError, ConfigError
from ..strategies import Strategy, available, get

__all__ = [
    "CurriculumConfig",
    "TeacherConfig",
    "TrainConfig",
    "build_strategy",
    "check_choice",
    "check_device",
    "check_flag",
    "check_int",
    "check_number",
]


#: keys of one curriculum stage and their defaults
STAGE_KEYS: dict[str, Any] = {"size": None, "magnitude": 0.0, "share": 1.0}


@dataclass
class CurriculumConfig:
    """An EfficientTrain-style curriculum: stages of growing input size and augmentation (off when ``stages`` is empty).

    Attributes:
        stages: in order, each ``{size, magnitude, share}``: ``size`` the input's side in pixels (``null`` = the
            data's full size; a pair ``[h, w]`` also works), ``magnitude`` in [0, 1] the strength of the batch
            augmentation (:func:`adaptnn.data.transforms.jitter_batch`, on top of the data's own), ``share`` the
            stage's relative share of the run (default 1).
        mode: ``"lowpass"`` (keep the low-frequency window of the 2-D FFT, EfficientTrain) or ``"resize"``
            (antialiased bilinear).
        balance: ``"time"``: the stages' steps are chosen so each costs ``share`` of the *measured* wall time
            (step time measured per stage at the start of the run, or ``step_ms``); ``"steps"``: each gets
            ``share`` of the steps. The run's total steps stay ``epochs x steps per epoch`` either way.
        step_ms: given milliseconds per training step of each stage (skips the measurement); ``null``: measure.
    """

    stages: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "lowpass"
    balance: str = "time"
    step_ms: list[float] | None = None

    @property
    def enabled(self) -> bool:
        """Whether a curriculum is configured (at least one stage)."""
        return bool(self.stages)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        if not isinstance(self.stages, list):
            raise ConfigError(f"train.curriculum.stages must be a list of stages, got {_show(self.stages)}")
        for i, stage in enumerate(self.stages):
            where = f"train.curriculum.stages[{i}]"
            if not isinstance(stage, dict):
                raise ConfigError(f"{where} must be a mapping with keys {list(STAGE_KEYS)}, got {_show(stage)}")
            unknown = sorted(set(stage) - set(STAGE_KEYS), key=str)
            if unknown:
                raise ConfigError(f"{where} has unknown key(s) {unknown}; valid keys: {list(STAGE_KEYS)}")
            size = stage.get("size")
            if isinstance(size, list):
                if len(size) != 2:
                    raise ConfigError(f"{where}.size must be an integer, [h, w] or null, got {_show(size)}")
                for j, side in enumerate(size):
                    check_int(f"{where}.size[{j}]", side, 1)
            elif size is not None:
                check_int(f"{where}.size", size, 1)
            check_number(f"{where}.magnitude", stage.get("magnitude", 0.0), 0, 1)
            check_number(f"{where}.share", stage.get("share", 1.0), 0, low_open=True)
        check_choice("train.curriculum.mode", self.mode, ("lowpass", "resize"))
        check_choice("train.curriculum.balance", self.balance, ("time", "steps"))
        if self.step_ms is not None:
            if not isinstance(self.step_ms, list) or len(self.step_ms) != len(self.stages):
                raise ConfigError(
                    f"train.curriculum.step_ms must be null or one time per stage ({len(self.stages)}), "
                    f"got {_show(self.step_ms)}"
                )
            for i, ms in enumerate(self.step_ms):
                check_number(f"train.curriculum.step_ms[{i}]", ms, 0, low_open=True)


@dataclass
class TeacherConfig:
    """The model's own weights as a distillation teacher (for the ``distill`` strategy with ``teacher: model``).

    The teacher is the ensemble (mean of softened predictions) of every source configured here; it is frozen.

    Attributes:
        ema_decay: keep an exponential moving average of the weights with this decay per step (``null``: none).
        snapshot_epochs: after these epochs (1-based) the weights are kept (``checkpoints/epoch<N>.safetensors``)
            and join the teacher: a snapshot ensemble.
        checkpoints: weights of earlier checkpoints (``.safetensors`` of the same model) that teach from the start.
    """

    ema_decay: float | None = None
    snapshot_epochs: list[int] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        """Whether any teacher source is configured."""
        return self.ema_decay is not None or bool(self.snapshot_epochs) or bool(self.checkpoints)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        if self.ema_decay is not None:
            check_number("train.teacher.ema_decay", self.ema_decay, 0, 1, low_open=True, high_open=True)
        if not isinstance(self.snapshot_epochs, list):
            raise ConfigError(
                f"train.teacher.snapshot_epochs must be a list of epochs, got {_show(self.snapshot_epochs)}"
            )
        for i, epoch in enumerate(self.snapshot_epochs):
            check_int(f"train.teacher.snapshot_epochs[{i}]", epoch, 1)
        if not isinstance(self.checkpoints, list) or not all(isinstance(p, str) for p in self.checkpoints):
            raise ConfigError(f"train.teacher.checkpoints must be a list of paths, got {_show(self.checkpoints)}")


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        epochs: passes over the training split.
        batch_size: samples per step.
        optimizer: ``"sgd"`` (momentum, Nesterov by default) or ``"adamw"``.
        lr: peak learning rate (reached after warm-up).
        momentum: SGD momentum (AdamW uses its default betas).
        nesterov: SGD with Nesterov momentum (``true``, the default) or plain heavy-ball momentum (``false``, as
            the MSDNet / BoostNet / L2W / IMTA reference recipes); ignored when ``momentum`` is 0 and for AdamW.
        weight_decay: decoupled for AdamW, L2 for SGD.
        weight_decay_norm_bias: also decay biases and norm weights (every parameter of dimension <= 1);
            ``false`` (the default) decays only weight matrices and kernels; the reference recipes decay all.
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        lr_schedule: after warm-up, ``"cosine"`` (decay to ``min_lr_ratio`` x ``lr`` at the end) or
            ``"multistep"`` (multiply by ``lr_gamma`` at each epoch of ``lr_milestones``; ``min_lr_ratio`` unused).
        lr_milestones: epochs (fractions allowed, increasing) at which the multistep schedule decays the lr.
        lr_gamma: the multistep decay factor, in (0, 1].
        min_lr_ratio: final learning rate as a fraction of ``lr`` at the end of the cosine.
        exit_weights: ``"uniform"``, ``"linear"`` or a list: per-exit loss weights of the strategy (when it
            takes weights and ``strategy_options`` does not set them).
        label_smoothing: cross-entropy label smoothing (same rule).
        seed: seeds weights' init order, data order and augmentation.
        num_workers: DataLoader worker processes.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:i]"``.
        progress: show a progress bar.
        strategy: training strategy name (``adaptnn.strategies.available()``).
        strategy_options: keyword options of the strategy, e.g. ``{r: 0.5}`` for ``boost``.
        grad_accum_steps: micro-batches per optimizer step (per process); ``batch_size`` stays the global batch.
        precision: ``"fp32"`` or ``"bf16"`` (autocast to bfloat16; for GPUs, slow on CPUs).
        channels_last: convert the model and 4-D inputs to channels-last memory format.
        compile: ``torch.compile`` the training forward pass.
        distributed: ``"auto"`` (DDP when launched by torchrun with more than one process) or ``"off"``.
        tensorboard: also write TensorBoard scalars to ``run_dir/tensorboard`` (needs the tensorboard package).
        curriculum: input-size and augmentation curriculum (:class:`CurriculumConfig`; off by default).
        teacher: the model's EMA / earlier checkpoints as distillation teacher (:class:`TeacherConfig`).
    """

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    weight_decay_norm_bias: bool = False
    warmup_epochs: float = 1.0
    lr_schedule: str = "cosine"
    lr_milestones: list[float] = field(default_factory=list)
    lr_gamma: float = 0.1
    min_lr_ratio: float = 0.0
    exit_weights: str | list[float] = "uniform"
    label_smoothing: float = 0.0
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    progress: bool = True
    strategy: str = "joint"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    grad_accum_steps: int = 1
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    distributed: str = "auto"
    tensorboard: bool = False
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field, the value received and what is expected.

        Checks every field's type and range, and builds the strategy once (its options are checked by its
        constructor), so a bad config fails before anything is written or trained.
        """
        check_int("train.epochs", self.epochs, 1)
        check_int("train.batch_size", self.batch_size, 1)
        check_choice("train.optimizer", self.optimizer, ("sgd", "adamw"))
        check_number("train.lr", self.lr, 0, low_open=True)
        check_number("train.momentum", self.momentum, 0, 1, high_open=True)
        check_flag("train.nesterov", self.nesterov)
        check_number("train.weight_decay", self.weight_decay, 0)
        check_flag("train.weight_decay_norm_bias", self.weight_decay_norm_bias)
        check_number("train.warmup_epochs", self.warmup_epochs, 0)
        check_choice("train.lr_schedule", self.lr_schedule, ("cosine", "multistep"))
        _milestones("train.lr_milestones", self.lr_milestones, self.epochs)
        check_number("train.lr_gamma", self.lr_gamma, 0, 1, low_open=True)
        if self.lr_schedule == "multistep" and not self.lr_milestones:
            raise ConfigError("train.lr_schedule='multistep' needs train.lr_milestones (epochs), got []")
        check_number("train.min_lr_ratio", self.min_lr_ratio, 0, 1)
        _exit_weights("train.exit_weights", self.exit_weights)
        check_number("train.label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        check_int("train.seed", self.seed, 0, 2**64 - 1)
        check_int("train.num_workers", self.num_workers, 0)
        check_device("train.device", self.device)
        check_flag("train.progress", self.progress)
        check_choice("train.strategy", self.strategy, tuple(available()))
        if not isinstance(self.strategy_options, dict) or not all(isinstance(k, str) for k in self.strategy_options):
            raise ConfigError(
                f"train.strategy_options must be a mapping of option names, got {_show(self.strategy_options)}"
            )
        check_int("train.grad_accum_steps", self.grad_accum_steps, 1)
        if self.batch_size < self.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is the global batch; it must be >= grad_accum_steps="
                f"{self.grad_accum_steps} (each step is split into that many micro-batches)"
            )
        check_choice("train.precision", self.precision, ("fp32", "bf16"))
        check_flag("train.channels_last", self.channels_last)
        check_flag("train.compile", self.compile)
        check_choice("train.distributed", self.distributed, ("auto", "off"))
        check_flag("train.tensorboard", self.tensorboard)
        for name, kind in (("curriculum", CurriculumConfig), ("teacher", TeacherConfig)):
            if isinstance(getattr(self, name), dict):  # built from a plain dict (e.g. TrainConfig(**asdict(...)))
                setattr(self, name, dataclass_from_mapping(kind, getattr(self, name), f"train.{name}"))
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"train.{name} must be a mapping, got {_show(getattr(self, name))}")
        self.curriculum.validate()
        self.teacher.validate()
        if self.teacher.enabled and not (
            self.strategy == "distill" and self.strategy_options.get("teacher") == "model"
        ):
            raise ConfigError(
                "train.teacher is set but nothing uses it: the teacher teaches the 'distill' strategy with "
                f"strategy_options.teacher='model', got strategy={self.strategy!r}, options={self.strategy_options}"
            )
        if "weights" in self.strategy_options:
            _exit_weights("train.strategy_options.weights", self.strategy_options["weights"])
        try:
            build_strategy(self)
        except AdaptnnError:
            raise
        except (TypeError, ValueError, ArithmeticError) as err:  # a constructor choking on a wrongly typed option
            raise ConfigError(f"train.strategy_options for {self.strategy!r}: {err}") from None


def dataclass_from_mapping(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls(**data)`` with unknown keys refused by name (a config sub-section given as a plain dict)."""
    known = {f for f in cls.__dataclass_fields__}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} in {where}; valid keys: {sorted(known)}")
    return cls(**data)


def _show(value: object) -> str:
    """``value``'s repr (shortened) and type, for messages."""
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an integer (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {_show(value)}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be {bound}, got {value}")


def check_number(
    name: str,
    value: object,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number (not a bool) within the bounds given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {_show(value)}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        raise ConfigError(f"{name} is out of range: an integer of {len(str(value))} digits") from None
    if not finite:
        raise ConfigError(f"{name} must be finite, got {value}")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        bound = f"in {left}{low}, {high}{right}" if high is not None else f"{'>' if low_open else '>='} {low}"
        raise ConfigError(f"{name} must be {bound}, got {value}")


def check_flag(name: str, value: object) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {_show(value)}")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {_show(value)}")


def check_device(name: str, value: object) -> None:
    """Raise :class:`ConfigError` unless ``value`` is ``"auto"`` or a device string torch parses (not its presence)."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be 'auto', 'cpu' or 'cuda[:i]', got {_show(value)}")
    if value != "auto":
        try:
            torch.device(value)
        except (RuntimeError, ValueError, TypeError):
            raise ConfigError(f"{name} must be 'auto', 'cpu' or 'cuda[:i]', got {value!r}") from None


def _milestones(name: str, value: object, epochs: int) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a strictly increasing list of epochs in (0, ``epochs``)."""
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be a list of epochs, got {_show(value)}")
    for i, epoch in enumerate(value):
        check_number(f"{name}[{i}]", epoch, 0, epochs, low_open=True, high_open=True)
    if any(b <= a for a, b in zip(value[:-1], value[1:], strict=True)):
        raise ConfigError(f"{name} must be strictly increasing, got {value}")


def _exit_weights(name: str, value: object) -> None:
    if isinstance(value, str):
        check_choice(name, value, ("uniform", "linear"))
        return
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{name} must be 'uniform', 'linear' or a non-empty list of weights, got {_show(value)}")
    for i, w in enumerate(value):
        check_number(f"{name}[{i}]", w, 0)
    if sum(value) <= 0:
        raise ConfigError(f"{name} must have a positive sum, got {list(value)}")


def build_strategy(config: TrainConfig) -> Strategy:
    """The strategy ``config.strategy`` with ``config.strategy_options``.

    ``exit_weights`` and ``label_smoothing`` of the config fill the strategy's ``weights`` and
    ``label_smoothing`` options when it takes them and the options do not set them.
    """
    options = dict(config.strategy_options)
    probe = get(config.strategy, **options)
    accepted = inspect.signature(type(probe)).parameters
    if "weights" in accepted and "weights" not in options:
        options["weights"] = config.exit_weights
    if "label_smoothing" in accepted and "label_smoothing" not in options:
        options["label_smoothing"] = config.label_smoothing
    return get(config.strategy, **options)
