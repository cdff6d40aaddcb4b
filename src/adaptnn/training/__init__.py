"""Training infrastructure: the Trainer, its config, data-parallel batching, schedules, RNG state, devices."""

from .trainer import (
    TrainConfig,
    Trainer,
    build_strategy,
    cosine_warmup_factor,
    micro_batch_indices,
    resolve_device,
    seed_everything,
)

__all__ = [
    "TrainConfig",
    "Trainer",
    "build_strategy",
    "cosine_warmup_factor",
    "micro_batch_indices",
    "resolve_device",
    "seed_everything",
]
