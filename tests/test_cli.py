"""The CLI end to end, in-process: quickstart, cost, and one-line errors for bad input."""

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from adaptnn.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "quick"
    assert main(["quickstart", "--run_dir", str(run_dir), "--epochs", "3", "--tolerance", "0.5"]) == 0
    return run_dir


_WALL_CLOCK = {"wall_time_s", "full_model_wall_time_s", "speedup", "warmup_s", "rounds"}


def _without_wall_clock(report: dict) -> dict:
    report = {k: v for k, v in report.items() if k != "run_dir"}
    report["operating_point"]["realised"] = {
        k: v for k, v in report["operating_point"]["realised"].items() if k not in _WALL_CLOCK
    }
    return report


@pytest.mark.integration
def test_quickstart_is_bit_reproducible_on_one_machine(quick_run, tmp_path):
    """Same seed, same machine: identical weights and every figure but the wall-clock ones (issue 12)."""
    again = tmp_path / "again"
    assert main(["quickstart", "--run_dir", str(again), "--epochs", "3", "--tolerance", "0.5"]) == 0
    weights = [load_file(d / "model.safetensors") for d in (quick_run, again)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    first, second = (json.loads((d / "report.json").read_text()) for d in (quick_run, again))
    assert _without_wall_clock(second) == _without_wall_clock(first)


@pytest.mark.integration
def test_quickstart_writes_report(quick_run, capsys):
    report = json.loads((quick_run / "report.json").read_text())
    assert (quick_run / "report.png").stat().st_size > 10_000
    assert [a["exit"] for a in report["anytime"]] == [0, 1, 2, 3]
    assert all(a["macs"] < b["macs"] for a, b in itertools.pairwise(report["anytime"]))
    assert len(report["budgeted"]) == 39
    for point in report["budgeted"]:
        assert {"p", "thresholds", "val_accuracy", "test_accuracy", "avg_macs", "exit_fractions"} <= set(point)
    op = report["operating_point"]
    real, sim = op["realised"], op["simulated"]
    assert {"accuracy", "avg_macs", "exit_fractions", "wall_time_s", "full_model_wall_time_s"} <= set(real)
    assert {"accuracy", "avg_macs"} <= set(sim)
    # realised run_dynamic makes exactly the simulated decisions
    assert op["realised_equals_simulated"] is True
    assert real["accuracy"] == sim["accuracy"] and real["avg_macs"] == pytest.approx(sim["avg_macs"])
    # the chosen point is the budgeted sweep's point with that p
    chosen = next(b for b in report["budgeted"] if b["p"] == op["p"])
    assert chosen["test_accuracy"] == pytest.approx(sim["accuracy"])
    assert chosen["avg_macs"] == pytest.approx(sim["avg_macs"])
    split = json.loads((quick_run / "splits.json").read_text())
    assert len(split["val_indices"]) == 300


@pytest.mark.integration
def test_train_resume_is_a_no_op_when_done(quick_run, capsys):
    before = (quick_run / "model.safetensors").read_bytes()
    assert main(["quickstart", "--run_dir", str(quick_run)]) == 2  # different epochs -> config clash
    assert "different config" in capsys.readouterr().err
    assert (quick_run / "model.safetensors").read_bytes() == before


@pytest.mark.integration
def test_calibrate_and_evaluate_commands(quick_run, capsys):
    assert main(["calibrate", str(quick_run), "--tolerance", "0.3"]) == 0
    calibration = json.loads((quick_run / "calibration.json").read_text())
    assert calibration["tolerance"] == 0.3
    assert main(["calibrate", str(quick_run), "--tolerance", "0.0"]) in (0, 2)  # 2: BudgetError, clearly
    assert main(["calibrate", str(quick_run), "--tolerance", "0.3"]) == 0
    assert main(["evaluate", str(quick_run)]) == 0
    out = capsys.readouterr().out
    assert "realised == simulated: True" in out


def test_cost_table_and_json(capsys):
    assert main(["cost", "mecnn_digits"]) == 0
    table = capsys.readouterr().out
    assert "cumulative MACs" in table and "2,813,280" in table
    assert main(["cost", "mecnn_cifar", "--json", "--kwargs", "{num_classes: 100}"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["exit_macs"]) == 4 and data["input_size"] == [3, 32, 32]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["cost", "mecnn_digitz"], "did you mean mecnn_digits"),
        (["train", "--data.name", "image_folder", "--data.root", "{empty}", "--run_dir", "{tmp}/r"], "does not exist"),
        (["train", "--model.name", "mecnn_cifar", "--run_dir", "{tmp}/r"], "expects inputs shaped [3, 32, 32]"),
        (["evaluate", "{tmp}/missing"], "no config file"),
    ],
)
def test_errors_are_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, empty=tmp_path / "empty") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  epoch: 3\n")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(cfg)])
    assert exc.value.code == 2
    assert "train.epoch" in capsys.readouterr().err


@pytest.mark.integration
def test_corrupt_checkpoint_in_run(quick_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((quick_run / "config.yaml").read_text())
    data = (quick_run / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert main(["evaluate", str(broken)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    torch.manual_seed(0)
