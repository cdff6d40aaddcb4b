"""Shared test fixtures: a model whose state is a tuple, and randomised statistics for sharper checks."""

import torch
from torch import nn


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
