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
    "TrainConfig",
    "build_strategy",
    "check_choice",
    "check_device",
    "check_flag",
    "check_int",
    "check_number",
]


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        epochs: passes over the training split.
        batch_size: samples per step.
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adamw"``.
        lr: peak learning rate (reached after warm-up).
        momentum: SGD momentum (AdamW uses its default betas).
        weight_decay: decoupled for AdamW, L2 for SGD; not applied to biases and norm weights.
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
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
    """

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
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
        check_number("train.weight_decay", self.weight_decay, 0)
        check_number("train.warmup_epochs", self.warmup_epochs, 0)
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
        if "weights" in self.strategy_options:
            _exit_weights("train.strategy_options.weights", self.strategy_options["weights"])
        try:
            build_strategy(self)
        except AdaptnnError:
            raise
        except (TypeError, ValueError, ArithmeticError) as err:  # a constructor choking on a wrongly typed option
            raise ConfigError(f"train.strategy_options for {self.strategy!r}: {err}") from None


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
