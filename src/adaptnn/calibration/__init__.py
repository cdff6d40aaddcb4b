"""Calibrating exit policies to the budget a user has, on the validation split only.

:mod:`~adaptnn.calibration.budgeted` is the one budgeted-batch engine (exit distribution, quotas, greedy
threshold fit, exit rule, figures, candidate path, sweep); everything else builds on it:

* :func:`calibrate_to_budget`: thresholds meeting a target average MACs per sample;
* :func:`calibrate_to_latency`: the same for measured per-exit latencies (ms) on the user's device;
* :func:`calibrate_knob_and_exits`: a deployment knob (a ViT token setting, an elastic member, anything with its
  own logits and exit costs) chosen jointly with the thresholds for one budget (the one joint engine);
  :func:`fit_to_batch_latency` holds it to a batch latency model for a budget in ms at batch > 1;
* :func:`calibrate_accuracy_guarantee`: accuracy drop vs the last exit ``<= epsilon`` with probability
  ``>= 1 - delta`` (Learn then Test);
* :func:`policy_sweep`: :func:`budgeted_sweep` for any threshold policy, with the reference code's
  ``legacy`` quirks available for reproducing published curves;
* :func:`thresholds_for_cost`: label-free thresholds whose average cost on given scores is closest to a
  target (for speed benchmarks).

The calibrators take a :class:`~adaptnn.policies.ThresholdPolicy` (any rule, with or without temperatures)
and cached ``forward_all`` logits, and return thresholds that ``run_dynamic`` applies unchanged.
"""

from .budget import CalibrationResult, calibrate_to_budget, calibrate_to_latency
from .budgeted import (
    DEFAULT_P_VALUES,
    DENSE_P_VALUES,
    EXIT_ALL,
    ExitScores,
    assign_exits,
    budgeted_sweep,
    check_costs,
    check_p_values,
    choose_operating_point,
    exit_distribution,
    exit_figures,
    exits_for_candidates,
    fit_thresholds,
    p_path,
    quota,
    split_figures,
    sweep_splits,
    thresholds_for_cost,
)
from .guarantee import (
    LOSSES,
    binomial_p_value,
    binomial_upper_bound,
    calibrate_accuracy_guarantee,
    exit_losses,
    losses_from_exits,
)
from .knobs import calibrate_knob_and_exits, fit_to_batch_latency
from .scores import exit_scores
from .sweep import flat_curve, policy_sweep

__all__ = [
    "DEFAULT_P_VALUES",
    "assign_exits",
    "budgeted_sweep",
    "check_costs",
    "check_p_values",
    "choose_operating_point",
    "exit_distribution",
    "exit_figures",
    "fit_thresholds",
    "quota",
    "sweep_splits",
    "thresholds_for_cost",
    "CalibrationResult",
    "calibrate_to_budget",
    "calibrate_to_latency",
    "calibrate_knob_and_exits",
    "fit_to_batch_latency",
    "calibrate_accuracy_guarantee",
    "binomial_p_value",
    "binomial_upper_bound",
    "exit_losses",
    "losses_from_exits",
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
