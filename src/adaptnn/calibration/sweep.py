"""The budgeted-batch sweep for any threshold policy, and the reference code's "flat curve" quirk.

:func:`policy_sweep` is :func:`~adaptnn.calibration.budgeted.budgeted_sweep` with the policy's score in
place of the max-softmax confidence (identical results for :class:`~adaptnn.policies.ConfidencePolicy`
without temperatures): both run the engine's :func:`~adaptnn.calibration.budgeted.sweep_splits`, which fits
the thresholds greedily on the validation scores for each ``p`` and applies them unchanged to the test split.

``legacy=True`` reproduces a quirk of published budgeted-batch curves so that they can be compared:
the reported test curve is post-processed into its upper envelope over cost (:func:`flat_curve`: a point
never shows lower accuracy than a cheaper one; it is drawn flat instead). The envelope picks, for each
budget, the best *test* accuracy among cheaper points, i.e. it uses the test split to make a choice and is
optimistic. The other quirk, reading the validation split with training augmentation, is a data-loading
choice: see ``adaptnn.runs.calibrate_run(legacy=True)``. Both are off by default; the honest protocol is
validation read with evaluation transforms and the raw test curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..policies import ThresholdPolicy
from .budgeted import check_costs, sweep_splits
from .scores import exit_scores

__all__ = ["policy_sweep", "flat_curve"]


def policy_sweep(
    policy: ThresholdPolicy,
    val_logits: Tensor,
    val_labels: Tensor,
    test_logits: Tensor,
    test_labels: Tensor,
    exit_costs: Sequence[float],
    p_values: Sequence[float] | None = None,
    *,
    legacy: bool = False,
) -> list[dict[str, Any]]:
    """Budgeted-batch sweep of ``policy``: one dict per ``p`` with the keys of ``budgeted_sweep``.

    Keys: ``p, thresholds, val_accuracy, test_accuracy, avg_cost, exit_fractions, val_avg_cost,
    val_exit_fractions``; with ``legacy=True`` also ``test_accuracy_raw`` (before :func:`flat_curve`).
    """
    val = exit_scores(policy, val_logits, val_labels)
    test = exit_scores(policy, test_logits, test_labels)
    out = sweep_splits(val, test, check_costs(exit_costs, val.num_exits), p_values)
    return flat_curve(out) if legacy else out


def flat_curve(sweep: Sequence[dict[str, Any]], key: str = "test_accuracy", cost_key: str = "avg_cost") -> list[dict]:
    """Upper envelope of a sweep over cost: each point's ``key`` becomes the best among points no dearer.

    Returns new dicts in the input order; the original value is kept under ``<key>_raw``. This is the
    "flat curve" post-processing of the legacy protocol (it consults the test split; see the module
    docstring).
    """
    order = sorted(range(len(sweep)), key=lambda i: (sweep[i][cost_key], i))
    out = [dict(point) for point in sweep]
    best = -float("inf")
    for i in order:
        best = max(best, sweep[i][key])
        out[i][f"{key}_raw"] = sweep[i][key]
        out[i][key] = best
    return out
