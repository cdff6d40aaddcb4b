"""Exit policies: the rules that decide, after each exit head, which samples are finished.

See :mod:`adaptnn.policies.base` for the protocol. Shipped rules (all threshold rules, usable in
``run_dynamic`` and :func:`simulate_exits`, calibratable with :mod:`adaptnn.calibration`):

==========================  ==============================================================
``confidence``              :class:`ConfidencePolicy`: max softmax probability
``entropy``                 :class:`EntropyPolicy`: ``1 - H / log C``
``margin``                  :class:`MarginPolicy`: top-1 minus top-2 probability
``patience``                :class:`PatiencePolicy`: unchanged predictions in a row (PABEE)
``average``                 :class:`AveragedEnsemblePolicy`: running mean of the exits' probabilities
``boosted``                 :class:`BoostedEnsemblePolicy`: additive logits ``A_s = f_s + r A_{s-1}``
``learned``                 :class:`LearnedPolicy`: tiny MLP predicting "this exit is correct"
==========================  ==============================================================

Per-exit temperature scaling (:func:`fit_temperatures`) is an option of every confidence-based rule.
"""

from __future__ import annotations

from .base import ExitPolicy, ThresholdPolicy, max_softmax, normalised_certainty, simulate_exits, softmax_margin
from .confidence import ConfidencePolicy, EntropyPolicy, MarginPolicy, NeverExit
from .ensemble import AveragedEnsemblePolicy, BoostedEnsemblePolicy
from .factory import POLICY_NAMES, make_policy, policy_from_dict, policy_name, policy_to_dict
from .learned import ExitCorrectnessNet, LearnedPolicy, exit_features, fit_learned_policy
from .patience import PatiencePolicy
from .temperature import fit_temperatures

__all__ = [
    "ExitPolicy",
    "ThresholdPolicy",
    "ConfidencePolicy",
    "NeverExit",
    "EntropyPolicy",
    "MarginPolicy",
    "PatiencePolicy",
    "AveragedEnsemblePolicy",
    "BoostedEnsemblePolicy",
    "LearnedPolicy",
    "ExitCorrectnessNet",
    "exit_features",
    "fit_learned_policy",
    "fit_temperatures",
    "simulate_exits",
    "max_softmax",
    "softmax_margin",
    "normalised_certainty",
    "POLICY_NAMES",
    "make_policy",
    "policy_name",
    "policy_to_dict",
    "policy_from_dict",
]
