"""Choosing an elastic member for a budget (calibration.variants) and the ``adaptnn menu`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adaptnn.calibration.variants import choose_joint, choose_variant, pareto_front, variant_operating_points
from adaptnn.cli import main
from adaptnn.errors import BudgetError, ConfigError

ROWS = [
    {"variant": "w0.25", "accuracy": 0.80, "macs": 1.0, "ms_b64": 1.0},
    {"variant": "w0.5", "accuracy": 0.83, "macs": 3.0, "ms_b64": 2.5},
    {"variant": "w0.75", "accuracy": 0.84, "macs": 6.0, "ms_b64": 2.0},
    {"variant": "w1", "accuracy": 0.90, "macs": 10.0, "ms_b64": 4.0},
]


def test_pareto_front_and_choice_by_budget():
    assert pareto_front(ROWS, "macs") == [True, True, True, True]
    assert pareto_front(ROWS, "ms_b64") == [True, False, True, True]
    assert choose_variant(ROWS, "macs", 5.0)["variant"] == "w0.5"
    assert choose_variant(ROWS, "ms_b64", 2.2)["variant"] == "w0.75"
    assert choose_variant(ROWS, "ms_b64", 100)["variant"] == "w1"
    with pytest.raises(BudgetError, match="cheapest is w0.25 at 1"):
        choose_variant(ROWS, "macs", 0.5)
    with pytest.raises(ConfigError, match="ms_b1"):
        choose_variant(ROWS, "ms_b1", 2.0)
    with pytest.raises(ConfigError, match="positive"):
        choose_variant(ROWS, "macs", -1)


def test_joint_choice_of_member_and_exit_thresholds():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    points = {}
    for name, (skill, scale) in {"small": (0.6, 1.0), "large": (0.9, 4.0)}.items():
        right = rng.random((2, 200)) < np.array([[skill - 0.1], [skill]])
        preds = np.where(right, labels, (labels + 1) % 3)
        scores = np.where(right, rng.uniform(0.6, 1.0, (2, 200)), rng.uniform(0.3, 0.7, (2, 200)))
        points[name] = variant_operating_points(scores, preds, labels, [scale, 2 * scale])
        costs = [p["avg_cost"] for p in points[name]]
        assert min(costs) == pytest.approx(scale) and max(costs) == pytest.approx(2 * scale)
    best = choose_joint(points, 1.5)
    assert best["variant"] == "small" and best["avg_cost"] <= 1.5
    best = choose_joint(points, 8.0)
    assert best["variant"] == "large" and best["accuracy"] >= max(p["accuracy"] for p in points["small"])
    with pytest.raises(BudgetError):
        choose_joint(points, 0.5)


def test_latency_model_per_variant():
    import torch

    import adaptnn
    from adaptnn.measure.latency import profile_variants

    model = adaptnn.create_model("elastic_cnn_digits", width_mults=[0.25, 1.0], depths=[2])
    profiles = profile_variants(model, torch.randn(8, 1, 8, 8), batch_sizes=[1, 4], repeats=2, warmup_s=0.0)
    assert set(profiles) == {"w0.25_d2", "w1_d2"}
    assert all(p.num_exits == 4 and p.predict_full(4) > 0 for p in profiles.values())
    with pytest.raises(ConfigError, match="elastic model"):
        profile_variants(adaptnn.create_model("mecnn_digits"), torch.randn(2, 1, 8, 8))


@pytest.mark.integration
def test_menu_command_on_a_sorted_run(tmp_path, capsys):
    run = tmp_path / "run"
    train = ["--train.epochs", "1", "--train.progress", "false", "--data.val_size", "64"]
    model = ["--model.name", "elastic_cnn_digits", "--model.kwargs", "{width_mults: [0.5, 1.0], depths: [2]}"]
    assert main(["train", *model, "--train.strategy", "sorted", *train, "--run_dir", str(run)]) == 0
    argv = ["menu", str(run), "--rounds", "1", "--warmup_s", "0", "--batch_sizes", "[1, 8]", "--threads", "1"]
    assert main([*argv, "--budget_macs", "1e9"]) == 0
    out = capsys.readouterr().out
    menu = json.loads((run / "menu.json").read_text())
    assert [r["variant"] for r in menu["rows"]] == ["w0.5_d2", "w1_d2"]
    assert all(r["ms_b1"] > 0 and r["ms_b8"] > 0 for r in menu["rows"])
    assert menu["rows"][0]["macs"] < menu["rows"][1]["macs"] / 3
    assert menu["choice"]["variant"] in ("w0.5_d2", "w1_d2") and "chosen:" in out
    assert (run / "menu.png").stat().st_size > 1000
    assert main([*argv, "--budget_macs", "10"]) == 2  # nothing fits: one line, the menu is still written
    err = capsys.readouterr().err
    assert "no variant fits macs <= 10" in err and "Traceback" not in err
