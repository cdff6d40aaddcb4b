"""Choosing a member of an elastic family for a budget, from its menu rows (no exit thresholds).

The menu (``adaptnn menu``) measures every member: validation accuracy, MACs, milliseconds at a few batch sizes.
These functions only read such rows (plain dicts), so the choice is made from measurements, never re-measured:

* :func:`pareto_front` marks the members no other member beats on both accuracy and a cost;
* :func:`choose_variant` picks the most accurate member whose cost fits a budget.

Choosing a member *jointly* with its exit thresholds is the knob engine's job
(:func:`~adaptnn.calibration.knobs.calibrate_knob_and_exits`, each member one knob setting).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import BudgetError, ConfigError

__all__ = ["pareto_front", "choose_variant"]


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
