"""Patience-based exit (PABEE, Zhou et al. 2020): stop once the prediction has stayed the same long enough."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..runtime.state import State
from .base import ThresholdPolicy, _saved_thresholds

__all__ = ["PatiencePolicy"]


class PatiencePolicy(ThresholdPolicy):
    """Stop when the predicted class has stayed unchanged for ``patience`` consecutive exits.

    The score at exit ``k`` is a counter: 0 at the first exit, +1 when exit ``k`` predicts the same class
    as exit ``k-1``, reset to 0 otherwise. A sample stops when the counter reaches ``patience`` (so with
    patience ``t`` the earliest exit is ``t``: the first ``t + 1`` exits agreed). The prediction is the
    current exit's logits.

    Args:
        patience: one integer for every exit, or ``K-1`` per-exit thresholds on the counter (``None``
            disables an exit).
    """

    name = "patience"
    score_name = "consecutive unchanged predictions"

    def __init__(self, patience: int | Sequence[float | None]) -> None:
        self._uniform: int | None = None
        if isinstance(patience, int | float) and not isinstance(patience, bool):
            if patience < 0 or int(patience) != patience:
                raise ConfigError(f"patience must be an integer >= 0, got {patience!r}")
            self._uniform = int(patience)
            super().__init__([])
        else:
            super().__init__(patience)

    @property
    def patience(self) -> int | None:
        """The shared patience, or ``None`` when per-exit thresholds were given."""
        return self._uniform

    def check_num_exits(self, num_exits: int) -> None:
        if self._uniform is None:
            super().check_num_exits(num_exits)
        elif num_exits < 1:
            raise ConfigError(f"a model needs at least one exit, got {num_exits}")

    def threshold_at(self, exit_index: int) -> float:
        return float(self._uniform) if self._uniform is not None else super().threshold_at(exit_index)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self._uniform is not None:
            out["patience"] = self._uniform
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatiencePolicy:
        if data.get("patience") is not None:
            return cls(data["patience"])
        return cls(_saved_thresholds(data))

    def with_thresholds(self, thresholds: Sequence[float | None]) -> PatiencePolicy:
        new = super().with_thresholds(thresholds)
        new._uniform = None
        return new

    def step(self, exit_index: int, logits: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        pred = logits.argmax(dim=-1)
        if state is None:
            count = torch.zeros(pred.shape[0], dtype=torch.float32, device=pred.device)
        else:
            prev, count = state
            count = torch.where(pred == prev, count + 1, torch.zeros_like(count))
        return count, logits, (pred, count)

    def __repr__(self) -> str:
        if self._uniform is not None:
            return f"PatiencePolicy(patience={self._uniform})"
        return super().__repr__()
