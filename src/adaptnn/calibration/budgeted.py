"""Confidence-threshold calibration for multi-exit networks ("budgeted batch classification").

A multi-exit network produces a prediction at each of its ``K`` exits; exit ``k`` costs ``exit_costs[k]``
(the cumulative compute, e.g. MACs, spent to reach it). At inference a sample leaves at the first exit
whose confidence (the largest class probability) reaches that exit's threshold ``T_k``; the last exit
takes everything else. Choosing the thresholds trades accuracy for compute.

The budgeted batch classification protocol (MSDNet, Huang et al. 2018, and its successors) picks the
thresholds from a *target exit distribution*. For a scalar ``p > 0`` the fraction of samples meant to
leave at exit ``k`` (1-based) is proportional to ``p**k``:

    pi_k = p**k / sum_{j=1..K} p**j

so ``p < 1`` favours early exits and ``p > 1`` late ones. On a **held-out validation split**, exits are
processed in order ``k = 0 .. K-2`` (0-based):

1. the quota is ``n_k = floor(N_val * pi_k)`` - a fraction of *all* validation samples, not of the ones
   still unassigned;
2. among the samples not yet assigned, sorted by their confidence at exit ``k`` in descending order, the
   threshold ``T_k`` is the confidence of the ``n_k``-th one (1-based); ``T_k = +inf`` when ``n_k == 0`` or
   fewer than ``n_k`` samples remain;
3. every unassigned sample with confidence ``>= T_k`` is assigned to exit ``k`` (ties at the threshold
   can therefore assign more than ``n_k`` samples).

The last exit takes the rest (conceptually ``T_{K-1} = -inf``). The thresholds are then frozen and
applied to the test split with :func:`assign_exits`. Sweeping ``p`` traces the accuracy/cost curve.

Why a held-out split: thresholds fitted on the very samples they are evaluated on would be tuned to
those samples' confidences (optimistic accuracy, exact exit fractions). Fitting on validation and
reporting on test measures what a deployed model would achieve; :func:`choose_operating_point` likewise
selects an operating point from validation figures only, so the test set is never used to make a choice.

Floating-point note: ``N_val * pi_k`` is computed in binary floating point and can land a hair below an
integer it equals mathematically (e.g. ``K=2, p=0.2, N=18`` gives ``14.999999999999998`` instead of 15).
The quota is therefore ``floor(N_val * pi_k + 1e-13 * max(1, N_val * pi_k))``: the slack is about a
hundred times the rounding error of the product and far below any genuine fractional part.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from adaptnn.errors import BudgetError, ConfigError

__all__ = [
    "DEFAULT_P_VALUES",
    "assign_exits",
    "budgeted_sweep",
    "check_p_values",
    "choose_operating_point",
    "exit_distribution",
    "fit_thresholds",
    "quota",
]

#: Default sweep of the exit-distribution parameter ``p``: 0.05, 0.10, ..., 1.95.
DEFAULT_P_VALUES: tuple[float, ...] = tuple(q / 20 for q in range(1, 40))

# Relative slack added to ``N * pi_k`` before flooring (see the module docstring).
_QUOTA_REL_SLACK = 1e-13
# Absolute slack when comparing accuracies in :func:`choose_operating_point` (float rounding of
# ``last_exit_val_accuracy - tolerance``).
_ACCURACY_SLACK = 1e-12

_SWEEP_KEYS = ("p", "val_accuracy", "val_avg_cost")


# --------------------------------------------------------------------------------------------------
# input conversion and validation
# --------------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array, torch tensor or nested sequence to a numpy array."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be array-like; could not convert {type(x).__name__}: {exc}") from exc


def _check_probs(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.ndim != 3:
        raise ConfigError(f"{name} must have shape [K, N, C] (exits, samples, classes); got shape {tuple(arr.shape)}")
    k, n, c = arr.shape
    if k < 1 or n < 1 or c < 1:
        raise ConfigError(
            f"{name} must have K >= 1 exits, N >= 1 samples and C >= 1 classes; got shape {tuple(arr.shape)}"
        )
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name} contains non-finite values (NaN or inf); shape {tuple(arr.shape)}")
    return arr


def _check_labels(x: Any, name: str, probs_name: str, probs_shape: tuple[int, ...]) -> np.ndarray:
    arr = _to_numpy(x, name)
    n, c = probs_shape[1], probs_shape[2]
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ConfigError(
            f"{name} must have shape [N] = [{n}] to match {probs_name} of shape {tuple(probs_shape)}; "
            f"got shape {tuple(arr.shape)}"
        )
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{name} must hold integer class indices; got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= c):
        raise ConfigError(
            f"{name} must hold class indices in [0, {c}) (C = {c} from {probs_name} of shape "
            f"{tuple(probs_shape)}); got values in [{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.int64, copy=False)


def _check_costs(x: Any, n_exits: int) -> np.ndarray:
    arr = _to_numpy(x, "exit_costs")
    if arr.ndim != 1 or arr.shape[0] != n_exits:
        raise ConfigError(
            f"exit_costs must be a 1-D sequence of length K = {n_exits} (one cumulative cost per exit); "
            f"got shape {tuple(arr.shape)}"
        )
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError(f"exit_costs must hold real numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ConfigError(f"exit_costs must be finite and non-negative; got {arr.tolist()}")
    return arr


def check_p_values(p_values: Sequence[float] | None) -> list[float]:
    if p_values is None:
        return list(DEFAULT_P_VALUES)
    arr = _to_numpy(p_values, "p_values")
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(f"p_values must be a non-empty 1-D sequence of numbers; got shape {tuple(arr.shape)}")
    try:
        values = [float(v) for v in arr.tolist()]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"p_values must hold numbers: {exc}") from exc
    for v in values:
        if not math.isfinite(v) or v <= 0:
            raise ConfigError(f"p_values must be finite and > 0; got {v!r}")
    return values


# --------------------------------------------------------------------------------------------------
# protocol
# --------------------------------------------------------------------------------------------------


def exit_distribution(p: float, n_exits: int) -> list[float]:
    """Target exit fractions ``pi_k = p**k / sum_j p**j`` for ``k = 1..K`` (Python floats)."""
    try:
        weights = [p**k for k in range(1, n_exits + 1)]
    except OverflowError as exc:
        raise ConfigError(f"p = {p!r} overflows p**k for K = {n_exits} exits") from exc
    total = sum(weights)
    if not math.isfinite(total) or total <= 0:
        raise ConfigError(f"p = {p!r} gives a degenerate exit distribution for K = {n_exits} exits")
    return [w / total for w in weights]


def quota(n_samples: int, fraction: float) -> int:
    """``floor(n_samples * fraction)``, robust to the product landing just below an integer."""
    x = n_samples * fraction
    return math.floor(x + _QUOTA_REL_SLACK * max(1.0, x))


def fit_thresholds(confidences: np.ndarray, pi: Sequence[float]) -> list[Any]:
    """Greedy validation-set thresholds; returns ``K-1`` numpy scalars in ``confidences.dtype``."""
    n_exits, n = confidences.shape
    unassigned = np.ones(n, dtype=bool)
    inf = confidences.dtype.type(np.inf)
    thresholds: list[Any] = []
    for k in range(n_exits - 1):
        n_k = quota(n, pi[k])
        remaining = confidences[k, unassigned]
        if n_k == 0 or remaining.size < n_k:
            threshold = inf
        else:
            # The n_k-th largest remaining confidence (1-based, descending order).
            pos = remaining.size - n_k
            threshold = np.partition(remaining, pos)[pos]
            unassigned &= ~(confidences[k] >= threshold)
        thresholds.append(threshold)
    return thresholds


def assign_exits(confidences: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Exit taken by each sample under fixed confidence thresholds.

    Sample ``i`` leaves at the first exit ``k < K-1`` with ``confidences[k, i] >= thresholds[k]``, and at
    the last exit ``K-1`` when no threshold is reached (the last exit has no threshold). A threshold of
    ``+inf`` disables its exit. This is the inference-time rule; :func:`budgeted_sweep` uses it to apply
    validation-fitted thresholds to the validation and test splits.

    Args:
        confidences: Array (or torch tensor) of shape ``[K, N]``: the confidence of every sample at every
            exit, typically the largest softmax probability.
        thresholds: ``K-1`` thresholds, one per exit except the last. NaN is rejected.

    Returns:
        Integer array of shape ``[N]`` with values in ``[0, K)``.

    Raises:
        ConfigError: If ``confidences`` is not 2-D or holds NaN, or ``thresholds`` has the wrong length
            or holds NaN.
    """
    conf = _to_numpy(confidences, "confidences")
    if conf.ndim != 2 or conf.shape[0] < 1:
        raise ConfigError(f"confidences must have shape [K, N] with K >= 1; got shape {tuple(conf.shape)}")
    if conf.dtype == np.bool_ or not (np.issubdtype(conf.dtype, np.floating) or np.issubdtype(conf.dtype, np.integer)):
        raise ConfigError(f"confidences must hold real numbers; got dtype {conf.dtype}")
    if np.any(np.isnan(conf)):
        raise ConfigError(f"confidences contains NaN; shape {tuple(conf.shape)}")
    n_exits, n = conf.shape
    thr = np.asarray([float(t) for t in thresholds], dtype=np.float64)
    if thr.shape != (n_exits - 1,):
        raise ConfigError(
            f"thresholds must have K-1 = {n_exits - 1} entries for confidences of shape "
            f"{tuple(conf.shape)}; got {thr.shape[0]}"
        )
    if np.any(np.isnan(thr)):
        raise ConfigError(f"thresholds must not contain NaN; got {thr.tolist()}")
    if n_exits == 1:
        return np.zeros(n, dtype=np.int64)
    # Comparing in float64 is exact for float16/32/64 confidences and thresholds taken from them.
    passes = np.empty((n_exits, n), dtype=bool)
    passes[:-1] = conf[:-1].astype(np.float64, copy=False) >= thr[:, None]
    passes[-1] = True
    return np.argmax(passes, axis=0).astype(np.int64)


def _evaluate(
    exits: np.ndarray, predictions: np.ndarray, labels: np.ndarray, costs: np.ndarray
) -> tuple[float, float, list[float]]:
    """Accuracy, average cost and exit fractions of one split for a given exit assignment."""
    n_exits, n = predictions.shape
    taken = predictions[exits, np.arange(n)]
    accuracy = int(np.count_nonzero(taken == labels)) / n
    fractions = np.bincount(exits, minlength=n_exits) / n
    return accuracy, float(fractions @ costs), fractions.tolist()


def budgeted_sweep(
    val_probs: Any,
    val_labels: Any,
    test_probs: Any,
    test_labels: Any,
    exit_costs: Sequence[float] | Any,
    p_values: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Budgeted batch classification sweep: fit exit thresholds on validation, evaluate on test.

    For each ``p`` the target exit distribution ``pi_k ~ p**k`` (``k = 1..K``) is turned into ``K-1``
    confidence thresholds on the validation split (greedily, exit by exit: quota
    ``floor(N_val * pi_k)`` of all samples; threshold = confidence of the quota-th most confident
    still-unassigned sample; every unassigned sample at or above it exits there). The thresholds are
    then applied unchanged to the test split with :func:`assign_exits`. See the module docstring for
    the full protocol and why a held-out split is used.

    Confidence at an exit is the largest class probability and the prediction its argmax, so ``probs``
    may be softmax outputs (the usual case) or any per-class scores.

    Args:
        val_probs: Validation class probabilities, shape ``[K, N_val, C]``; numpy array or torch tensor.
        val_labels: Validation labels, integer shape ``[N_val]`` with values in ``[0, C)``.
        test_probs: Test class probabilities, shape ``[K, N_test, C]`` (same ``K`` and ``C``).
        test_labels: Test labels, integer shape ``[N_test]``.
        exit_costs: ``K`` non-negative cumulative costs, one per exit (e.g. MACs to reach that exit).
        p_values: Exit-distribution parameters to sweep, each ``> 0``. Defaults to
            :data:`DEFAULT_P_VALUES` (``0.05, 0.10, ..., 1.95``).

    Returns:
        One dict per ``p`` (in the given order) with keys:

        - ``p``: the parameter (float).
        - ``thresholds``: ``K-1`` floats; ``float('inf')`` disables an exit. Each finite threshold is
          exactly the confidence of some validation sample (computed in the input dtype).
        - ``val_accuracy``, ``test_accuracy``: fraction of samples whose prediction at the exit they
          took is correct.
        - ``avg_cost``: test ``sum_k exit_fractions[k] * exit_costs[k]``.
        - ``exit_fractions``: test fraction of samples leaving at each exit (``K`` floats, sum 1).
        - ``val_avg_cost``, ``val_exit_fractions``: the same on validation; use these (not the test
          figures) to choose an operating point, e.g. with :func:`choose_operating_point`.

    Raises:
        ConfigError: If a shape, length, dtype or value is invalid; the message names the argument
            and the shapes received.
    """
    vp = _check_probs(val_probs, "val_probs")
    tp = _check_probs(test_probs, "test_probs")
    if vp.shape[0] != tp.shape[0] or vp.shape[2] != tp.shape[2]:
        raise ConfigError(
            "val_probs and test_probs must have the same number of exits K and classes C; got shapes "
            f"{tuple(vp.shape)} and {tuple(tp.shape)}"
        )
    vl = _check_labels(val_labels, "val_labels", "val_probs", tuple(vp.shape))
    tl = _check_labels(test_labels, "test_labels", "test_probs", tuple(tp.shape))
    costs = _check_costs(exit_costs, vp.shape[0])
    ps = check_p_values(p_values)

    n_exits = vp.shape[0]
    val_conf, val_pred = vp.max(axis=2), vp.argmax(axis=2)
    test_conf, test_pred = tp.max(axis=2), tp.argmax(axis=2)

    results: list[dict[str, Any]] = []
    for p in ps:
        pi = exit_distribution(p, n_exits)
        thresholds = [float(t) for t in fit_thresholds(val_conf, pi)]
        val_acc, val_cost, val_frac = _evaluate(assign_exits(val_conf, thresholds), val_pred, vl, costs)
        test_acc, test_cost, test_frac = _evaluate(assign_exits(test_conf, thresholds), test_pred, tl, costs)
        results.append(
            {
                "p": p,
                "thresholds": thresholds,
                "val_accuracy": val_acc,
                "test_accuracy": test_acc,
                "avg_cost": test_cost,
                "exit_fractions": test_frac,
                "val_avg_cost": val_cost,
                "val_exit_fractions": val_frac,
            }
        )
    return results


def choose_operating_point(
    sweep: Sequence[dict[str, Any]], last_exit_val_accuracy: float, tolerance: float = 0.01
) -> dict[str, Any]:
    """Cheapest sweep point whose validation accuracy is within ``tolerance`` of the full network.

    Only validation figures (``val_accuracy``, ``val_avg_cost``) are consulted, so the choice never
    peeks at the test split; report the chosen point's test figures afterwards.

    Args:
        sweep: Output of :func:`budgeted_sweep` (or any dicts with ``p``, ``val_accuracy`` and
            ``val_avg_cost``).
        last_exit_val_accuracy: Validation accuracy of the last exit alone (the full network), a
            fraction in ``[0, 1]``.
        tolerance: Allowed accuracy drop as a fraction (``0.01`` = one accuracy point), ``>= 0``.

    Returns:
        The qualifying dict (the object from ``sweep``) with the lowest ``val_avg_cost``; ties go to
        the higher ``val_accuracy``, then to the earlier entry. A point qualifies when
        ``val_accuracy >= last_exit_val_accuracy - tolerance`` (with 1e-12 slack for float rounding).

    Raises:
        ConfigError: If ``sweep`` is empty or malformed, or an argument is out of range.
        BudgetError: If no point qualifies; the message names the best validation accuracy reached
            and its cost.
    """
    if not math.isfinite(last_exit_val_accuracy) or not 0.0 <= last_exit_val_accuracy <= 1.0:
        raise ConfigError(f"last_exit_val_accuracy must be a fraction in [0, 1]; got {last_exit_val_accuracy!r}")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ConfigError(f"tolerance must be a finite fraction >= 0 (0.01 = 1 point); got {tolerance!r}")
    if len(sweep) == 0:
        raise ConfigError("sweep is empty; run budgeted_sweep with at least one p value")
    for i, point in enumerate(sweep):
        missing = [key for key in _SWEEP_KEYS if key not in point]
        if missing:
            raise ConfigError(f"sweep[{i}] lacks key(s) {missing}; expected dicts from budgeted_sweep")

    floor_acc = last_exit_val_accuracy - tolerance - _ACCURACY_SLACK
    qualifying = [pt for pt in sweep if pt["val_accuracy"] >= floor_acc]
    if not qualifying:
        best = min(sweep, key=lambda pt: (-pt["val_accuracy"], pt["val_avg_cost"]))
        raise BudgetError(
            f"no operating point reaches validation accuracy >= {last_exit_val_accuracy - tolerance:.4f} "
            f"(last exit {last_exit_val_accuracy:.4f} - tolerance {tolerance:.4f}); the closest is "
            f"p = {best['p']:g} with validation accuracy {best['val_accuracy']:.4f} at average cost "
            f"{best['val_avg_cost']:.6g}"
        )
    return min(qualifying, key=lambda pt: (pt["val_avg_cost"], -pt["val_accuracy"]))
