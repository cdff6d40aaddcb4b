"""Choosing a member of an elastic family (and, jointly, its exit thresholds) for a budget.

The menu (``adaptnn menu``) measures every member: validation accuracy, MACs, milliseconds at a few batch sizes.
These functions only read such rows (plain dicts), so the choice is made from measurements, never re-measured:

* :func:`pareto_front` marks the members no other member beats on both accuracy and a cost;
* :func:`choose_variant` picks the most accurate member whose cost fits a budget;
* :func:`variant_operating_points` / :func:`choose_joint` extend the choice to (member, exit thresholds) pairs
  in MACs, with the thresholds of the budgeted-batch engine (:func:`~adaptnn.calibration.budgeted.p_path`)
  fitted on each member's validation scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import BudgetError, ConfigError
from .budgeted import DENSE_P_VALUES, ExitScores, check_costs, exit_figures, exits_for_candidates, p_path

__all__ = ["pareto_front", "choose_variant", "variant_operating_points", "choose_joint"]


def _cost(row: Mapping[str, Any], key: str, where: str) -> float:
    if key not in row:
        raise ConfigError(f"{where} has no {key!r}; expected menu rows with keys such as 'macs' or 'ms_b64'")
    value = float(row[key])
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}[{key!r}] = {row[key]!r}: expected a finite cost >= 0")
    return value


def pareto_front(rows: Sequence[Mapping[str, Any]], cost_key: str, accuracy_key: str = "accuracy") -> list[bool]:
    """Per row, whether no other row is at least as accurate and at most as costly, and strictly better in one."""
    pts = [(_cost(r, cost_key, f"rows[{i}]"), float(r[accuracy_key])) for i, r in enumerate(rows)]
    front = []
    for c, a in pts:
        dominated = any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in pts)
        front.append(not dominated)
    return front


def choose_variant(
    rows: Sequence[Mapping[str, Any]], cost_key: str, budget: float, accuracy_key: str = "accuracy"
) -> Mapping[str, Any]:
    """The most accurate row with ``row[cost_key] <= budget`` (ties: the cheaper, then the earlier).

    Raises:
        ConfigError: no rows, a row without the cost, or a budget that is not a positive number.
        BudgetError: no row fits; the message names the cheapest one.
    """
    if not rows:
        raise ConfigError("no menu rows to choose from")
    if not math.isfinite(float(budget)) or budget <= 0:
        raise ConfigError(f"the budget must be a positive number, got {budget!r}")
    costs = [_cost(r, cost_key, f"rows[{i}]") for i, r in enumerate(rows)]
    fitting = [i for i, c in enumerate(costs) if c <= budget]
    if not fitting:
        cheapest = min(range(len(rows)), key=lambda i: costs[i])
        raise BudgetError(
            f"no variant fits {cost_key} <= {budget:g}; the cheapest is {rows[cheapest].get('variant', cheapest)} "
            f"at {costs[cheapest]:.4g}"
        )
    best = max(fitting, key=lambda i: (float(rows[i][accuracy_key]), -costs[i], -i))
    return rows[best]


def variant_operating_points(
    scores: np.ndarray,
    predictions: np.ndarray,
    labels: np.ndarray,
    exit_costs: Sequence[float],
    p_values: Sequence[float] = DENSE_P_VALUES,
) -> list[dict[str, Any]]:
    """Early-exit operating points of one member on its validation outputs.

    Args:
        scores: ``[K, N]`` exit scores (e.g. the largest softmax probability).
        predictions: ``[K, N]`` predicted classes.
        labels: ``[N]`` labels.
        exit_costs: the member's cumulative cost of each exit (e.g. MACs).
        p_values: the budgeted-batch engine's exit-distribution grid.

    Returns:
        One ``{"thresholds", "accuracy", "avg_cost"}`` per distinct threshold vector (both extremes included).
    """
    split = ExitScores(np.asarray(scores), np.asarray(predictions), np.asarray(labels))
    costs = check_costs(exit_costs, split.num_exits)
    candidates = p_path(split.scores, p_values)
    accuracy, avg_cost, _ = exit_figures(split, exits_for_candidates(split.scores, candidates), costs)
    return [
        {"thresholds": [float(t) for t in thr], "accuracy": float(a), "avg_cost": float(c)}
        for thr, a, c in zip(candidates, accuracy, avg_cost, strict=True)
    ]


def choose_joint(points: Mapping[str, Sequence[Mapping[str, Any]]], budget: float) -> dict[str, Any]:
    """The most accurate (member, thresholds) pair whose average cost fits ``budget``.

    Args:
        points: member name -> its :func:`variant_operating_points`.
        budget: the average cost per sample allowed (same unit as the points' ``avg_cost``).

    Returns:
        ``{"variant", "thresholds", "accuracy", "avg_cost"}``.
    """
    rows = [{"variant": name, **pt} for name, pts in points.items() for pt in pts]
    best = choose_variant(rows, "avg_cost", budget)
    return dict(best)
