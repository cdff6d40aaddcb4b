"""Calibrating exit policies to the budget a user has, on the validation split only.

* :func:`calibrate_to_budget`: thresholds meeting a target average MACs per sample;
* :func:`calibrate_to_latency`: the same for measured per-exit latencies (ms) on the user's device;
* :func:`calibrate_accuracy_guarantee`: accuracy drop vs the last exit ``<= epsilon`` with probability
  ``>= 1 - delta`` (Learn then Test);
* :func:`policy_sweep`: the budgeted-batch sweep of :mod:`adaptnn.calibrate` for any threshold policy,
  with the reference code's ``legacy`` quirks available for reproducing published curves.

All of them take a :class:`~adaptnn.policies.ThresholdPolicy` (any rule, with or without temperatures)
and cached ``forward_all`` logits, and return thresholds that ``run_dynamic`` applies unchanged.
"""

from .budget import CalibrationResult, calibrate_to_budget, calibrate_to_latency
from .budgeted import (
    DEFAULT_P_VALUES,
    assign_exits,
    budgeted_sweep,
    check_p_values,
    choose_operating_point,
    exit_distribution,
    fit_thresholds,
    quota,
)
from .guarantee import (
    LOSSES,
    binomial_p_value,
    binomial_upper_bound,
    calibrate_accuracy_guarantee,
    exit_losses,
)
from .scores import DENSE_P_VALUES, EXIT_ALL, ExitScores, exit_scores, exits_for_candidates, p_path, split_figures
from .sweep import flat_curve, policy_sweep

__all__ = [
    "DEFAULT_P_VALUES",
    "assign_exits",
    "budgeted_sweep",
    "check_p_values",
    "choose_operating_point",
    "exit_distribution",
    "fit_thresholds",
    "quota",
    "CalibrationResult",
    "calibrate_to_budget",
    "calibrate_to_latency",
    "calibrate_accuracy_guarantee",
    "binomial_p_value",
    "binomial_upper_bound",
    "exit_losses",
    "LOSSES",
    "DENSE_P_VALUES",
    "EXIT_ALL",
    "ExitScores",
    "exit_scores",
    "exits_for_candidates",
    "p_path",
    "split_figures",
    "policy_sweep",
    "flat_curve",
]
