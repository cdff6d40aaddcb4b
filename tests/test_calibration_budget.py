"""Compute- and latency-budget calibrators, the generic policy sweep and the legacy flat curve."""

import math

import numpy as np
import pytest
import torch

from adaptnn import BudgetError, ConfigError
from adaptnn.calibration import (
    EXIT_ALL,
    assign_exits,
    budgeted_sweep,
    calibrate_to_budget,
    calibrate_to_latency,
    exits_for_candidates,
    flat_curve,
    p_path,
    policy_sweep,
    thresholds_for_cost,
)
from adaptnn.policies import ConfidencePolicy, MarginPolicy, PatiencePolicy, simulate_exits


def _two_exit_logits(n: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K=2, C=2, all labels 0. Exit 0: sample i has confidence rising with i and is right only for the top
    half (i >= n/2); the last exit is always right. Returns (logits [2, n, 2], labels, exit-0 confidences)."""
    i = torch.arange(n, dtype=torch.float64)
    margin = 0.1 + 3 * i / n  # distinct, increasing confidences
    sign = torch.where(i >= n // 2, 1.0, -1.0)  # bottom half predicts class 1 (wrong)
    exit0 = torch.stack([sign * margin / 2, -sign * margin / 2], dim=1)
    last = torch.tensor([[4.0, -4.0]]).expand(n, 2)
    logits = torch.stack([exit0, last]).float()
    return logits, torch.zeros(n, dtype=torch.long), logits[0].softmax(-1).amax(-1)


def test_compute_budget_known_answers():
    logits, labels, conf = _two_exit_logits()
    policy = ConfidencePolicy([None])
    # budget 2 with costs [1, 3]: at most... at least half must leave at exit 0; the best is the confident half
    res = calibrate_to_budget(policy, logits, labels, [1.0, 3.0], 2.0)
    assert res.val["avg_cost"] == pytest.approx(2.0)
    assert res.val["accuracy"] == 1.0
    assert res.thresholds == [pytest.approx(float(conf[50]))]
    # budget 1.5: 75 samples must leave at exit 0, 25 of them wrong
    res = calibrate_to_budget(policy, logits, labels, [1.0, 3.0], 1.5)
    assert res.val["avg_cost"] == pytest.approx(1.5)
    assert res.val["accuracy"] == pytest.approx(0.75)
    # a generous budget takes the full model (accuracy 1 at the highest exit fraction of exit 0 allowed)
    res = calibrate_to_budget(policy, logits, labels, [1.0, 3.0], 10.0)
    assert res.val["accuracy"] == 1.0
    # exactly the first exit's cost: everyone leaves there
    res = calibrate_to_budget(policy, logits, labels, [1.0, 3.0], 1.0)
    assert res.thresholds == [EXIT_ALL] and res.val["exit_fractions"] == [1.0, 0.0]
    assert res.val["accuracy"] == pytest.approx(0.5)
    # the returned policy really does that on the logits
    exit_index, _ = simulate_exits(res.policy, logits)
    assert exit_index.tolist() == [0] * 100


def test_budget_below_first_exit_names_closest_point():
    logits, labels, _ = _two_exit_logits()
    with pytest.raises(BudgetError, match=r"first exit alone costs 1.*closest achievable.*1 MACs.*accuracy 0.5000"):
        calibrate_to_budget(ConfidencePolicy([None]), logits, labels, [1.0, 3.0], 0.5)
    with pytest.raises(ConfigError, match="finite number > 0"):
        calibrate_to_budget(ConfidencePolicy([None]), logits, labels, [1.0, 3.0], -1)
    with pytest.raises(ConfigError, match="cumulative"):
        calibrate_to_budget(ConfidencePolicy([None]), logits, labels, [3.0, 1.0], 2)
    with pytest.raises(ConfigError, match="one cumulative value per exit"):
        calibrate_to_budget(ConfidencePolicy([None]), logits, labels, [1.0, 2.0, 3.0], 2)


def test_latency_budget_uses_latencies_and_margin():
    logits, labels, _ = _two_exit_logits()
    res = calibrate_to_latency(ConfidencePolicy([None]), logits, labels, [2.0, 6.0], 4.0, batch_size=8)
    assert res.method == "latency_budget" and res.details["unit"] == "ms"
    assert res.details["latency_batch_size"] == 8
    assert res.val["avg_cost"] == pytest.approx(4.0) and res.val["accuracy"] == 1.0
    # a safety margin aims below the budget
    safe = calibrate_to_latency(ConfidencePolicy([None]), logits, labels, [2.0, 6.0], 4.0, margin=2.0)
    assert safe.val["avg_cost"] + 2 * safe.val["avg_cost_std_error"] <= 4.0 + 1e-9
    assert safe.val["avg_cost"] < 4.0
    with pytest.raises(BudgetError, match="ms"):
        calibrate_to_latency(ConfidencePolicy([None]), logits, labels, [2.0, 6.0], 1.0)


def _synthetic(n: int, seed: int, k: int = 4, c: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=gen)
    d = torch.randn(n, generator=gen)
    z = torch.randn(k, n, c, generator=gen)
    for e in range(k):
        z[e, torch.arange(n), y] += 1 + 0.8 * e - d
    return z, y


def test_budget_result_generalises_and_beats_a_single_exit():
    z, y = _synthetic(3000, 0)
    zt, yt = _synthetic(3000, 1)
    costs = [1.0, 2.0, 3.0, 4.0]
    for policy in (ConfidencePolicy([None] * 3), MarginPolicy([None] * 3), PatiencePolicy([None] * 3)):
        res = calibrate_to_budget(policy, z, y, costs, 2.0, test_logits=zt, test_labels=yt)
        assert res.val["avg_cost"] <= 2.0
        assert abs(res.test["avg_cost"] - res.val["avg_cost"]) < 0.15  # same cost on unseen data up to sampling error
        exit1_acc = float((z[1].argmax(-1) == y).double().mean())  # the single exit with the same cost
        if not isinstance(policy, PatiencePolicy):  # patience's integer scores cannot use the budget finely
            assert res.val["avg_cost"] > 1.9
            assert res.val["accuracy"] > exit1_acc


def test_policy_sweep_equals_budgeted_sweep_for_confidence():
    z, y = _synthetic(500, 2)
    zt, yt = _synthetic(400, 3)
    costs = [1.0, 2.0, 3.0, 4.0]
    ours = policy_sweep(ConfidencePolicy([None] * 3), z, y, zt, yt, costs)
    ref = budgeted_sweep(z.softmax(-1), y, zt.softmax(-1), yt, costs)
    assert ours == ref


def test_flat_curve_is_the_upper_envelope():
    sweep = [
        {"avg_cost": 3.0, "test_accuracy": 0.8},
        {"avg_cost": 1.0, "test_accuracy": 0.7},
        {"avg_cost": 2.0, "test_accuracy": 0.9},
        {"avg_cost": 4.0, "test_accuracy": 0.85},
    ]
    flat = flat_curve(sweep)
    assert [p["test_accuracy"] for p in flat] == [0.9, 0.7, 0.9, 0.9]
    assert [p["test_accuracy_raw"] for p in flat] == [0.8, 0.7, 0.9, 0.85]
    z, y = _synthetic(300, 4)
    legacy = policy_sweep(ConfidencePolicy([None] * 3), z, y, z, y, [1, 2, 3, 4], legacy=True)
    by_cost = sorted(legacy, key=lambda p: p["avg_cost"])
    accs = [p["test_accuracy"] for p in by_cost]
    assert all(b >= a for a, b in zip(accs, accs[1:], strict=False))
    assert all(p["test_accuracy"] >= p["test_accuracy_raw"] for p in legacy)
    assert not math.isnan(np.mean(accs))


def test_thresholds_for_cost_picks_the_path_candidate_closest_to_the_target():
    z, _ = _synthetic(2000, 5)
    scores = z.softmax(-1).amax(-1).numpy()  # [K, N] max softmax; no labels anywhere
    costs = np.asarray([1.0, 2.0, 3.0, 4.0])
    candidates = p_path(scores)
    achieved = [float(costs[assign_exits(scores, t)].mean()) for t in candidates]
    assert len(candidates) > 50
    # the target cost of a known candidate returns it (the earliest of equal-cost candidates)
    for i in (0, 1, 7, len(candidates) // 2, len(candidates) - 1):
        thresholds, cost = thresholds_for_cost(scores, costs, achieved[i])
        first = min(j for j, c in enumerate(achieved) if c == pytest.approx(achieved[i], abs=1e-12))
        assert thresholds == candidates[first]
        assert cost == pytest.approx(achieved[i], abs=1e-12)
    # beyond the extremes: everyone at the first exit, everyone at the last
    assert thresholds_for_cost(scores, costs, 0.0) == ([EXIT_ALL, math.inf, math.inf], 1.0)
    assert thresholds_for_cost(scores, costs, 10.0) == ([math.inf] * 3, 4.0)
    # in between: the realised cost of the returned thresholds, closer to the target than any other candidate
    for target in (1.37, 2.5, 3.21):
        thresholds, cost = thresholds_for_cost(scores, costs, target)
        assert 1.0 <= cost <= 4.0 and abs(cost - target) < 0.05
        assert cost == pytest.approx(float(costs[assign_exits(scores, thresholds)].mean()), abs=1e-12)
        assert abs(cost - target) <= min(abs(c - target) for c in achieved) + 1e-12
    # a tensor gives the same answer; a single exit has no thresholds
    assert thresholds_for_cost(torch.from_numpy(scores), costs.tolist(), 2.5) == thresholds_for_cost(scores, costs, 2.5)
    assert thresholds_for_cost(scores[:1], [5.0], 3.0) == ([], 5.0)
    bad = scores.copy()
    bad[1, 3] = np.nan
    for args, pattern in [
        ((bad, costs, 2.0), "NaN"),
        ((scores, [1.0, 2.0], 2.0), "length K = 4"),
        ((scores, costs, math.inf), "target_cost"),
        ((scores[0], [1.0], 2.0), r"shape \[K, N\]"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            thresholds_for_cost(*args)


def test_one_exit_rule_for_one_or_many_threshold_vectors():
    z, _ = _synthetic(300, 6)
    scores = z.softmax(-1).amax(-1).numpy()
    candidates = p_path(scores, [0.1, 0.5, 1.0, 3.0])
    many = exits_for_candidates(scores, candidates)
    assert many.shape == (len(candidates), 300) and many.dtype == np.int64
    for row, thresholds in zip(many, candidates, strict=True):
        assert np.array_equal(row, assign_exits(scores, thresholds))
