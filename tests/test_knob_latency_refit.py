"""A budget in ms at batch > 1 is held to the latency model of mixed-exit batches, not to a per-sample average.

At batch 64 the samples that go on past an exit run the later stages as a smaller batch, which costs more per row
than the per-sample exit latencies say; a choice fitted to those linear costs overruns its budget.
"""

from __future__ import annotations

import pytest
import torch

from adaptnn.errors import BudgetError, ConfigError
from adaptnn.measure.latency import LatencyModel, PiecewiseLinear
from adaptnn.policies import make_policy, simulate_exits
from adaptnn.runs.knobs import joint_choice

BATCH = 64


def _model(fixed_ms: float = 2.0) -> LatencyModel:
    """2 exits, 2 segments; each segment costs ``fixed_ms`` + 0.1 ms per row (small batches are inefficient)."""
    segment = PiecewiseLinear([1.0, float(BATCH)], [fixed_ms + 0.1, fixed_ms + 0.1 * BATCH])
    free = PiecewiseLinear([1.0, float(BATCH)], [0.0, 0.0])
    return LatencyModel(exit_after=[0, 1], segment_ms=[segment, segment], head_ms=[free, free],
                        exit_overhead_ms=[free], compaction_ms=[free])  # fmt: skip


def test_predict_batches_predicts_each_batch_from_its_own_exit_counts():
    model = _model()
    exits = torch.cat([torch.zeros(BATCH), torch.tensor([0, 1] * (BATCH // 2))]).long()
    expected = (model.predict([BATCH, 0]) + model.predict([BATCH // 2, BATCH // 2])) / 2
    assert model.predict_batches(exits, BATCH) == pytest.approx(expected)
    # the per-batch counts matter: the same fractions spread evenly cost more than sorted into whole batches
    sorted_exits = torch.cat([torch.zeros(BATCH), torch.ones(BATCH)]).long()
    even = torch.tensor([0, 1] * BATCH)
    assert model.predict_batches(sorted_exits, BATCH) < model.predict_batches(even, BATCH)
    # fewer samples than a batch: one batch with their exit fractions
    assert model.predict_batches(torch.tensor([0, 1]), BATCH) == pytest.approx(model.predict([32, 32]))
    with pytest.raises(ConfigError, match="need exits of >= 1 sample"):
        model.predict_batches(torch.tensor([], dtype=torch.long), BATCH)
    with pytest.raises(ConfigError, match=r"exit indices must be in \[0, 2\), got 0..2"):
        model.predict_batches(torch.tensor([0, 2]), BATCH)


def _options(n: int = 1024, seed: int = 0):
    """Validation logits of 2 exits: exit 0 right on its confident half, exit 1 right everywhere."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    confidence = torch.rand(n, generator=g) * 6
    first = torch.randn(n, 4, generator=g)
    first[torch.arange(n), labels] += confidence
    last = torch.full((n, 4), -4.0)
    last[torch.arange(n), labels] = 4.0
    return torch.stack([first, last]), labels


def test_ms_budget_is_refitted_until_the_latency_model_meets_it():
    model = _model()
    logits, labels = _options()
    costs = [t / BATCH for t in model.exit_latency_ms(BATCH)]  # the engine's per-sample cumulative exit costs
    policy = make_policy("confidence", 2)
    budget = 0.75 * costs[-1]  # per sample: a quarter of the second stage must be saved
    linear, linear_out = joint_choice(policy, {"only": (logits, costs)}, labels, budget, unit="ms", batch=BATCH)
    exits, _ = simulate_exits(linear.policy, logits)
    linear_true = model.predict_batches(exits, BATCH)
    assert linear_out["prediction"] == "linear"
    assert linear_true > budget * BATCH  # fitted to the linear costs, the choice overruns the budget
    result, out = joint_choice(
        policy, {"only": (logits, costs)}, labels, budget, unit="ms", batch=BATCH, latency_models={"only": model}
    )
    exits, _ = simulate_exits(result.policy, logits)
    assert out["prediction"] == "latency_model"
    assert out["predicted_ms_per_batch"] == pytest.approx(model.predict_batches(exits, BATCH))
    assert out["predicted_ms_per_batch"] <= budget * BATCH
    assert out["predicted_ms_per_batch"] >= 0.95 * budget * BATCH  # and it uses the budget, not a fraction of it
    assert out["linear_ms_per_batch"] < out["predicted_ms_per_batch"]
    # batch 1 has no mixed batches: the linear costs are the latency model's, nothing is refitted
    _, single = joint_choice(
        policy, {"only": (logits, costs)}, labels, budget, unit="ms", batch=1, latency_models={"only": model}
    )
    assert single["prediction"] == "linear"


def test_ms_budget_the_latency_model_cannot_meet_is_refused():
    model = _model()
    logits, labels = _options()
    policy = make_policy("confidence", 2)
    # exit costs that under-state every exit (a profile from a faster moment): the engine alone would accept
    costs = [0.8 * t / BATCH for t in model.exit_latency_ms(BATCH)]
    budget = 0.9 * model.exit_latency_ms(BATCH)[0] / BATCH
    result, _ = joint_choice(policy, {"only": (logits, costs)}, labels, budget, unit="ms", batch=BATCH)
    assert result.val["avg_cost"] <= budget
    with pytest.raises(BudgetError, match="latency model of mixed-exit batches predicts at least"):
        joint_choice(
            policy, {"only": (logits, costs)}, labels, budget, unit="ms", batch=BATCH, latency_models={"only": model}
        )
    with pytest.raises(BudgetError, match="no knob setting meets the budget"):  # below every first exit: the engine's
        joint_choice(
            policy, {"only": (logits, costs)}, labels, 0.5 * costs[0], unit="ms", batch=BATCH,
            latency_models={"only": model},
        )  # fmt: skip
    with pytest.raises(ConfigError, match="no latency model for the settings"):
        joint_choice(policy, {"only": (logits, costs)}, labels, costs[-1], unit="ms", batch=BATCH, latency_models={})


def test_predict_pooled_runs_every_stage_at_the_full_batch():
    model = _model(fixed_ms=2.0)
    segment = model.segment_ms[0]
    exits = torch.tensor([0, 1] * BATCH)  # half leave at exit 0; every batch of 64 has 32 survivors
    # pooled: stage 0 once per batch, stage 1 on full batches of survivors (half as many calls)
    assert model.predict_pooled(exits, BATCH) == pytest.approx(segment(BATCH) + 0.5 * segment(BATCH))
    # request-level batches run stage 1 on 32 rows, paying its fixed cost per batch: pooling saves half of it
    saved = model.predict_batches(exits, BATCH) - model.predict_pooled(exits, BATCH)
    assert saved == pytest.approx(0.5 * 2.0)
    # no fixed cost per call: pooling saves nothing
    linear = _model(fixed_ms=0.0)
    assert linear.predict_pooled(exits, BATCH) == pytest.approx(linear.predict_batches(exits, BATCH))
    # nobody leaves early: both are the whole batch through every stage
    last = torch.ones(BATCH, dtype=torch.long)
    assert model.predict_pooled(last, BATCH) == pytest.approx(model.predict([0, BATCH]))
    with pytest.raises(ConfigError, match=r"exit indices must be in \[0, 2\), got 0..2"):
        model.predict_pooled(torch.tensor([0, 2]), BATCH)
