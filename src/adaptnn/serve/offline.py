"""Offline prediction: a dataset streamed through the engine, so large jobs get stage-level pooling too."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConfigError
from .engine import BatchRecord, Engine, Request

__all__ = ["OfflineResult", "stream_predict"]


@dataclass
class OfflineResult:
    """Predictions of every sample in input order, and what the engine did."""

    prediction: Tensor  # [N] long, argmax class
    exit_index: Tensor  # [N] long
    macs: Tensor  # [N] float64
    labels: Tensor | None  # [N] long when the data had labels
    wall_s: float
    batch_sizes: dict[int, list[int]] = field(default_factory=dict)  # stage -> sizes of its batches

    def report(self, num_exits: int) -> dict[str, Any]:
        """Throughput, exit mix, MACs and the stage batch sizes, JSON-ready."""
        n = int(self.prediction.shape[0])
        counts = torch.bincount(self.exit_index, minlength=num_exits).tolist() if n else [0] * num_exits
        out: dict[str, Any] = {
            "samples": n,
            "wall_s": self.wall_s,
            "samples_per_s": n / self.wall_s if self.wall_s > 0 else None,
            "exit_counts": counts,
            "exit_fractions": [c / n if n else 0.0 for c in counts],
            "avg_macs": float(self.macs.mean()) if n else 0.0,
            "stage_batches": {
                str(k): {"count": len(v), "mean_size": sum(v) / len(v) if v else 0.0}
                for k, v in sorted(self.batch_sizes.items())
            },
        }
        if self.labels is not None and n:
            out["accuracy"] = float((self.prediction == self.labels).double().mean())
        return out


def stream_predict(
    engine: Engine,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    *,
    total: int | None = None,
    max_inflight: int = 1024,
    progress: bool = True,
) -> OfflineResult:
    """Feed ``(x, labels or None)`` batches to ``engine`` while keeping at most ``max_inflight`` rows in it.

    New batches enter as earlier rows finish, so the survivors of many input batches share deep-stage batches.
    """
    if max_inflight < 1:
        raise ConfigError(f"max_inflight must be >= 1, got {max_inflight}")
    sizes: dict[int, list[int]] = {}
    previous = engine.on_batch

    def record(batch: BatchRecord) -> None:
        sizes.setdefault(batch.stage, []).append(batch.size)
        if previous is not None:
            previous(batch)

    engine.on_batch = record
    requests: list[Request] = []
    labels: list[Tensor] = []
    bar = tqdm(total=total, desc="predict", unit="sample", disable=not progress, leave=False)
    done_rows = 0

    def count(request: Request) -> None:
        nonlocal done_rows
        done_rows += request.n
        bar.update(request.n)

    start = time.perf_counter()
    try:
        for x, y in batches:
            while engine.pending_rows + x.shape[0] > max_inflight and engine.step():
                pass
            requests.append(engine.submit(x, callback=count))
            if y is not None:
                labels.append(torch.as_tensor(y))
        engine.drain()
    finally:
        engine.on_batch = previous
        bar.close()
    wall = time.perf_counter() - start
    for r in requests:
        if r.error is not None:
            raise r.error
    results = [r.result for r in requests if r.result is not None]
    if not results:
        raise ConfigError("no samples to predict: the data is empty")
    return OfflineResult(
        prediction=torch.cat([r.logits.argmax(dim=-1).cpu() for r in results]),
        exit_index=torch.cat([r.exit_index for r in results]),
        macs=torch.cat([r.macs for r in results]),
        labels=torch.cat(labels).long() if len(labels) == len(requests) else None,
        wall_s=wall,
        batch_sizes=sizes,
    )
