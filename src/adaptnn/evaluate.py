"""Evaluation of a staged model: anytime accuracy, simulated and realised early exit.

* :func:`collect_logits` caches every exit's logits on a split (``forward_all``) once.
* :func:`anytime_results` gives each exit's accuracy and cumulative MACs.
* :func:`simulate_policy` applies a policy to cached logits (no model run).
* :func:`realised_run` runs the policy for real through ``run_dynamic`` on the split and times it against
  the full model (all segments + last head) over the same batches, in the same process.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import DataError
from .policies import ExitPolicy, simulate_exits
from .staged import StagedModel

__all__ = ["collect_logits", "anytime_results", "simulate_policy", "realised_run", "exit_fractions"]


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    if len(dataset) == 0:
        raise DataError("cannot evaluate on an empty split")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.inference_mode()
def collect_logits(
    model: StagedModel,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "logits",
) -> tuple[Tensor, Tensor]:
    """Logits of every exit on ``dataset``: ``([K, N, C] float32 on CPU, labels [N] long)``."""
    model.eval().to(device)
    chunks: list[Tensor] = []
    labels: list[Tensor] = []
    show = progress and sys.stderr.isatty()
    for x, y in tqdm(_loader(dataset, batch_size), desc=desc, disable=not show, leave=False):
        x = x.to(device)
        model.check_input(x, check_finite=True)
        chunks.append(torch.stack(model.forward_all(x)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(chunks, dim=1), torch.cat(labels).long()


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


@torch.inference_mode()
def realised_run(
    model: StagedModel,
    dataset: Dataset,
    policy: ExitPolicy,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    warmup_batches: int = 2,
) -> dict[str, Any]:
    """Run ``policy`` for real (``run_dynamic``) on ``dataset`` and time it against the full model.

    Both are timed over the same batches, alternating full/dynamic per batch (so drifts of the machine
    affect both alike), after ``warmup_batches`` untimed batches of each. Data loading is excluded:
    batches are loaded once beforehand.

    Returns:
        ``{accuracy, avg_macs, exit_fractions, wall_time_s, full_model_wall_time_s, speedup, batch_size,
        device, exit_index}``.
    """
    model.eval().to(device)
    batches = [(x.to(device), torch.as_tensor(y).to(device)) for x, y in _loader(dataset, batch_size)]
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for x, _ in batches[:warmup_batches]:
        model(x)
        model.run_dynamic(x, policy)
    sync()
    dynamic_time = full_time = 0.0
    correct = 0
    macs_sum = 0.0
    exits: list[Tensor] = []
    for x, y in batches:
        t0 = time.perf_counter()
        model(x)
        sync()
        t1 = time.perf_counter()
        out = model.run_dynamic(x, policy)
        sync()
        t2 = time.perf_counter()
        full_time += t1 - t0
        dynamic_time += t2 - t1
        correct += int((out.logits.argmax(-1) == y).sum())
        macs_sum += float(out.macs.sum())
        exits.append(out.exit_index.cpu())
    n = sum(len(y) for _, y in batches)
    exit_index = torch.cat(exits)
    return {
        "accuracy": correct / n,
        "avg_macs": macs_sum / n,
        "exit_fractions": exit_fractions(exit_index, model.num_exits),
        "wall_time_s": dynamic_time,
        "full_model_wall_time_s": full_time,
        "speedup": full_time / dynamic_time if dynamic_time > 0 else float("nan"),
        "batch_size": batch_size,
        "device": str(device),
        "exit_index": exit_index,
    }
