"""A run trained with `boost` is calibrated and evaluated with its additive-ensemble rule by default."""

import pytest
import torch

from adaptnn.runs import calibrate_run, evaluate_run, strategy_policy, train_run
from adaptnn.runs.config import RunConfig
from adaptnn.strategies import boosted_logits

pytestmark = pytest.mark.integration  # whole run-directory workflows


def test_boost_run_uses_the_boosted_policy(tmp_path):
    config = RunConfig.from_dict(
        {
            "data": {"name": "digits", "val_size": 200},
            "model": {"name": "mecnn_digits", "kwargs": {"widths": [8, 8, 16, 16]}},
            "train": {
                "epochs": 2,
                "device": "cpu",
                "progress": False,
                "strategy": "boost",
                "strategy_options": {"r": 0.7},
            },
            "eval": {"device": "cpu"},
        }
    )
    assert strategy_policy(config) == ("boosted", {"r": 0.7})
    train_run(config, tmp_path)
    calibration = calibrate_run(tmp_path, tolerance=0.5, progress=False)
    assert calibration["policy"] == "boosted" and calibration["policy_spec"]["r"] == 0.7
    report = evaluate_run(tmp_path, progress=False, policies=None)
    assert report["operating_point"]["realised_equals_simulated"] is True
    # anytime accuracy of exit k is that of the additive ensemble A_k, not of the raw head
    from adaptnn.data import DataConfig, build_datasets
    from adaptnn.evaluation import collect_logits
    from adaptnn.models import load_model

    model = load_model(tmp_path / "model.safetensors")
    logits, labels = collect_logits(model, build_datasets(DataConfig(name="digits", val_size=200)).test)
    ensemble = torch.stack(boosted_logits(list(logits), r=0.7))
    expected = (ensemble.argmax(-1) == labels).double().mean(dim=1).tolist()
    assert [a["accuracy"] for a in report["anytime"]] == expected


def _train_small_exit_cnn(run_dir) -> None:
    """A one-epoch 4-exit CNN on digits in ``run_dir`` (the latency-budget tests profile and calibrate it)."""
    config = RunConfig.from_dict(
        {
            "data": {"name": "digits", "val_size": 200},
            "model": {"name": "mecnn_digits", "kwargs": {"widths": [8, 8, 16, 16]}},
            "train": {"epochs": 1, "device": "cpu", "progress": False},
            "eval": {"device": "cpu"},
        }
    )
    train_run(config, run_dir)


def test_latency_budget_from_the_runs_profile(tmp_path):
    from adaptnn import ConfigError
    from adaptnn.measure.latency import profile_latency
    from adaptnn.models import load_model

    _train_small_exit_cnn(tmp_path)
    with pytest.raises(ConfigError, match="adaptnn profile"):
        calibrate_run(tmp_path, budget_ms=1.0, progress=False)
    model = load_model(tmp_path / "model.safetensors")
    latency = profile_latency(model, torch.randn(8, 1, 8, 8), batch_sizes=(1, 2), repeats=2, warmup_s=0.0)
    latency.save(tmp_path / "latency_profile.json")
    per_exit = latency.exit_latency_ms(1)
    budget = (per_exit[0] + per_exit[-1]) / 2
    calibration = calibrate_run(tmp_path, budget_ms=budget, progress=False)
    assert calibration["calibrator"]["method"] == "latency_budget"
    assert calibration["calibrator"]["val"]["avg_latency_ms"] <= budget + 1e-9
    # at batch 2 the choice is held to the profile's latency of mixed-exit batches, not the per-sample average
    per_exit = [t / 2 for t in latency.exit_latency_ms(2)]
    budget = (per_exit[0] + per_exit[-1]) / 2
    calibration = calibrate_run(tmp_path, budget_ms=budget, latency_batch_size=2, progress=False)
    calibrator = calibration["calibrator"]
    assert calibrator["method"] == "latency_budget"
    assert calibrator["latency_model"].startswith("latency model of mixed-exit batches")
    assert calibrator["latency_batch_size"] == 2
    assert calibrator["predicted_ms_per_batch"] <= 2 * budget + 1e-9
    assert "latency_profile_check" not in calibration  # this profile was saved without its held-out check


def test_latency_budget_reports_the_saved_profiles_own_check(tmp_path, caplog):
    """The saved profile's held-out check (``adaptnn profile``) goes into calibration.json, and a warning names it
    when it was off by more than 10%; a malformed check is a record only and is left out, never an error."""
    import logging

    from adaptnn.measure.latency import profile_latency
    from adaptnn.models import load_model

    _train_small_exit_cnn(tmp_path)
    latency = profile_latency(
        load_model(tmp_path / "model.safetensors"), torch.randn(8, 1, 8, 8), batch_sizes=(1, 2), repeats=2,
        warmup_s=0.0,
    )  # fmt: skip
    budget = sum(latency.exit_latency_ms(1)) / latency.num_exits
    rows = [{"batch_size": 3, "measured_ms": 1.0, "predicted_ms": 0.85, "error": -0.15, "num_batches": 2}]
    latency.info["validation"] = {"budget": 0.5, "thresholds": [0.5], "rows": rows}
    latency.save(tmp_path / "latency_profile.json")
    with caplog.at_level(logging.WARNING, logger="adaptnn"):
        calibration = calibrate_run(tmp_path, budget_ms=budget, progress=False)
    assert calibration["latency_profile_check"] == [{"batch_size": 3, "error": -0.15}]
    assert "-15.0% at batch 3" in caplog.text
    malformed_checks = ("no", {"rows": "x"}, {"rows": [{"batch_size": 3, "error": "big"}]})
    for malformed in (*malformed_checks, {"rows": [{"batch_size": 3, "error": float("inf")}]}):
        latency.info["validation"] = malformed
        latency.save(tmp_path / "latency_profile.json")
        assert "latency_profile_check" not in calibrate_run(tmp_path, budget_ms=budget, progress=False)
