"""``adaptnn predict`` and ``adaptnn serve`` on a quickstart run (torch and ONNX stage backends)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from adaptnn.cli import main

pytestmark = pytest.mark.integration  # trains a quickstart run and exports it (tens of seconds)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "quick"
    assert main(["quickstart", "--run_dir", str(run_dir), "--epochs", "2", "--tolerance", "0.9"]) == 0
    return run_dir


def _reference(run_dir):
    from adaptnn.policies import policy_from_dict
    from adaptnn.runs import read_calibration
    from adaptnn.runs.rundir import load_run

    loaded = load_run(run_dir)
    policy = policy_from_dict(read_calibration(run_dir / "calibration.json")["policy_spec"])
    test = loaded.splits.test
    x = torch.stack([torch.as_tensor(test[i][0]) for i in range(len(test))])
    return loaded.model.eval().run_dynamic(x, policy), x


def test_predict_writes_what_run_dynamic_decides(quick_run, tmp_path, capsys) -> None:
    ref, _ = _reference(quick_run)
    out = tmp_path / "pred.json"
    assert main(["predict", str(quick_run), "--out", str(out), "--max_batch", "16", "--no_progress"]) == 0
    assert "predicted" in capsys.readouterr().out
    rows = json.loads(out.read_text())["predictions"]
    assert [r["exit"] for r in rows] == ref.exit_index.tolist()
    assert [r["prediction"] for r in rows] == ref.logits.argmax(-1).tolist()
    report = json.loads((tmp_path / "pred_report.json").read_text())
    assert report["samples"] == len(rows) and sum(report["exit_counts"]) == len(rows)
    assert main(["predict", str(quick_run), "--out", str(tmp_path / "p.csv"), "--limit", "20", "--no_progress"]) == 0
    with open(tmp_path / "p.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["exit"]) for r in table] == ref.exit_index[:20].tolist()


def test_predict_errors_are_one_line(quick_run, tmp_path, capsys) -> None:
    assert main(["predict", str(quick_run), "--data", "holdout"]) == 2
    assert "--data must be one of" in capsys.readouterr().err
    assert main(["predict", str(quick_run), "--backend", "onnx", "--out", str(tmp_path / "x.json")]) == 2
    assert "adaptnn export" in capsys.readouterr().err  # no export yet: says how to make one
    assert main(["predict", str(tmp_path / "nothing")]) == 2


def test_onnx_backend_predicts_like_torch(quick_run, tmp_path, capsys) -> None:
    ref, _ = _reference(quick_run)
    assert main(["export", str(quick_run), "--mode", "stages"]) == 0
    out = tmp_path / "onnx.json"
    assert main(["predict", str(quick_run), "--backend", "onnx", "--out", str(out), "--no_progress"]) == 0
    rows = json.loads(out.read_text())["predictions"]
    assert [r["exit"] for r in rows] == ref.exit_index.tolist()


def test_serve_command_builds_the_app(quick_run, monkeypatch, capsys) -> None:
    import uvicorn
    from starlette.testclient import TestClient

    ref, x = _reference(quick_run)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["serve", str(quick_run), "--max_batch", "8", "--port", "8123"]) == 0
    assert seen["port"] == 8123 and "serving" in capsys.readouterr().out
    with TestClient(seen["app"]) as client:
        answer = client.post("/v1/predict", json={"inputs": x[:5].tolist()}).json()
    assert answer["exits"] == ref.exit_index[:5].tolist()


def test_serve_switch_interval_flag_reaches_the_app_and_bad_values_are_one_line(quick_run, monkeypatch, capsys) -> None:
    import sys

    import uvicorn
    from starlette.testclient import TestClient

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    before = sys.getswitchinterval()
    assert main(["serve", str(quick_run), "--switch_interval_ms", "0.5"]) == 0
    with TestClient(seen["app"]):
        assert sys.getswitchinterval() == 0.0005
    assert sys.getswitchinterval() == before
    capsys.readouterr()
    assert main(["serve", str(quick_run), "--switch_interval_ms", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "switch_interval_ms" in err[0] and "-1" in err[0]
