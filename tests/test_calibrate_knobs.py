"""``adaptnn calibrate --knob``: a token knob or an elastic member chosen jointly with the exit thresholds.

The choice is persisted in calibration.json and honoured by ``adaptnn evaluate`` (the realised run uses the chosen
setting, realised == simulated decisions); "no reduction" competes and can win; a knob the model lacks and a
variant the checkpoint was not trained for are refused with one line.
"""

from __future__ import annotations

import json

import pytest
import torch

from adaptnn.cli import main
from adaptnn.errors import ConfigError
from adaptnn.layers.tokens import TokenKnob, set_token_knob
from adaptnn.models import load_model
from adaptnn.runs.knobs import apply_knob, knob_settings, parse_variant
from adaptnn.runtime.cost import cost_breakdown

TRAIN = ["--data.name", "digits", "--data.val_size", "300", "--train.progress", "false", "--train.batch_size", "64"]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("knobs") / "vit"
    vit = "{input_size: [8, 8], embed_dim: 32, depth: 4, num_heads: 2, exits: [1]}"
    argv = ["train", *TRAIN, "--model.name", "vit_tiny_conv_fmnist", "--model.kwargs", vit, "--train.epochs", "3"]
    assert main([*argv, "--train.optimizer", "adamw", "--train.lr", "0.003", "--run_dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("knobs") / "elastic"
    model = ["--model.name", "elastic_cnn_digits", "--model.kwargs", "{width_mults: [0.5, 1.0], depths: [2]}"]
    assert (
        main(["train", *TRAIN, *model, "--train.strategy", "sorted", "--train.epochs", "2", "--run_dir", str(run)]) == 0
    )
    return run


def _calibration(run) -> dict:
    return json.loads((run / "calibration.json").read_text())


def _evaluate(run) -> dict:
    assert main(["evaluate", str(run), "--policies", "[]"]) == 0
    return json.loads((run / "report.json").read_text())


def test_token_knob_chosen_for_a_macs_budget_is_persisted_and_honoured(vit_run, capsys):
    model = load_model(vit_run / "model.safetensors")
    full = cost_breakdown(model, (1, 8, 8)).exit_macs
    reduced = cost_breakdown(set_token_knob(model, TokenKnob("tome", 2)), (1, 8, 8)).exit_macs
    assert reduced[-1] < full[0]  # only the reduced model fits a budget below the unreduced first exit
    budget = 0.5 * (reduced[-1] + full[0])
    assert (
        main(["calibrate", str(vit_run), "--knob", "tome", "--knob_values", "[1,2]", "--budget_macs", str(budget)]) == 0
    )
    cal = _calibration(vit_run)
    assert cal["knob"]["label"] in ("tome_r1", "tome_r2") and cal["knob"]["token_knob"]["method"] == "tome"
    assert cal["calibrator"]["method"] == "joint_knob_budget" and cal["operating_point"]["val_avg_macs"] <= budget
    assert [p["knob"] for p in cal["calibrator"]["per_knob"]] == ["none", "tome_r1", "tome_r2"]
    assert "reason" in cal["calibrator"]["per_knob"][0]  # no reduction cannot meet this budget
    assert f"chose {cal['knob']['label']}" in capsys.readouterr().out
    report = _evaluate(vit_run)
    assert report["knob"] == cal["knob"] and report["exit_macs"] == pytest.approx(cal["exit_macs"])
    assert report["exit_macs"][-1] < full[-1]  # the realised run used the reduced model
    assert report["operating_point"]["realised_equals_simulated"] is True
    assert report["operating_point"]["realised"]["avg_macs"] <= budget * 1.2


def test_no_reduction_competes_and_wins_an_ms_budget_it_can_afford(vit_run, capsys):
    settings = knob_settings(load_model(vit_run / "model.safetensors"), "evit", [0.5, 1.0])
    assert [s.label for s in settings] == ["none", "evit_k0.5"]  # keep=1 is no reduction, listed once, first
    argv = ["calibrate", str(vit_run), "--knob", "evit", "--knob_values", "[0.25]", "--budget_ms", "1e4"]
    assert main([*argv, "--threads", "1", "--latency_repeats", "2", "--measure_samples", "16"]) == 0
    cal = _calibration(vit_run)
    per = {p["knob"]: p for p in cal["calibrator"]["per_knob"]}
    # every setting fits a huge budget; dropping 3 of the 4 patch tokens costs accuracy, so no reduction wins
    assert per["none"]["accuracy"] > per["evit_k0.25"]["accuracy"]
    assert cal["knob"] == {"kind": "evit", "label": "none", "token_knob": TokenKnob().to_dict()}
    assert cal["calibrator"]["latency_batch_size"] == 1 and cal["calibrator"]["val"]["avg_latency_ms"] <= 1e4
    check = cal["latency_check"]
    assert check["batch_size"] == 1 and check["samples"] == 16 and sum(check["exit_fractions"]) == pytest.approx(1)
    assert check["measured_ms_per_batch"] > 0 and check["predicted_ms_per_batch"] > 0
    assert "predicted" in capsys.readouterr().out
    report = _evaluate(vit_run)
    assert report["knob"]["label"] == cal["knob"]["label"]
    assert report["operating_point"]["realised_equals_simulated"] is True


def test_unsupported_knobs_and_options_are_refused_in_one_line(vit_run, elastic_run, capsys):
    cases = [
        ([str(elastic_run), "--knob", "tome", "--budget_macs", "1e9"], "needs a token ViT"),
        ([str(vit_run), "--knob", "variant", "--budget_macs", "1e9"], "needs an elastic run"),
        ([str(vit_run), "--knob", "dvt", "--budget_macs", "1e9"], "--knob must be one of"),
        ([str(vit_run), "--knob", "tome"], "give budget_macs or budget_ms"),
        ([str(vit_run), "--knob", "tome", "--epsilon", "0.1"], "not epsilon"),
        ([str(vit_run), "--knob", "tome", "--knob_values", "[1.5]", "--budget_macs", "1e9"], "whole number"),
    ]
    for argv, message in cases:
        assert main(["calibrate", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_elastic_member_chosen_jointly_is_honoured_and_unknown_members_refused(elastic_run, capsys):
    model = load_model(elastic_run / "model.safetensors")
    assert [v.name for v in model.variants] == ["w0.5_d2", "w1_d2"]
    for bad, message in (("w0.75_d2", "not one this model was built and trained for"), ("x1", "not a variant name")):
        argv = ["calibrate", str(elastic_run), "--knob", "variant", "--knob_values", f"[{bad}]", "--budget_macs", "1e9"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    with model.use_variant(parse_variant("w0.5_d2")):
        small = cost_breakdown(model, (1, 8, 8)).exit_macs
    large = cost_breakdown(model, (1, 8, 8)).exit_macs
    assert small[0] < large[0]
    budget = 0.5 * (small[0] + large[0])  # only the small member (with its early exits) fits
    assert main(["calibrate", str(elastic_run), "--knob", "variant", "--budget_macs", str(budget)]) == 0
    cal = _calibration(elastic_run)
    assert cal["knob"] == {"kind": "variant", "label": "w0.5_d2", "variant": {"width": 0.5, "depth": 2}}
    assert [p["knob"] for p in cal["calibrator"]["per_knob"]] == ["w1_d2", "w0.5_d2"]  # the largest listed first
    report = _evaluate(elastic_run)
    assert report["knob"]["label"] == "w0.5_d2" and report["exit_macs"] == pytest.approx(small)
    assert report["operating_point"]["realised_equals_simulated"] is True
    # a record naming a member the checkpoint lacks is refused when applied
    with pytest.raises(ConfigError, match="valid variants: w0.5_d2, w1_d2"):
        apply_knob(model, {"kind": "variant", "label": "w0.25_d2", "variant": {"width": 0.25, "depth": 2}})


def test_knob_settings_and_records_without_a_run():
    import adaptnn

    vit = adaptnn.create_model("vit_tiny_conv_fmnist", input_size=[8, 8], embed_dim=16, depth=2, num_heads=2, exits=[0])
    settings = knob_settings(vit.eval(), "tome", [0, 2, 2.0])
    assert [s.label for s in settings] == ["none", "tome_r2"]  # r=0 is no reduction; duplicates once
    assert all(s.model is not vit and s.deployed is s.model for s in settings)
    x = torch.randn(3, 1, 8, 8)
    with torch.inference_mode():
        reduced = settings[1].model(x)
        rebuilt = apply_knob(vit, settings[1].record)(x)  # the persisted record sets the same reduction
    assert torch.equal(reduced, rebuilt)
    assert parse_variant("w0.5_d2").name == "w0.5_d2" and parse_variant("w1").depth is None
    with pytest.raises(ConfigError, match="needs an elastic run"):
        knob_settings(vit, "variant")
    with pytest.raises(ConfigError, match="needs a token ViT"):
        knob_settings(adaptnn.create_model("mecnn_digits"), "evit")
    with pytest.raises(ConfigError, match="names neither"):
        apply_knob(vit, {"kind": "tome"})


def test_profiles_of_settings_are_anchored_to_interleaved_engine_runs(one_thread):
    import adaptnn
    from adaptnn.measure.latency import profile_settings

    model = adaptnn.create_model("elastic_cnn_digits", width_mults=[0.5, 1.0], depths=[2])
    members = {v.name: model.materialise(v) for v in model.variants}
    pool = torch.randn(16, 1, 8, 8)
    profiles = profile_settings(members, pool, batch_sizes=[1, 4], repeats=2, warmup_s=0.0, anchor_batch=4)
    for profile in profiles.values():
        anchor = profile.info["anchor"]
        assert anchor["batch_size"] == 4 and len(anchor["exit_ms"]) == profile.num_exits
        assert profile.exit_latency_ms(4)[-1] == pytest.approx(anchor["exit_ms"][-1])
        # the profiled size below the anchor batch is anchored by its own whole last-exit run
        assert set(anchor["last_exit_ms_by_batch"]) == {"1"}
        assert profile.exit_latency_ms(1)[-1] == pytest.approx(anchor["last_exit_ms_by_batch"]["1"])
        assert set(profile.info["anchor_scales"]) == {"1", "4"}
        # and on one mixed-exit run (about a third leaving at each exit): its error sets the cost per compaction
        mixed = anchor["mixed"]
        assert profile.num_exits > 1 and mixed["ms"] > 0 and mixed["compactions"] > 0 and mixed["ratio_to_last"] > 0
        assert mixed["ms"] == pytest.approx(mixed["ratio_to_last"] * anchor["exit_ms"][-1])
        assert profile.info["compaction_shift_ms"] == pytest.approx(mixed["compaction_shift_ms"])
        doubled = profile.scaled(2.0)
        assert doubled.exit_latency_ms(4) == pytest.approx([2 * t for t in profile.exit_latency_ms(4)])
        assert doubled.info["anchor_scale"] == pytest.approx(2.0)


def _spy_checks(monkeypatch, drift: float) -> list[dict]:
    """Record every ``measure_choice`` call of the calibrator; the first one reports ``drift``."""
    import adaptnn.runs.calibrate as calibrate_module

    real, calls = calibrate_module.measure_choice, []

    def spy(deployed, latency_model, exit_ms, *args, **kwargs):
        out = real(deployed, latency_model, exit_ms, *args, **kwargs)
        if not calls:
            out["drift"] = drift
        calls.append({"model": latency_model, "exit_ms": list(exit_ms), "out": out})
        return out

    monkeypatch.setattr(calibrate_module, "measure_choice", spy)
    return calls


def test_ms_choice_is_remade_once_from_profiles_reanchored_to_the_check(vit_run, monkeypatch):
    calls = _spy_checks(monkeypatch, drift=1.5)
    argv = ["calibrate", str(vit_run), "--knob", "tome", "--knob_values", "[1]", "--budget_ms", "1e4"]
    argv += ["--latency_batch_size", "4", "--threads", "1", "--latency_repeats", "2", "--measure_samples", "16"]
    assert main(argv) == 0
    assert len(calls) == 2  # the first check, then the check of the choice re-made at the speed it measured
    first, second = calls
    assert second["exit_ms"] == pytest.approx([1.5 * t for t in first["exit_ms"]])
    assert second["model"].exit_latency_ms(4) == pytest.approx([1.5 * t for t in first["model"].exit_latency_ms(4)])
    anchor_then, anchor_now = first["model"].info["anchor"], second["model"].info["anchor"]
    assert anchor_now["exit_ms"] == pytest.approx([1.5 * t for t in anchor_then["exit_ms"]])
    mixed_then, mixed_now = anchor_then["mixed"], anchor_now["mixed"]  # its times scale, its ratio does not
    assert mixed_now["ms"] == pytest.approx(1.5 * mixed_then["ms"])
    assert mixed_now["ratio_to_last"] == mixed_then["ratio_to_last"]
    check = _calibration(vit_run)["latency_check"]
    assert check["refit"]["factor"] == 1.5 and check["refit"]["first_check"]["drift"] == 1.5
    assert check["refit"]["first_check"]["error"] == first["out"]["error"]
    assert check["measured_ms_per_batch"] == second["out"]["measured_ms_per_batch"]
    cal = _calibration(vit_run)
    recorded = {s["knob"]: s["exit_latency_ms"] for s in cal["calibrator"]["settings"]}
    assert recorded[cal["knob"]["label"]] == pytest.approx(second["exit_ms"])  # the record holds the re-anchored ms
    # and what each setting's latency model was anchored to, re-anchored as the choice used it
    anchors = {s["knob"]: s["latency_anchor"] for s in cal["calibrator"]["settings"]}
    assert set(anchors) == set(recorded)
    assert anchors[cal["knob"]["label"]]["exit_ms"] == pytest.approx(anchor_now["exit_ms"])
    assert anchors[cal["knob"]["label"]]["mixed"]["ratio_to_last"] > 0

    calls.clear()
    assert main([*argv, "--no_refit"]) == 0
    assert len(calls) == 1 and "refit" not in _calibration(vit_run)["latency_check"]


def test_when_nothing_fits_at_the_speed_measured_now_the_first_choice_stays(vit_run, monkeypatch, caplog):
    calls = _spy_checks(monkeypatch, drift=1e9)  # a machine a billion times slower than profiled
    argv = ["calibrate", str(vit_run), "--knob", "evit", "--knob_values", "[0.5]", "--budget_ms", "1e4"]
    argv += ["--latency_batch_size", "4", "--threads", "1", "--latency_repeats", "2", "--measure_samples", "16"]
    assert main(argv) == 0
    assert len(calls) == 1
    cal = _calibration(vit_run)
    refit = cal["latency_check"]["refit"]
    assert refit["factor"] == 1e9 and "budget" in refit["infeasible"] and refit["first_choice"] == cal["knob"]["label"]
    assert "keeping the first choice" in caplog.text


def test_calibrate_knobs_benchmark_plots_saved_repeats_together(tmp_path):
    """``benchmarks/calibrate_knobs.py --replot`` draws every choice's error from saved results (no re-run)."""
    from helpers import load_benchmark

    bench = load_benchmark("calibrate_knobs")

    def report(errors: list[float]) -> dict:
        rows = [
            {"run": "vit_tome", "batch_size": b, "error": e, "first_error": -e}
            for b, e in zip([1, 64, 64], errors, strict=True)
        ]
        rows.append({"run": "vit_tome", "batch_size": 64, "infeasible": "no setting meets the budget"})  # no error
        return {"runs": {"vit_tome": {"rows": rows}}}

    saved = []
    for i, errors in enumerate(([0.02, -0.05, 0.08], [0.01, 0.12, -0.03])):
        saved.append(tmp_path / f"rep{i}.json")
        saved[-1].write_text(json.dumps(report(errors)))
    bench.main(["--replot", *map(str, saved), "--out", str(tmp_path / "both")])
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "both.json").exists()  # replot writes the plot only, nothing is measured
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a calibrate_knobs result"):
        bench.main(["--replot", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad")])
