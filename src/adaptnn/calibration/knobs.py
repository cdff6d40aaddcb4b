"""THE engine that chooses a deployment knob jointly with the exit thresholds for one budget.

A *knob* is anything fixed per deployment that changes what every exit predicts and costs: the token reduction of a
ViT (ToMe ``r``, EViT keep rate, or none), a member of an elastic family (a width x depth variant), or any other
setting that gives its own cached ``forward_all`` logits and its own cumulative exit costs (MACs, or measured ms at
the deployment's batch size). For each knob setting the budgeted-batch engine
(:func:`~adaptnn.calibration.budget._budget_fit`, the same candidates and rule as :func:`calibrate_to_budget`)
finds the most accurate thresholds within the budget; the setting whose best point is most accurate wins (ties:
the cheaper, then the earlier listed). The candidates of every setting include "everyone at the last exit", so the
knob alone, exits alone (the setting with no reduction, or the largest member) and both together all compete: the
joint choice is never worse on validation than either alone. A setting that cannot meet the budget is skipped.

A budget in ms at batch > 1 is not linear in the exit fractions: the samples that go on run the later stages as a
smaller batch (less efficient per row) and pay a compaction. :func:`fit_to_batch_latency` holds the same engine to
a batch latency model (e.g. ``LatencyModel.predict_batches``) by re-fitting the budget it is given.

Choosing a knob setting *without* exit thresholds (one row per setting, e.g. the elastic menu's member choice) is a
different idea: :func:`~adaptnn.calibration.variants.choose_variant`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from ..errors import BudgetError, ConfigError
from ..policies import ThresholdPolicy, simulate_exits
from .budget import CalibrationResult, _budget_fit
from .budgeted import DENSE_P_VALUES, check_costs, split_figures
from .scores import exit_scores

__all__ = ["calibrate_knob_and_exits", "fit_to_batch_latency"]

#: most rounds of re-fitting the engine's budget to a batch latency model (scaling, then bisection)
REFIT_ROUNDS = 12

log = logging.getLogger(__name__)


def calibrate_knob_and_exits(
    policy: ThresholdPolicy,
    options: Mapping[str, tuple[Tensor, Sequence[float]]],
    val_labels: Tensor,
    budget: float,
    *,
    unit: str = "MACs",
    test: Mapping[str, Tensor] | None = None,
    test_labels: Tensor | None = None,
    margin: float = 0.0,
    p_values: Sequence[float] = DENSE_P_VALUES,
) -> CalibrationResult:
    """The knob setting and thresholds with the best validation accuracy whose average cost is within ``budget``.

    Args:
        policy: any threshold policy (its thresholds are ignored; temperatures kept). Every setting must have
            the same number of exits ``K`` (the policy's).
        options: knob label (a token setting, an elastic member's name, ...) -> (validation ``forward_all``
            logits ``[K, N, C]`` with that setting, its ``K`` cumulative exit costs). List the default setting
            (no reduction, the largest member) first so it wins exact ties.
        val_labels: validation labels ``[N]`` (the same samples for every setting).
        budget: average cost per sample, in ``unit`` (MACs, or ms per sample at the measured batch size).
        unit: the cost unit, for messages and ``details``.
        test: optional knob label -> test logits, evaluated for the chosen setting only.
        test_labels: labels of the test logits.
        margin, p_values: as :func:`~adaptnn.calibration.calibrate_to_budget`.

    Returns:
        A :class:`CalibrationResult` (method ``"joint_budget"``) whose policy runs unchanged in ``run_dynamic``
        of the model set to the chosen setting; ``details["knob"]`` is the chosen label and ``details["per_knob"]``
        the best point of every setting (or why it was skipped).

    Raises:
        ConfigError: no settings, a non-positive budget, or exit costs that do not match the logits.
        BudgetError: no setting meets the budget.
    """
    if not options:
        raise ConfigError("options is empty: give at least one knob setting (label -> (val_logits, exit_costs))")
    if not math.isfinite(float(budget)) or float(budget) <= 0:
        raise ConfigError(f"the budget must be a finite number > 0 {unit}; got {budget!r}")
    best: tuple[float, float, int] | None = None
    chosen: dict[str, Any] = {}
    per_knob: list[dict[str, Any]] = []
    for order, (label, (val_logits, costs_in)) in enumerate(options.items()):
        val = exit_scores(policy, val_logits, val_labels)
        costs = check_costs(costs_in, val.num_exits, f"exit costs of {label!r}")
        try:
            thresholds, fig, n_cand = _budget_fit(
                policy, val, costs, float(budget), unit=unit, margin=margin, p_values=p_values
            )
        except BudgetError as err:
            per_knob.append({"knob": label, "feasible": False, "reason": str(err).split(".")[0]})
            continue
        per_knob.append({"knob": label, "feasible": True, "thresholds": thresholds, **fig})
        key = (fig["accuracy"], -fig["avg_cost"], -order)
        if best is None or key > best:
            best = key
            chosen = {"label": label, "thresholds": thresholds, "val": fig, "costs": costs, "candidates": n_cand}
    if best is None:
        cheapest = min(float(check_costs(c, len(c), "exit costs")[0]) for _, c in options.values())
        raise BudgetError(
            f"no knob setting meets the budget of {float(budget):.6g} {unit} per sample; the cheapest first exit of "
            f"any setting costs {cheapest:.6g} {unit}: raise the budget to at least that"
        )
    label = chosen["label"]
    test_fig = None
    if test is not None and label in test:
        if test_labels is None:
            raise ConfigError("test logits were given without test_labels")
        test_fig = split_figures(exit_scores(policy, test[label], test_labels), chosen["thresholds"], chosen["costs"])
        test_fig["within_budget"] = bool(test_fig["avg_cost"] <= budget)
    log.info("joint_budget: %.6g %s -> knob %s, val accuracy %.4f", budget, unit, label, chosen["val"]["accuracy"])
    return CalibrationResult(
        method="joint_budget",
        policy=policy.with_thresholds(chosen["thresholds"]),
        thresholds=chosen["thresholds"],
        val=chosen["val"],
        test=test_fig,
        details={
            "budget": float(budget),
            "unit": unit,
            "knob": label,
            "exit_costs": chosen["costs"].tolist(),
            "margin": margin,
            "candidates": chosen["candidates"],
            "per_knob": per_knob,
        },
    )


def fit_to_batch_latency(
    policy: ThresholdPolicy,
    options: Mapping[str, tuple[Tensor, Sequence[float]]],
    val_labels: Tensor,
    budget_ms: float,
    batch_size: int,
    batch_ms: Mapping[str, Callable[[Tensor], float]],
) -> tuple[CalibrationResult, float]:
    """:func:`calibrate_knob_and_exits` in ms, held to a batch latency model: ``(result, predicted ms per batch)``.

    The engine costs a choice linearly (``sum_k fraction_k * exit_ms[k]`` per sample, ``options``' costs); at batch
    > 1 that under-states mixed batches. ``batch_ms[label](exit_index)`` predicts the mean ms per batch of
    ``batch_size`` for the validation samples taking those exits (in order). The budget given to the engine is
    re-fitted (scaled by how far off the prediction is, then bisected: the choices are discrete) until the
    prediction meets ``budget_ms * batch_size``; the most accurate choice the model keeps within it wins.

    Raises:
        ConfigError: a setting without a batch latency model.
        BudgetError: no choice meets the budget (the engine's own error when even its budget is below every
            setting's first exit).
    """
    missing = [label for label in options if label not in batch_ms]
    if missing:
        raise ConfigError(f"no latency model for the settings {missing}; got models for {sorted(batch_ms)}")
    target = float(budget_ms) * int(batch_size)  # ms per batch
    # everyone at the first exit of the cheapest setting: no mixed batch, so both cost models agree there
    floor = min(float(costs[0]) for _, costs in options.values())
    engine_budget = float(budget_ms)
    feasible: float | None = None  # the largest engine budget whose choice the model keeps within target
    infeasible: float | None = None  # the smallest one whose choice it does not
    best: tuple[tuple[float, float], CalibrationResult, float] | None = None
    cheapest: float | None = None
    engine_error: BudgetError | None = None
    for _ in range(REFIT_ROUNDS):
        predicted = None
        try:
            result = calibrate_knob_and_exits(policy, options, val_labels, engine_budget, unit="ms")
        except BudgetError as err:  # the engine's budget fell below every setting's first exit
            engine_error = engine_error or err
            infeasible = engine_budget if infeasible is None else min(infeasible, engine_budget)
        else:
            label = result.details["knob"]
            exits, _ = simulate_exits(result.policy, options[label][0])
            predicted = float(batch_ms[label](exits))
            cheapest = predicted if cheapest is None else min(cheapest, predicted)
            if predicted <= target * (1 + 1e-9):
                feasible = engine_budget if feasible is None else max(feasible, engine_budget)
                key = (result.val["accuracy"], -predicted)
                if best is None or key > best[0]:
                    best = (key, result, predicted)
            else:
                infeasible = engine_budget if infeasible is None else min(infeasible, engine_budget)
            if abs(predicted / target - 1.0) < 0.005:
                break
        if infeasible is None:  # within target so far: spend more of it (scale by how far under it is)
            engine_budget *= max(target / predicted, 1.01) if predicted else 1.01
            continue
        low = feasible if feasible is not None else floor
        if infeasible - low <= 1e-3 * infeasible:
            break
        engine_budget = 0.5 * (low + infeasible)
    if best is None and cheapest is None and engine_error is not None:
        raise engine_error
    if best is None:
        raise BudgetError(
            f"no knob setting meets the budget of {budget_ms:.6g} ms per sample at batch {batch_size}: the latency "
            f"model of mixed-exit batches predicts at least {cheapest:.6g} ms per batch for the choices tried "
            f"(budget {target:.6g} ms per batch); raise the budget"
        )
    _, result, predicted = best
    result.details["predicted_ms_per_batch"] = predicted
    result.details["latency_batch_size"] = int(batch_size)
    return result, predicted
