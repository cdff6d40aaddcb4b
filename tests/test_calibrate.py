"""Tests for the budgeted-batch engine (adaptnn.calibration.budgeted): the sweep and operating-point choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adaptnn.calibration.budgeted import DEFAULT_P_VALUES, assign_exits, budgeted_sweep, choose_operating_point
from adaptnn.errors import BudgetError, ConfigError

# --------------------------------------------------------------------------------------------------
# brute-force reference: pure Python, loops over samples, the rule written out literally
# --------------------------------------------------------------------------------------------------


def _ref_quota(n: int, fraction: float) -> int:
    # floor(N * pi_k), with the documented slack for N * pi_k landing a hair below an integer.
    x = n * fraction
    return math.floor(x + 1e-13 * max(1.0, x))


def _ref_conf_pred(probs: list) -> tuple[list, list]:
    """Per exit, per sample: max probability and first index reaching it."""
    conf, pred = [], []
    for exit_rows in probs:
        c_row, p_row = [], []
        for row in exit_rows:
            best = 0
            for j in range(1, len(row)):
                if row[j] > row[best]:
                    best = j
            c_row.append(row[best])
            p_row.append(best)
        conf.append(c_row)
        pred.append(p_row)
    return conf, pred


def _ref_assign(conf: list, thresholds: list) -> list:
    n_exits, n = len(conf), len(conf[0])
    exits = []
    for i in range(n):
        chosen = n_exits - 1
        for k in range(n_exits - 1):
            if conf[k][i] >= thresholds[k]:
                chosen = k
                break
        exits.append(chosen)
    return exits


def _ref_eval(exits: list, pred: list, labels: list, costs: list) -> tuple[float, float, list]:
    n_exits, n = len(pred), len(labels)
    correct = 0
    counts = [0] * n_exits
    for i in range(n):
        counts[exits[i]] += 1
        if pred[exits[i]][i] == labels[i]:
            correct += 1
    fractions = [c / n for c in counts]
    cost = sum(fractions[k] * costs[k] for k in range(n_exits))
    return correct / n, cost, fractions


def reference_sweep(val_probs, val_labels, test_probs, test_labels, costs, p_values) -> list[dict]:
    val_probs, test_probs = val_probs.tolist(), test_probs.tolist()  # exact Python floats
    val_labels, test_labels = [int(v) for v in val_labels], [int(v) for v in test_labels]
    costs = [float(c) for c in costs]
    v_conf, v_pred = _ref_conf_pred(val_probs)
    t_conf, t_pred = _ref_conf_pred(test_probs)
    n_exits, n_val = len(v_conf), len(val_labels)
    out = []
    for p in p_values:
        weights = [p**k for k in range(1, n_exits + 1)]
        total = sum(weights)
        pi = [w / total for w in weights]
        assigned = [False] * n_val
        thresholds = []
        for k in range(n_exits - 1):
            quota = _ref_quota(n_val, pi[k])
            remaining = sorted((v_conf[k][i] for i in range(n_val) if not assigned[i]), reverse=True)
            if quota == 0 or len(remaining) < quota:
                t = math.inf
            else:
                t = remaining[quota - 1]
            for i in range(n_val):
                if not assigned[i] and v_conf[k][i] >= t:
                    assigned[i] = True
            thresholds.append(t)
        # The greedy validation assignment must be what the thresholds give on validation.
        greedy_exits = _ref_assign(v_conf, thresholds)
        v_acc, v_cost, v_frac = _ref_eval(greedy_exits, v_pred, val_labels, costs)
        t_acc, t_cost, t_frac = _ref_eval(_ref_assign(t_conf, thresholds), t_pred, test_labels, costs)
        out.append(
            {
                "p": p,
                "thresholds": thresholds,
                "val_accuracy": v_acc,
                "test_accuracy": t_acc,
                "avg_cost": t_cost,
                "exit_fractions": t_frac,
                "val_avg_cost": v_cost,
                "val_exit_fractions": v_frac,
            }
        )
    return out


def _random_case(rng: np.random.Generator, k: int, n_val: int, n_test: int, c: int, decimals: int, dtype):
    def probs(n):
        raw = rng.dirichlet(np.full(c, 0.5), size=(k, n))
        return np.round(raw, decimals).astype(dtype)  # rounding forces ties in confidence

    val_labels = rng.integers(0, c, size=n_val)
    test_labels = rng.integers(0, c, size=n_test)
    costs = np.cumsum(rng.uniform(1.0, 100.0, size=k))
    return probs(n_val), val_labels, probs(n_test), test_labels, costs


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["p"] == w["p"]
        assert g["thresholds"] == w["thresholds"], (g["p"], g["thresholds"], w["thresholds"])
        assert all(type(t) is float for t in g["thresholds"])
        assert g["val_accuracy"] == w["val_accuracy"]
        assert g["test_accuracy"] == w["test_accuracy"]
        assert g["exit_fractions"] == w["exit_fractions"]
        assert g["val_exit_fractions"] == w["val_exit_fractions"]
        assert math.isclose(g["avg_cost"], w["avg_cost"], rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(g["val_avg_cost"], w["val_avg_cost"], rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(sum(g["exit_fractions"]), 1.0)
        assert math.isclose(sum(g["val_exit_fractions"]), 1.0)


# p values beyond the default grid: tiny p (later quotas 0), large p (early quotas 0), p = 1 (uniform).
EXTRA_P = [0.001, 0.2, 1.0, 3.0, 25.0]


@pytest.mark.parametrize("seed", range(40))
def test_matches_bruteforce_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 6))
    n_val = int(rng.integers(1, 201)) if seed % 5 else int(rng.integers(1, 6))  # some tiny N
    n_test = int(rng.integers(1, 201))
    c = int(rng.integers(1, 11))
    decimals = 1 if seed % 3 == 0 else 2
    dtype = np.float32 if seed % 2 else np.float64
    case = _random_case(rng, k, n_val, n_test, c, decimals, dtype)
    p_values = list(DEFAULT_P_VALUES) + EXTRA_P
    got = budgeted_sweep(*case, p_values=p_values)
    want = reference_sweep(*case, p_values=p_values)
    _assert_same(got, want)


def test_reference_cases_exercise_ties_and_zero_quotas() -> None:
    """Guard against the comparison above silently testing only easy cases."""
    rng = np.random.default_rng(123)
    case = _random_case(rng, 4, 150, 150, 5, 1, np.float64)
    got = budgeted_sweep(*case, p_values=[0.001, 25.0, 1.0])
    # p tiny: exits 1 and 2 get quota 0 -> +inf; p huge: exit 0 gets quota 0 -> +inf.
    assert got[0]["thresholds"][1:] == [math.inf, math.inf]
    assert got[1]["thresholds"][0] == math.inf
    # p = 1: quota 37 per exit; with 1-decimal confidences ties make exit 0 take more than 37.
    assert got[2]["val_exit_fractions"][0] * 150 > 37
    _assert_same(got, reference_sweep(*case, p_values=[0.001, 25.0, 1.0]))


def test_default_p_values() -> None:
    assert DEFAULT_P_VALUES == tuple(q / 20 for q in range(1, 40))
    rng = np.random.default_rng(0)
    out = budgeted_sweep(*_random_case(rng, 3, 50, 40, 4, 2, np.float64))
    assert [r["p"] for r in out] == list(DEFAULT_P_VALUES)
    for r in out:
        assert set(r) == {
            "p",
            "thresholds",
            "val_accuracy",
            "test_accuracy",
            "avg_cost",
            "exit_fractions",
            "val_avg_cost",
            "val_exit_fractions",
        }
        assert len(r["thresholds"]) == 2 and len(r["exit_fractions"]) == 3


def test_quota_is_not_lost_to_float_rounding() -> None:
    # K=2, p=0.2: pi_0 = 5/6 and 18 * pi_0 evaluates to 14.999999999999998; the quota must be 15.
    assert 18 * (0.2 / (0.2 + 0.2**2)) < 15
    conf0 = np.linspace(0.9, 0.5, 18)  # distinct confidences: exactly the quota exits at 0
    probs = np.stack([np.stack([conf0, 1 - conf0], axis=1)] * 2)
    labels = np.zeros(18, dtype=np.int64)
    (r,) = budgeted_sweep(probs, labels, probs, labels, [1.0, 2.0], p_values=[0.2])
    assert r["val_exit_fractions"] == [15 / 18, 3 / 18]
    assert r["thresholds"] == [float(conf0[14])]


def test_thresholds_keep_input_dtype() -> None:
    rng = np.random.default_rng(7)
    case = _random_case(rng, 3, 100, 60, 5, 3, np.float32)
    out = budgeted_sweep(*case, p_values=[0.5, 1.0])
    val_conf = case[0].max(axis=2)
    for r in out:
        for k, t in enumerate(r["thresholds"]):
            if math.isfinite(t):
                # exactly a float32 validation confidence, not a float64 rounding of it
                assert np.any(val_conf[k] == np.float32(t))
                assert float(np.float32(t)) == t


# --------------------------------------------------------------------------------------------------
# behaviour of the protocol
# --------------------------------------------------------------------------------------------------


def _confident_first_exit(n: int, k: int = 3, c: int = 4, seed: int = 0):
    """Exit 0 is one-hot (confidence exactly 1.0) for every sample; later exits are soft."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(c), size=(k, n))
    first_pred = rng.integers(0, c, size=n)
    probs[0] = np.eye(c)[first_pred]
    labels = rng.integers(0, c, size=n)
    return probs, labels, first_pred


@pytest.mark.parametrize("p", [0.05, 0.5, 1.0, 1.95])
def test_perfectly_confident_first_exit_takes_everyone_when_its_quota_is_positive(p: float) -> None:
    # With N = 200, K = 3 the exit-0 quota floor(200 * pi_0) is >= 1 for every p here (even p = 1.95,
    # where pi_0 ~ 0.14). The quota-th confidence is 1.0 and *all* samples tie at 1.0, so the tie rule
    # sends every sample to exit 0 - for large p as well as small, the quota is a floor, not a cap.
    probs, labels, first_pred = _confident_first_exit(200)
    costs = [10.0, 20.0, 30.0]
    (r,) = budgeted_sweep(probs, labels, probs, labels, costs, p_values=[p])
    assert r["thresholds"][0] == 1.0
    assert r["exit_fractions"] == [1.0, 0.0, 0.0]
    assert r["val_exit_fractions"] == [1.0, 0.0, 0.0]
    assert r["avg_cost"] == 10.0 and r["val_avg_cost"] == 10.0
    expected_acc = float(np.mean(first_pred == labels))
    assert r["test_accuracy"] == expected_acc and r["val_accuracy"] == expected_acc


def test_perfectly_confident_first_exit_is_skipped_when_its_quota_is_zero() -> None:
    # N = 10, K = 5, p = 1.95: pi_0 ~ 0.035, so floor(10 * pi_0) = 0 -> T_0 = +inf and nobody uses
    # exit 0 even though it is certain about every sample. The protocol follows the target
    # distribution, not the confidences.
    probs, labels, _ = _confident_first_exit(10, k=5)
    (r,) = budgeted_sweep(probs, labels, probs, labels, [1, 2, 3, 4, 5], p_values=[1.95])
    assert r["thresholds"][0] == math.inf
    assert r["exit_fractions"][0] == 0.0 and r["val_exit_fractions"][0] == 0.0
    # with small p the same data sends everyone to exit 0
    (r_small,) = budgeted_sweep(probs, labels, probs, labels, [1, 2, 3, 4, 5], p_values=[0.05])
    assert r_small["exit_fractions"][0] == 1.0


def test_single_exit() -> None:
    rng = np.random.default_rng(3)
    case = _random_case(rng, 1, 30, 25, 3, 2, np.float64)
    out = budgeted_sweep(*case, p_values=[0.1, 1.0, 1.9])
    expected_test = float(np.mean(case[2][0].argmax(axis=1) == case[3]))
    expected_val = float(np.mean(case[0][0].argmax(axis=1) == case[1]))
    for r in out:
        assert r["thresholds"] == []
        assert r["exit_fractions"] == [1.0] and r["val_exit_fractions"] == [1.0]
        assert r["avg_cost"] == float(case[4][0]) and r["val_avg_cost"] == float(case[4][0])
        assert r["test_accuracy"] == expected_test and r["val_accuracy"] == expected_val


def test_single_sample() -> None:
    probs = np.array([[[0.7, 0.3]], [[0.1, 0.9]]])
    labels = np.array([1])
    # N = 1: pi_0 < 1 for every p, so the exit-0 quota floor(1 * pi_0) is 0 -> exit 0 disabled.
    out = budgeted_sweep(probs, labels, probs, labels, [1.0, 2.0], p_values=[0.05, 1.0])
    for r in out:
        assert r["thresholds"] == [math.inf]
        assert r["exit_fractions"] == [0.0, 1.0]
        assert r["test_accuracy"] == 1.0 and r["avg_cost"] == 2.0


def test_torch_input_equals_numpy_input() -> None:
    rng = np.random.default_rng(11)
    case = _random_case(rng, 4, 120, 90, 6, 2, np.float32)
    np_out = budgeted_sweep(*case)
    vp, vl, tp, tl, costs = case
    torch_out = budgeted_sweep(
        torch.from_numpy(vp).requires_grad_(True),
        torch.from_numpy(vl),
        torch.from_numpy(tp),
        torch.from_numpy(tl),
        torch.from_numpy(costs),
        p_values=list(DEFAULT_P_VALUES),
    )
    assert torch_out == np_out


def test_bfloat16_torch_input_is_accepted() -> None:
    rng = np.random.default_rng(5)
    vp, vl, tp, tl, costs = _random_case(rng, 2, 40, 30, 3, 2, np.float32)
    out = budgeted_sweep(
        torch.from_numpy(vp).bfloat16(),
        torch.from_numpy(vl),
        torch.from_numpy(tp).bfloat16(),
        torch.from_numpy(tl),
        costs,
        p_values=[0.5],
    )
    assert len(out) == 1 and math.isclose(sum(out[0]["exit_fractions"]), 1.0)


def test_large_input_runs_vectorised() -> None:
    rng = np.random.default_rng(2)
    n, k, c = 20_000, 5, 10
    vp = rng.dirichlet(np.ones(c), size=(k, n)).astype(np.float32)
    tp = rng.dirichlet(np.ones(c), size=(k, n)).astype(np.float32)
    labels = rng.integers(0, c, size=n)
    out = budgeted_sweep(vp, labels, tp, labels, [1, 2, 3, 4, 5])
    assert len(out) == 39
    # with continuous confidences (few ties) the validation exit counts track the quotas closely
    r = out[19]  # p = 1.0: uniform target, 4000 per exit
    assert r["val_exit_fractions"][:4] == [0.2, 0.2, 0.2, 0.2]


# --------------------------------------------------------------------------------------------------
# assign_exits
# --------------------------------------------------------------------------------------------------


def test_assign_exits_rule() -> None:
    conf = np.array(
        [
            [0.9, 0.5, 0.5, 0.1],
            [0.2, 0.8, 0.6, 0.1],
            [0.1, 0.1, 0.1, 0.1],
        ]
    )
    assert assign_exits(conf, [0.5, 0.7]).tolist() == [0, 0, 0, 2]
    assert assign_exits(conf, [0.6, 0.6]).tolist() == [0, 1, 1, 2]
    assert assign_exits(conf, [math.inf, 0.7]).tolist() == [2, 1, 2, 2]
    assert assign_exits(conf, [math.inf, math.inf]).tolist() == [2, 2, 2, 2]
    assert assign_exits(conf[:1], []).tolist() == [0, 0, 0, 0]
    assert assign_exits(torch.from_numpy(conf), [0.6, 0.6]).tolist() == [0, 1, 1, 2]
    assert assign_exits(conf, [0.6, 0.6]).dtype == np.int64


def test_assign_exits_errors() -> None:
    conf = np.full((3, 4), 0.5)
    with pytest.raises(ConfigError, match="K-1 = 2"):
        assign_exits(conf, [0.5])
    with pytest.raises(ConfigError, match="NaN"):
        assign_exits(conf, [0.5, float("nan")])
    with pytest.raises(ConfigError, match=r"shape \[K, N\]"):
        assign_exits(np.zeros(4), [])


# --------------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------------


def _good():
    rng = np.random.default_rng(0)
    return list(_random_case(rng, 3, 20, 15, 4, 2, np.float64))


@pytest.mark.parametrize(
    ("index", "bad", "pattern"),
    [
        (0, np.zeros((20, 4)), r"val_probs must have shape \[K, N, C\].*\(20, 4\)"),
        (2, np.zeros((3, 15, 4, 1)), r"test_probs must have shape \[K, N, C\].*\(3, 15, 4, 1\)"),
        (0, np.zeros((0, 20, 4)), r"val_probs must have K >= 1.*\(0, 20, 4\)"),
        (0, np.zeros((3, 0, 4)), r"val_probs must have K >= 1.*N >= 1.*\(3, 0, 4\)"),
        (2, np.full((2, 15, 4), 0.25), r"same number of exits K.*\(3, 20, 4\) and \(2, 15, 4\)"),
        (2, np.full((3, 15, 5), 0.2), r"same number of exits K and classes C.*\(3, 15, 5\)"),
        (
            1,
            np.zeros(19, dtype=np.int64),
            r"val_labels must have shape \[N\] = \[20\].*\(3, 20, 4\).*\(19,\)",
        ),
        (3, np.zeros((15, 1), dtype=np.int64), r"test_labels must have shape \[N\] = \[15\].*\(15, 1\)"),
        (1, np.zeros(20), r"val_labels must hold integer.*float64"),
        (3, np.full(15, 4), r"test_labels must hold class indices in \[0, 4\)"),
        (3, np.full(15, -1), r"test_labels must hold class indices"),
        (4, [1.0, 2.0], r"exit_costs .* length K = 3.*\(2,\)"),
        (4, [1.0, float("inf"), 3.0], r"exit_costs must be finite"),
        (4, [1.0, -2.0, 3.0], r"exit_costs must be finite and non-negative"),
    ],
)
def test_invalid_inputs_raise_config_error(index: int, bad, pattern: str) -> None:
    args = _good()
    args[index] = bad
    with pytest.raises(ConfigError, match=pattern):
        budgeted_sweep(*args)


def test_non_finite_probs_rejected() -> None:
    args = _good()
    args[0] = args[0].copy()
    args[0][1, 2, 3] = np.nan
    with pytest.raises(ConfigError, match=r"val_probs contains non-finite.*\(3, 20, 4\)"):
        budgeted_sweep(*args)
    args = _good()
    args[2] = args[2].copy()
    args[2][0, 0, 0] = np.inf
    with pytest.raises(ConfigError, match="test_probs contains non-finite"):
        budgeted_sweep(*args)


@pytest.mark.parametrize("p_values", [[], [0.0], [-0.5], [float("nan")], [1e200]])
def test_invalid_p_values(p_values) -> None:
    with pytest.raises(ConfigError, match="p"):
        budgeted_sweep(*_good(), p_values=p_values)


def test_config_error_is_value_error() -> None:
    args = _good()
    args[0] = np.zeros((20, 4))
    with pytest.raises(ValueError):
        budgeted_sweep(*args)


# --------------------------------------------------------------------------------------------------
# choose_operating_point
# --------------------------------------------------------------------------------------------------


def _pt(p: float, val_acc: float, val_cost: float, test_acc: float = 0.0, test_cost: float = 0.0) -> dict:
    return {
        "p": p,
        "val_accuracy": val_acc,
        "val_avg_cost": val_cost,
        "test_accuracy": test_acc,
        "avg_cost": test_cost,
    }


def test_choose_cheapest_qualifying_point() -> None:
    sweep = [
        _pt(0.1, 0.80, 10.0),  # cheapest overall, does not qualify
        _pt(0.5, 0.895, 30.0),  # qualifies (>= 0.89)
        _pt(0.9, 0.905, 25.0),  # qualifies, cheaper -> chosen
        _pt(1.5, 0.91, 60.0),
    ]
    assert choose_operating_point(sweep, 0.90, tolerance=0.01) is sweep[2]
    # tighter tolerance excludes 0.895 and 0.905 < 0.91 - 0.0
    assert choose_operating_point(sweep, 0.91, tolerance=0.0) is sweep[3]


def test_choose_ties_prefer_higher_accuracy() -> None:
    sweep = [_pt(0.3, 0.90, 20.0), _pt(0.4, 0.93, 20.0), _pt(0.5, 0.95, 40.0)]
    assert choose_operating_point(sweep, 0.94, tolerance=0.05) is sweep[1]


def test_choose_uses_validation_figures_only() -> None:
    # Test figures point the other way; the choice must not change.
    sweep = [
        _pt(0.2, 0.89, 10.0, test_acc=0.0, test_cost=1e9),
        _pt(0.8, 0.95, 50.0, test_acc=1.0, test_cost=0.0),
    ]
    assert choose_operating_point(sweep, 0.90, tolerance=0.01) is sweep[0]


def test_choose_boundary_is_inclusive_despite_float_rounding() -> None:
    # 0.1 - 0.01 evaluates to 0.09000000000000001 > 9/100; an accuracy of 9/100 sits on the boundary.
    assert 0.1 - 0.01 > 9 / 100
    sweep = [_pt(0.2, 9 / 100, 10.0), _pt(0.8, 0.95, 50.0)]
    assert choose_operating_point(sweep, 0.1, tolerance=0.01) is sweep[0]


def test_choose_raises_budget_error_naming_closest_point() -> None:
    sweep = [_pt(0.2, 0.70, 10.0), _pt(0.6, 0.84, 33.5), _pt(1.0, 0.84, 40.0)]
    with pytest.raises(BudgetError, match=r"0\.8400 at average cost 33\.5") as info:
        choose_operating_point(sweep, 0.90, tolerance=0.01)
    assert "p = 0.6" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_choose_argument_errors() -> None:
    with pytest.raises(ConfigError, match="empty"):
        choose_operating_point([], 0.9)
    with pytest.raises(ConfigError, match="tolerance"):
        choose_operating_point([_pt(1.0, 0.9, 1.0)], 0.9, tolerance=-0.1)
    with pytest.raises(ConfigError, match="last_exit_val_accuracy"):
        choose_operating_point([_pt(1.0, 0.9, 1.0)], 90.0)
    with pytest.raises(ConfigError, match="val_avg_cost"):
        choose_operating_point([{"p": 1.0, "val_accuracy": 0.9}], 0.9)


def test_choose_on_real_sweep_matches_bruteforce() -> None:
    rng = np.random.default_rng(42)
    case = _random_case(rng, 4, 200, 200, 5, 2, np.float64)
    sweep = budgeted_sweep(*case)
    last_acc = float(np.mean(case[0][-1].argmax(axis=1) == case[1]))
    tol = 0.02
    qualifying = [r for r in sweep if r["val_accuracy"] >= last_acc - tol - 1e-12]
    if not qualifying:
        with pytest.raises(BudgetError):
            choose_operating_point(sweep, last_acc, tol)
        return
    best_cost = min(r["val_avg_cost"] for r in qualifying)
    best_acc = max(r["val_accuracy"] for r in qualifying if r["val_avg_cost"] == best_cost)
    chosen = choose_operating_point(sweep, last_acc, tol)
    assert chosen["val_avg_cost"] == best_cost and chosen["val_accuracy"] == best_acc
