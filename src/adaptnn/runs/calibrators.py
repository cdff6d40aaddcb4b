"""The calibrators: one small function per way of choosing a run's operating point, selected from a table.

Each calibrator maps the fitted :class:`CalibrationInputs` (policy family, validation logits, exit MACs, the
budgeted sweep) and the user's :class:`CalibrationOptions` to ``(operating point, calibrator JSON)``, named
for ``calibration.json`` (cost figures by unit, :mod:`.naming`). Only validation figures are used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from ..calibration import (
    CalibrationResult,
    calibrate_accuracy_guarantee,
    calibrate_to_budget,
    calibrate_to_latency,
    choose_operating_point,
    exit_scores,
    fit_to_batch_latency,
    split_figures,
)
from ..errors import ConfigError
from ..policies import ThresholdPolicy
from .naming import named_by_unit

__all__ = [
    "CALIBRATORS",
    "CalibrationInputs",
    "CalibrationOptions",
    "Calibrator",
    "Choice",
    "point_from_result",
    "select_calibrator",
]


@dataclass
class CalibrationOptions:
    """What ``calibrate_run`` was asked for; at most one of ``budget_macs``, ``budget_ms``, ``epsilon`` is set.

    ``batch_latency_ms`` (exit index per validation sample -> mean ms per batch of ``latency_batch_size``, e.g. the
    run's profiled ``LatencyModel.predict_batches``) holds a ``budget_ms`` at batch > 1 to the latency of mixed-exit
    batches instead of the per-sample average of ``exit_latency_ms``.
    """

    tolerance: float
    budget_macs: float | None = None
    budget_ms: float | None = None
    exit_latency_ms: Sequence[float] | None = None
    latency_batch_size: int = 1
    epsilon: float | None = None
    delta: float = 0.1
    batch_latency_ms: Callable[[Tensor], float] | None = None


@dataclass
class CalibrationInputs:
    """What every calibrator reads: the policy family, validation logits, exit MACs and the budgeted sweep."""

    family: ThresholdPolicy
    val_logits: Tensor
    val_labels: Tensor
    exit_macs: list[float]
    sweep: list[dict[str, Any]]
    last_exit_val_accuracy: float


#: what a calibrator returns: the operating point and the calibrator's JSON (both for calibration.json)
Choice = tuple[dict[str, Any], dict[str, Any]]
Calibrator = Callable[[CalibrationInputs, CalibrationOptions], Choice]


def _sweep_tolerance(inputs: CalibrationInputs, options: CalibrationOptions) -> Choice:
    """The cheapest sweep point (validation MACs) within ``tolerance`` of the last exit's validation accuracy."""
    point = choose_operating_point(inputs.sweep, inputs.last_exit_val_accuracy, options.tolerance)
    return named_by_unit(point), {"method": "budgeted_sweep_tolerance", "tolerance": options.tolerance}


def _compute_budget(inputs: CalibrationInputs, options: CalibrationOptions) -> Choice:
    """The most accurate thresholds whose average validation MACs are within ``budget_macs``."""
    result = calibrate_to_budget(
        inputs.family, inputs.val_logits, inputs.val_labels, inputs.exit_macs, float(options.budget_macs)
    )
    return point_from_result(inputs, result)


def _latency_budget(inputs: CalibrationInputs, options: CalibrationOptions) -> Choice:
    """The most accurate thresholds whose average latency (from ``exit_latency_ms``) is within ``budget_ms``.

    At batch > 1 with ``batch_latency_ms`` the thresholds are held to the latency of mixed-exit batches
    (:func:`~adaptnn.calibration.fit_to_batch_latency`, one setting).
    """
    if options.batch_latency_ms is not None and options.latency_batch_size > 1:
        result, predicted = fit_to_batch_latency(
            inputs.family, {"none": (inputs.val_logits, list(options.exit_latency_ms or []))}, inputs.val_labels,
            float(options.budget_ms), options.latency_batch_size, {"none": options.batch_latency_ms},
        )  # fmt: skip
        details = {k: v for k, v in result.details.items() if k not in ("knob", "per_knob")}
        details["latency_model"] = "latency model of mixed-exit batches (each batch's own exit counts)"
        result = dataclasses.replace(result, method="latency_budget", details=details)
        return point_from_result(inputs, result)
    result = calibrate_to_latency(
        inputs.family,
        inputs.val_logits,
        inputs.val_labels,
        list(options.exit_latency_ms or []),
        float(options.budget_ms),
        batch_size=options.latency_batch_size,
    )
    return point_from_result(inputs, result)


def _accuracy_guarantee(inputs: CalibrationInputs, options: CalibrationOptions) -> Choice:
    """The cheapest thresholds certified to lose at most ``epsilon`` accuracy w.p. ``>= 1 - delta``."""
    result = calibrate_accuracy_guarantee(
        inputs.family, inputs.val_logits, inputs.val_labels, inputs.exit_macs, float(options.epsilon), options.delta
    )
    return point_from_result(inputs, result)


def point_from_result(inputs: CalibrationInputs, result: CalibrationResult) -> Choice:
    """Operating point (``p`` is ``None``: no sweep point) and calibrator JSON of a calibrator's result."""
    macs = split_figures(
        exit_scores(inputs.family, inputs.val_logits, inputs.val_labels),
        result.thresholds,
        np.asarray(inputs.exit_macs),
    )["avg_cost"]
    point = {
        "p": None,
        "thresholds": result.thresholds,
        "val_accuracy": result.val["accuracy"],
        "val_avg_macs": float(macs),
    }
    return point, named_by_unit(result.to_dict(), result.details.get("unit", "MACs"))


#: calibrator name (``calibrator.method`` in calibration.json) -> (the calibrate_run option that selects it,
#: the calibrator); the one without an option is the default
CALIBRATORS: dict[str, tuple[str | None, Calibrator]] = {
    "compute_budget": ("budget_macs", _compute_budget),
    "latency_budget": ("budget_ms", _latency_budget),
    "accuracy_guarantee": ("epsilon", _accuracy_guarantee),
    "budgeted_sweep_tolerance": (None, _sweep_tolerance),
}


def select_calibrator(given: dict[str, Any]) -> str:
    """The calibrator selected by the options ``given`` (option -> value, ``None`` when not set).

    Raises:
        ConfigError: more than one budget or guarantee was given.
    """
    chosen = {
        option: name
        for name, (option, _) in CALIBRATORS.items()
        if option is not None and given.get(option) is not None
    }
    if len(chosen) > 1:
        raise ConfigError(f"give at most one of budget_macs, budget_ms and epsilon; got {list(chosen)}")
    return next(iter(chosen.values()), "budgeted_sweep_tolerance")
