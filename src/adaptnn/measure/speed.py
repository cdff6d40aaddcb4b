"""Honest speed benchmark: does the compute early exit saves become wall-clock time saved?

For one model, one exit policy and a set of inputs, at each batch size:

* the full model (``forward``: every segment, last head only) and ``run_dynamic`` run on the *same*
  batches, interleaved call by call in rotating order, after a warm-up by time (the timing engine,
  :func:`~adaptnn.measure.timing.interleaved_medians`);
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

from ..calibration import thresholds_for_cost
from ..errors import ConfigError
from ..policies import ConfidencePolicy, ExitPolicy
from ..runtime.cost import cost_breakdown
from ..runtime.cuda_graphs import GraphedModel, default_buckets
from ..runtime.execution import EagerStages, oracle_loop
from ..runtime.staged import DynamicOutput, StagedModel
from .timing import Timer, interleaved_medians, machine_info, model_device_dtype, pinned_threads, to_model

__all__ = [
    "full_model_macs",
    "thresholds_for_macs_fraction",
    "bench_policy",
    "bench_at_budget",
    "percentiles",
    "latency_percentiles",
    "check_bench_options",
]

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

    Label-free: the largest softmax probability of every exit on the inputs goes to
    :func:`~adaptnn.calibration.thresholds_for_cost` with a target of ``fraction`` times the full model's MACs
    (accuracy is not the point: this fixes an exit distribution for timing, e.g. on a model with random weights).

    Returns:
        ``(thresholds, predicted average MACs as a fraction of the full model)``.
    """
    if not 0 < fraction <= 1.5:
        raise ConfigError(f"target MACs fraction must be in (0, 1.5], got {fraction}")
    model.eval()
    dtype = model_device_dtype(model)[1] if calibration_inputs.is_floating_point() else calibration_inputs.dtype
    costs = cost_breakdown(model, tuple(calibration_inputs.shape[1:]), dtype=dtype).exit_macs
    full = full_model_macs(model, tuple(calibration_inputs.shape[1:]), dtype=dtype)
    scores = [
        torch.stack(model.forward_all(to_model(model, calibration_inputs[i : i + batch_size])))
        .float()
        .softmax(-1)
        .amax(-1)
        .cpu()
        for i in range(0, calibration_inputs.shape[0], batch_size)
    ]
    thresholds, avg_macs = thresholds_for_cost(torch.cat(scores, dim=1).numpy(), costs, fraction * full)
    return [float(t) for t in thresholds], avg_macs / full


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


def check_bench_options(
    batch_sizes: Sequence[int],
    *,
    rounds: int = 1,
    warmup_s: float = 0.0,
    num_threads: int | None = None,
    max_samples: int | None = None,
    name: str = "batch_sizes",
) -> None:
    """Raise :class:`ConfigError` (naming the option and the value received) for options no benchmark can run.

    ``batch_sizes``: a non-empty list of integers >= 1; ``rounds`` >= 1; ``warmup_s`` finite and >= 0;
    ``num_threads`` and ``max_samples`` None or >= 1. ``name`` is the batch-size option's name in messages.
    """

    def positive(value: object) -> bool:
        return not isinstance(value, bool) and isinstance(value, int) and value >= 1

    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence) or len(batch_sizes) == 0:
        raise ConfigError(f"{name} must be a non-empty list of batch sizes >= 1, got {batch_sizes!r}")
    bad = [b for b in batch_sizes if not positive(b)]
    if bad:
        raise ConfigError(f"{name} must hold batch sizes >= 1, got {list(batch_sizes)}")
    if not positive(rounds):
        raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}")
    if isinstance(warmup_s, bool) or not isinstance(warmup_s, (int, float)) or not 0 <= warmup_s < float("inf"):
        raise ConfigError(f"warmup_s must be a finite number of seconds >= 0, got {warmup_s!r}")
    if num_threads is not None and not positive(num_threads):
        raise ConfigError(f"threads must be None or an integer >= 1, got {num_threads!r}")
    if max_samples is not None and not positive(max_samples):
        raise ConfigError(f"max_samples must be None or an integer >= 1, got {max_samples!r}")


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
        warmup_s: warm-up time per batch size, cycling all variants.
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
    check_bench_options(batch_sizes, rounds=rounds, warmup_s=warmup_s, num_threads=num_threads, max_samples=max_samples)
    if cuda_graphs and torch.device(device).type != "cuda":
        raise ConfigError(f"CUDA graphs need a CUDA device, got device={device!s}")
    model, inputs = _prepare(model, inputs, device=device, dtype=dtype, channels_last=channels_last)
    full_macs = full_model_macs(
        model, tuple(inputs.shape[1:]), dtype=None if inputs.is_floating_point() else inputs.dtype
    )
    n_avail = inputs.shape[0] if max_samples is None else min(inputs.shape[0], max_samples)
    timer = Timer(device)
    results = []
    with pinned_threads(num_threads):
        runner, executor = _runner(model, inputs, device, channels_last, cuda_graphs, max(batch_sizes))
        for b in batch_sizes:
            batches = _batches(inputs, b, n_avail, device, channels_last)
            outs, medians = _measure(model, runner, executor, policy, batches, rounds, warmup_s, timer)
            results.append(_entry(b, model.num_exits, full_macs, outs, medians))
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


def _prepare(
    model: StagedModel, inputs: Tensor, *, device: torch.device | str, dtype: torch.dtype | None, channels_last: bool
) -> tuple[StagedModel, Tensor]:
    """The model in eval mode on ``device`` (in ``dtype``, channels_last if asked) and the inputs to match."""
    if dtype is not None and not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point dtype, got {dtype}")
    if channels_last and inputs.dim() != 4:
        raise ConfigError("channels_last needs 4-D image inputs")
    model = model.eval().to(device)
    if dtype is not None:
        model = model.to(dtype)
        if inputs.is_floating_point():
            inputs = inputs.to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, inputs


def _runner(
    model: StagedModel,
    inputs: Tensor,
    device: torch.device | str,
    channels_last: bool,
    cuda_graphs: bool,
    max_batch: int,
) -> tuple[StagedModel | GraphedModel, Any]:
    """What the full and dynamic runs call (the model or its CUDA graphs) and the oracle's stage executor."""
    if not cuda_graphs:
        return model, EagerStages(model)
    example = inputs[:8].to(device)
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    graphed = GraphedModel(model, example, buckets=default_buckets(max_batch))
    return graphed, graphed.executor()


def _batches(
    inputs: Tensor, batch_size: int, n_avail: int, device: torch.device | str, channels_last: bool
) -> list[Tensor]:
    """The first ``floor(n_avail / batch_size)`` batches of ``inputs`` on ``device``."""
    n = (n_avail // batch_size) * batch_size
    if n == 0:
        raise ConfigError(f"batch size {batch_size} is larger than the {n_avail} available samples")
    batches = [inputs[i : i + batch_size].to(device) for i in range(0, n, batch_size)]
    if channels_last:
        batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    return batches


def _measure(
    model: StagedModel,
    runner: StagedModel | GraphedModel,
    executor: Any,
    policy: ExitPolicy,
    batches: list[Tensor],
    rounds: int,
    warmup_s: float,
    timer: Timer,
) -> tuple[list[DynamicOutput], dict[str, list[float]]]:
    """One untimed dynamic pass (exits, MACs, the oracle's plans), then the three variants timed interleaved.

    Returns the dynamic outputs per batch and the per-batch median ms of ``full``, ``dynamic`` and ``oracle``.
    """
    outs = [runner.run_dynamic(x, policy, check_finite=False) for x in batches]
    plans = [(x, *_oracle_plan(model, x, o.exit_index)) for x, o in zip(batches, outs, strict=True)]
    variants = {
        "full": lambda plan: runner(plan[0]),
        "dynamic": lambda plan: runner.run_dynamic(plan[0], policy, check_finite=False),
        "oracle": lambda plan: oracle_loop(executor, plan[1], plan[2]),
    }
    return outs, interleaved_medians(variants, plans, rounds=rounds, warmup_s=warmup_s, timer=timer)


def _entry(
    batch_size: int, num_exits: int, full_macs: float, outs: list[DynamicOutput], medians: dict[str, list[float]]
) -> dict[str, Any]:
    """The result of one batch size: times per batch, realised/ideal speedups and their decomposition."""
    exit_index = torch.cat([o.exit_index.cpu() for o in outs])
    n = exit_index.numel()
    avg_macs = float(torch.cat([o.macs.cpu() for o in outs]).mean())
    full, dynamic, oracle = (sum(medians[k]) for k in ("full", "dynamic", "oracle"))
    num_batches = len(outs)
    realised, ideal = full / dynamic, full_macs / avg_macs
    entry: dict[str, Any] = {
        "batch_size": batch_size,
        "num_samples": n,
        "full_ms_per_batch": full / num_batches,
        "dynamic_ms_per_batch": dynamic / num_batches,
        "realised_speedup": realised,
        "ideal_speedup": ideal,
        "ratio": realised / ideal,
        "oracle_ms_per_batch": oracle / num_batches,
        "time_ideal_speedup": full / oracle,
        "engine_efficiency": oracle / dynamic,
        "avg_macs": avg_macs,
        "exit_fractions": (torch.bincount(exit_index, minlength=num_exits).double() / n).tolist(),
    }
    if batch_size == 1:
        entry["latency_ms"] = latency_percentiles(medians["full"], medians["dynamic"], exit_index.tolist())
    log.info(
        "batch %d: full %.3f ms, dynamic %.3f ms per batch; realised %.2fx, ideal %.2fx, ratio %.2f",
        batch_size,
        entry["full_ms_per_batch"],
        entry["dynamic_ms_per_batch"],
        realised,
        ideal,
        realised / ideal,
    )
    return entry


def latency_percentiles(full_ms: Sequence[float], dynamic_ms: Sequence[float], exits: Sequence[int]) -> dict[str, Any]:
    """Per-sample latency at batch 1: p50/p95/p99 of the full and dynamic models, dynamic median per exit taken."""
    by_exit: dict[int, list[float]] = {}
    for k, t in zip(exits, dynamic_ms, strict=True):
        by_exit.setdefault(int(k), []).append(t)
    return {
        "full": percentiles(full_ms),
        "dynamic": percentiles(dynamic_ms),
        "dynamic_by_exit_median": {str(k): statistics.median(v) for k, v in sorted(by_exit.items())},
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
