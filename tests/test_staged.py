"""StagedModel: real early exit equals the simulation on forward_all logits (the core invariant)."""

import math

import pytest
import torch
from torch import nn

from adaptnn import ConfidencePolicy, ConfigError, InputError, NeverExit, StagedModel, create_model, simulate_exits
from adaptnn.runtime import InputSpec
from helpers import TupleSegment, randomise_stats


class DictSegment(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, state):
        h, aux = state
        return {"h": torch.relu(self.lin(h)) * (1 + aux), "aux": aux}


class DictHead(nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, state):
        return self.fc(state["h"])


class TupleHead(nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, state):
        return self.fc(state[0])


def _nested_state_model(dim: int = 12, classes: int = 5) -> StagedModel:
    # segments: tuple, tuple, (no head), tuple->dict ; 3 exits
    segments = [TupleSegment(dim), TupleSegment(dim), TupleSegment(dim), DictSegment(dim)]
    heads = [TupleHead(dim, classes), TupleHead(dim, classes), DictHead(dim, classes)]
    model = StagedModel(segments, heads, exit_after=[0, 1, 3], input_spec=InputSpec((dim,)), num_classes=classes)
    for head in heads:
        nn.init.normal_(head.fc.weight, std=2.0)  # spread the confidences
    return model.double().eval()


MODELS = {
    "nested_state": lambda: (_nested_state_model(), (12,)),
    "cnn": lambda: (create_model("mecnn_digits").double().eval(), (1, 8, 8)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_run_dynamic_matches_simulation(name):
    model, sample_shape = MODELS[name]()
    randomise_stats(model)
    gen = torch.Generator().manual_seed(1)
    n_total = 24
    x_all = torch.randn(n_total, *sample_shape, generator=gen, dtype=torch.float64)
    costs = model.exit_costs(x_all)
    for batch in [1, 2, 3, 7, 16, 24]:
        x = x_all[:batch]
        with torch.no_grad():
            all_logits = model.forward_all(x)
        confs = torch.stack([lg.softmax(-1).amax(-1) for lg in all_logits])  # [K, B]
        for trial in range(5):
            # thresholds drawn from the observed confidence range so that every exit gets used
            lo, hi = confs.min().item(), confs.max().item()
            thresholds = (torch.rand(model.num_exits - 1, generator=gen) * (hi - lo) + lo).tolist()
            if trial == 4:
                thresholds[0] = math.inf  # a disabled exit
            policy = ConfidencePolicy(thresholds)
            sim_exit, sim_logits = simulate_exits(policy, all_logits)
            out = model.run_dynamic(x, policy)
            assert torch.equal(out.exit_index, sim_exit), (batch, thresholds)
            torch.testing.assert_close(out.logits, sim_logits, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(out.macs, costs[sim_exit])


@pytest.mark.parametrize("name", list(MODELS))
def test_never_exit_reproduces_last_exit(name):
    model, sample_shape = MODELS[name]()
    x = torch.randn(9, *sample_shape, dtype=torch.float64)
    out = model.run_dynamic(x, NeverExit())
    with torch.no_grad():
        last = model.forward_all(x)[-1]
        full = model(x)
    assert torch.equal(out.exit_index, torch.full((9,), model.num_exits - 1))
    torch.testing.assert_close(out.logits, last, rtol=0, atol=1e-12)
    torch.testing.assert_close(full, last, rtol=0, atol=0)
    assert torch.all(out.macs == model.exit_costs(x)[-1])


def test_everyone_exits_first():
    model = create_model("mecnn_digits").eval()
    x = torch.randn(6, 1, 8, 8)
    out = model.run_dynamic(x, ConfidencePolicy([0.0, 0.0, 0.0]))
    assert out.exit_index.tolist() == [0] * 6
    torch.testing.assert_close(out.logits, model.forward_all(x)[0])


def test_run_dynamic_under_inference_mode_and_train_mode_error():
    model = create_model("mecnn_digits")
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(ConfigError, match="eval mode"):
        model.run_dynamic(x, NeverExit())
    model.eval()
    with torch.inference_mode():
        out = model.run_dynamic(x, ConfidencePolicy([0.5, 0.5, 0.5]))
    assert out.logits.shape == (4, 10)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.randn(1, 8, 8), "add a batch dimension"),
        (torch.randn(2, 3, 8, 8), "expected 1 channels, got 3"),
        (torch.randn(2, 1, 9, 8), "expected 8 height, got 9"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.long), "floating-point"),
        (torch.full((2, 1, 8, 8), float("nan")), "non-finite"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(bad, message):
    model = create_model("mecnn_digits").eval()
    with pytest.raises(InputError, match=message):
        model.run_dynamic(bad, NeverExit())


def test_policy_threshold_count_checked():
    model = create_model("mecnn_digits").eval()
    with pytest.raises(ConfigError, match="3 thresholds but the model has 4 exits|1 thresholds"):
        model.run_dynamic(torch.randn(2, 1, 8, 8), ConfidencePolicy([0.5]))


def test_constructor_validation():
    seg = [nn.Identity(), nn.Identity()]
    with pytest.raises(ConfigError, match="strictly increasing"):
        StagedModel(seg, [nn.Identity(), nn.Identity()], exit_after=[1, 1])
    with pytest.raises(ConfigError, match="last head must follow the last segment"):
        StagedModel(seg, [nn.Identity()], exit_after=[0])
    with pytest.raises(ConfigError, match="pass exit_after"):
        StagedModel(seg, [nn.Identity()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_run_dynamic_cuda_matches_cpu_decisions():
    model = create_model("mecnn_digits").eval()
    x = torch.randn(32, 1, 8, 8)
    policy = ConfidencePolicy([0.105, 0.105, 0.105])
    cpu = model.run_dynamic(x, policy)
    gpu = model.cuda().run_dynamic(x.cuda(), policy)
    sim_exit, _ = simulate_exits(policy, [t.cpu() for t in model.forward_all(x.cuda())])
    assert torch.equal(gpu.exit_index.cpu(), sim_exit)
    assert cpu.logits.shape == gpu.logits.shape
