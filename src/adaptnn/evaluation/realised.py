"""The realised run: a policy executed for real through ``run_dynamic`` and timed against the full model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..measure.timing import Timer, interleaved_medians
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
    rounds: int = 3,
    warmup_s: float = 0.5,
    warmup_batches: int = 2,
) -> dict[str, Any]:
    """Run ``policy`` for real (``run_dynamic``) on ``dataset`` and time it against the full model.

    Accuracy, MACs and exits come from one ``run_dynamic`` pass over the split (inputs checked). The times come
    from the measurement engine (:func:`~adaptnn.measure.timing.interleaved_medians`): the full model and
    ``run_dynamic`` on the same batches, interleaved call by call in rotating order, after a warm-up of at least
    ``warmup_s`` seconds over the first ``warmup_batches`` batches; each batch's time is its median over
    ``rounds`` calls, and a wall time is the sum of those medians. Data loading is excluded: batches are
    loaded once beforehand.

    Returns:
        ``{accuracy, avg_macs, exit_fractions, wall_time_s, full_model_wall_time_s, speedup, batch_size,
        device, rounds, warmup_s, exit_index}``.
    """
    model.eval().to(device)
    batches = [(x.to(device), torch.as_tensor(y).to(device)) for x, y in eval_loader(dataset, batch_size)]
    correct = 0
    macs_sum = 0.0
    exits: list[Tensor] = []
    for x, y in batches:
        out = model.run_dynamic(x, policy)
        correct += int((out.logits.argmax(-1) == y).sum())
        macs_sum += float(out.macs.sum())
        exits.append(out.exit_index.cpu())
    variants = {"full": model, "dynamic": lambda x: model.run_dynamic(x, policy, check_finite=False)}
    medians = interleaved_medians(
        variants,
        [x for x, _ in batches],
        rounds=rounds,
        warmup_s=warmup_s,
        warmup_batches=warmup_batches,
        timer=Timer(device),
    )
    full_time, dynamic_time = sum(medians["full"]) / 1e3, sum(medians["dynamic"]) / 1e3
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
        "rounds": rounds,
        "warmup_s": warmup_s,
        "exit_index": exit_index,
    }
