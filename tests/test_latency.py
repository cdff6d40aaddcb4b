"""Latency model: exact predictions on synthetic timings with known answers; profiling runs end to end."""

import dataclasses
import statistics

import pytest
import torch

from adaptnn import ConfidencePolicy, ConfigError, create_model
from adaptnn.measure.latency import (
    LatencyModel,
    PiecewiseLinear,
    alive_per_segment,
    profile_latency,
    validate_latency_model,
)


def test_piecewise_linear_known_values():
    f = PiecewiseLinear([1, 4, 8], [2.0, 5.0, 7.0])
    assert f(0) == 0.0
    assert f(0.5) == 1.0  # line from the origin below the first knot (expected time of half a sample)
    assert f(1) == 2.0 and f(4) == 5.0 and f(8) == 7.0
    assert f(2) == 3.0 and f(6) == 6.0
    assert f(16) == 11.0  # last slope (0.5 ms/sample) extrapolated
    assert PiecewiseLinear([2], [4.0])(3) == 6.0
    fit = PiecewiseLinear.fit([1, 1, 2], [1.0, 3.0, 5.0])
    assert fit.knots == [1.0, 2.0] and fit.values == [2.0, 5.0]
    assert PiecewiseLinear.fit([1, 2, 4], [3.0, 2.0, 6.0]).values == [3.0, 3.0, 6.0]  # noise dip removed
    with pytest.raises(ConfigError):
        PiecewiseLinear([2, 1], [1.0, 1.0])


def test_alive_per_segment():
    # 4 segments, exits after segments 1 and 3; 5 samples leave at exit 0, 3 at exit 1
    assert alive_per_segment([1, 3], 4, [5, 3]) == [8, 8, 3, 3]
    assert alive_per_segment([0, 1, 2], 3, [2, 0, 1]) == [3, 1, 1]


def _linear(a: float, b: float) -> PiecewiseLinear:
    # a + b * n exactly at every n >= 1 (two knots, extrapolated)
    return PiecewiseLinear([1, 2], [a + b, a + 2 * b])


def test_predict_synthetic_known_answer(tmp_path):
    model = LatencyModel(
        exit_after=[0, 2],
        segment_ms=[_linear(1, 1), _linear(0, 2), _linear(2, 0.5)],
        head_ms=[_linear(0.1, 0.1), _linear(0.2, 0.2)],
        exit_overhead_ms=[_linear(0.05, 0.0), PiecewiseLinear([1], [0.0])],
    )
    # batch of 10: 4 leave at exit 0, 6 go on through segments 1, 2 and the last head
    expected = (1 + 10) + (0.1 + 1.0) + 0.05 + (0 + 12) + (2 + 3) + (0.2 + 1.2)
    assert model.predict([4, 6]) == pytest.approx(expected)
    # nobody continues: later segments cost nothing
    assert model.predict([10, 0]) == pytest.approx(11 + 1.1 + 0.05)
    assert model.predict_full(10) == pytest.approx(11 + 20 + 7 + 2.2)
    assert model.exit_latency_ms(1)[0] == pytest.approx(2 + 0.2 + 0.05)
    model.save(tmp_path / "p.json")
    assert LatencyModel.load(tmp_path / "p.json").predict([4, 6]) == pytest.approx(expected)
    with pytest.raises(ConfigError, match="exit counts"):
        model.predict([1, 2, 3])


def test_profile_and_validate_run_end_to_end():
    model = create_model("mecnn_digits", widths=[4, 4, 8, 8]).eval()
    pool = torch.randn(16, 1, 8, 8)
    lm = profile_latency(model, pool, batch_sizes=(1, 4), repeats=2, warmup_s=0.0)
    assert len(lm.segment_ms) == 4 and len(lm.head_ms) == 4
    assert all(v > 0 for f in lm.segment_ms for v in f.values)
    assert lm.exit_overhead_ms[-1].values == [0.0]  # no exit step after the last head
    latencies = lm.exit_latency_ms(1)
    assert all(b > a for a, b in zip(latencies, latencies[1:], strict=False))
    rows = validate_latency_model(
        model, lm, pool, ConfidencePolicy([0.1] * 3), batch_sizes=(2, 8), rounds=1, warmup_s=0.0
    )
    assert [r["batch_size"] for r in rows] == [2, 8]
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in rows)


def test_gpu_profile_predicts_max_of_host_and_gpu_per_stage(tmp_path):
    host = LatencyModel(
        exit_after=[0, 2],
        segment_ms=[_linear(1, 0), _linear(1, 0), _linear(1, 0)],  # launch-bound: flat in the batch size
        head_ms=[_linear(0.5, 0), _linear(0.5, 0)],
        exit_overhead_ms=[_linear(0.2, 0), PiecewiseLinear([1], [0.0])],
    )
    model = LatencyModel(
        **{k: getattr(host, k) for k in ("exit_after", "segment_ms", "head_ms", "exit_overhead_ms")},
        segment_gpu_ms=[_linear(0, 0.1), _linear(0, 0.2), _linear(0, 0.3)],
        head_gpu_ms=[_linear(0, 0.01), _linear(0, 0.01)],
        exit_gpu_ms=[_linear(0, 0.0), PiecewiseLinear([1], [0.0])],
    )
    # batch 100, 40 leave at exit 0: stage 0 host 1.7 vs GPU 11 -> 11; stage 1 host 2.5 vs GPU 30.6 -> 30.6
    assert model.predict([40, 60]) == pytest.approx(100 * 0.11 + 60 * 0.51)
    # batch 2: launch-bound, host time wins in both stages
    assert model.predict([1, 1]) == pytest.approx(1.7 + 2.5)
    assert host.predict([1, 1]) == pytest.approx(1.7 + 2.5)
    assert model.predict_full(100) == pytest.approx(100 * 0.61)
    model.save(tmp_path / "gpu.json")
    assert LatencyModel.load(tmp_path / "gpu.json").predict([40, 60]) == pytest.approx(model.predict([40, 60]))


def test_compaction_is_charged_only_where_some_but_not_all_leave():
    model = LatencyModel(
        exit_after=[0, 1],
        segment_ms=[_linear(1, 0), _linear(1, 0)],
        head_ms=[_linear(0, 0), _linear(0, 0)],
        exit_overhead_ms=[_linear(0.1, 0), PiecewiseLinear([1], [0.0])],
        compaction_ms=[_linear(0.5, 0.01), PiecewiseLinear([1], [0.0])],
    )
    assert model.predict([4, 6]) == pytest.approx(1 + 0.1 + (0.5 + 0.1) + 1)  # 4 of 10 leave: compaction
    assert model.predict([0, 10]) == pytest.approx(1 + 0.1 + 1)  # nobody leaves at exit 0
    assert model.predict([10, 0]) == pytest.approx(1 + 0.1)  # everybody leaves: no compaction, no later stage
    legacy = model.to_dict()
    del legacy["compaction_ms"], legacy["compaction_gpu_ms"]  # a profile written before compaction was split out
    assert LatencyModel.from_dict(legacy).predict([4, 6]) == pytest.approx(1 + 0.1 + 1)
    # profiled as a function of the samples kept (the state copy is of the survivors): 6 kept, not 10 at the exit
    by_kept = dataclasses.replace(model, compaction_by_kept=True)
    assert by_kept.predict([4, 6]) == pytest.approx(1 + 0.1 + (0.5 + 0.06) + 1)
    assert LatencyModel.from_dict(by_kept.to_dict()).predict([4, 6]) == pytest.approx(by_kept.predict([4, 6]))
    assert by_kept.scaled(2.0).compaction_by_kept
    with pytest.raises(ConfigError, match="compaction_by_kept must be true or false, got 'no'"):
        LatencyModel.from_dict({**by_kept.to_dict(), "compaction_by_kept": "no"})


def test_profile_separates_decision_and_compaction():
    model = create_model("mecnn_digits", widths=[4, 8, 8, 16]).eval()
    lm = profile_latency(model, torch.randn(16, 1, 8, 8), batch_sizes=(1, 4, 8), repeats=2, warmup_s=0.0)
    assert lm.compaction_ms is not None and len(lm.compaction_ms) == model.num_exits and lm.compaction_by_kept
    for curve in lm.compaction_ms[:-1]:
        # a function of the samples kept when about half of a batch of 4 and of 8 leaves (a batch of 1 never compacts)
        assert 1 <= len(curve.knots) <= 2 and max(curve.knots) <= 5 and min(curve.values) >= 0.0
    assert lm.compaction_ms[-1].values == [0.0]  # nobody leaves after the last exit
    assert lm.predict([0, 0, 0, 8]) == pytest.approx(lm.exit_latency_ms(8)[-1])  # no compaction when nobody leaves


def test_scaled_by_batch_multiplies_each_knot_by_its_factor():
    curve = PiecewiseLinear([1.0, 16.0, 64.0], [1.0, 10.0, 40.0])
    model = LatencyModel(exit_after=[0], segment_ms=[curve], head_ms=[PiecewiseLinear([1.0], [0.0])],
                         exit_overhead_ms=[])  # fmt: skip
    scaled = model.scaled_by_batch({16: 1.2, 64: 1.0})
    # at the anchored sizes the factor itself; below the smallest anchored size the nearest one's
    assert scaled.segment_ms[0].values == pytest.approx([1.2, 12.0, 40.0])
    assert scaled.info["anchor_scales"] == {"16": 1.2, "64": 1.0}
    # between anchored sizes the factor is interpolated: 1.1 at 40 rows
    mid = LatencyModel(exit_after=[0], segment_ms=[PiecewiseLinear([40.0], [20.0])],
                       head_ms=[PiecewiseLinear([1.0], [0.0])], exit_overhead_ms=[])  # fmt: skip
    assert mid.scaled_by_batch({16: 1.2, 64: 1.0}).segment_ms[0].values == pytest.approx([22.0])
    # every anchored size predicts exactly its factor times the profile, even where that makes a piece dip
    assert model.scaled_by_batch({1: 1.0, 16: 5.0, 64: 1.0}).segment_ms[0].values == pytest.approx([1.0, 50.0, 40.0])
    with pytest.raises(ConfigError, match="a latency scale must be a finite number > 0"):
        model.scaled_by_batch({16: float("nan")})
    with pytest.raises(ConfigError, match="needs at least one"):
        model.scaled_by_batch({})


def test_a_measured_mixed_exit_run_sets_the_cost_per_compaction():
    from adaptnn.measure.latency import _anchor_mixed, _mixed_policy

    torch.manual_seed(0)
    model = create_model("mecnn_digits", widths=[4, 8, 8, 16]).eval()
    lm = profile_latency(model, torch.randn(16, 1, 8, 8), batch_sizes=(1, 4, 8), repeats=2, warmup_s=0.0)
    assert lm.compactions([2, 0, 0, 6]) == 1 and lm.compactions([0, 0, 0, 8]) == 0 and lm.compactions([8, 0, 0, 0]) == 0
    assert lm.compactions([2, 2, 2, 2]) == 3
    batches = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    policy, simulated = _mixed_policy(model, batches)
    with torch.inference_mode():
        exits = [model.run_dynamic(x, policy).exit_index for x in batches]
    assert len(set(torch.cat(exits).tolist())) > 1  # about a third leave at each exit: a mixed run
    predicted = statistics.fmean(lm.predict_batches(e, 8) for e in exits)
    # the mixed run measured at a ratio to the last exit (the two timed side by side): the target is that ratio of
    # the profile's own last exit, so a machine slower or faster during the pair does not move it
    last = lm.exit_latency_ms(8)[-1]
    ratio = (predicted + 0.5) / last
    assert all(torch.equal(s, e) for s, e in zip(simulated, exits, strict=True))  # replayed == run for real
    shifted, record = _anchor_mixed(lm, exits, ratio=ratio)
    # the anchored profile predicts the measured mixed run; a run without compactions is unchanged
    assert statistics.fmean(shifted.predict_batches(e, 8) for e in exits) == pytest.approx(predicted + 0.5)
    assert shifted.predict([0, 0, 0, 8]) == pytest.approx(lm.predict([0, 0, 0, 8]))
    assert record["compaction_shift_ms"] == pytest.approx(0.5 / record["compactions"])
    assert record["ms"] == pytest.approx(predicted + 0.5) and record["ratio_to_last"] == ratio
    assert LatencyModel.from_dict(shifted.to_dict()).predict([2, 2, 2, 2]) == pytest.approx(
        shifted.predict([2, 2, 2, 2])
    )
    # a negative shift never makes a compaction cost less than nothing
    assert min(v for c in lm.shifted_compaction(-1e3).compaction_ms for v in c.values) == 0.0
    with pytest.raises(ConfigError, match="compaction shift must be finite"):
        lm.shifted_compaction(float("nan"))
