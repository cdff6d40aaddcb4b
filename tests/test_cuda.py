"""Real early exit on a CUDA device: dynamic == simulated for every backbone family and batch size.

Skipped where no GPU is present (CI); run on a GPU machine with ``pytest -m gpu tests/test_cuda.py``.
Models run in float64 so that a batch's composition cannot flip a decision through rounding; thresholds sit
between observed confidences so that every run has early and late exits.
"""

import pytest
import torch

from adaptnn import ConfidencePolicy, create_model
from adaptnn.policies import simulate_exits
from adaptnn.runtime import State, map_state
from helpers import randomise_stats

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _timm(arch: str, input_size: tuple[int, ...], **kwargs):
    import timm  # dev extra, always installed where these tests run

    from adaptnn.adapters import from_timm

    return from_timm(timm.create_model(arch, num_classes=7, **kwargs), input_size=input_size)


def _torchvision(arch: str):
    import torchvision

    from adaptnn.adapters import from_torchvision

    return from_torchvision(torchvision.models.get_model(arch, num_classes=7), input_size=(3, 32, 32))


FAMILIES = {
    "mecnn": lambda: create_model("mecnn_cifar", widths=[8, 16, 16, 32]),
    "msdnet": lambda: create_model("msdnet_test_tiny"),
    "timm_cnn": lambda: _timm("test_resnet", (3, 32, 32)),
    "timm_vit": lambda: _timm("test_vit", None),
    "torchvision": lambda: _torchvision("mobilenet_v3_small"),
}


def _thresholds_between(logits: list[torch.Tensor], quantile: float) -> list[float]:
    return [float(lg.softmax(-1).amax(-1).quantile(quantile)) + 1e-9 for lg in logits[:-1]]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_dynamic_equals_simulated_on_cuda(family, batch):
    torch.manual_seed(0)
    model = randomise_stats(FAMILIES[family]()).double().eval().cuda()
    shape = model.input_spec.shape
    reference = torch.randn(64, *shape, dtype=torch.float64, device="cuda")
    x = reference[:batch]
    with torch.inference_mode():
        policy = ConfidencePolicy(_thresholds_between(model.forward_all(reference), 0.5))
        logits = model.forward_all(x)
    sim_exit, sim_logits = simulate_exits(policy, logits)
    out = model.run_dynamic(x, policy)
    assert out.logits.device.type == "cuda" and out.exit_index.device.type == "cuda"
    assert torch.equal(out.exit_index, sim_exit)
    torch.testing.assert_close(out.logits, sim_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.macs, model.exit_costs(x)[sim_exit])
    if batch == 64:
        assert len(set(sim_exit.tolist())) > 1  # samples really left at different exits


def test_channels_last_stays_channels_last_through_compaction_on_cuda():
    model = create_model("mecnn_cifar", widths=[8, 16, 16, 32]).eval().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    seen: list[bool] = []

    def record(module, args, output: State) -> None:
        if isinstance(output, torch.Tensor) and output.device.type == "meta":
            return  # the MACs counter runs a copy of the model (hooks included) on the meta device
        map_state(output, lambda t: seen.append(t.dim() != 4 or t.is_contiguous(memory_format=torch.channels_last)))

    hooks = [seg.register_forward_hook(record) for seg in model.segments]
    with torch.inference_mode():
        logits = model.forward_all(x)
    policy = ConfidencePolicy(_thresholds_between(logits, 0.4))
    seen.clear()
    out = model.run_dynamic(x, policy)
    for hook in hooks:
        hook.remove()
    assert seen and all(seen)
    sim_exit, sim_logits = simulate_exits(policy, logits)
    assert torch.equal(out.exit_index, sim_exit)
    torch.testing.assert_close(out.logits, sim_logits, rtol=1e-4, atol=1e-4)


def test_compiled_parts_make_the_same_decisions_on_cuda():
    model = randomise_stats(create_model("mecnn_cifar", widths=[8, 16, 16, 32])).eval().cuda()
    x = torch.randn(24, 3, 32, 32, device="cuda")
    with torch.inference_mode():
        logits = model.forward_all(x)
    policy = ConfidencePolicy(_thresholds_between(logits, 0.5))
    eager = model.run_dynamic(x, policy)
    model.compile_parts()
    compiled = model.run_dynamic(x, policy)
    # compiled kernels may round differently: samples whose confidence sits at a threshold may move
    agree = (eager.exit_index == compiled.exit_index).float().mean()
    assert agree >= 0.9
    same = eager.exit_index == compiled.exit_index
    torch.testing.assert_close(eager.logits[same], compiled.logits[same], rtol=1e-3, atol=1e-3)


def test_speed_benchmark_runs_on_cuda_in_half_precision():
    from adaptnn.measure.speed import bench_at_budget

    model = create_model("mecnn_cifar", widths=[8, 16, 16, 32]).eval()
    inputs, calib = torch.randn(16, 3, 32, 32), torch.randn(32, 3, 32, 32)
    result = bench_at_budget(
        model, inputs, calib, 0.5, batch_sizes=(1, 8), rounds=1, warmup_s=0.0, device="cuda", dtype=torch.bfloat16
    )
    assert result["dtype"] == "bfloat16" and result["machine"]["gpu"]
    assert all(r["dynamic_ms_per_batch"] > 0 and r["avg_macs"] > 0 for r in result["results"])


@pytest.mark.parametrize("mode", ["fused", "fused_speculative", "loop"])
@pytest.mark.parametrize("family", ["mecnn", "msdnet", "timm_cnn", "timm_vit"])
def test_cuda_graphs_equal_eager_on_cuda(family, mode):
    fused = mode != "loop"
    from adaptnn.runtime.cuda_graphs import GraphedModel

    torch.manual_seed(0)
    model = randomise_stats(FAMILIES[family]()).double().eval().cuda()
    x_all = torch.randn(80, *model.input_spec.shape, dtype=torch.float64, device="cuda")
    with torch.inference_mode():
        policy = ConfidencePolicy(_thresholds_between(model.forward_all(x_all[:64]), 0.5))
    graphed = GraphedModel(model, x_all[:4], max_batch=64, speculate=True if mode == "fused_speculative" else None)
    assert graphed.use_graphs and graphed.stage_ms
    if fused:
        graphed.run_dynamic(x_all[:2], policy)
        assert all(d is not None for d in graphed._decisions.values())  # really captured, no fallback
    for batch in [1, 8, 37, 80]:  # 37: padded bucket; 80: two chunks
        x = x_all[:batch]
        eager = model.run_dynamic(x, policy)
        out = graphed.run_dynamic(x, policy, fused=fused)
        assert torch.equal(out.exit_index, eager.exit_index)
        torch.testing.assert_close(out.logits, eager.logits, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(graphed(x), model(x), rtol=1e-9, atol=1e-9)


def test_speed_benchmark_with_cuda_graphs():
    from adaptnn.measure.speed import bench_at_budget

    model = create_model("mecnn_cifar", widths=[8, 16, 16, 32]).eval()
    inputs, calib = torch.randn(16, 3, 32, 32), torch.randn(32, 3, 32, 32)
    result = bench_at_budget(
        model,
        inputs,
        calib,
        0.5,
        batch_sizes=(1, 8),
        rounds=1,
        warmup_s=0.0,
        device="cuda",
        cuda_graphs=True,
        channels_last=True,
        dtype=torch.bfloat16,
    )
    assert result["cuda_graphs"] and all(r["oracle_ms_per_batch"] > 0 for r in result["results"])


def test_latency_profile_on_cuda_records_gpu_time():
    from adaptnn.measure.latency import LatencyModel, profile_latency

    model = create_model("mecnn_cifar", widths=[8, 16, 16, 32]).eval()
    lm = profile_latency(model, torch.randn(16, 3, 32, 32), batch_sizes=(1, 4, 16), repeats=2, device="cuda")
    assert lm.segment_gpu_ms is not None and all(f(4) > 0 for f in lm.segment_gpu_ms)
    assert lm.predict([2, 2, 2, 2]) > 0
    assert LatencyModel.from_dict(lm.to_dict()).predict([2, 2, 2, 2]) == lm.predict([2, 2, 2, 2])


def test_stateful_policy_decisions_captured_on_cuda():
    from adaptnn.policies import PatiencePolicy
    from adaptnn.runtime.cuda_graphs import GraphedModel

    model = randomise_stats(FAMILIES["msdnet"]()).double().eval().cuda()
    x = torch.randn(40, *model.input_spec.shape, dtype=torch.float64, device="cuda")
    policy = PatiencePolicy(patience=1)
    graphed = GraphedModel(model, x[:4], max_batch=32)
    eager = model.run_dynamic(x, policy)
    out = graphed.run_dynamic(x, policy)
    assert all(d is not None for d in graphed._decisions.values())
    assert torch.equal(out.exit_index, eager.exit_index)
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("executor", ["eager", "pooled_graphs"])
@pytest.mark.parametrize("scheduler", ["oldest", "fill"])
def test_pipelined_serving_engine_decides_like_run_dynamic_on_cuda(executor, scheduler):
    """Two batches in flight (decisions read through pinned host memory), rows pooled across requests."""
    from adaptnn.runtime import GraphedModel
    from adaptnn.serve import Engine, TorchBackend

    torch.manual_seed(0)
    model = randomise_stats(create_model("msdnet_test_tiny")).cuda().double().eval()
    x = torch.randn(40, 3, 16, 16, device="cuda", dtype=torch.float64)
    with torch.inference_mode():
        scores = torch.stack([o.softmax(-1).amax(-1) for o in model.forward_all(x)])
    policy = ConfidencePolicy([float(s.median()) for s in scores[:-1]])
    reference = model.run_dynamic(x, policy)
    pooled = GraphedModel(model, x[:4], max_batch=16).pooled_executor() if executor == "pooled_graphs" else None
    backend = TorchBackend(model, policy, executor=pooled)
    assert backend.asynchronous
    engine = Engine(backend, max_batch=16, scheduler=scheduler, max_wait_ms=0.0)
    assert engine.pipeline
    requests = []
    for i in range(0, 40, 3):
        requests.append(engine.submit(x[i : i + 3]))
        engine.step()
    engine.drain()
    assert torch.equal(torch.cat([r.result.exit_index for r in requests]), reference.exit_index.cpu())
    logits = torch.cat([r.result.logits for r in requests])
    torch.testing.assert_close(logits, reference.logits, atol=1e-9, rtol=1e-9)


def test_token_knob_models_capture_as_cuda_graphs():
    """A fixed ToMe / EViT knob fixes every shape: the graphed model equals eager (fp32 noise)."""
    import timm

    from adaptnn.adapters.vit_tokens import token_vit
    from adaptnn.layers.tokens import TokenKnob, set_token_knob
    from adaptnn.runtime import GraphedModel

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64).eval()
    x = torch.randn(6, 3, 64, 64, device="cuda")
    for knob in (TokenKnob("tome", 4), TokenKnob("evit", 0.7)):
        m = set_token_knob(token_vit(vit, verify=False), knob).cuda().eval()
        graphed = GraphedModel(m, x[:2], buckets=[1, 4, 8])
        with torch.inference_mode():
            torch.testing.assert_close(graphed(x), m(x), atol=1e-4, rtol=1e-4)


def test_tome_on_cuda_merges_like_on_cpu():
    """ToMe's metric is one reduction on a GPU (H - 1 additions on CPU): the same merges, the same logits."""
    import copy

    import timm

    from adaptnn.adapters.vit_tokens import token_vit
    from adaptnn.layers.tokens import TokenKnob, set_token_knob

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64).eval()
    cpu = set_token_knob(token_vit(vit, verify=False), TokenKnob("tome", 4)).eval()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(8, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), atol=1e-4, rtol=1e-4)
