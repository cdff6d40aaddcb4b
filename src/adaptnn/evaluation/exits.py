"""Where samples exit and what that costs, from cached logits: anytime accuracy, replayed policies, per class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..policies import ExitPolicy, simulate_exits

__all__ = ["exit_fractions", "anytime_results", "simulate_policy", "per_class_exits"]


def exit_fractions(exit_index: Tensor, num_exits: int) -> list[float]:
    """Fraction of samples that took each exit."""
    counts = torch.bincount(exit_index.cpu(), minlength=num_exits).double()
    return (counts / max(1, exit_index.numel())).tolist()


def anytime_results(logits: Tensor, labels: Tensor, exit_costs: Sequence[float]) -> list[dict[str, Any]]:
    """``[{exit, macs, accuracy}]`` for every exit: what you get by always stopping there."""
    accuracy = (logits.argmax(-1) == labels.unsqueeze(0)).double().mean(dim=1)  # [K]
    return [{"exit": k, "macs": float(exit_costs[k]), "accuracy": float(accuracy[k])} for k in range(logits.shape[0])]


def simulate_policy(policy: ExitPolicy, logits: Tensor, labels: Tensor, exit_costs: Sequence[float]) -> dict[str, Any]:
    """Accuracy, average MACs and exit fractions of ``policy`` replayed on cached ``logits [K, N, C]``."""
    exit_index, prediction = simulate_exits(policy, logits)
    costs = torch.as_tensor(list(exit_costs), dtype=torch.float64)
    return {
        "accuracy": float((prediction.argmax(-1) == labels).double().mean()),
        "avg_macs": float(costs[exit_index].mean()),
        "exit_fractions": exit_fractions(exit_index, logits.shape[0]),
        "exit_index": exit_index,
    }


def per_class_exits(
    exit_index: Tensor,
    prediction: Tensor,
    labels: Tensor,
    exit_costs: Sequence[float],
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Which classes exit early: per class ``{class, name, n, mean_exit, exit_fractions, avg_macs, accuracy}``."""
    num_exits = len(exit_costs)
    costs = torch.as_tensor(list(exit_costs), dtype=torch.float64)
    pred = prediction.argmax(-1) if prediction.dim() == 2 else prediction
    labels = labels.cpu()
    rows = []
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    if class_names is not None:
        num_classes = max(num_classes, len(class_names))
    for c in range(num_classes):
        mask = labels == c
        n = int(mask.sum())
        if n == 0:
            continue
        ex = exit_index.cpu()[mask]
        rows.append(
            {
                "class": c,
                "name": class_names[c] if class_names is not None and c < len(class_names) else str(c),
                "n": n,
                "mean_exit": float(ex.double().mean()),
                "exit_fractions": exit_fractions(ex, num_exits),
                "avg_macs": float(costs[ex].mean()),
                "accuracy": float((pred.cpu()[mask] == c).double().mean()),
            }
        )
    return rows
