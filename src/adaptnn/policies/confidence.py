"""Stateless confidence rules: max-softmax, entropy and top-1/top-2 margin, each with one threshold per exit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..errors import ConfigError
from ..runtime.state import State
from .base import ThresholdPolicy, max_softmax, normalised_certainty, softmax_margin

__all__ = ["ConfidencePolicy", "NeverExit", "EntropyPolicy", "MarginPolicy"]


class ConfidencePolicy(ThresholdPolicy):
    """Max-softmax confidence: stop at exit k when ``max softmax(z_k / tau_k) >= T_k``.

    Args:
        thresholds: ``T_0 .. T_{K-2}`` (see :class:`ThresholdPolicy`); ``None``/``inf`` disables an exit.
        temperatures: optional per-exit temperatures ``tau_k`` (default: none, i.e. 1).
    """

    name = "confidence"
    score_name = "max softmax probability"

    def __init__(self, thresholds: Sequence[float | None], *, temperatures: Sequence[float] | None = None) -> None:
        super().__init__(thresholds, temperatures=temperatures)

    def step(self, exit_index: int, logits: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        return max_softmax(self.scaled(exit_index, logits)), logits, state


class NeverExit(ConfidencePolicy):
    """Every sample runs to the last exit; ``run_dynamic`` then equals the full model."""

    name = "never"

    def __init__(self) -> None:
        super().__init__([])

    def check_num_exits(self, num_exits: int) -> None:
        """Fits any model: no thresholds, so no exit before the last one is ever taken."""
        if num_exits < 1:
            raise ConfigError(f"a model needs at least one exit, got {num_exits}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeverExit:
        return cls()


class EntropyPolicy(ThresholdPolicy):
    """Entropy rule: stop at exit k when the normalised certainty ``1 - H(p_k) / log C >= T_k``.

    ``p_k = softmax(z_k / tau_k)`` and ``H`` the entropy in nats; the certainty is 1 for a one-hot and 0
    for a uniform prediction, so thresholds live in ``[0, 1]`` like max-softmax ones. A threshold ``T``
    means "entropy at most ``(1 - T) log C``" (the usual entropy-threshold rule, e.g. BranchyNet).
    """

    name = "entropy"
    score_name = "1 - entropy / log(C)"

    def step(self, exit_index: int, logits: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        return normalised_certainty(self.scaled(exit_index, logits)), logits, state


class MarginPolicy(ThresholdPolicy):
    """Margin rule: stop at exit k when the top-1 minus top-2 probability of ``softmax(z_k / tau_k)`` >= T_k."""

    name = "margin"
    score_name = "top-1 minus top-2 softmax probability"

    def step(self, exit_index: int, logits: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        return softmax_margin(self.scaled(exit_index, logits)), logits, state
