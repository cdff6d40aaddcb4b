"""The calibrate / evaluate / compare commands with policies, budgets and the accuracy guarantee."""

import json

import pytest

from adaptnn.cli import main

pytestmark = pytest.mark.integration  # whole run-directory workflows


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "quick"
    assert main(["quickstart", "--run_dir", str(run_dir), "--epochs", "2", "--tolerance", "0.9"]) == 0
    return run_dir


def test_calibrate_to_budget_and_evaluate_report(run_dir, capsys):
    report0 = json.loads((run_dir / "report.json").read_text())
    macs = report0["exit_macs"]
    budget = 0.5 * (macs[0] + macs[-1])
    assert main(["calibrate", str(run_dir), "--policy", "margin", "--temperature", "--budget_macs", str(budget)]) == 0
    cal = json.loads((run_dir / "calibration.json").read_text())
    assert cal["calibrator"]["method"] == "compute_budget" and cal["policy_spec"]["name"] == "margin"
    assert cal["operating_point"]["val_avg_macs"] <= budget
    assert len(cal["policy_spec"]["temperatures"]) == len(macs)
    assert main(["evaluate", str(run_dir), "--policies", '["confidence", "boosted"]']) == 0
    report = json.loads((run_dir / "report.json").read_text())
    op = report["operating_point"]
    assert op["realised_equals_simulated"] is True and op["p"] is None
    assert report["policy"]["name"] == "margin"
    assert set(report["policies"]) == {"confidence", "confidence+ts", "boosted"}
    per_class = report["per_class"]
    assert sum(row["n"] for row in per_class) == report["dataset"]["sizes"]["test"]
    assert all(abs(sum(row["exit_fractions"]) - 1) < 1e-9 for row in per_class)
    assert "AUC" in capsys.readouterr().out


def test_budget_errors_and_guarantee(run_dir, capsys):
    macs = json.loads((run_dir / "calibration.json").read_text())["exit_macs"]
    assert main(["calibrate", str(run_dir), "--budget_macs", str(macs[0] / 2)]) == 2
    err = capsys.readouterr().err
    assert "first exit alone costs" in err and "closest achievable" in err and len(err.strip().splitlines()) == 1
    assert main(["calibrate", str(run_dir), "--budget_ms", "1.0"]) == 2
    assert "exit_latency_ms" in capsys.readouterr().err
    code = main(["calibrate", str(run_dir), "--epsilon", "0.2", "--delta", "0.2", "--policy", "learned"])
    out = capsys.readouterr()
    if code == 0:  # a 2-epoch model may or may not be certifiable; either way the outcome is explicit
        cal = json.loads((run_dir / "calibration.json").read_text())
        assert cal["calibrator"]["method"] == "accuracy_guarantee" and "certified" in out.out
        assert cal["calibrator"]["risk_upper_bound"] <= 0.2
    else:
        assert code == 2 and "can be certified" in out.err
    latencies = "[" + ",".join(str(0.1 * (k + 1)) for k in range(len(macs))) + "]"
    assert main(["calibrate", str(run_dir), "--budget_ms", "0.25", "--exit_latency_ms", latencies]) == 0
    cal = json.loads((run_dir / "calibration.json").read_text())
    assert cal["calibrator"]["method"] == "latency_budget" and cal["calibrator"]["val"]["avg_latency_ms"] <= 0.25


def test_legacy_and_compare(run_dir, tmp_path, capsys):
    assert main(["calibrate", str(run_dir), "--legacy"]) == 0
    cal = json.loads((run_dir / "calibration.json").read_text())
    assert cal["legacy"] is True and all("test_accuracy_raw" in pt for pt in cal["budgeted"])
    assert main(["evaluate", str(run_dir), "--policies", "[confidence]"]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", str(run_dir), str(run_dir), "--out", str(out)]) == 0
    table = json.loads((out / "compare.json").read_text())["table"]
    assert len(table) == 6  # two runs (labels made unique) x (budgeted curve, confidence, confidence+ts)
    assert len({row["label"] for row in table}) == 6
    assert (out / "compare.png").stat().st_size > 5000
    assert main(["compare", str(tmp_path / "missing")]) == 2
