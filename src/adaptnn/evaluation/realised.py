"""The realised run: a policy executed for real through ``run_dynamic`` and timed against the full model."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..policies import ExitPolicy
from ..runtime.staged import StagedModel
from .exits import exit_fractions
from .logits import eval_loader

__all__ = ["realised_run"]


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
    batches = [(x.to(device), torch.as_tensor(y).to(device)) for x, y in eval_loader(dataset, batch_size)]
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
