"""Per-sample layer skipping (LAUDNet's layer mode): a small gate per block decides, per sample, whether it runs.

:class:`GatedBlock` wraps a shape-preserving block (a residual block: skipping it is the identity). At inference the
gate's logit decides (``logit > threshold``); the samples that run the block are *gathered*, run as one dense
batch and *scattered* back, the others pass unchanged, so the saving is real compute, not masking
(channels_last inputs stay channels_last). ``mode="dense"`` is the simulation: every sample runs the block and the
decision selects the output; both modes make the same decisions and give the same outputs (tested).

Training uses Gumbel (logistic-noise) gates with a straight-through hard decision: the forward pass mixes
``x + g * (block(x) - x)`` with ``g`` in {0, 1}, the backward pass follows the relaxed sigmoid. Under
:func:`record_gates` each gate appends its keep probability (training) or decisions (inference);
:func:`skip_cost_penalty` turns the probabilities into the cost term that pulls the keep rate to a target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime.state import index_state

__all__ = [
    "SkipGate",
    "GatedBlock",
    "ResidualBlock",
    "gated_blocks",
    "record_gates",
    "set_skip_mode",
    "skip_cost_penalty",
]


class SkipGate(nn.Module):
    """Global average pooling then a linear layer: one logit per sample (``[b]``); positive means "run"."""

    def __init__(self, channels: int, bias: float = 2.0) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, 1)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, bias)  # start with (almost) every block on

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x  # [b, c]
        return self.fc(pooled).squeeze(-1)


class GatedBlock(nn.Module):
    """A shape-preserving block run only on the samples its gate keeps.

    Args:
        block: the block (output shaped like its input).
        channels: channels (dim 1) of the input, for the gate.
        tau: temperature of the Gumbel-sigmoid relaxation in training.
        threshold: inference decision ``logit > threshold`` (raise it to skip more).
    """

    def __init__(self, block: nn.Module, channels: int, tau: float = 1.0, threshold: float = 0.0) -> None:
        super().__init__()
        if not tau > 0:
            raise ConfigError(f"GatedBlock tau must be > 0, got {tau}")
        self.block = block
        self.gate = SkipGate(channels)
        self.tau = float(tau)
        self.threshold = float(threshold)
        self.mode = "gather"
        self._record: list[Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        logit = self.gate(x)  # [b]
        shape = (-1,) + (1,) * (x.dim() - 1)
        if self.training:
            u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / self.tau)
            g = (soft > 0.5).to(soft.dtype) + soft - soft.detach()  # hard forward, relaxed backward
            if self._record is not None:
                self._record.append(torch.sigmoid(logit))
            return x + g.view(shape) * (self.block(x) - x)
        keep = logit > self.threshold
        if self._record is not None:
            self._record.append(keep)
        if self.mode == "dense" or x.device.type == "meta":  # meta (cost counting): no data-dependent gather
            return torch.where(keep.view(shape), self.block(x), x)
        idx = keep.nonzero().squeeze(1)
        n = idx.numel()  # the host sync: the block's batch size depends on it
        if n == 0:
            return x
        if n == x.shape[0]:
            return self.block(x)
        out = x.clone()  # keeps the memory format
        return out.index_copy_(0, idx, self.block(index_state(x, idx)))

    def extra_repr(self) -> str:
        return f"mode={self.mode}, tau={self.tau}, threshold={self.threshold}"


class ResidualBlock(nn.Module):
    """ResNet basic block at constant width: ``relu(x + bn(conv(relu(bn(conv(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


def gated_blocks(model: nn.Module) -> list[GatedBlock]:
    """Every :class:`GatedBlock` of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, GatedBlock)]


def set_skip_mode(model: nn.Module, mode: str) -> None:
    """``"gather"`` (real skipping) or ``"dense"`` (simulation: run everything, select by decision)."""
    if mode not in ("gather", "dense"):
        raise ConfigError(f"skip mode must be 'gather' or 'dense', got {mode!r}")
    for block in gated_blocks(model):
        block.mode = mode


@contextlib.contextmanager
def record_gates(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collect, in call order, every gate's keep probabilities ``[b]`` (training) or decisions (inference)."""
    records: list[Tensor] = []
    blocks = gated_blocks(model)
    for block in blocks:
        block._record = records
    try:
        yield records
    finally:
        for block in blocks:
            block._record = None


def skip_cost_penalty(
    keep_probs: Sequence[Tensor], target: float, block_costs: Sequence[float] | None = None
) -> Tensor:
    """``(cost-weighted mean keep probability - target)^2``: the cost term of gate training.

    Args:
        keep_probs: per gate, the samples' keep probabilities ``[b]`` (from :func:`record_gates` in training).
        target: the wanted fraction of the gated blocks' compute, in [0, 1].
        block_costs: relative cost of each gated block (default: equal).
    """
    if not keep_probs:
        raise ConfigError("skip_cost_penalty: no gate was recorded (run the forward pass under record_gates)")
    if not 0.0 <= target <= 1.0:
        raise ConfigError(f"skip_cost_penalty: target must be in [0, 1], got {target}")
    costs = torch.ones(len(keep_probs)) if block_costs is None else torch.as_tensor(block_costs, dtype=torch.float32)
    if costs.numel() != len(keep_probs):
        raise ConfigError(f"got {costs.numel()} block costs for {len(keep_probs)} gates")
    means = torch.stack([p.float().mean() for p in keep_probs])
    costs = costs.to(means.device)
    rate = (means * costs).sum() / costs.sum()
    return (rate - target) ** 2
