"""Shared test helpers: a model whose state is a tuple, randomised statistics for sharper checks, and the
realised == simulated check of early exit."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adaptnn.policies import simulate_exits
from adaptnn.runtime import ExitPolicy, StagedModel


class TupleSegment(nn.Module):
    """A segment whose state is a tuple (features, auxiliary): both must be compacted together."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, state):
        if isinstance(state, torch.Tensor):
            return (torch.tanh(self.lin(state)), state.sum(dim=1, keepdim=True))
        h, aux = state
        return (torch.tanh(self.lin(h)) + aux, aux + h.mean(dim=1, keepdim=True))


def randomise_stats(model: nn.Module) -> nn.Module:
    """Random BN running statistics and wider linear weights: spreads confidences, exercises every exit."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.5)
    return model


def assert_realised_equals_simulated(
    model: StagedModel,
    x: Tensor,
    policy: ExitPolicy,
    cached: Sequence[Tensor],
    batch_sizes: Sequence[int],
    rows: int | None = None,
) -> Tensor:
    """``run_dynamic`` on consecutive batches of each size over the first ``rows`` inputs decides and predicts what
    ``simulate_exits`` replays from ``cached`` (``forward_all`` logits of ``x``); returns the simulated exits."""
    sim_exit, sim_pred = simulate_exits(policy, cached)
    for batch in batch_sizes:
        for start in range(0, len(x) if rows is None else rows, batch):
            out = model.run_dynamic(x[start : start + batch], policy)
            assert torch.equal(out.exit_index, sim_exit[start : start + batch]), (batch, start)
            assert torch.allclose(out.logits, sim_pred[start : start + batch], atol=1e-5), (batch, start)
    return sim_exit


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (it may import its siblings, e.g. ``strategies.py``)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", bench / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    return module


def between_middle_values(values: torch.Tensor) -> float:
    """A threshold halfway between the two middle values: about half are above it and none sits on it (a sample on
    its threshold leaves or not by float noise between two runtimes, e.g. onnxruntime vs PyTorch)."""
    ordered = values.flatten().sort().values
    k = len(ordered) // 2
    return float((ordered[k - 1] + ordered[k]) / 2)
