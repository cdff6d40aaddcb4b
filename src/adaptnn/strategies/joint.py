"""Joint training: a weighted sum of the per-exit cross-entropies."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import Strategy

__all__ = ["JointLoss", "exit_weights"]


def exit_weights(scheme: str | Sequence[float], num_exits: int) -> list[float]:
    """Per-exit loss weights.

    Args:
        scheme: ``"uniform"`` (all 1), ``"linear"`` (k/K for exit k = 1..K, the ramp of Shallow-Deep
            Networks, favouring deep exits) or an explicit list of K non-negative weights.
        num_exits: K.
    """
    if isinstance(scheme, str):
        if scheme == "uniform":
            return [1.0] * num_exits
        if scheme == "linear":
            return [(k + 1) / num_exits for k in range(num_exits)]
        raise ConfigError(f"unknown exit weight scheme {scheme!r}; use 'uniform', 'linear' or a list of floats")
    weights = [float(w) for w in scheme]
    if len(weights) != num_exits:
        raise ConfigError(f"got {len(weights)} exit weights for a model with {num_exits} exits")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"exit weights must be >= 0 with a positive sum, got {weights}")
    return weights


class JointLoss(Strategy):
    """``sum_k w_k * CE(logits_k, y)`` over the exits (weights from :func:`exit_weights`).

    Args:
        weights: ``"uniform"``, ``"linear"`` or an explicit list.
        label_smoothing: passed to the cross-entropy.
    """

    name = "joint"

    def __init__(self, weights: str | Sequence[float] = "uniform", label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.weights = weights
        self.label_smoothing = label_smoothing

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        weights = exit_weights(self.weights, len(exit_logits))
        losses = torch.stack([F.cross_entropy(lg, targets, label_smoothing=self.label_smoothing) for lg in exit_logits])
        return (losses * losses.new_tensor(weights)).sum()
