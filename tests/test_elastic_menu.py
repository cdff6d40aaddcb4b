"""Choosing an elastic member for a budget (alone, or with exit thresholds via the knob engine); ``adaptnn menu``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from adaptnn.calibration import calibrate_knob_and_exits
from adaptnn.calibration.variants import choose_variant, pareto_front
from adaptnn.cli import main
from adaptnn.cli.menu import MemberLogits, joint_choice
from adaptnn.errors import BudgetError, ConfigError
from adaptnn.io.jsonfile import to_jsonable
from adaptnn.policies import ConfidencePolicy

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


def _member_logits(rng: np.random.Generator, labels: np.ndarray, skill: float) -> torch.Tensor:
    """Two-exit logits ``[2, N, 3]``: right with probability skill - 0.1 / skill, confident when right."""
    right = rng.random((2, labels.size)) < np.array([[skill - 0.1], [skill]])
    preds = np.where(right, labels, (labels + 1) % 3)
    margin = np.where(right, rng.uniform(1.0, 4.0, right.shape), rng.uniform(0.0, 1.0, right.shape))
    logits = np.zeros((2, labels.size, 3))
    np.put_along_axis(logits, preds[..., None], margin[..., None], axis=-1)
    return torch.tensor(logits, dtype=torch.float32)


def test_joint_choice_of_member_and_exit_thresholds_uses_the_knob_engine():
    """Each member is one knob setting of calibrate_knob_and_exits; the menu's JSON names member + thresholds."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    costs = {"small": [1.0, 2.0], "large": [4.0, 8.0]}
    options = {
        name: (_member_logits(rng, labels, skill), costs[name]) for name, skill in (("small", 0.6), ("large", 0.9))
    }
    rows = [
        {
            "variant": name,
            "width": w,
            "depth": 2,
            "accuracy": float((lg[-1].argmax(-1).numpy() == labels).mean()),
            "macs": costs[name][-1],
        }
        for (name, (lg, _)), w in zip(options.items(), (0.5, 1.0), strict=True)
    ]
    menu_labels = torch.as_tensor(labels)
    menu_logits = MemberLogits(options, menu_labels)
    policy = ConfidencePolicy([math.inf])
    for budget in (1.5, 3.0, 6.0, 8.0):
        choice = joint_choice(rows, menu_logits, budget)
        engine = calibrate_knob_and_exits(policy, options, torch.as_tensor(labels), budget)
        assert choice["variant"] == engine.details["knob"] and choice["thresholds"] == engine.thresholds
        assert choice["accuracy"] == engine.val["accuracy"] and choice["avg_cost"] <= budget * (1 + 1e-9)
        # never worse than the member-only choice (everyone at the last exit is a candidate of every member)
        fitting = [r["accuracy"] for r in rows if r["macs"] <= budget]
        assert choice["accuracy"] >= max(fitting, default=0.0) - 1e-12
        assert json.loads(json.dumps(to_jsonable(choice)))["policy"]["name"] == "confidence"
        assert {m["variant"] for m in choice["per_member"]} == {"small", "large"}
    assert joint_choice(rows, menu_logits, 1.5)["variant"] == "small"
    assert joint_choice(rows, menu_logits, 8.0)["variant"] == "large"
    # at 6 MACs the large member with early exits beats the small member at its last exit
    assert joint_choice(rows, menu_logits, 6.0)["variant"] == "large"
    with pytest.raises(BudgetError, match="cheapest first exit of any setting costs 1"):
        joint_choice(rows, menu_logits, 0.5)
    # a budget in ms per batch: the members' per-exit latencies (per sample) are the knob engine's costs
    exit_ms = {"small": [0.01, 0.02], "large": [0.04, 0.08]}  # ms per sample at batch 10
    ms_choice = joint_choice(rows, menu_logits, 0.6, exit_ms=exit_ms, batch=10)
    engine = calibrate_knob_and_exits(
        policy, {n: (lg, exit_ms[n]) for n, (lg, _) in options.items()}, menu_labels, 0.06
    )
    assert ms_choice["variant"] == engine.details["knob"] == "large" and ms_choice["thresholds"] == engine.thresholds
    assert ms_choice["predicted_ms"] == pytest.approx(10 * engine.val["avg_cost"]) and ms_choice["predicted_ms"] <= 0.6
    assert (
        ms_choice["budget_ms"] == 0.6
        and ms_choice["budget_batch"] == 10
        and "ms per batch of 10" in ms_choice["summary"]
    )


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
    assert main([*argv, "--budget_macs", "1e9", "--joint"]) == 0  # member + exit thresholds, by the knob engine
    choice = json.loads((run / "menu.json").read_text())["choice"]
    assert choice["variant"] in ("w0.5_d2", "w1_d2") and choice["policy"]["name"] == "confidence"
    assert len(choice["thresholds"]) == len(menu["rows"][0]["exit_macs"]) - 1 and choice["avg_cost"] <= 1e9
    assert choice["accuracy"] >= max(r["accuracy"] for r in menu["rows"]) - 1e-12
    assert "exit thresholds" in capsys.readouterr().out
    assert main([*argv, "--budget_ms", "1e3", "--budget_batch", "8", "--joint"]) == 0  # measured per-exit ms
    choice = json.loads((run / "menu.json").read_text())["choice"]
    assert choice["budget_batch"] == 8 and 0 < choice["predicted_ms"] <= 1e3 and len(choice["exit_ms"]) == 4
    assert main([*argv, "--budget_macs", "10"]) == 2  # nothing fits: one line, the menu is still written
    err = capsys.readouterr().err
    assert "no variant fits macs <= 10" in err and "Traceback" not in err


def test_elastic_benchmark_merges_seeds_trained_in_parallel_and_refuses_mismatched_reports(tmp_path):
    """``benchmarks/elastic.py --merge``: seeds trained in separate processes join into one seed table (here a
    shipped 3-seed report split in two and joined again); reports of another recipe or CPU model, a seed trained
    twice, and a file that is not a report are refused in one line."""
    from pathlib import Path

    from helpers import load_benchmark

    elastic = load_benchmark("elastic")
    shipped = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "elastic_cpu_accuracy_s22.json"
    whole = json.loads(shipped.read_text())
    assert [run["seed"] for run in whole["train_seeds"]] == [0, 1, 2]

    def part(name: str, runs: list, **changes) -> str:
        report = dict(whole, train_seeds=runs, train=runs[0], **changes)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(report))
        return str(path)

    later = part("later", whole["train_seeds"][2:])  # given first: the merge orders seeds
    earlier = part("earlier", whole["train_seeds"][:2])
    merged = elastic.merge_reports([later, earlier])
    assert merged["train_seeds"] == whole["train_seeds"] and merged["train"] == whole["train_seeds"][0]
    assert [p["path"] for p in merged["merged_from"]] == [later, earlier]
    merged["command"] = "python benchmarks/elastic.py --merge ..."
    text = elastic.markdown(merged)
    assert "over seeds [0, 1, 2]" in text and "| w0.25_d2 | +0.59 | +0.90 | +0.44 | +0.59 |" in text

    other_cpu = part("other_cpu", whole["train_seeds"][2:], machine=dict(whole["machine"], processor="Other CPU"))
    other_steps = part("other_steps", whole["train_seeds"][2:], steps=whole["steps"] + 1)
    (tmp_path / "junk.json").write_text("{not json")
    refusals = {
        (earlier, other_cpu): "ran on 'Other CPU'.*gaps pair only on one CPU model",
        (earlier, other_steps): "has steps 851",
        (earlier, earlier): r"a seed appears twice among \[0, 0, 1, 1\]",
        (earlier, str(tmp_path / "junk.json")): "junk.json is not a readable JSON report",
    }
    for paths, message in refusals.items():
        with pytest.raises(SystemExit, match=message):
            elastic.merge_reports(list(paths))
    text_seed = [dict(whole["train_seeds"][2], seed="2")]
    with pytest.raises(SystemExit, match="has no train part"):
        elastic.merge_reports([earlier, part("text_seed", text_seed)])
    no_gap = dict(whole["train_seeds"][2])
    no_gap["members"] = [{k: v for k, v in m.items() if k != "gap_pt"} for m in no_gap["members"]]
    with pytest.raises(SystemExit, match="lacks a field the table needs.*gap_pt"):  # refused before anything is saved
        elastic.main(["--merge", earlier, part("no_gap", [no_gap]), "--name", "never_written"])
    assert not (shipped.parent / "never_written.json").exists()
