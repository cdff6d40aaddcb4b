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

This module is the one engine of the protocol; every calibrator of :mod:`adaptnn.calibration` builds on it.
The confidence may be any per-exit score (a policy's score, see :class:`ExitScores`); the rule is the same.

* pieces: :func:`exit_distribution`, :func:`quota`, :func:`fit_thresholds`, and the exit rule
  :func:`exits_for_candidates` (``M`` threshold vectors at once) with its checked one-vector form
  :func:`assign_exits`;
* figures of an exit assignment (accuracy, average cost, exit fractions): :func:`exit_figures`, and
  :func:`split_figures` for one threshold vector;
* candidates: :func:`p_path`, the distinct thresholds of a ``p`` grid plus the two extremes;
* sweeps: :func:`sweep_splits` (the core), :func:`budgeted_sweep` (class probabilities in),
  :func:`choose_operating_point`; label-free: :func:`thresholds_for_cost`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adaptnn.errors import BudgetError, ConfigError

__all__ = [
    "DEFAULT_P_VALUES",
    "DENSE_P_VALUES",
    "EXIT_ALL",
    "ExitScores",
    "assign_exits",
    "budgeted_sweep",
    "check_costs",
    "check_p_values",
    "choose_operating_point",
    "exit_distribution",
    "exit_figures",
    "exits_for_candidates",
    "fit_thresholds",
    "p_path",
    "quota",
    "split_figures",
    "sweep_splits",
    "thresholds_for_cost",
]

#: Default sweep of the exit-distribution parameter ``p``: 0.05, 0.10, ..., 1.95.
DEFAULT_P_VALUES: tuple[float, ...] = tuple(q / 20 for q in range(1, 40))

#: Dense geometric grid of the exit-distribution parameter ``p`` used to build candidate threshold paths.
DENSE_P_VALUES: tuple[float, ...] = tuple(float(p) for p in np.geomspace(0.01, 100.0, 161))

#: A finite threshold below every score (float32's lowest value): "everyone exits here". Finite so that it
#: survives strict JSON (``inf`` is written as ``null``, which reads back as "exit disabled").
EXIT_ALL: float = float(np.finfo(np.float32).min)

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


def _is_real(arr: np.ndarray) -> bool:
    return arr.dtype != np.bool_ and (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer))


def _check_probs(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.ndim != 3:
        raise ConfigError(f"{name} must have shape [K, N, C] (exits, samples, classes); got shape {tuple(arr.shape)}")
    k, n, c = arr.shape
    if k < 1 or n < 1 or c < 1:
        raise ConfigError(
            f"{name} must have K >= 1 exits, N >= 1 samples and C >= 1 classes; got shape {tuple(arr.shape)}"
        )
    if not _is_real(arr):
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


def _check_scores(x: Any, name: str) -> np.ndarray:
    """A real ``[K, N]`` score matrix without NaN, in its own dtype."""
    arr = _to_numpy(x, name)
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ConfigError(f"{name} must have shape [K, N] with K >= 1; got shape {tuple(arr.shape)}")
    if not _is_real(arr):
        raise ConfigError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    if np.any(np.isnan(arr)):
        raise ConfigError(f"{name} contains NaN; shape {tuple(arr.shape)}")
    return arr


def check_costs(costs: Any, num_exits: int, name: str = "exit_costs", *, cumulative: bool = True) -> np.ndarray:
    """``K`` finite non-negative costs (sequence, numpy array or tensor) as float64.

    With ``cumulative`` they must also be non-decreasing from the first exit to the last.
    """
    arr = _to_numpy(costs, name)
    if arr.ndim != 1 or arr.shape[0] != num_exits:
        raise ConfigError(
            f"{name} must have one cumulative value per exit: a 1-D sequence of length K = {num_exits}; "
            f"got {arr.tolist()} (shape {tuple(arr.shape)})"
        )
    if not _is_real(arr):
        raise ConfigError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ConfigError(f"{name} must be finite and non-negative; got {arr.tolist()}")
    if cumulative and np.any(np.diff(arr) < 0):
        raise ConfigError(
            f"{name} must be cumulative (non-decreasing from the first exit to the last); got {arr.tolist()}"
        )
    return arr


def check_p_values(p_values: Sequence[float] | None) -> list[float]:
    """Exit-distribution parameters as Python floats, each finite and ``> 0``; ``None`` gives
    :data:`DEFAULT_P_VALUES`."""
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


def exits_for_candidates(scores: np.ndarray, candidates: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Exit of every sample under each of ``M`` threshold vectors at once: ``[M, N]`` int64.

    The rule of :func:`assign_exits` (first ``k < K-1`` with ``scores[k] >= T_k``, else the last exit),
    without input checks: ``scores`` is a real ``[K, N]`` array, ``candidates`` ``M`` vectors of ``K-1``.
    """
    scores = _to_numpy(scores, "scores")
    n_exits, n = scores.shape
    thr = np.asarray(candidates, dtype=np.float64).reshape(len(candidates), n_exits - 1)
    if n_exits == 1:
        return np.zeros((len(candidates), n), dtype=np.int64)
    # Comparing in float64 is exact for float16/32/64 scores and thresholds taken from them.
    passes = np.ones((len(candidates), n_exits, n), dtype=bool)
    passes[:, :-1] = scores[None, :-1].astype(np.float64) >= thr[:, :, None]
    return passes.argmax(axis=1).astype(np.int64)


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
    conf = _check_scores(confidences, "confidences")
    n_exits = conf.shape[0]
    thr = np.asarray([float(t) for t in thresholds], dtype=np.float64)
    if thr.shape != (n_exits - 1,):
        raise ConfigError(
            f"thresholds must have K-1 = {n_exits - 1} entries for confidences of shape "
            f"{tuple(conf.shape)}; got {thr.shape[0]}"
        )
    if np.any(np.isnan(thr)):
        raise ConfigError(f"thresholds must not contain NaN; got {thr.tolist()}")
    return exits_for_candidates(conf, thr[None, :])[0]


def p_path(scores: np.ndarray, p_values: Sequence[float] = DENSE_P_VALUES) -> list[list[float]]:
    """Distinct threshold vectors of the budgeted-batch protocol on ``scores`` ``[K, N]`` for each ``p``,
    after the two extremes (everyone at the first exit; everyone at the last)."""
    n_exits, n = scores.shape
    if n_exits == 1:
        return [[]]
    out: list[list[float]] = [[EXIT_ALL] + [math.inf] * (n_exits - 2), [math.inf] * (n_exits - 1)]
    seen = {tuple(t) for t in out}
    for p in p_values:
        pi = exit_distribution(p, n_exits)
        if not any(quota(n, f) for f in pi[:-1]):
            continue  # every early exit disabled: the last-exit extreme
        thresholds = [float(t) for t in fit_thresholds(scores, pi)]
        key = tuple(thresholds)
        if key not in seen:
            seen.add(key)
            out.append(thresholds)
    return out


# --------------------------------------------------------------------------------------------------
# figures of an exit assignment
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitScores:
    """One split: scores ``[K, N]`` (real, any float dtype), predicted classes ``[K, N]`` and labels ``[N]``."""

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


def _exit_fractions(exits: np.ndarray, n_exits: int) -> np.ndarray:
    """``[M, K]`` fraction of the samples of each assignment ``exits`` ``[M, N]`` that leave at each exit."""
    m, n = exits.shape
    flat = (exits + n_exits * np.arange(m)[:, None]).ravel()
    return np.bincount(flat, minlength=m * n_exits).reshape(m, n_exits) / n


def _average_costs(fractions: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """``[M]`` average cost ``sum_k fractions[k] * costs[k]`` of each row of ``fractions`` ``[M, K]``."""
    return np.asarray([row @ costs for row in fractions], dtype=np.float64)


def exit_figures(split: ExitScores, exits: np.ndarray, costs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy ``[M]``, average cost ``[M]`` and exit fractions ``[M, K]`` of ``M`` exit assignments.

    ``exits`` is ``[M, N]`` (e.g. from :func:`exits_for_candidates`; one ``[N]`` assignment counts as
    ``M = 1``); ``costs`` are the ``K`` checked costs.
    """
    exits = np.atleast_2d(exits)
    taken = np.take_along_axis(split.predictions, exits, axis=0)
    accuracy = np.count_nonzero(taken == split.labels, axis=1) / split.size
    fractions = _exit_fractions(exits, split.num_exits)
    return accuracy, _average_costs(fractions, costs), fractions


def split_figures(es: ExitScores, thresholds: Sequence[float], costs: np.ndarray) -> dict[str, Any]:
    """Accuracy, average cost, exit fractions and the accuracy change vs the last exit for ``thresholds``."""
    exits = assign_exits(es.scores, list(thresholds))
    accuracy, avg_cost, fractions = exit_figures(es, exits, costs)
    last_accuracy = float((es.predictions[-1] == es.labels).mean())
    return {
        "accuracy": float(accuracy[0]),
        "avg_cost": float(avg_cost[0]),
        "exit_fractions": fractions[0].tolist(),
        "last_exit_accuracy": last_accuracy,
        "accuracy_change_vs_last_exit": float(accuracy[0] - last_accuracy),
        "n": es.size,
    }


# --------------------------------------------------------------------------------------------------
# sweeps and operating points
# --------------------------------------------------------------------------------------------------


def sweep_splits(
    val: ExitScores, test: ExitScores, costs: np.ndarray, p_values: Sequence[float] | None = None
) -> list[dict[str, Any]]:
    """The budgeted-batch sweep on prepared splits: one dict per ``p`` with the keys of :func:`budgeted_sweep`.

    Thresholds are fitted on ``val.scores`` (kept in their dtype, so finite thresholds are exactly scores of
    validation samples) and applied unchanged to ``test``; ``costs`` are ``K`` checked costs.
    """
    results: list[dict[str, Any]] = []
    for p in check_p_values(p_values):
        thresholds = [float(t) for t in fit_thresholds(val.scores, exit_distribution(p, val.num_exits))]
        val_acc, val_cost, val_frac = exit_figures(val, exits_for_candidates(val.scores, [thresholds]), costs)
        test_acc, test_cost, test_frac = exit_figures(test, exits_for_candidates(test.scores, [thresholds]), costs)
        results.append(
            {
                "p": p,
                "thresholds": thresholds,
                "val_accuracy": float(val_acc[0]),
                "test_accuracy": float(test_acc[0]),
                "avg_cost": float(test_cost[0]),
                "exit_fractions": test_frac[0].tolist(),
                "val_avg_cost": float(val_cost[0]),
                "val_exit_fractions": val_frac[0].tolist(),
            }
        )
    return results


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
    costs = check_costs(exit_costs, vp.shape[0], cumulative=False)
    ps = check_p_values(p_values)
    val = ExitScores(vp.max(axis=2), vp.argmax(axis=2), vl)
    test = ExitScores(tp.max(axis=2), tp.argmax(axis=2), tl)
    return sweep_splits(val, test, costs, ps)


def thresholds_for_cost(
    scores: Any,
    exit_costs: Sequence[float] | Any,
    target_cost: float,
    p_values: Sequence[float] = DENSE_P_VALUES,
) -> tuple[list[float], float]:
    """Label-free calibration: the :func:`p_path` candidate whose average cost on ``scores`` is closest to a target.

    Args:
        scores: ``[K, N]`` per-exit scores (e.g. the largest softmax probability); numpy array or tensor.
        exit_costs: ``K`` non-negative costs, one per exit (e.g. cumulative MACs or ms).
        target_cost: the average cost per sample to aim at.
        p_values: the grid of exit-distribution parameters the candidates come from.

    Returns:
        ``(thresholds, avg_cost)``: the ``K-1`` thresholds and their average cost on these samples. Ties go
        to the cheaper candidate, then to the earlier one on the path.

    Raises:
        ConfigError: If ``scores`` is not a real ``[K, N]`` array with ``N >= 1`` and no NaN, or a cost,
            ``target_cost`` or ``p`` is invalid.
    """
    conf = _check_scores(scores, "scores")
    if conf.shape[1] < 1:
        raise ConfigError(f"scores must hold at least one sample; got shape {tuple(conf.shape)}")
    if not np.issubdtype(conf.dtype, np.floating):
        conf = conf.astype(np.float64)
    costs = check_costs(exit_costs, conf.shape[0], cumulative=False)
    target = float(target_cost)
    if not math.isfinite(target):
        raise ConfigError(f"target_cost must be a finite number; got {target_cost!r}")
    candidates = p_path(conf, check_p_values(p_values))
    fractions = _exit_fractions(exits_for_candidates(conf, candidates), conf.shape[0])
    avg_cost = _average_costs(fractions, costs)
    best = min(range(len(candidates)), key=lambda i: (abs(avg_cost[i] - target), avg_cost[i], i))
    return candidates[best], float(avg_cost[best])


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
