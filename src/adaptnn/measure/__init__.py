"""Wall-clock measurement: timers, the interleaved timing engine, the latency model and the speed benchmark.

Compute cost in MACs is a property of the model and lives with it in :mod:`adaptnn.runtime.cost`; this layer
measures what those MACs become in milliseconds on the user's device.
"""

from .latency import LatencyModel, PiecewiseLinear, alive_per_segment, profile_latency, validate_latency_model
from .speed import (
    bench_at_budget,
    bench_policy,
    full_model_macs,
    latency_percentiles,
    percentiles,
    thresholds_for_macs_fraction,
)
from .timing import (
    Timer,
    interleaved_medians,
    machine_info,
    median_ms,
    model_device_dtype,
    pinned_threads,
    to_model,
    warm_up,
)

__all__ = [
    "LatencyModel",
    "PiecewiseLinear",
    "Timer",
    "alive_per_segment",
    "bench_at_budget",
    "bench_policy",
    "full_model_macs",
    "interleaved_medians",
    "latency_percentiles",
    "machine_info",
    "median_ms",
    "model_device_dtype",
    "percentiles",
    "pinned_threads",
    "profile_latency",
    "thresholds_for_macs_fraction",
    "to_model",
    "validate_latency_model",
    "warm_up",
]
