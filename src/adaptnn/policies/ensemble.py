"""Ensemble-of-exits rules: a sample's prediction at exit k combines the outputs of exits 0..k.

* :class:`AveragedEnsemblePolicy`: running average of the exits' softmax probabilities;
* :class:`BoostedEnsemblePolicy`: BoostNet-style additive logits, ``A_s = f_s + r * A_{s-1}``.

Both carry the running combination as per-sample policy state (compacted by ``run_dynamic`` together
with the model state) and return the combination as the prediction of a sample that stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..runtime.state import State
from .base import ThresholdPolicy, _saved_thresholds, max_softmax

__all__ = ["AveragedEnsemblePolicy", "BoostedEnsemblePolicy"]


class BoostedEnsemblePolicy(ThresholdPolicy):
    """Additive-logit ensemble (BoostNet style) with a max-softmax rule on the ensemble.

    At exit ``s`` the prediction is ``A_s = f_s + E_{s-1}`` (``f_s`` the head's logits, ``E_{-1} = 0``)
    and the carried per-sample state becomes ``E_s = r * A_s``. A sample stops when
    ``max softmax(A_s / tau_s) >= T_s``; it returns ``A_s``.

    Args:
        thresholds: ``T_0 .. T_{K-2}`` (see :class:`ThresholdPolicy`).
        r: shrinkage of the running sum carried to the next exit, ``>= 0`` (``r = 0``: each exit alone;
            ``r = 1``: plain sum of logits).
        temperatures: optional per-exit temperatures applied to ``A_s`` for the confidence only.
    """

    name = "boosted"
    score_name = "max softmax of the boosted logits"

    def __init__(
        self, thresholds: Sequence[float | None], r: float = 0.5, *, temperatures: Sequence[float] | None = None
    ) -> None:
        super().__init__(thresholds, temperatures=temperatures)
        r = float(r)
        if not r >= 0 or r == float("inf"):
            raise ConfigError(f"BoostedEnsemblePolicy needs a finite r >= 0, got {r}")
        self.r = r

    @staticmethod
    def combine(exit_index: int, logits: Tensor, state: State, r: float) -> tuple[Tensor, Tensor]:
        """``(A_s, E_s)`` for one exit; ``state`` is ``E_{s-1}`` or ``None`` at the first exit."""
        boosted = logits if state is None else logits + state
        return boosted, r * boosted

    def step(self, exit_index: int, logits: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        boosted, carried = self.combine(exit_index, logits, state, self.r)
        return max_softmax(self.scaled(exit_index, boosted)), boosted, carried

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "r": self.r}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BoostedEnsemblePolicy:
        return cls(_saved_thresholds(data), r=float(data.get("r", 0.5)), temperatures=data.get("temperatures"))

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", r={self.r})"


class AveragedEnsemblePolicy(ThresholdPolicy):
    """Running average of the exits' probabilities with a max-probability rule on the average.

    At exit ``k`` the ensemble is ``q_k = mean_{j <= k} softmax(z_j / tau_j)``; a sample stops when
    ``max q_k >= T_k`` and returns ``log q_k`` (float32; its softmax is ``q_k``).
    """

    name = "average"
    score_name = "max averaged probability"

    def step(self, exit_index: int, logits: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        probs = self.scaled(exit_index, logits).float().softmax(dim=-1)
        total = probs if state is None else state + probs
        mean = total / (exit_index + 1)
        return mean.amax(dim=-1), mean.clamp_min(torch.finfo(torch.float32).tiny).log(), total
