"""Accuracy-vs-MACs curves compared: area over the common cost range, MACs needed to match the last exit.

:func:`macs_curve` reads a curve off budgeted points as ``report.json`` stores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["common_range", "curve_auc", "cost_at_accuracy", "curve_table", "point_macs", "macs_curve"]


def point_macs(point: dict[str, Any]) -> float:
    """Average test MACs of one budgeted point: ``avg_macs`` (``avg_cost`` in reports of older adaptnn)."""
    return float(point["avg_macs"] if "avg_macs" in point else point["avg_cost"])


def macs_curve(points: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """``(average MACs, test accuracy)`` of budgeted points (``report.json``'s ``budgeted`` or a policy curve)."""
    return [point_macs(p) for p in points], [float(p["test_accuracy"]) for p in points]


def _sorted_curve(costs: Sequence[float], accuracies: Sequence[float]) -> tuple[list[float], list[float]]:
    pairs = sorted(zip((float(c) for c in costs), (float(a) for a in accuracies), strict=True))
    xs: list[float] = []
    ys: list[float] = []
    for c, a in pairs:  # one point per cost: the best accuracy at it
        if xs and c == xs[-1]:
            ys[-1] = max(ys[-1], a)
        else:
            xs.append(c)
            ys.append(a)
    return xs, ys


def common_range(curves: dict[str, tuple[Sequence[float], Sequence[float]]]) -> tuple[float, float] | None:
    """``(lo, hi)``: the cost range every curve covers (``None`` when they do not overlap).

    Curves of a single cost (a point, e.g. a rule that cannot be tuned finely) do not narrow the range;
    :func:`curve_table` gives them no area.
    """
    spans = [(min(costs), max(costs)) for costs, _ in curves.values() if len(costs) and max(costs) > min(costs)]
    if not spans:
        return None
    lo = max(a for a, _ in spans)
    hi = min(b for _, b in spans)
    return (float(lo), float(hi)) if hi > lo else None


def curve_auc(costs: Sequence[float], accuracies: Sequence[float], lo: float, hi: float, points: int = 2001) -> float:
    """Mean accuracy of the curve over ``[lo, hi]`` (area under accuracy vs cost / (hi - lo)).

    The curve is the points sorted by cost, linearly interpolated (held flat beyond its ends).
    """
    xs, ys = _sorted_curve(costs, accuracies)
    grid = np.linspace(lo, hi, points)
    values = np.interp(grid, xs, ys)
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(grid)) / (hi - lo))


def cost_at_accuracy(costs: Sequence[float], accuracies: Sequence[float], target: float) -> float | None:
    """Cost of the cheapest point reaching ``target`` accuracy (``None`` if none does); no interpolation."""
    reaching = [c for c, a in zip(costs, accuracies, strict=True) if a >= target - 1e-12]
    return float(min(reaching)) if reaching else None


def curve_table(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    last_exit: dict[str, tuple[float, float]],
) -> list[dict[str, Any]]:
    """One row per curve: AUC over the range all curves share and MACs at the last exit's accuracy.

    Args:
        curves: ``label -> (avg MACs per point, test accuracy per point)``.
        last_exit: ``label -> (last exit's MACs, last exit's test accuracy)`` of that curve's model.

    Returns:
        ``[{label, auc, auc_range, macs_at_last_exit_accuracy, macs_saved_at_last_exit_accuracy,
        last_exit_accuracy, last_exit_macs, best_accuracy}]``; ``macs_saved`` is
        ``1 - macs_at_last_exit_accuracy / last_exit_macs`` (``None`` when the curve never reaches it).
    """
    rng = common_range(curves)
    rows = []
    for label, (costs, accs) in curves.items():
        last_macs, last_acc = last_exit[label]
        at = cost_at_accuracy(costs, accs, last_acc)
        rows.append(
            {
                "label": label,
                "auc": curve_auc(costs, accs, *rng) if rng and min(costs) <= rng[0] and max(costs) >= rng[1] else None,
                "auc_range": list(rng) if rng else None,
                "macs_at_last_exit_accuracy": at,
                "macs_saved_at_last_exit_accuracy": None if at is None else 1.0 - at / last_macs,
                "last_exit_accuracy": last_acc,
                "last_exit_macs": last_macs,
                "best_accuracy": max(accs) if len(accs) else None,
            }
        )
    return rows
