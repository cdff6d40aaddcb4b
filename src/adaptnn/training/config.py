"""The Trainer's settings (:class:`TrainConfig`) and the strategy they name (:func:`build_strategy`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..strategies import Strategy, available, get

__all__ = ["TrainConfig", "build_strategy"]


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
        """Raise :class:`ConfigError` for out-of-range values."""
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"train.epochs and train.batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"train.optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError("train.lr must be > 0 and train.weight_decay, train.warmup_epochs >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.strategy not in available():
            raise ConfigError(f"train.strategy must be one of {available()}, got {self.strategy!r}")
        if not isinstance(self.strategy_options, dict):
            raise ConfigError(f"train.strategy_options must be a mapping, got {type(self.strategy_options).__name__}")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.distributed not in ("auto", "off"):
            raise ConfigError(f"train.distributed must be 'auto' or 'off', got {self.distributed!r}")


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
