"""Accuracy-guarantee calibrator (Learn then Test): validity over many validation draws and bad inputs."""

import math

import numpy as np
import pytest
import torch

from adaptnn import BudgetError, ConfigError
from adaptnn.calibration import (
    binomial_p_value,
    binomial_upper_bound,
    calibrate_accuracy_guarantee,
    exit_losses,
    exit_scores,
    exits_for_candidates,
    p_path,
    split_figures,
)
from adaptnn.calibration.budgeted import assign_exits
from adaptnn.calibration.guarantee import losses_from_exits as _losses
from adaptnn.policies import ConfidencePolicy, EntropyPolicy

COSTS = [1.0, 2.0, 3.0]


def _population(n: int = 100_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic 3-exit logits: per-sample difficulty shared by the exits, later exits more accurate."""
    gen = torch.Generator().manual_seed(seed)
    c = 5
    labels = torch.randint(0, c, (n,), generator=gen)
    difficulty = torch.randn(n, generator=gen)
    logits = torch.randn(3, n, c, generator=gen)
    for k, strength in enumerate([1.0, 2.0, 3.0]):
        logits[k, torch.arange(n), labels] += strength - 1.2 * difficulty
    return logits, labels


def test_binomial_helpers():
    # P(Bin(10, 0.1) <= 0) = 0.9**10
    assert binomial_p_value(0, 10, 0.1) == pytest.approx(0.9**10)
    assert binomial_p_value(10, 10, 0.1) == pytest.approx(1.0)
    # Clopper-Pearson with 0 losses: 1 - delta**(1/n)
    assert binomial_upper_bound(0, 50, 0.05) == pytest.approx(1 - 0.05 ** (1 / 50))
    assert binomial_upper_bound(5, 5, 0.05) == 1.0


def test_violation_rate_at_most_delta_over_many_validation_draws():
    """Over many i.i.d. validation draws, P(true risk > epsilon) <= delta (up to sampling error).

    The population is a finite sample of 100k; validation sets are drawn from it with replacement, so the
    population's own figures are the exact true risk of any thresholds.
    """
    logits, labels = _population()
    policy = ConfidencePolicy([None, None])
    pop = exit_scores(policy, logits, labels)
    epsilon, delta, n_val, trials = 0.03, 0.2, 800, 150
    rng = np.random.default_rng(1)
    violations = naive_violations = 0
    costs_reached = []
    for trial in range(trials):
        idx = torch.as_tensor(rng.integers(0, labels.shape[0], n_val))
        result = calibrate_accuracy_guarantee(policy, logits[:, idx], labels[idx], COSTS, epsilon, delta, seed=trial)
        true_risk = float(exit_losses(pop, result.thresholds, "drop").mean())
        violations += true_risk > epsilon
        costs_reached.append(split_figures(pop, result.thresholds, np.asarray(COSTS))["avg_cost"])
        # naive baseline: cheapest candidate whose empirical validation risk is <= epsilon (no statistics)
        val = pop.subset(idx.numpy())
        cands = p_path(val.scores)
        exits = exits_for_candidates(val.scores, cands)
        emp_risk = _losses(val, exits, "drop").mean(axis=1)
        cost = np.asarray(COSTS)[exits].mean(axis=1)
        cheapest = cands[min(np.flatnonzero(emp_risk <= epsilon), key=lambda i: cost[i])]
        naive_violations += float(exit_losses(pop, cheapest).mean()) > epsilon
    print(f"violation rate {violations / trials:.3f}, naive {naive_violations / trials:.3f}")
    rate = violations / trials
    slack = 3 * math.sqrt(delta * (1 - delta) / trials)
    assert rate <= delta + slack, f"violation rate {rate:.3f} > delta {delta} + {slack:.3f}"
    # the test has power: the naive rule violates far more often, and the calibrated one still saves compute
    assert naive_violations / trials > delta + slack
    assert np.mean(costs_reached) < COSTS[-1] * 0.95


def test_bad_targets_give_clear_errors():
    logits, labels = _population(2000)
    policy = ConfidencePolicy([None, None])
    with pytest.raises(BudgetError, match="higher accuracy than the last exit.*epsilon = 0"):
        calibrate_accuracy_guarantee(policy, logits, labels, COSTS, -0.01)
    with pytest.raises(BudgetError, match="at least 299 are needed.*last exit alone"):
        calibrate_accuracy_guarantee(policy, logits[:, :200], labels[:200], COSTS, 0.01, 0.05)
    with pytest.raises(ConfigError, match="delta"):
        calibrate_accuracy_guarantee(policy, logits, labels, COSTS, 0.01, 1.5)
    with pytest.raises(ConfigError, match="unknown loss"):
        calibrate_accuracy_guarantee(policy, logits, labels, COSTS, 0.01, loss="mse")


def test_result_is_consistent_and_works_for_other_policies():
    logits, labels = _population(4000)
    for policy in (ConfidencePolicy([None, None], temperatures=[1.5, 1.2, 1.0]), EntropyPolicy([None, None])):
        for loss in ("drop", "disagreement"):
            res = calibrate_accuracy_guarantee(
                policy, logits[:, :3000], labels[:3000], COSTS, 0.02, 0.1, loss=loss,
                test_logits=logits[:, 3000:], test_labels=labels[3000:],
            )  # fmt: skip
            assert res.details["certified"] >= 1
            assert res.details["risk_upper_bound"] <= 0.02 + 1e-9  # the certificate of the chosen point
            assert res.val["avg_cost"] < COSTS[-1]
            # the returned policy applies the thresholds
            sc = exit_scores(res.policy, logits[:, 3000:], labels[3000:])
            exits = assign_exits(sc.scores, res.thresholds)
            assert np.allclose(np.bincount(exits, minlength=3) / 1000, res.test["exit_fractions"])
            d = res.to_dict()
            assert d["method"] == "accuracy_guarantee" and d["epsilon"] == 0.02
