"""GraphedModel's buckets, padding and buffers, checked without a GPU (use_graphs=False replays by calling)."""

import pytest
import torch
from torch import nn

from adaptnn import ConfidencePolicy, ConfigError, InputError, StagedModel, create_model
from adaptnn.policies import PatiencePolicy, simulate_exits
from adaptnn.runtime import EagerStages, oracle_loop
from adaptnn.runtime.cuda_graphs import GraphedModel
from helpers import TupleSegment, randomise_stats


def _thresholds(logits, quantile=0.5):
    return [float(lg.softmax(-1).amax(-1).quantile(quantile)) + 1e-9 for lg in logits[:-1]]


def _tuple_model():
    torch.manual_seed(3)
    segments = [TupleSegment(6) for _ in range(4)]
    heads = [nn.Sequential(Pick0(), nn.Linear(6, 5)) for _ in range(2)]
    return StagedModel(segments, heads, exit_after=[1, 3]).double().eval()


class Pick0(nn.Module):
    def forward(self, state):
        return state[0]


MODELS = {
    "cnn": lambda: randomise_stats(create_model("mecnn_cifar", widths=[8, 8, 16, 16])).double().eval(),
    "msdnet": lambda: randomise_stats(create_model("msdnet_test_tiny")).double().eval(),
    "tuple_state": _tuple_model,
}


@pytest.mark.parametrize("mode", ["fused", "fused_speculative", "loop"])
@pytest.mark.parametrize("name", list(MODELS))
def test_graphed_dynamic_equals_eager_and_simulated(name, mode):
    model = MODELS[name]()
    shape = (6,) if name == "tuple_state" else model.input_spec.shape
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(40, *shape, generator=gen, dtype=torch.float64)
    with torch.inference_mode():
        policy = ConfidencePolicy(_thresholds(model.forward_all(x_all)))
    graphed = GraphedModel(
        model, x_all[:3], buckets=[1, 2, 4, 8, 16], use_graphs=False, speculate=mode == "fused_speculative"
    )
    if mode == "loop":
        graphed._decisions_for = lambda policy: None  # the generic per-exit loop over the stage buffers
    for batch in [1, 3, 8, 13, 40]:  # 13 and 40: padding, and chunks of the largest bucket
        x = x_all[:batch]
        with torch.inference_mode():
            logits = model.forward_all(x)
        sim_exit, sim_logits = simulate_exits(policy, logits)
        out = graphed.run_dynamic(x, policy)
        assert torch.equal(out.exit_index, sim_exit)
        torch.testing.assert_close(out.logits, sim_logits, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.macs, model.exit_costs(x)[sim_exit])
        torch.testing.assert_close(graphed(x), logits[-1], rtol=1e-10, atol=1e-10)
    assert len(set(graphed.run_dynamic(x_all, policy).exit_index.tolist())) > 1


def test_outputs_do_not_alias_the_buffers():
    model = MODELS["cnn"]()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    graphed = GraphedModel(model, x, buckets=[4], use_graphs=False)
    never = ConfidencePolicy([float("inf")] * (model.num_exits - 1))
    first = graphed.run_dynamic(x, never).logits
    full = graphed(x)
    kept, kept_full = first.clone(), full.clone()
    graphed.run_dynamic(torch.randn_like(x), never)
    graphed(torch.randn_like(x))
    assert torch.equal(first, kept) and torch.equal(full, kept_full)


def test_stateful_policy_through_graphs():
    model = MODELS["cnn"]()
    x = torch.randn(24, 3, 32, 32, dtype=torch.float64)
    policy = PatiencePolicy(patience=1)
    with torch.inference_mode():
        sim_exit, sim_logits = simulate_exits(policy, model.forward_all(x))
    for speculate in (False, True):
        graphed = GraphedModel(model, x[:2], max_batch=8, use_graphs=False, speculate=speculate)
        out = graphed.run_dynamic(x, policy)
        assert torch.equal(out.exit_index, sim_exit)
        torch.testing.assert_close(out.logits, sim_logits)


def test_oracle_through_graph_executor_matches_eager():
    model = MODELS["cnn"]()
    x = torch.randn(11, 3, 32, 32, dtype=torch.float64)
    graphed = GraphedModel(model, x[:2], buckets=[2, 4, 16], use_graphs=False)
    calls: list[tuple[int, int]] = []
    hooks = [
        head.register_forward_hook(lambda m, a, o, k=k: calls.append((k, o.shape[0])))
        for k, head in enumerate(model.heads)
    ]
    with torch.inference_mode():
        oracle_loop(EagerStages(model), x, [11, 7, 3, 0])
        eager_calls, calls[:] = list(calls), []
        oracle_loop(graphed.executor(), x, [11, 7, 3, 0])
    for h in hooks:
        h.remove()
    assert eager_calls == [(0, 11), (1, 7), (2, 3)]
    assert calls == [(0, 16), (1, 16), (2, 4)]  # the same stages, each at its bucket


def test_bad_inputs_and_settings():
    model = MODELS["cnn"]()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ConfigError, match="CUDA"):
        GraphedModel(model, x, use_graphs=True)
    graphed = GraphedModel(model, x, buckets=[2], use_graphs=False)
    with pytest.raises(InputError, match="captured for batches"):
        graphed(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(InputError, match="captured for batches"):
        graphed(x.float())
    with pytest.raises(InputError, match="exceed the largest captured bucket"):
        graphed.bucket_for(3)


def test_fused_decisions_are_captured_once_per_policy_and_recaptured_when_it_changes():
    model = MODELS["cnn"]()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    graphed = GraphedModel(model, x[:2], buckets=[8], use_graphs=False)
    policy = ConfidencePolicy([0.5, 0.5, 0.5])
    graphed.run_dynamic(x, policy)
    graphed.run_dynamic(x, ConfidencePolicy([0.5, 0.5, 0.5]))  # equal policy: same captured decisions
    assert len(graphed._decisions) == 1
    policy.thresholds = [0.0, 0.0, 0.0]  # changed thresholds: captured again, and really used
    assert torch.equal(graphed.run_dynamic(x, policy).exit_index, torch.zeros(8, dtype=torch.long))
    assert len(graphed._decisions) == 2


def test_speculation_rule_from_stage_times():
    model = MODELS["cnn"]()
    graphed = GraphedModel(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), buckets=[1, 8], use_graphs=False)
    graphed.stage_ms = {(1, 1): 1.0, (8, 1): 2.0, (1, 2): 1.0, (8, 2): 5.0}
    assert graphed.speculate(8, 1)  # about as slow at 8 as at 1: launch-bound, hide the read
    assert not graphed.speculate(8, 2)  # compute-bound: compact as early as possible
    assert not graphed.speculate(1, 1)  # batch 1: nothing to compact
