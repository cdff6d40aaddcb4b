"""Timing primitives shared by the latency profiler and the speed benchmark.

Wall-clock figures on shared machines are noisy. What makes them usable: a fixed thread count, warming up
by *time* (allocator pools, oneDNN primitive caches and CPU clocks settle after a while, not after a fixed
number of calls), interleaving the variants being compared so drifts hit both alike, and medians instead
of means. On CUDA every timed call is bracketed by ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["Timer", "median_ms", "pinned_threads", "machine_info", "warm_up", "model_device_dtype", "to_model"]

T = TypeVar("T")


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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
