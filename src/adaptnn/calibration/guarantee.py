"""Thresholds with a statistical guarantee on the accuracy lost against the last exit (Learn then Test).

Goal: early-exit thresholds ``lambda`` whose accuracy drop versus the last exit is at most ``epsilon``
with probability at least ``1 - delta`` over the draw of the validation split, spending as little
compute as possible.

Method: Learn then Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021) with fixed-sequence testing.

* Risk. For thresholds ``lambda`` and a sample, the loss is ``1[last exit right and the exit taken is
  wrong]`` (``loss="drop"``) or ``1[the prediction differs from the last exit's]``
  (``loss="disagreement"``). Both are in ``{0, 1}`` and their mean ``R(lambda)`` upper-bounds the
  accuracy drop ``acc(last) - acc(lambda)``; so ``R(lambda) <= epsilon`` implies the drop is at most
  ``epsilon``.
* The validation split is shuffled (``seed``) and cut in two. The first part (``path_fraction``) only
  *orders* the candidates: threshold vectors of the budgeted-batch protocol over a dense ``p`` grid,
  sorted from the most expensive (safest) to the cheapest by their cost on that part. The second part
  (``n`` samples) tests ``H_lambda: R(lambda) > epsilon`` for each candidate in that order with the exact
  binomial p-value ``P(Binomial(n, epsilon) <= k)`` (``k`` = losses counted). Testing stops at the first
  p-value above ``delta``; every candidate before it is certified. Fixed-sequence testing controls the
  family-wise error at ``delta`` without a multiplicity correction, so *all* certified candidates satisfy
  ``R <= epsilon`` simultaneously with probability ``>= 1 - delta``, and picking the cheapest of them
  (by validation cost) keeps the guarantee.
* The last exit alone (every threshold disabled) has ``R = 0`` by construction and is always valid.

Assumptions: validation and test samples are i.i.d. draws from the same distribution (the binomial
p-values need independent losses given the ordering, which the split provides); the model, the policy
family, temperatures and any learned policy are fixed before the second part is looked at (fit them on
other data, e.g. the training split or the first part). The guarantee is on the population risk, i.e.
the expected loss on unseen data from that distribution, and holds for any finite ``n``; it says
nothing under distribution shift. ``epsilon`` is compared with the population drop, so the drop
measured on a finite test split fluctuates around it by sampling error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from ..errors import BudgetError, ConfigError
from ..policies import ThresholdPolicy
from .budget import CalibrationResult
from .budgeted import (
    DENSE_P_VALUES,
    ExitScores,
    assign_exits,
    check_costs,
    exit_figures,
    exits_for_candidates,
    p_path,
    split_figures,
)
from .scores import exit_scores

__all__ = [
    "calibrate_accuracy_guarantee",
    "binomial_p_value",
    "binomial_upper_bound",
    "exit_losses",
    "losses_from_exits",
    "LOSSES",
]

log = logging.getLogger(__name__)

LOSSES: tuple[str, ...] = ("drop", "disagreement")


def binomial_p_value(losses: int, n: int, epsilon: float) -> float:
    """``P(Binomial(n, epsilon) <= losses)``: valid p-value for ``H: mean loss > epsilon`` (losses in {0, 1})."""
    from scipy.stats import binom

    return float(binom.cdf(losses, n, epsilon))


def binomial_upper_bound(losses: int, n: int, delta: float) -> float:
    """Clopper-Pearson upper confidence bound (level ``1 - delta``) of a Bernoulli mean from ``losses`` of ``n``."""
    from scipy.stats import beta

    if losses >= n:
        return 1.0
    return float(beta.ppf(1 - delta, losses + 1, n - losses))


def _binomial_cdf(losses: np.ndarray, n: int, epsilon: float) -> np.ndarray:
    from scipy.stats import binom

    return np.asarray(binom.cdf(losses, n, epsilon), dtype=np.float64)


def losses_from_exits(es: ExitScores, exits: np.ndarray, loss: str) -> np.ndarray:
    """Per-sample loss (bool, shape of ``exits``: ``[N]`` or ``[M, N]``) of exit assignments of ``es``."""
    taken = np.take_along_axis(es.predictions, exits.reshape(-1, es.size), axis=0).reshape(exits.shape)
    last = es.predictions[-1]
    if loss == "drop":
        return (last == es.labels) & (taken != es.labels)
    if loss == "disagreement":
        return taken != last
    raise ConfigError(f"unknown loss {loss!r}; choose one of {list(LOSSES)}")


def exit_losses(es: ExitScores, thresholds: Sequence[float], loss: str = "drop") -> np.ndarray:
    """Per-sample loss ``[N]`` (bool) of ``thresholds`` (see the module docstring for the definitions)."""
    return losses_from_exits(es, assign_exits(es.scores, list(thresholds)), loss)


def calibrate_accuracy_guarantee(
    policy: ThresholdPolicy,
    val_logits: Tensor,
    val_labels: Tensor,
    exit_costs: Sequence[float],
    epsilon: float,
    delta: float = 0.1,
    *,
    loss: str = "drop",
    path_fraction: float = 0.3,
    seed: int = 0,
    test_logits: Tensor | None = None,
    test_labels: Tensor | None = None,
    p_values: Sequence[float] = DENSE_P_VALUES,
) -> CalibrationResult:
    """Cheapest certified thresholds: accuracy drop vs the last exit ``<= epsilon`` w.p. ``>= 1 - delta``.

    See the module docstring for the method (Learn then Test, fixed-sequence binomial tests) and its
    assumptions.

    Args:
        policy: a threshold policy (thresholds ignored; temperatures kept).
        val_logits, val_labels: validation logits ``[K, N, C]`` and labels.
        exit_costs: cumulative MACs per exit (the cost minimised among certified candidates).
        epsilon: allowed accuracy drop (fraction, e.g. 0.01 = one point), ``0 <= epsilon < 1``.
        delta: allowed probability that the guarantee fails, ``0 < delta < 1``.
        loss: ``"drop"`` or ``"disagreement"`` (both bound the drop; see the module docstring).
        path_fraction: share of the validation split used to order the candidates (the rest tests them).
        seed: seed of the validation shuffle.
        test_logits, test_labels: optional test split, evaluated afterwards (never used to choose).

    Raises:
        BudgetError: ``epsilon < 0`` (more accurate than the last exit), or no early-exit candidate can
            be certified; the message names the closest achievable operating point.
    """
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; choose one of {list(LOSSES)}")
    if not math.isfinite(epsilon) or epsilon >= 1:
        raise ConfigError(f"epsilon is an accuracy drop in [0, 1); got {epsilon!r}")
    if epsilon < 0:
        raise BudgetError(
            f"epsilon = {epsilon} asks for a higher accuracy than the last exit, which early exit cannot "
            "guarantee; the closest achievable target is epsilon = 0 (the last exit alone, no early exit)"
        )
    if not 0 < delta < 1:
        raise ConfigError(f"delta is a probability in (0, 1); got {delta!r}")
    if not 0 < path_fraction < 1:
        raise ConfigError(f"path_fraction must be in (0, 1); got {path_fraction!r}")
    val = exit_scores(policy, val_logits, val_labels)
    costs = check_costs(exit_costs, val.num_exits)
    k_exits = val.num_exits
    order = np.random.default_rng(seed).permutation(val.size)
    n_path = int(round(path_fraction * val.size))
    path_part, test_part = val.subset(order[:n_path]), val.subset(order[n_path:])
    n = test_part.size
    if n_path < 1 or n < 1:
        raise ConfigError(f"the validation split ({val.size} samples) is too small to split for the guarantee")
    full_model = [math.inf] * (k_exits - 1)

    candidates = [t for t in p_path(path_part.scores, p_values) if any(math.isfinite(v) for v in t)]
    _, path_cost, _ = exit_figures(path_part, exits_for_candidates(path_part.scores, candidates), costs)
    ordered = [candidates[i] for i in np.argsort(-path_cost, kind="stable")]

    # losses of every candidate on the testing part, then fixed-sequence testing in the path order
    exits = exits_for_candidates(test_part.scores, ordered)
    losses = losses_from_exits(test_part, exits, loss).sum(axis=1)
    p_values_all = _binomial_cdf(losses, n, epsilon)
    failing = np.flatnonzero(p_values_all > delta)
    n_certified = int(failing[0]) if failing.size else len(ordered)
    certified = [(ordered[i], int(losses[i]), float(p_values_all[i])) for i in range(n_certified)]
    first_failure = (
        (ordered[n_certified], int(losses[n_certified]), float(p_values_all[n_certified])) if failing.size else None
    )

    details = {
        "epsilon": float(epsilon),
        "delta": float(delta),
        "loss": loss,
        "procedure": "Learn then Test, fixed-sequence testing with exact binomial p-values",
        "assumptions": "validation and test samples i.i.d. from one distribution; policy fixed beforehand",
        "n_path": n_path,
        "n_test": n,
        "candidates": len(ordered),
        "certified": len(certified),
        "min_samples_for_any_certificate": int(math.ceil(math.log(delta) / math.log1p(-epsilon)))
        if epsilon > 0
        else None,
    }
    if not certified:
        closest = ""
        if first_failure is not None:
            thr, k, _ = first_failure
            fig = split_figures(val, thr, costs)
            closest = (
                f" The safest early-exit candidate (validation avg cost {fig['avg_cost']:.6g}, accuracy change "
                f"{fig['accuracy_change_vs_last_exit']:+.4f}) had {k}/{n} losses: it is certifiable only for "
                f"epsilon >= {binomial_upper_bound(k, n, delta):.4f} at this delta."
            )
        raise BudgetError(
            f"no early-exit thresholds can be certified to lose at most epsilon = {epsilon} accuracy with "
            f"probability >= {1 - delta} from {n} validation samples (at least "
            f"{details['min_samples_for_any_certificate']} are needed even for a loss-free candidate). "
            f"The closest achievable operating point is the last exit alone (cost {costs[-1]:.6g}).{closest} "
            "Use a larger epsilon or delta, or a larger validation split."
        )
    # any certified candidate is valid simultaneously: take the cheapest on the whole validation split
    val_acc, val_cost, _ = exit_figures(val, exits_for_candidates(val.scores, [thr for thr, _, _ in certified]), costs)
    best = min(range(len(certified)), key=lambda i: (val_cost[i], -val_acc[i]))
    thresholds, k, p_value = certified[best]
    best_fig = split_figures(val, thresholds, costs)
    details.update(
        {
            "test_part_losses": k,
            "test_part_risk": k / n,
            "p_value": p_value,
            "risk_upper_bound": binomial_upper_bound(k, n, delta),
            "full_model_thresholds": full_model,
        }
    )
    test_fig = None
    if test_logits is not None:
        if test_labels is None:
            raise ConfigError("test_logits were given without test_labels")
        test_es = exit_scores(policy, test_logits, test_labels)
        test_fig = split_figures(test_es, thresholds, costs)
        test_fig["risk"] = float(exit_losses(test_es, thresholds, loss).mean())
        test_fig["drop_within_epsilon"] = bool(-test_fig["accuracy_change_vs_last_exit"] <= epsilon)
    log.info(
        "accuracy guarantee eps=%.4g delta=%.3g: %d/%d candidates certified; cost %.6g (last exit %.6g)",
        epsilon, delta, len(certified), len(ordered), best_fig["avg_cost"], costs[-1],
    )  # fmt: skip
    return CalibrationResult(
        method="accuracy_guarantee",
        policy=policy.with_thresholds(thresholds),
        thresholds=thresholds,
        val=best_fig,
        test=test_fig,
        details=details,
    )
