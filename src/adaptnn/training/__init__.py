"""Training infrastructure: the Trainer, its config, data-parallel batching, schedules, RNG state, devices.

============== ===========================================================================================
module         what it holds
============== ===========================================================================================
config         :class:`TrainConfig` and :func:`build_strategy` (the strategy a config names)
trainer        :class:`Trainer`: the one training loop, checkpoints and resume
metrics        :class:`EpochMeter`: the epoch's loss and the strategy's step metrics, reduced over processes
distributed    torchrun process layout and group, :func:`micro_batch_indices` and its batch sampler
schedule       :func:`cosine_warmup_factor`, parameter groups (no decay on biases/norms), SGD or AdamW
rng            capture and restore the Python, NumPy, torch and CUDA RNG states for checkpoints
device         :func:`resolve_device` and :func:`seed_everything`
curriculum     EfficientTrain curriculum: input-size/augmentation stages planned from measured step times
teachers       the model's EMA, snapshots and earlier checkpoints as a frozen distillation teacher
incubation     Deep Incubation: meta model, per-segment hybrid jobs, assembly (``adaptnn incubate``)
============== ===========================================================================================
"""

from .config import CurriculumConfig, TeacherConfig, TrainConfig, build_strategy
from .device import resolve_device, seed_everything
from .distributed import micro_batch_indices
from .schedule import cosine_warmup_factor
from .trainer import Trainer

__all__ = [
    "CurriculumConfig",
    "TeacherConfig",
    "TrainConfig",
    "Trainer",
    "build_strategy",
    "cosine_warmup_factor",
    "micro_batch_indices",
    "resolve_device",
    "seed_everything",
]
