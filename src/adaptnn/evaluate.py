"""Evaluation of a staged model: anytime accuracy, simulated and realised early exit.

* :func:`collect_logits` caches every exit's logits on a split (``forward_all``) once.
* :func:`anytime_results` gives each exit's accuracy and cumulative MACs.
* :func:`simulate_policy` applies a policy to cached logits (no model run).
* :func:`realised_run` runs the policy for real through ``run_dynamic`` on the split and times it against
  the full model (all segments + last head) over the same batches, in the same process.
* :func:`curve_table` compares accuracy-vs-MACs curves: area under the curve over the cost range all of
  them cover, and the MACs each needs to match its last exit's accuracy; :func:`per_class_exits` tells
  which classes leave early.
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

__all__ = [
    "collect_logits",
    "anytime_results",
    "simulate_policy",
    "realised_run",
    "exit_fractions",
    "common_range",
    "curve_auc",
    "cost_at_accuracy",
    "curve_table",
    "per_class_exits",
]


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


# --------------------------------------------------------------------------------------------------
# curves: area under accuracy-vs-MACs, MACs at a target accuracy, per-class exit statistics
# --------------------------------------------------------------------------------------------------


def _sorted_curve(costs: Sequence[float], accuracies: Sequence[float]) -> tuple[list[float], list[float]]:
    pairs = sorted(zip((float(c) for c in costs), (float(a) for a in accuracies), strict=True))
    xs: list[float] = []
    ys: list[float] = []
    for c, a in pairs:  # one point per cost: the best accuracy at it
        if xs and c == xs[-1]:
            ys[-1] = max(ys[-1], a)
        else:
            xs.append(c)
            ys.append(a)
    return xs, ys


def common_range(curves: dict[str, tuple[Sequence[float], Sequence[float]]]) -> tuple[float, float] | None:
    """``(lo, hi)``: the cost range every curve covers (``None`` when they do not overlap).

    Curves of a single cost (a point, e.g. a rule that cannot be tuned finely) do not narrow the range;
    :func:`curve_table` gives them no area.
    """
    spans = [(min(costs), max(costs)) for costs, _ in curves.values() if len(costs) and max(costs) > min(costs)]
    if not spans:
        return None
    lo = max(a for a, _ in spans)
    hi = min(b for _, b in spans)
    return (float(lo), float(hi)) if hi > lo else None


def curve_auc(costs: Sequence[float], accuracies: Sequence[float], lo: float, hi: float, points: int = 2001) -> float:
    """Mean accuracy of the curve over ``[lo, hi]`` (area under accuracy vs cost / (hi - lo)).

    The curve is the points sorted by cost, linearly interpolated (held flat beyond its ends).
    """
    import numpy as np

    xs, ys = _sorted_curve(costs, accuracies)
    grid = np.linspace(lo, hi, points)
    values = np.interp(grid, xs, ys)
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(grid)) / (hi - lo))


def cost_at_accuracy(costs: Sequence[float], accuracies: Sequence[float], target: float) -> float | None:
    """Cost of the cheapest point reaching ``target`` accuracy (``None`` if none does); no interpolation."""
    reaching = [c for c, a in zip(costs, accuracies, strict=True) if a >= target - 1e-12]
    return float(min(reaching)) if reaching else None


def curve_table(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    last_exit: dict[str, tuple[float, float]],
) -> list[dict[str, Any]]:
    """One row per curve: AUC over the range all curves share and MACs at the last exit's accuracy.

    Args:
        curves: ``label -> (avg MACs per point, test accuracy per point)``.
        last_exit: ``label -> (last exit's MACs, last exit's test accuracy)`` of that curve's model.

    Returns:
        ``[{label, auc, auc_range, macs_at_last_exit_accuracy, macs_saved_at_last_exit_accuracy,
        last_exit_accuracy, last_exit_macs, best_accuracy}]``; ``macs_saved`` is
        ``1 - macs_at_last_exit_accuracy / last_exit_macs`` (``None`` when the curve never reaches it).
    """
    rng = common_range(curves)
    rows = []
    for label, (costs, accs) in curves.items():
        last_macs, last_acc = last_exit[label]
        at = cost_at_accuracy(costs, accs, last_acc)
        rows.append(
            {
                "label": label,
                "auc": curve_auc(costs, accs, *rng) if rng and min(costs) <= rng[0] and max(costs) >= rng[1] else None,
                "auc_range": list(rng) if rng else None,
                "macs_at_last_exit_accuracy": at,
                "macs_saved_at_last_exit_accuracy": None if at is None else 1.0 - at / last_macs,
                "last_exit_accuracy": last_acc,
                "last_exit_macs": last_macs,
                "best_accuracy": max(accs) if len(accs) else None,
            }
        )
    return rows


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
