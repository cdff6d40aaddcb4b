"""Evaluation of a staged model: cached logits, anytime accuracy, replayed and realised early exit, curves, plots.

* :func:`collect_logits` caches every exit's logits on a split (``forward_all``) once;
* :func:`anytime_results`, :func:`simulate_policy`, :func:`per_class_exits` read exits off cached logits;
* :func:`realised_run` runs a policy for real (``run_dynamic``) and times it against the full model with the
  measurement engine of :mod:`adaptnn.measure` (interleaved calls, warm-up by time, medians);
* :func:`curve_table` compares accuracy-vs-MACs curves (:func:`macs_curve` reads one off report points);
  :mod:`.plots` draws ``report.png``.
"""

from .curves import common_range, cost_at_accuracy, curve_auc, curve_table, macs_curve, point_macs
from .exits import anytime_results, exit_fractions, per_class_exits, simulate_policy
from .logits import collect_logits, eval_loader
from .plots import plot_curves, plot_report
from .realised import realised_run

__all__ = [
    "collect_logits",
    "eval_loader",
    "anytime_results",
    "exit_fractions",
    "per_class_exits",
    "simulate_policy",
    "realised_run",
    "common_range",
    "cost_at_accuracy",
    "curve_auc",
    "curve_table",
    "macs_curve",
    "point_macs",
    "plot_curves",
    "plot_report",
]
