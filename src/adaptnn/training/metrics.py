"""One epoch's training metrics, owned by the Trainer: the loss and the strategy's per-step metrics.

Strategies report what one micro-batch measured (:class:`~adaptnn.strategies.StepOutput`) and keep no
running sums; :class:`EpochMeter` adds them up on the device (no sync per step) and reduces them over the
processes once per epoch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..strategies import StepOutput
from .distributed import all_reduce_totals

__all__ = ["EpochMeter"]


class EpochMeter:
    """Running totals of one epoch on one process.

    ``train_loss`` is the sample-weighted mean of the micro-batches' (mean) losses; every strategy metric is
    the plain mean over the micro-batches that reported it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.samples = 0
        self.metric_sums: dict[str, Tensor] = {}
        self.metric_counts: dict[str, int] = {}

    def add(self, output: StepOutput, n: int) -> None:
        """Count one micro-batch of ``n`` samples."""
        self.loss_sum += output.loss.detach().double() * n
        self.samples += n
        for key, value in output.metrics.items():
            if isinstance(value, Tensor):
                value = value.detach().to(device=self.device, dtype=torch.float64)
            else:
                value = torch.tensor(float(value), dtype=torch.float64, device=self.device)
            self.metric_sums[key] = self.metric_sums[key] + value if key in self.metric_sums else value
            self.metric_counts[key] = self.metric_counts.get(key, 0) + 1

    def running_loss(self) -> float:
        """This process's mean loss so far (syncs with the device; for progress bars)."""
        return float(self.loss_sum) / max(self.samples, 1)

    def summary(self, world_size: int = 1) -> tuple[float, dict[str, float]]:
        """``(train_loss, {metric: mean})`` over every process (a collective call under DDP)."""
        totals = {"loss/sum": self.loss_sum, "loss/count": self.loss_sum.new_tensor(float(self.samples))}
        for key, total in self.metric_sums.items():
            totals[f"metric/sum/{key}"] = total
            totals[f"metric/count/{key}"] = total.new_tensor(float(self.metric_counts[key]))
        totals = all_reduce_totals(totals, world_size)
        train_loss = float(totals["loss/sum"] / totals["loss/count"].clamp_min(1))
        keys = sorted(name.removeprefix("metric/sum/") for name in totals if name.startswith("metric/sum/"))
        metrics = {key: float(totals[f"metric/sum/{key}"] / totals[f"metric/count/{key}"]) for key in keys}
        return train_loss, metrics
