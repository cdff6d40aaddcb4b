"""What the optimizer does: warm-up + cosine or multistep learning-rate factor, parameter groups, SGD or AdamW."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .config import TrainConfig

__all__ = ["build_optimizer", "cosine_warmup_factor", "lr_factor", "multistep_warmup_factor", "param_groups"]


def cosine_warmup_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def multistep_warmup_factor(
    step: int, warmup_steps: int, milestone_steps: list[int] | tuple[int, ...], gamma: float
) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1, then ``gamma`` to the number of milestones reached."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return gamma ** sum(step >= m for m in milestone_steps)


def lr_factor(config: TrainConfig, step: int, total_steps: int, warmup_steps: int) -> float:
    """The multiplier of ``config.lr`` at optimizer ``step`` under ``config.lr_schedule`` (milestones in epochs)."""
    if config.lr_schedule == "multistep":
        steps_per_epoch = total_steps / config.epochs
        milestones = [round(m * steps_per_epoch) for m in config.lr_milestones]
        return multistep_warmup_factor(step, warmup_steps, milestones, config.lr_gamma)
    return cosine_warmup_factor(step, total_steps, warmup_steps, config.min_lr_ratio)


def param_groups(model: nn.Module, weight_decay: float, *, norm_bias: bool = False) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices/kernels with ``weight_decay``, biases and norm weights
    (every parameter of dimension <= 1) with ``weight_decay`` too when ``norm_bias``, else without."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() > 1 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": weight_decay if norm_bias else 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """``config.optimizer`` over :func:`param_groups` at the peak ``config.lr`` (the Trainer sets the lr every step).

    SGD uses Nesterov momentum when ``config.nesterov`` (and the momentum is not 0), plain momentum otherwise.
    """
    groups = param_groups(model, config.weight_decay, norm_bias=config.weight_decay_norm_bias)
    if not any(g["params"] for g in groups):
        raise ConfigError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        nesterov = config.nesterov and config.momentum > 0
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=nesterov)
    return torch.optim.AdamW(groups, lr=config.lr)
