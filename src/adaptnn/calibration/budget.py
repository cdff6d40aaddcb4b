"""Calibration to a compute budget (average MACs per sample) or a latency budget (average ms per sample).

Candidates are the threshold vectors of the budgeted-batch protocol over a dense grid of the
exit-distribution parameter ``p`` (fitted on the validation split's scores), plus the two extremes
(everyone at the first exit, everyone at the last). The chosen vector is the one with the highest
validation accuracy whose validation average cost is within the budget (ties: the cheaper). The test
split, when given, is only evaluated afterwards.

The budget is met *on average over the validation split*; on unseen data the average cost varies by
sampling error (its standard error is reported as ``val.avg_cost_std_error``); pass ``margin`` to aim
below the budget by that many standard errors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from ..errors import BudgetError, ConfigError
from ..policies import ThresholdPolicy
from .budgeted import (
    DENSE_P_VALUES,
    ExitScores,
    check_costs,
    exit_figures,
    exits_for_candidates,
    p_path,
    split_figures,
)
from .scores import exit_scores

__all__ = ["CalibrationResult", "calibrate_to_budget", "calibrate_to_latency"]

log = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    """A calibrated policy and its figures.

    Attributes:
        method: ``"compute_budget"``, ``"latency_budget"`` or ``"accuracy_guarantee"``.
        policy: the policy with the chosen thresholds (ready for ``run_dynamic``).
        thresholds: the chosen ``K-1`` thresholds.
        val: validation figures (accuracy, avg_cost, exit_fractions, ...).
        test: test figures, when test logits were given.
        details: method-specific figures (budget, risk bound, number of candidates, ...).
    """

    method: str
    policy: ThresholdPolicy
    thresholds: list[float]
    val: dict[str, Any]
    test: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the policy is described by its class and thresholds)."""
        return {
            "method": self.method,
            "policy": type(self.policy).__name__,
            "thresholds": self.thresholds,
            "temperatures": self.policy.temperatures,
            "val": self.val,
            "test": self.test,
            **self.details,
        }


def _std_error(per_sample: np.ndarray) -> np.ndarray:
    """Standard error of the mean over the last axis (``ddof=1``)."""
    return per_sample.std(axis=-1, ddof=1) / math.sqrt(per_sample.shape[-1])


def _budget_fit(
    policy: ThresholdPolicy,
    val: ExitScores,
    costs: np.ndarray,
    budget: float,
    *,
    unit: str,
    margin: float,
    p_values: Sequence[float],
) -> tuple[list[float], dict[str, Any], int]:
    if not math.isfinite(budget) or budget <= 0:
        raise ConfigError(f"the budget must be a finite number > 0 {unit}; got {budget!r}")
    if margin < 0 or not math.isfinite(margin):
        raise ConfigError(f"margin (in standard errors) must be finite and >= 0; got {margin!r}")
    candidates = p_path(val.scores, p_values)
    exits = exits_for_candidates(val.scores, candidates)  # [M, N]
    accuracy, cost, _ = exit_figures(val, exits, costs)
    if margin and val.size > 1:
        cost = cost + margin * _std_error(costs[exits])
    feasible = np.flatnonzero(cost <= budget * (1 + 1e-12))
    if feasible.size == 0:
        i = int(np.argmin(cost))
        first = f"; the first exit alone costs {costs[0]:.6g} {unit}" if budget < costs[0] else ""
        raise BudgetError(
            f"no thresholds meet the budget of {budget:.6g} {unit} per sample{first}. The closest achievable "
            f"operating point sends every sample out at the first exit: {cost[i]:.6g} {unit} per sample with "
            f"validation accuracy {accuracy[i]:.4f}. Raise the budget to at least {cost[i]:.6g} {unit}"
            + (" (or lower margin)" if margin else "")
        )
    best = max(feasible.tolist(), key=lambda j: (accuracy[j], -cost[j], -j))
    best_thr = candidates[best]
    figures = split_figures(val, best_thr, costs)
    figures["avg_cost_std_error"] = float(_std_error(costs[exits[best]])) if val.size > 1 else 0.0
    return best_thr, figures, len(candidates)


def calibrate_to_budget(
    policy: ThresholdPolicy,
    val_logits: Tensor,
    val_labels: Tensor,
    exit_costs: Sequence[float],
    budget: float,
    *,
    test_logits: Tensor | None = None,
    test_labels: Tensor | None = None,
    margin: float = 0.0,
    p_values: Sequence[float] = DENSE_P_VALUES,
) -> CalibrationResult:
    """Thresholds with the best validation accuracy whose validation average MACs stay within ``budget``.

    Args:
        policy: any threshold policy (its current thresholds are ignored; temperatures are kept).
        val_logits, val_labels: validation ``forward_all`` logits ``[K, N, C]`` and labels ``[N]``.
        exit_costs: cumulative MACs to reach each exit (``K`` values).
        budget: target average MACs per sample.
        test_logits, test_labels: optional test split, evaluated with the chosen thresholds only.
        margin: aim ``margin`` standard errors of the validation mean below the budget.
        p_values: the grid of exit-distribution parameters the candidates come from.

    Raises:
        BudgetError: the budget is below the cheapest achievable cost (the first exit's); the message
            gives the closest achievable operating point.
    """
    return _calibrate_cost(
        "compute_budget", "MACs", policy, val_logits, val_labels, exit_costs, budget,
        test_logits=test_logits, test_labels=test_labels, margin=margin, p_values=p_values,
    )  # fmt: skip


def calibrate_to_latency(
    policy: ThresholdPolicy,
    val_logits: Tensor,
    val_labels: Tensor,
    exit_latency_ms: Sequence[float],
    budget_ms: float,
    *,
    batch_size: int = 1,
    test_logits: Tensor | None = None,
    test_labels: Tensor | None = None,
    margin: float = 0.0,
    p_values: Sequence[float] = DENSE_P_VALUES,
) -> CalibrationResult:
    """Thresholds with the best validation accuracy whose expected latency per sample is within ``budget_ms``.

    Latency model: a sample that leaves at exit ``k`` costs ``exit_latency_ms[k]``, the measured time
    (cumulative, in milliseconds per sample) to run the model up to and including exit ``k``'s head on the
    user's device at ``batch_size`` (measure it with the model's segments and heads, e.g. with
    ``batch_size = 1`` for online serving). The expected latency of thresholds is then
    ``sum_k fraction_k * exit_latency_ms[k]``. This ignores the per-exit overhead of compaction and the
    change of per-sample time with the shrinking batch inside ``run_dynamic``; check the realised time.

    Args:
        exit_latency_ms: ``K`` cumulative per-sample latencies in ms.
        budget_ms: target average latency per sample in ms.
        batch_size: the batch size the latencies were measured at (recorded in the result).
        other arguments: as :func:`calibrate_to_budget`.
    """
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    result = _calibrate_cost(
        "latency_budget", "ms", policy, val_logits, val_labels, exit_latency_ms, budget_ms,
        test_logits=test_logits, test_labels=test_labels, margin=margin, p_values=p_values, cost_name="exit_latency_ms",
    )  # fmt: skip
    result.details["latency_batch_size"] = int(batch_size)
    result.details["latency_model"] = "sum_k fraction_k * exit_latency_ms[k] (measured, cumulative, per sample)"
    return result


def _calibrate_cost(
    method: str,
    unit: str,
    policy: ThresholdPolicy,
    val_logits: Tensor,
    val_labels: Tensor,
    exit_costs: Sequence[float],
    budget: float,
    *,
    test_logits: Tensor | None,
    test_labels: Tensor | None,
    margin: float,
    p_values: Sequence[float],
    cost_name: str = "exit_costs",
) -> CalibrationResult:
    val = exit_scores(policy, val_logits, val_labels)
    costs = check_costs(exit_costs, val.num_exits, cost_name)
    thresholds, val_fig, n_candidates = _budget_fit(
        policy, val, costs, float(budget), unit=unit, margin=margin, p_values=p_values
    )
    test_fig = None
    if test_logits is not None:
        if test_labels is None:
            raise ConfigError("test_logits were given without test_labels")
        test_fig = split_figures(exit_scores(policy, test_logits, test_labels), thresholds, costs)
        test_fig["within_budget"] = bool(test_fig["avg_cost"] <= budget)
    chosen = policy.with_thresholds(thresholds)
    log.info(
        "%s: budget %.6g %s -> val accuracy %.4f at %.6g %s", method, budget, unit, val_fig["accuracy"],
        val_fig["avg_cost"], unit,
    )  # fmt: skip
    return CalibrationResult(
        method=method,
        policy=chosen,
        thresholds=thresholds,
        val=val_fig,
        test=test_fig,
        details={"budget": float(budget), "unit": unit, "exit_costs": costs.tolist(), "margin": margin,
                 "candidates": n_candidates},
    )  # fmt: skip
