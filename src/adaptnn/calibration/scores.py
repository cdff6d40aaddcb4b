"""Score matrices of a threshold policy and the figures of a threshold vector on one split.

Every calibrator works on the same object, :class:`ExitScores`: the policy's score of every sample at
every exit (``[K, N]``, computed once from cached logits), the class each exit predicts, and the labels.
A sample with thresholds ``T`` exits at the first ``k < K-1`` with ``scores[k] >= T_k`` (see
:func:`adaptnn.calibrate.assign_exits`), so any threshold vector is evaluated without touching the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..policies import ThresholdPolicy
from .budgeted import assign_exits, fit_thresholds, quota

__all__ = [
    "ExitScores",
    "exit_scores",
    "split_figures",
    "p_path",
    "check_costs",
    "exits_for_candidates",
    "EXIT_ALL",
    "DENSE_P_VALUES",
]

#: A finite threshold below every score (float32's lowest value): "everyone exits here". Finite so that it
#: survives strict JSON (``inf`` is written as ``null``, which reads back as "exit disabled").
EXIT_ALL: float = float(np.finfo(np.float32).min)

#: Dense geometric grid of the exit-distribution parameter ``p`` used to build candidate threshold paths.
DENSE_P_VALUES: tuple[float, ...] = tuple(float(p) for p in np.geomspace(0.01, 100.0, 161))


@dataclass(frozen=True)
class ExitScores:
    """Scores ``[K, N]`` (float32), predicted classes ``[K, N]`` and labels ``[N]`` of one split (numpy)."""

    scores: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray

    @property
    def num_exits(self) -> int:
        return int(self.scores.shape[0])

    @property
    def size(self) -> int:
        return int(self.scores.shape[1])

    @property
    def correct(self) -> np.ndarray:
        """``[K, N]`` bool: is exit k's prediction right."""
        return self.predictions == self.labels[None, :]

    def subset(self, index: np.ndarray) -> ExitScores:
        """The samples ``index`` of this split."""
        return ExitScores(self.scores[:, index], self.predictions[:, index], self.labels[index])


def exit_scores(policy: ThresholdPolicy, logits: Tensor, labels: Tensor | np.ndarray) -> ExitScores:
    """:class:`ExitScores` of ``policy`` on cached ``forward_all`` logits ``[K, N, C]`` and labels ``[N]``."""
    if not isinstance(policy, ThresholdPolicy):
        raise ConfigError(
            f"calibration needs a threshold policy (adaptnn.policies.ThresholdPolicy), got {type(policy).__name__}"
        )
    logits = torch.as_tensor(logits)
    if logits.dim() != 3:
        raise ConfigError(f"logits must have shape [K, N, C] (exits, samples, classes); got {list(logits.shape)}")
    labels_np = np.asarray(torch.as_tensor(labels).cpu().numpy(), dtype=np.int64)
    if labels_np.shape != (logits.shape[1],):
        raise ConfigError(f"labels must have shape [N] = [{logits.shape[1]}]; got {list(labels_np.shape)}")
    if not torch.isfinite(logits).all():
        raise ConfigError("logits contain NaN or inf")
    scores, preds = policy.scores(logits)
    scores_np = scores.float().cpu().numpy()
    if np.isnan(scores_np).any():
        raise ConfigError(f"{type(policy).__name__} produced NaN scores")
    return ExitScores(scores_np, preds.cpu().numpy().astype(np.int64), labels_np)


def check_costs(costs: Sequence[float], num_exits: int, name: str = "exit_costs") -> np.ndarray:
    """``K`` finite non-negative non-decreasing cumulative costs as float64."""
    arr = np.asarray([float(c) for c in costs], dtype=np.float64)
    if arr.shape != (num_exits,):
        raise ConfigError(f"{name} must have one cumulative value per exit (K = {num_exits}); got {arr.tolist()}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ConfigError(f"{name} must be finite and >= 0; got {arr.tolist()}")
    if np.any(np.diff(arr) < 0):
        raise ConfigError(
            f"{name} must be cumulative (non-decreasing from the first exit to the last); got {arr.tolist()}"
        )
    return arr


def split_figures(es: ExitScores, thresholds: Sequence[float], costs: np.ndarray) -> dict[str, Any]:
    """Accuracy, average cost, exit fractions and the accuracy change vs the last exit for ``thresholds``."""
    exits = assign_exits(es.scores, list(thresholds))
    n = es.size
    taken = es.predictions[exits, np.arange(n)]
    correct = taken == es.labels
    fractions = np.bincount(exits, minlength=es.num_exits) / n
    last_correct = es.predictions[-1] == es.labels
    return {
        "accuracy": float(correct.mean()),
        "avg_cost": float(fractions @ costs),
        "exit_fractions": fractions.tolist(),
        "last_exit_accuracy": float(last_correct.mean()),
        "accuracy_change_vs_last_exit": float(correct.mean() - last_correct.mean()),
        "n": n,
    }


def exits_for_candidates(scores: np.ndarray, candidates: Sequence[Sequence[float]]) -> np.ndarray:
    """Exit of every sample under each of M threshold vectors at once: ``[M, N]`` int64.

    Same rule as :func:`adaptnn.calibrate.assign_exits` (first ``k < K-1`` with ``score >= T_k``).
    """
    n_exits, n = scores.shape
    thr = np.asarray(candidates, dtype=np.float64).reshape(len(candidates), n_exits - 1)
    if n_exits == 1:
        return np.zeros((len(candidates), n), dtype=np.int64)
    passes = np.ones((len(candidates), n_exits, n), dtype=bool)
    passes[:, :-1] = scores[None, :-1].astype(np.float64) >= thr[:, :, None]
    return passes.argmax(axis=1).astype(np.int64)


def p_path(scores: np.ndarray, p_values: Sequence[float] = DENSE_P_VALUES) -> list[list[float]]:
    """Distinct threshold vectors of the budgeted-batch protocol on ``scores`` for each ``p``, plus the
    two extremes (everyone at the first exit; everyone at the last)."""
    n_exits, n = scores.shape
    out: list[list[float]] = [[EXIT_ALL] + [math.inf] * (n_exits - 2), [math.inf] * (n_exits - 1)]
    if n_exits == 1:
        return [[]]
    seen = {tuple(t) for t in out}
    for p in p_values:
        weights = np.asarray([p**k for k in range(1, n_exits + 1)], dtype=np.float64)
        pi = (weights / weights.sum()).tolist()
        if not any(quota(n, f) for f in pi[:-1]):
            continue
        thresholds = [float(t) for t in fit_thresholds(scores, pi)]
        key = tuple(thresholds)
        if key not in seen:
            seen.add(key)
            out.append(thresholds)
    return out
