"""The stage-level serving engine makes the decisions of run_dynamic whatever the arrival order and batching."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from adaptnn import ConfidencePolicy, ConfigError, InputError, create_model
from adaptnn.policies import AveragedEnsemblePolicy, BoostedEnsemblePolicy, PatiencePolicy
from adaptnn.serve import BATCH_INVARIANCE_ATOL, AsyncEngine, Engine, Overloaded, TorchBackend
from adaptnn.serve.engine import Request
from helpers import randomise_stats

N = 24


def _separated_thresholds(model, x: torch.Tensor, quantile: float = 0.5) -> list[float]:
    """Per exit, the midpoint of the widest gap between scores near ``quantile``: no score lies near a threshold,
    so float noise of another batch size cannot flip a decision."""
    with torch.inference_mode():
        scores, _ = ConfidencePolicy([0.0] * (model.num_exits - 1)).scores(model.forward_all(x))
    out = []
    for k in range(model.num_exits - 1):
        s = scores[k].sort().values
        lo, hi = int(0.1 * len(s)), int(0.9 * len(s))
        gaps = s[lo + 1 : hi + 1] - s[lo:hi]
        i = lo + int(gaps.argmax())
        assert float(s[i + 1] - s[i]) > 10 * BATCH_INVARIANCE_ATOL  # a score moves less than its logits
        out.append(float(s[i] + s[i + 1]) / 2)
    return out


_MODELS: dict[str, tuple] = {}


def _model(name: str):
    if name not in _MODELS:
        torch.manual_seed(3)
        shape = {"mecnn_digits": (1, 8, 8), "msdnet_test_tiny": (3, 16, 16)}[name]
        model = randomise_stats(create_model(name)).eval()
        x = torch.randn(N, *shape)
        _MODELS[name] = (model, x, _separated_thresholds(model, x))
    return _MODELS[name]


def _policy(kind: str, thresholds: list[float]):
    if kind == "confidence":
        return ConfidencePolicy(thresholds)
    if kind == "patience":
        return PatiencePolicy(1)
    if kind == "average":
        return AveragedEnsemblePolicy([0.55] * len(thresholds))
    return BoostedEnsemblePolicy([0.6] * len(thresholds), r=0.5)


def _serve(engine: Engine, x: torch.Tensor, sizes: list[int], order: list[int], steps: list[int]) -> list[Request]:
    """Submit the requests (cut by ``sizes``) in ``order``, stepping ``steps[i]`` times after the i-th submit."""
    bounds, start = [], 0
    for n in sizes:
        if start >= len(x):
            break
        bounds.append((start, min(start + n, len(x))))
        start += n
    if start < len(x):
        bounds.append((start, len(x)))
    requests: list[Request | None] = [None] * len(bounds)
    for i, j in enumerate(o % len(bounds) for o in order):
        while requests[j] is not None:
            j = (j + 1) % len(bounds)
        a, b = bounds[j]
        requests[j] = engine.submit(x[a:b])
        for _ in range(steps[i % len(steps)]):
            engine.step()
        if all(r is not None for r in requests):
            break
    for j, r in enumerate(requests):
        if r is None:
            requests[j] = engine.submit(x[bounds[j][0] : bounds[j][1]])
    engine.drain()
    assert engine.idle and engine.pending_rows == 0
    return requests  # type: ignore[return-value]


@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    name=st.sampled_from(["mecnn_digits", "msdnet_test_tiny"]),
    kind=st.sampled_from(["confidence", "patience", "average", "boosted"]),
    max_batch=st.integers(1, 40),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    order=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    steps=st.lists(st.integers(0, 3), min_size=1, max_size=5),
    scheduler=st.sampled_from(["oldest", "fill"]),
    pipeline=st.booleans(),
)
def test_engine_decides_like_run_dynamic(name, kind, max_batch, sizes, order, steps, scheduler, pipeline) -> None:
    model, x, thresholds = _model(name)
    policy = _policy(kind, thresholds)
    reference = model.run_dynamic(x, policy)
    batches = []
    engine = Engine(
        TorchBackend(model, policy),
        max_batch=max_batch,
        scheduler=scheduler,
        on_batch=batches.append,
        pipeline=pipeline,
    )
    requests = _serve(engine, x, sizes, order, steps)
    exits = torch.cat([r.result.exit_index for r in requests])
    logits = torch.cat([r.result.logits for r in requests])
    macs = torch.cat([r.result.macs for r in requests])
    assert torch.equal(exits, reference.exit_index)
    torch.testing.assert_close(logits, reference.logits, atol=BATCH_INVARIANCE_ATOL, rtol=1e-5)
    assert torch.equal(macs, reference.macs)
    assert all(b.size <= max_batch for b in batches)
    assert sum(b.size for b in batches if b.stage == 0) == N  # every row ran stage 0 exactly once


@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    name=st.sampled_from(["mecnn_digits", "msdnet_test_tiny"]),
    kind=st.sampled_from(["confidence", "patience"]),
    max_batch=st.integers(1, 24),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    order=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    scheduler=st.sampled_from(["oldest", "fill"]),
    pipeline=st.booleans(),
)
def test_engine_over_pooled_graph_stages_decides_like_run_dynamic(
    name, kind, max_batch, sizes, order, scheduler, pipeline
) -> None:
    """Rows of many requests copied into the captured buffers of their bucket (graphs emulated on CPU)."""
    from adaptnn.runtime import GraphedModel

    model, x, thresholds = _model(name)
    policy = _policy(kind, thresholds)
    reference = model.run_dynamic(x, policy)
    graphed = GraphedModel(model, x[:5], max_batch=max_batch, use_graphs=False)
    batches = []
    backend = TorchBackend(model, policy, executor=graphed.pooled_executor())
    engine = Engine(backend, max_batch=max_batch, scheduler=scheduler, on_batch=batches.append, pipeline=pipeline)
    requests = _serve(engine, x, sizes, order, [1, 0, 2])
    assert torch.equal(torch.cat([r.result.exit_index for r in requests]), reference.exit_index)
    logits = torch.cat([r.result.logits for r in requests])
    torch.testing.assert_close(logits, reference.logits, atol=BATCH_INVARIANCE_ATOL, rtol=1e-5)
    assert all(b.size <= max_batch for b in batches)


def test_pipelined_engine_keeps_two_batches_in_flight_and_answers_all() -> None:
    model, x, thresholds = _model("mecnn_digits")
    engine = Engine(TorchBackend(model, ConfidencePolicy(thresholds)), max_batch=4, pipeline=True)
    assert not TorchBackend(model, ConfidencePolicy(thresholds)).asynchronous  # a CPU backend: off by default
    requests = [engine.submit(x[i : i + 4]) for i in range(0, 12, 4)]
    assert engine.step() == 4 and not requests[0].done  # launched, its decisions not read yet
    assert engine.pending_rows == 12 and not engine.idle
    engine.step()  # launches a second batch, completes the first
    assert len(engine._inflight) == 1
    engine.drain()
    assert engine.idle and engine.pending_rows == 0 and all(r.result is not None for r in requests)
    reference = model.run_dynamic(x[:12], ConfidencePolicy(thresholds))
    assert torch.equal(torch.cat([r.result.exit_index for r in requests]), reference.exit_index)
    assert [e for r in requests for e in r.result.exits] == reference.exit_index.tolist()


def test_confidence_run_exercises_every_exit_path() -> None:
    model, x, thresholds = _model("mecnn_digits")
    exits = model.run_dynamic(x, ConfidencePolicy(thresholds)).exit_index
    assert len(exits.unique()) >= 2  # the acceptance test above checks real early exits, not one exit


def test_deep_stages_pool_rows_of_many_requests() -> None:
    model, x, _ = _model("mecnn_digits")
    policy = ConfidencePolicy([float("inf")] * (model.num_exits - 1))  # nobody exits early
    batches = []
    engine = Engine(TorchBackend(model, policy), max_batch=8, on_batch=batches.append)
    requests = [engine.submit(x[i : i + 1]) for i in range(16)]
    engine.drain()
    assert [b.size for b in batches] == [8] * (2 * model.num_exits)  # 16 one-row requests, full batches everywhere
    assert all(r.result is not None and r.result.exit_index.item() == model.num_exits - 1 for r in requests)


def test_fill_scheduler_pools_survivors_of_many_stage0_batches() -> None:
    model, x, thresholds = _model("msdnet_test_tiny")
    policy = ConfidencePolicy(thresholds)
    sizes = {}
    for scheduler in ("oldest", "fill"):
        batches = []
        engine = Engine(
            TorchBackend(model, policy), max_batch=4, scheduler=scheduler, on_batch=batches.append, clock=lambda: 0.0
        )
        requests = [engine.submit(x[i : i + 1]) for i in range(N)]
        engine.drain()
        assert all(r.result is not None for r in requests)
        deep = [b.size for b in batches if b.stage > 0]
        sizes[scheduler] = sum(deep) / len(deep)
    assert sizes["fill"] > sizes["oldest"]  # deep stages run on fuller batches when survivors are pooled


def test_oldest_request_first_finishes_old_rows_before_new_arrivals() -> None:
    model, x, _ = _model("mecnn_digits")
    policy = ConfidencePolicy([float("inf")] * (model.num_exits - 1))
    batches = []
    engine = Engine(TorchBackend(model, policy), max_batch=4, on_batch=batches.append)
    old = engine.submit(x[:4])
    engine.step()  # stage 0 of the old request
    engine.submit(x[4:8])
    engine.step()
    assert batches[-1].stage == 1  # the old request's rows go on before the new one starts
    engine.drain()
    assert old.result is not None


def test_deadline_scheduler_runs_least_slack_first() -> None:
    model, x, _ = _model("mecnn_digits")
    policy = ConfidencePolicy([float("inf")] * (model.num_exits - 1))
    batches = []
    now = [0.0]
    engine = Engine(
        TorchBackend(model, policy), max_batch=4, scheduler="deadline", on_batch=batches.append, clock=lambda: now[0]
    )
    relaxed = engine.submit(x[:4], deadline_s=10.0)
    engine.step()
    urgent = engine.submit(x[4:8], deadline_s=0.001)
    engine.step()
    assert batches[-1].stage == 0  # the urgent request's stage 0 overtakes the relaxed request's stage 1
    engine.drain()
    assert relaxed.result is not None and urgent.result is not None


def test_policy_with_batch_level_state_is_refused_by_name() -> None:
    class Counting(ConfidencePolicy):
        name = "counting"

        def init_state(self, batch_size, device):
            return torch.zeros(())  # one counter for the whole batch: cannot be pooled

    model, _, thresholds = _model("mecnn_digits")
    with pytest.raises(ConfigError, match="counting"):
        TorchBackend(model, Counting(thresholds))


def test_wrong_input_is_an_input_error() -> None:
    model, x, thresholds = _model("mecnn_digits")
    engine = Engine(TorchBackend(model, ConfidencePolicy(thresholds)))
    with pytest.raises(InputError):
        engine.submit(x[0])  # no batch dim
    bad = x[:2].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        engine.submit(bad)
    with pytest.raises(InputError):
        engine.submit(torch.randn(2, 1, 9, 9))
    assert engine.idle


def test_failing_stage_fails_its_requests_and_the_engine_goes_on() -> None:
    model, x, thresholds = _model("mecnn_digits")
    backend = TorchBackend(model, ConfidencePolicy(thresholds))
    real = backend.run_stage
    calls = []

    def flaky(k, state, pstate):
        calls.append(k)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(k, state, pstate)

    backend.run_stage = flaky
    engine = Engine(backend, max_batch=4)
    failed = engine.submit(x[:4])
    engine.step()
    ok = engine.submit(x[4:6])
    engine.drain()
    assert isinstance(failed.error, RuntimeError) and failed.result is None
    assert ok.result is not None and ok.error is None


def test_async_front_answers_concurrent_requests_and_sheds_when_full() -> None:
    model, x, thresholds = _model("msdnet_test_tiny")
    policy = ConfidencePolicy(thresholds)
    reference = model.run_dynamic(x, policy)
    front = AsyncEngine(Engine(TorchBackend(model, policy), max_batch=8), max_inflight=N)
    front.start()

    async def main():
        results = await asyncio.gather(*(front.predict(x[i : i + 1]) for i in range(N)))
        with pytest.raises(Overloaded):
            front.admit(N + 1)
        return results

    try:
        results = asyncio.run(main())
    finally:
        front.stop()
    assert torch.equal(torch.cat([r.exit_index for r in results]), reference.exit_index)
    assert front.inflight == 0 and front.peak_inflight <= N and front.shed == 1


def test_cuda_graph_executor_is_refused_with_the_alternative() -> None:
    from adaptnn.runtime.cuda_graphs import GraphedStages

    model, _, thresholds = _model("mecnn_digits")
    with pytest.raises(ConfigError, match="PooledGraphStages"):
        TorchBackend(model, ConfidencePolicy(thresholds), executor=GraphedStages.__new__(GraphedStages))


def test_stage_ms_from_a_latency_model() -> None:
    from adaptnn.serve.engine import stage_ms_from

    class Profiled:
        def exit_latency_ms(self, batch_size: int = 1) -> list[float]:
            return [1.0, 3.0, 6.0, 10.0]

    assert stage_ms_from(Profiled()) == [1.0, 2.0, 3.0, 4.0]
    model, _, thresholds = _model("mecnn_digits")
    engine = Engine(
        TorchBackend(model, ConfidencePolicy(thresholds)), scheduler="deadline", stage_ms=stage_ms_from(Profiled())
    )
    assert engine._remaining_s == pytest.approx([0.010, 0.009, 0.007, 0.004])
