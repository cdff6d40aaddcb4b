"""Speed benchmark mechanics (no timing assertions), the timing engine, the realised run and compaction."""

import pytest
import torch
from torch.utils.data import TensorDataset

from adaptnn import ConfidencePolicy, ConfigError, create_model, simulate_exits
from adaptnn.evaluation import realised_run
from adaptnn.measure.speed import bench_policy, full_model_macs, latency_percentiles, thresholds_for_macs_fraction
from adaptnn.measure.timing import _cpu_name, interleaved_medians
from adaptnn.runtime import index_state
from adaptnn.runtime.cost import cost_breakdown


def test_full_model_macs_excludes_intermediate_heads():
    model = create_model("mecnn_digits")
    b = cost_breakdown(model, (1, 8, 8))
    assert full_model_macs(model, (1, 8, 8)) == sum(b.segment_macs) + b.head_macs[-1]
    assert full_model_macs(model, (1, 8, 8)) < b.exit_macs[-1]


def test_thresholds_hit_the_macs_fraction():
    model = create_model("mecnn_cifar", widths=[8, 16, 16, 32]).eval()
    calib = torch.randn(256, 3, 32, 32)
    full = full_model_macs(model, (3, 32, 32))
    for fraction in (0.3, 0.6):
        thresholds, predicted = thresholds_for_macs_fraction(model, calib, fraction)
        out = model.run_dynamic(calib, ConfidencePolicy(thresholds))
        realised = float(out.macs.mean()) / full
        assert abs(predicted - realised) < 1e-9  # same inputs: the sweep's figure is what run_dynamic spends
        assert abs(realised - fraction) < 0.1


def test_bench_policy_reports_consistent_figures():
    model = create_model("mecnn_digits", widths=[4, 8, 8, 16]).eval()
    inputs = torch.randn(24, 1, 8, 8)
    policy = ConfidencePolicy([0.1001, 0.1001, 0.1001])
    result = bench_policy(model, inputs, policy, batch_sizes=(1, 8), rounds=1, warmup_s=0.0)
    sim_exit, _ = simulate_exits(policy, torch.stack(model.forward_all(inputs)))
    costs = model.exit_costs(inputs)
    for entry in result["results"]:
        assert entry["num_samples"] == 24
        assert entry["avg_macs"] == float(costs[sim_exit].mean())
        assert entry["ideal_speedup"] == result["full_model_macs"] / entry["avg_macs"]
        assert entry["ratio"] == entry["realised_speedup"] / entry["ideal_speedup"]
        fractions = torch.bincount(sim_exit, minlength=4).double() / 24
        assert entry["exit_fractions"] == fractions.tolist()
        # realised speedup decomposes exactly into the hardware part and the engine part
        assert entry["realised_speedup"] == pytest.approx(entry["time_ideal_speedup"] * entry["engine_efficiency"])
    assert set(result["results"][0]["latency_ms"]) == {"full", "dynamic", "dynamic_by_exit_median"}


def test_timing_engine_blocks_time_each_group_together_and_rotate_the_blocks():
    calls = []
    variants = {name: (lambda batch, name=name: calls.append((name, batch))) for name in "abc"}
    medians = interleaved_medians(
        variants, ["x", "y"], rounds=2, warmup_s=0.0, warmup_batches=1, blocks=[["a", "b"], ["c"]]
    )
    assert set(medians) == {"a", "b", "c"} and all(len(v) == 2 for v in medians.values())
    timed = calls[3:]  # after the warm-up of every variant on the first batch
    # round 0: block ab (re-warmed on x, then interleaved over x, y), then block c; round 1: c first
    assert timed[:8] == [("a", "x"), ("b", "x"), ("a", "x"), ("b", "x"), ("b", "y"), ("a", "y"), ("c", "x"),
                         ("c", "x")]  # fmt: skip
    assert timed[8:12] == [("c", "y"), ("c", "x"), ("c", "x"), ("c", "y")]
    assert timed[12:] == [("a", "x"), ("b", "x"), ("b", "x"), ("a", "x"), ("a", "y"), ("b", "y")]
    with pytest.raises(ConfigError, match="blocks must hold every variant exactly once"):
        interleaved_medians(variants, ["x"], blocks=[["a", "b"]])
    with pytest.raises(ConfigError, match="blocks must hold every variant exactly once"):
        interleaved_medians(variants, ["x"], blocks=[["a", "b"], ["b", "c"]])


def test_timing_engine_interleaves_in_rotating_order():
    calls = []
    variants = {name: (lambda batch, name=name: calls.append((name, batch))) for name in "abc"}
    medians = interleaved_medians(variants, ["x", "y"], rounds=2, warmup_s=0.0, warmup_batches=1)
    assert calls[:3] == [("a", "x"), ("b", "x"), ("c", "x")]  # warm-up: every variant on the first batch, once
    timed = calls[3:]
    assert timed[:6] == [("a", "x"), ("b", "x"), ("c", "x"), ("b", "y"), ("c", "y"), ("a", "y")]
    assert timed[6:] == [("b", "x"), ("c", "x"), ("a", "x"), ("c", "y"), ("a", "y"), ("b", "y")]
    assert set(medians) == {"a", "b", "c"} and all(len(m) == 2 and min(m) >= 0 for m in medians.values())
    assert interleaved_medians(variants, [], rounds=3) == {"a": [], "b": [], "c": []}


def test_latency_percentiles_group_dynamic_times_by_exit():
    lat = latency_percentiles([1.0, 1.0, 1.0], [0.5, 2.0, 1.0], [0, 3, 0])
    assert lat["full"]["p50"] == 1.0 and lat["dynamic"]["p50"] == 1.0
    assert lat["dynamic_by_exit_median"] == {"0": 0.75, "3": 2.0}


def test_realised_run_takes_figures_from_run_dynamic_and_times_with_the_engine():
    model = create_model("mecnn_digits", widths=[4, 8, 8, 16]).eval()
    x, y = torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,))
    policy = ConfidencePolicy([0.1001, 0.1001, 0.1001])
    real = realised_run(model, TensorDataset(x, y), policy, batch_size=8, rounds=1, warmup_s=0.0)
    sim_exit, sim_logits = simulate_exits(policy, torch.stack(model.forward_all(x)))
    assert torch.equal(real["exit_index"], sim_exit)
    assert real["accuracy"] == float((sim_logits.argmax(-1) == y).double().mean())
    assert real["avg_macs"] == pytest.approx(float(model.exit_costs(x)[sim_exit].mean()))
    assert real["wall_time_s"] > 0 and real["full_model_wall_time_s"] > 0
    assert real["speedup"] == real["full_model_wall_time_s"] / real["wall_time_s"]
    assert (real["rounds"], real["warmup_s"], real["batch_size"]) == (1, 0.0, 8)


def test_oracle_plan_runs_each_segment_on_the_samples_that_reach_it():
    from adaptnn.measure.speed import _oracle_plan
    from adaptnn.runtime import slice_state

    model = create_model("mecnn_digits", widths=[4, 8, 8, 16]).eval()
    x = torch.randn(6, 1, 8, 8)
    x_sorted, alive = _oracle_plan(model, x, torch.tensor([0, 3, 1, 0, 3, 2]))
    assert alive == [6, 4, 3, 2]  # two leave at exit 0, one at 1, one at 2
    assert torch.equal(x_sorted[:2], x[[1, 4]])  # the two that go to the last exit come first
    state = {"a": x, "b": [x, torch.tensor(1.0)]}
    sliced = slice_state(state, 2)
    assert sliced["a"].shape[0] == 2 and sliced["b"][1].dim() == 0
    assert sliced["a"].data_ptr() == x.data_ptr()  # a view, not a copy


def test_channels_last_survives_compaction_and_matches_simulation():
    x = torch.randn(6, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    picked = index_state([x, {"a": x}], torch.tensor([0, 2, 5]))
    assert picked[0].is_contiguous(memory_format=torch.channels_last)
    assert picked[1]["a"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(picked[0], x[[0, 2, 5]])

    model = create_model("mecnn_cifar", widths=[8, 8, 16, 16]).eval().to(memory_format=torch.channels_last)
    inputs = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    policy = ConfidencePolicy([0.1002, 0.1002, 0.1002])
    out = model.run_dynamic(inputs, policy)
    sim_exit, sim_logits = simulate_exits(policy, torch.stack(model.forward_all(inputs)))
    assert torch.equal(out.exit_index, sim_exit)
    torch.testing.assert_close(out.logits, sim_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_parts_make_the_same_decisions():
    model = create_model("mecnn_digits", widths=[4, 8, 8, 16]).eval()
    x = torch.randn(12, 1, 8, 8)
    policy = ConfidencePolicy([0.1001, 0.1001, 0.1001])
    eager = model.run_dynamic(x, policy)
    model.compile_parts()
    compiled = model.run_dynamic(x, policy)
    assert torch.equal(eager.exit_index, compiled.exit_index)
    torch.testing.assert_close(eager.logits, compiled.logits, rtol=1e-4, atol=1e-5)
    assert set(model.state_dict()) == set(create_model("mecnn_digits", widths=[4, 8, 8, 16]).state_dict())


def test_bench_refuses_cuda_graphs_on_cpu_and_integer_dtypes():
    model = create_model("mecnn_digits", widths=[4, 8, 8, 16]).eval()
    inputs = torch.randn(4, 1, 8, 8)
    policy = ConfidencePolicy([0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        bench_policy(model, inputs, policy, batch_sizes=(1,), rounds=1, warmup_s=0.0, cuda_graphs=True)
    with pytest.raises(ConfigError, match="floating-point dtype"):
        bench_policy(model, inputs, policy, batch_sizes=(1,), rounds=1, warmup_s=0.0, dtype=torch.int32)


def test_bench_in_bfloat16_counts_the_same_macs():
    model = create_model("mecnn_digits", widths=[4, 8, 8, 16]).eval()
    full32 = full_model_macs(model, (1, 8, 8))
    result = bench_policy(
        model,
        torch.randn(8, 1, 8, 8),
        ConfidencePolicy([0.5, 0.5, 0.5]),
        batch_sizes=(4,),
        rounds=1,
        warmup_s=0.0,
        dtype=torch.bfloat16,
    )
    assert result["dtype"] == "bfloat16" and result["full_model_macs"] == full32


def test_machine_lines_name_the_cpu_family_and_model():
    """Two CPUs sold under one name round floats differently: a figure's machine line names family and model,
    read from the first processor's block only, and falls back to the name alone where the kernel gives no more."""
    two_cpus = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n\n"
    two_cpus += "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9B14\n"
    assert _cpu_name(two_cpus) == "AMD EPYC family 23 model 1"
    assert _cpu_name("processor\t: 0\nmodel name\t: Some ARM core\nBogoMIPS\t: 50.00\n") == "Some ARM core"
