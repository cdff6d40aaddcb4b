"""Honest speed benchmark: does the compute early exit saves become wall-clock time saved?

For one model, one exit policy and a set of inputs, at each batch size:

* the full model (``forward``: every segment, last head only) and ``run_dynamic`` run on the *same*
  batches, interleaved call by call (and the order flips every round), after a warm-up by time;
* each batch's time is the median over rounds; the totals over all batches give the
  **realised speedup** = full-model time / dynamic time;
* the **ideal speedup** = full-model MACs / average MACs of the dynamic run (its heads included), from
  the same run's exit decisions;
* **ratio** = realised / ideal. 1.0 would mean every MAC saved became time saved.

The ratio mixes two things, so the benchmark also times an **oracle**: the same computation with the
exits known in advance (samples sorted by exit, every segment and head run on a batch *prefix*, no
decisions, no syncs, no copies). Then ``realised = (full / oracle) * (oracle / dynamic)``:

* ``time_ideal_speedup = full / oracle``: what skipping exactly those computations can save on this
  hardware. It differs from the MACs-ideal because time per MAC is not uniform: late, weight-heavy
  stages are memory-bound at batch 1 (skipping them saves more time than MACs), early high-resolution
  stages dominate at large batches (skipping late stages saves less);
* ``engine_efficiency = oracle / dynamic``: what the early-exit engine itself costs (policy decisions,
  one host sync per exit, compaction copies). This is the part adaptnn controls.

At batch size 1 each sample is timed alone, so the per-sample tail latency (p50/p95/p99) of the dynamic
model is reported next to the full model's: a sample that reaches the last exit pays for every head and
exit check on the way and can be slower than the full model.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..calibration.budgeted import budgeted_sweep
from ..errors import ConfigError
from ..policies import ConfidencePolicy, ExitPolicy
from ..runtime.cost import cost_breakdown
from ..runtime.cuda_graphs import GraphedModel, default_buckets
from ..runtime.execution import EagerStages, oracle_loop
from ..runtime.staged import StagedModel
from .timing import Timer, machine_info, model_device_dtype, pinned_threads, to_model, warm_up

__all__ = ["full_model_macs", "thresholds_for_macs_fraction", "bench_policy", "bench_at_budget", "percentiles"]

log = logging.getLogger(__name__)


def full_model_macs(model: StagedModel, input_size: Sequence[int], *, dtype: torch.dtype | None = None) -> float:
    """MACs of ``model.forward`` (all segments and only the last head) for one sample.

    ``dtype``: the input dtype (default: the model's parameter dtype, so a half-precision model is counted too).
    """
    breakdown = cost_breakdown(model, input_size, dtype=dtype or model_device_dtype(model)[1])
    return sum(breakdown.segment_macs) + breakdown.head_macs[-1]


@torch.inference_mode()
def thresholds_for_macs_fraction(
    model: StagedModel, calibration_inputs: Tensor, fraction: float, *, batch_size: int = 256
) -> tuple[list[float], float]:
    """Confidence thresholds whose average MACs on ``calibration_inputs`` are closest to ``fraction`` of the full model.

    Uses the budgeted-batch sweep over a fine grid of p; labels are not needed (accuracy is not the point:
    this fixes an exit distribution for timing, e.g. on a model with random weights).

    Returns:
        ``(thresholds, predicted average MACs as a fraction of the full model)``.
    """
    if not 0 < fraction <= 1.5:
        raise ConfigError(f"target MACs fraction must be in (0, 1.5], got {fraction}")
    model.eval()
    dtype = model_device_dtype(model)[1] if calibration_inputs.is_floating_point() else calibration_inputs.dtype
    costs = cost_breakdown(model, tuple(calibration_inputs.shape[1:]), dtype=dtype).exit_macs
    full = full_model_macs(model, tuple(calibration_inputs.shape[1:]), dtype=dtype)
    logits = [
        torch.stack(model.forward_all(to_model(model, calibration_inputs[i : i + batch_size]))).float().cpu()
        for i in range(0, calibration_inputs.shape[0], batch_size)
    ]
    probs = torch.cat(logits, dim=1).softmax(-1)
    labels = torch.zeros(probs.shape[1], dtype=torch.long)
    p_values = [float(p) for p in np.geomspace(0.02, 50, 200)]
    sweep = budgeted_sweep(probs, labels, probs, labels, costs, p_values)
    best = min(sweep, key=lambda point: abs(point["val_avg_cost"] / full - fraction))
    return [float(t) for t in best["thresholds"]], best["val_avg_cost"] / full


def _oracle_plan(model: StagedModel, x: Tensor, exit_index: Tensor) -> tuple[Tensor, list[int]]:
    """Samples sorted by exit (latest first) and how many of them run each stage."""
    order = torch.argsort(exit_index, descending=True, stable=True)
    counts = torch.bincount(exit_index.cpu(), minlength=model.num_exits).tolist()
    alive = [sum(counts[k:]) for k in range(model.num_exits)]
    x_sorted = x.index_select(0, order)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        x_sorted = x_sorted.contiguous(memory_format=torch.channels_last)
    return x_sorted, alive


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` of ``values``."""
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{int(q)}": float(np.percentile(arr, q)) for q in qs}


@torch.inference_mode()
def bench_policy(
    model: StagedModel,
    inputs: Tensor,
    policy: ExitPolicy,
    *,
    batch_sizes: Sequence[int] = (1, 8, 64),
    rounds: int = 5,
    warmup_s: float = 2.0,
    max_samples: int | None = None,
    device: torch.device | str = "cpu",
    num_threads: int | None = None,
    channels_last: bool = False,
    dtype: torch.dtype | None = None,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Time the full model against ``run_dynamic(policy)`` on the same batches (see the module docstring).

    Args:
        model: the staged model (put in eval mode).
        inputs: ``[N, ...]`` samples; each batch size uses the first ``floor(N' / b) * b`` of them where
            ``N' = min(N, max_samples)``.
        policy: the exit policy.
        batch_sizes: batch sizes to measure.
        rounds: timed passes over all batches (median per batch).
        warmup_s: warm-up time per batch size, alternating both variants.
        max_samples: cap on the samples used per batch size.
        device: where to run.
        num_threads: CPU threads to pin (None: leave as is).
        channels_last: convert model and inputs to channels_last (4-D inputs only).
        dtype: run model and inputs in this floating dtype (e.g. ``torch.bfloat16`` on GPU); default as given.
        cuda_graphs: run the full model, the dynamic model and the oracle through
            :class:`~adaptnn.cuda_graphs.GraphedModel` (graphs captured at powers of two up to the largest batch).

    Returns:
        ``{"machine": ..., "full_model_macs": ..., "results": [one dict per batch size]}``.
    """
    if cuda_graphs and torch.device(device).type != "cuda":
        raise ConfigError(f"CUDA graphs need a CUDA device, got device={device!s}")
    model = model.eval().to(device)
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating-point dtype, got {dtype}")
        model = model.to(dtype)
        if inputs.is_floating_point():
            inputs = inputs.to(dtype)
    if channels_last:
        if inputs.dim() != 4:
            raise ConfigError("channels_last needs 4-D image inputs")
        model = model.to(memory_format=torch.channels_last)
    timer = Timer(device)
    sample_shape = tuple(inputs.shape[1:])
    full_macs = full_model_macs(model, sample_shape, dtype=None if inputs.is_floating_point() else inputs.dtype)
    n_avail = inputs.shape[0] if max_samples is None else min(inputs.shape[0], max_samples)
    results = []
    with pinned_threads(num_threads):
        runner: StagedModel | GraphedModel = model
        executor: Any = EagerStages(model)
        if cuda_graphs:
            example = inputs[:8].to(device)
            if channels_last:
                example = example.contiguous(memory_format=torch.channels_last)
            runner = GraphedModel(model, example, buckets=default_buckets(max(batch_sizes)))
            executor = runner.executor()
        for b in batch_sizes:
            n = (n_avail // b) * b
            if n == 0:
                raise ConfigError(f"batch size {b} is larger than the {n_avail} available samples")
            batches = [inputs[i : i + b].to(device) for i in range(0, n, b)]
            if channels_last:
                batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]

            def both(batches=batches) -> None:
                for x in batches[:4]:
                    runner(x)
                    runner.run_dynamic(x, policy, check_finite=False)

            warm_up(both, warmup_s, timer, min_calls=1)
            outs = [runner.run_dynamic(x, policy, check_finite=False) for x in batches]
            plans = [_oracle_plan(model, x, o.exit_index) for x, o in zip(batches, outs, strict=True)]
            full_t: list[list[float]] = [[] for _ in batches]
            dyn_t: list[list[float]] = [[] for _ in batches]
            oracle_t: list[list[float]] = [[] for _ in batches]
            for r in range(rounds):
                for i, x in enumerate(batches):
                    x_sorted, alive = plans[i]
                    variants = [
                        (full_t, lambda x=x: runner(x)),
                        (dyn_t, lambda x=x: runner.run_dynamic(x, policy, check_finite=False)),
                        (oracle_t, lambda x=x_sorted, a=alive: oracle_loop(executor, x, a)),
                    ]
                    shift = (r + i) % 3  # rotate who goes first: drifts and cache state hit all three alike
                    for times, fn in variants[shift:] + variants[:shift]:
                        times[i].append(timer(fn))
            exit_index = torch.cat([o.exit_index.cpu() for o in outs])
            avg_macs = float(torch.cat([o.macs.cpu() for o in outs]).mean())
            full_med = [statistics.median(t) for t in full_t]
            dyn_med = [statistics.median(t) for t in dyn_t]
            realised = sum(full_med) / sum(dyn_med)
            ideal = full_macs / avg_macs
            oracle_total = sum(statistics.median(t) for t in oracle_t)
            entry: dict[str, Any] = {
                "batch_size": b,
                "num_samples": n,
                "full_ms_per_batch": sum(full_med) / len(batches),
                "dynamic_ms_per_batch": sum(dyn_med) / len(batches),
                "realised_speedup": realised,
                "ideal_speedup": ideal,
                "ratio": realised / ideal,
                "oracle_ms_per_batch": oracle_total / len(batches),
                "time_ideal_speedup": sum(full_med) / oracle_total,
                "engine_efficiency": oracle_total / sum(dyn_med),
                "avg_macs": avg_macs,
                "exit_fractions": (torch.bincount(exit_index, minlength=model.num_exits).double() / n).tolist(),
            }
            if b == 1:
                entry["latency_ms"] = {"full": percentiles(full_med), "dynamic": percentiles(dyn_med)}
                by_exit: dict[int, list[float]] = {}
                for k, t in zip(exit_index.tolist(), dyn_med, strict=True):
                    by_exit.setdefault(k, []).append(t)
                entry["latency_ms"]["dynamic_by_exit_median"] = {
                    str(k): statistics.median(v) for k, v in sorted(by_exit.items())
                }
            log.info(
                "batch %d: full %.3f ms, dynamic %.3f ms per batch; realised %.2fx, ideal %.2fx, ratio %.2f",
                b,
                entry["full_ms_per_batch"],
                entry["dynamic_ms_per_batch"],
                realised,
                ideal,
                realised / ideal,
            )
            results.append(entry)
    return {
        "machine": machine_info(device),
        "full_model_macs": full_macs,
        "rounds": rounds,
        "warmup_s": warmup_s,
        "channels_last": channels_last,
        "dtype": str(model_device_dtype(model)[1]).removeprefix("torch."),
        "cuda_graphs": cuda_graphs,
        "results": results,
    }


def bench_at_budget(
    model: StagedModel, inputs: Tensor, calibration_inputs: Tensor, budget: float, **bench_kwargs: Any
) -> dict[str, Any]:
    """Thresholds for ``budget`` (a MACs fraction, fitted on ``calibration_inputs``), then :func:`bench_policy`.

    Returns the benchmark dict with ``budget``, ``calibrated_macs_fraction`` and ``thresholds`` added.
    """
    thresholds, predicted = thresholds_for_macs_fraction(model, calibration_inputs, budget)
    result = bench_policy(model, inputs, ConfidencePolicy(thresholds), **bench_kwargs)
    return {"budget": budget, "calibrated_macs_fraction": predicted, "thresholds": thresholds, **result}
