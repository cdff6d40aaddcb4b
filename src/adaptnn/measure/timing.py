"""Timing primitives shared by the latency profiler, the speed benchmark and the realised run of a report.

Wall-clock figures on shared machines are noisy. What makes them usable: a fixed thread count, warming up
by *time* (allocator pools, oneDNN primitive caches and CPU clocks settle after a while, not after a fixed
number of calls), interleaving the variants being compared so drifts hit both alike, and medians instead
of means. On CUDA every timed call is bracketed by ``torch.cuda.synchronize``.

:func:`interleaved_medians` is the one engine that does all of this for comparisons (the speed benchmark, the
realised speedup of a run report): named variants, the same batches, rotating order, a median per batch.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch

from ..errors import ConfigError

__all__ = [
    "Timer",
    "median_ms",
    "interleaved_medians",
    "pinned_threads",
    "machine_info",
    "warm_up",
    "model_device_dtype",
    "to_model",
]

T = TypeVar("T")
B = TypeVar("B")


class Timer:
    """Times a callable in milliseconds, synchronising CUDA when ``device`` is a GPU."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]) -> float:
        return self.run(fn)[0]

    def run(self, fn: Callable[[], T]) -> tuple[float, T]:
        """``(milliseconds, result)`` of one call of ``fn``."""
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3, out


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's parameters live and their floating dtype (cpu/float32 for a parameter-free model)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    return torch.device("cpu"), torch.float32


def to_model(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the model's device, in its floating dtype when ``x`` is floating (token ids stay integers)."""
    device, dtype = model_device_dtype(model)
    return x.to(device, dtype) if x.is_floating_point() else x.to(device)


def median_ms(timer: Timer, fn: Callable[[], object], repeats: int) -> float:
    """Median of ``repeats`` timed calls of ``fn`` (ms)."""
    return statistics.median(timer(fn) for _ in range(max(1, repeats)))


def warm_up(fn: Callable[[], object], seconds: float, timer: Timer | None = None, min_calls: int = 3) -> int:
    """Call ``fn`` for at least ``seconds`` (and ``min_calls`` times); returns the number of calls."""
    timer = timer or Timer()
    calls, deadline = 0, time.perf_counter() + seconds
    while calls < min_calls or time.perf_counter() < deadline:
        fn()
        calls += 1
    timer.sync()
    return calls


def interleaved_medians(
    variants: Mapping[str, Callable[[B], object]],
    batches: Sequence[B],
    *,
    rounds: int = 5,
    warmup_s: float = 2.0,
    warmup_batches: int = 4,
    timer: Timer | None = None,
    blocks: Sequence[Sequence[str]] | None = None,
) -> dict[str, list[float]]:
    """The timing engine: every variant on every batch, interleaved call by call; median per batch (ms).

    First a warm-up by time: all variants on the first ``warmup_batches`` batches, for at least ``warmup_s``
    seconds (and at least once). Then ``rounds`` rounds over the batches; on each batch every variant is timed
    once, and who goes first rotates with the round and the batch, so drifts and cache state hit all alike.

    ``blocks`` groups the variants (each name in exactly one block) when the *absolute* time of each matters and
    the variants hold different weights (knob settings, elastic members): interleaved call by call, each evicts
    the others' weights from the CPU caches, which a deployed model serving alone does not suffer (a tiny model
    at batch 1 measured 10-20% slower among 32 interleaved variants than alone). Each round then runs the blocks
    one after the other, the block order rotating with the round (drift is still spread over all), re-warms a
    block on the first batch (untimed) and interleaves call by call only within it.

    Args:
        variants: name -> callable run on one batch (its result is discarded).
        batches: whatever the variants take, one item per batch (a tensor, a tuple of prepared inputs, ...).
        rounds: timed calls per variant and batch (at least 1).
        warmup_s: warm-up seconds.
        warmup_batches: batches cycled during the warm-up.
        timer: the timer (its device decides CUDA synchronisation); default a CPU timer.

    Returns:
        name -> per-batch median milliseconds, in the order of ``batches``.
    """
    timer = timer or Timer()
    names = list(variants)
    groups = _blocks(names, blocks)
    if not names or not batches:
        return {name: [] for name in names}
    warm = batches[: max(1, warmup_batches)]
    warm_up(lambda: [variants[name](item) for item in warm for name in names], warmup_s, timer, min_calls=1)
    times: dict[str, list[list[float]]] = {name: [[] for _ in batches] for name in names}
    for r in range(max(1, rounds)):
        first = r % len(groups)
        for group in groups[first:] + groups[:first]:
            if len(groups) > 1:  # the block's weights back into the caches before it is timed
                for name in group:
                    variants[name](batches[0])
                timer.sync()
            for i, item in enumerate(batches):
                shift = (r + i) % len(group)
                for name in group[shift:] + group[:shift]:
                    times[name][i].append(timer(lambda fn=variants[name], item=item: fn(item)))
    return {name: [statistics.median(t) for t in per_batch] for name, per_batch in times.items()}


def _blocks(names: list[str], blocks: Sequence[Sequence[str]] | None) -> list[list[str]]:
    """The blocks of :func:`interleaved_medians` (default: one block of all names), checked to partition them."""
    if blocks is None:
        return [names]
    groups = [list(block) for block in blocks if len(block)]
    flat = [name for group in groups for name in group]
    if sorted(flat) != sorted(names) or len(set(flat)) != len(flat):
        raise ConfigError(
            f"blocks must hold every variant exactly once; got blocks {[list(b) for b in blocks]} for variants {names}"
        )
    return groups


@contextmanager
def pinned_threads(num_threads: int | None):
    """Run the block with ``torch.set_num_threads(num_threads)`` and restore the previous value."""
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def machine_info(device: torch.device | str = "cpu") -> dict[str, object]:
    """What the figures were measured on: CPU/GPU, threads, torch version, allocator preload."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's name with its family and model where the kernel reports them (``AMD EPYC family 23 model 1``).

    Two processors sold under one name can differ in family and model, and with them in their kernels' float
    rounding and speed, so a figure names both. ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when None).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            if fields:  # the first processor's block has ended
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    family, model = fields.get("cpu family"), fields.get("model")
    return " ".join(part for part in (name, family and f"family {family}", model and f"model {model}") if part)
