"""EfficientTrain-style curriculum: stages of growing input size and augmentation, balanced by measured step time.

A curriculum (:class:`~adaptnn.training.config.CurriculumConfig`) is a list of stages; each shows the
training batches at a smaller size (the low-frequency window of their spectrum, or an antialiased resize) with
a batch augmentation of some magnitude. The Trainer applies the stage of the current *step* to every
micro-batch after the loader, so:

* the learning-rate schedule never notices a switch: it runs in steps of the whole run (a stage changes the
  input, not the number of steps per epoch);
* the plan (:class:`CurriculumPlan`: the last step of every stage) is fixed once at the start and stored in
  every checkpoint, so a resumed run follows the same plan (resuming in the middle of a stage is exact);
* ``balance: time`` gives stage ``i`` the number of steps ``n_i`` that makes ``n_i * t_i`` proportional to
  its share, ``t_i`` being the training step's wall time at that stage *measured* here (on CPUs small inputs
  cost more per MAC, so FLOPs would mislead) with :func:`adaptnn.measure.timing.interleaved_medians`.

Models must accept the smaller inputs: global pooling before the classifiers (the native CNN families,
ResNet-style timm/torchvision backbones); :func:`spatially_relaxed` lifts the model's fixed input-size check
for the duration of training.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import Tensor

from ..data.transforms import jitter_batch, lowpass_crop, resize_down
from ..errors import ConfigError
from ..measure.timing import Timer, interleaved_medians
from ..runtime.staged import StagedModel
from ..strategies import StepContext, Strategy
from .config import STAGE_KEYS, CurriculumConfig
from .rng import preserved_rng

__all__ = [
    "CurriculumPlan",
    "Stage",
    "apply_stage",
    "broadcast_step_ms",
    "measure_step_ms",
    "plan_steps",
    "resume_plan",
    "spatially_relaxed",
    "stages_of",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: input ``size`` (``None`` = full), augmentation ``magnitude``, relative ``share``."""

    size: tuple[int, int] | None
    magnitude: float
    share: float

    def input_size(self, full: tuple[int, int]) -> tuple[int, int]:
        """The ``(h, w)`` this stage trains at for inputs of size ``full`` (never larger than ``full``)."""
        if self.size is None:
            return full
        return min(self.size[0], full[0]), min(self.size[1], full[1])


def stages_of(config: CurriculumConfig) -> list[Stage]:
    """The config's stages as :class:`Stage` objects (defaults filled in)."""
    out = []
    for raw in config.stages:
        item = dict(STAGE_KEYS, **raw)
        size = item["size"]
        size = None if size is None else (int(size), int(size)) if isinstance(size, int) else tuple(map(int, size))
        out.append(Stage(size, float(item["magnitude"]), float(item["share"])))
    return out


def plan_steps(shares: Sequence[float], total_steps: int, step_ms: Sequence[float] | None = None) -> list[int]:
    """Steps of each stage: proportional to ``share / step_ms`` (equal *time* per unit share) or to ``share``.

    Integer counts summing to ``total_steps`` by largest remainders, every stage at least one step when
    ``total_steps`` allows.
    """
    if not shares:
        return []
    weights = [s / t for s, t in zip(shares, step_ms, strict=True)] if step_ms is not None else list(shares)
    total_w = sum(weights)
    ideal = [total_steps * w / total_w for w in weights]
    counts = [math.floor(v) for v in ideal]
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in order[: total_steps - sum(counts)]:
        counts[i] += 1
    if total_steps >= len(counts):  # no empty stage: take a step from the largest
        for i in range(len(counts)):
            if counts[i] == 0:
                j = max(range(len(counts)), key=lambda k: counts[k])
                counts[j] -= 1
                counts[i] += 1
    return counts


@dataclass(frozen=True)
class CurriculumPlan:
    """The curriculum of one run: its stages, the step times used and the end step (exclusive) of each stage."""

    stages: tuple[Stage, ...]
    ends: tuple[int, ...]
    step_ms: tuple[float, ...] | None
    total_steps: int

    @classmethod
    def build(cls, config: CurriculumConfig, total_steps: int, step_ms: Sequence[float] | None) -> CurriculumPlan:
        """Plan ``total_steps`` over the config's stages (``step_ms`` used when ``balance`` is ``"time"``)."""
        stages = stages_of(config)
        timed = step_ms if config.balance == "time" else None
        if config.balance == "time" and step_ms is None:
            raise ConfigError("train.curriculum.balance='time' needs step times (measured or step_ms)")
        counts = plan_steps([s.share for s in stages], total_steps, timed)
        ends = tuple(int(sum(counts[: i + 1])) for i in range(len(counts)))
        return cls(tuple(stages), ends, None if step_ms is None else tuple(map(float, step_ms)), total_steps)

    def stage_index(self, step: int) -> int:
        """Index of the stage that step ``step`` (0-based, of the whole run) belongs to."""
        for i, end in enumerate(self.ends):
            if step < end:
                return i
        return len(self.ends) - 1

    def stage_at(self, step: int) -> Stage:
        """The stage of step ``step``."""
        return self.stages[self.stage_index(step)]

    def to_json(self) -> dict[str, Any]:
        """What checkpoints store (enough to follow the same plan on resume)."""
        return {
            "ends": list(self.ends),
            "step_ms": None if self.step_ms is None else list(self.step_ms),
            "total_steps": self.total_steps,
            "stages": [dataclasses.asdict(s) for s in self.stages],
        }

    def describe(self, steps_per_epoch: int) -> str:
        """One line: each stage's size, magnitude, steps (epochs) and measured step time."""
        parts, start = [], 0
        for i, (stage, end) in enumerate(zip(self.stages, self.ends, strict=True)):
            ms = f", {self.step_ms[i]:.1f} ms/step" if self.step_ms is not None else ""
            size = "full" if stage.size is None else f"{stage.size[0]}x{stage.size[1]}"
            parts.append(
                f"[{size} m={stage.magnitude:g}: {end - start} steps ({(end - start) / steps_per_epoch:.2f} ep){ms}]"
            )
            start = end
        return " ".join(parts)


def resume_plan(config: CurriculumConfig, total_steps: int, stored: dict[str, Any] | None) -> CurriculumPlan | None:
    """The plan a checkpoint stored, re-planned from its step times when the run's length changed; else ``None``."""
    if not stored:
        return None
    step_ms = stored.get("step_ms")
    if int(stored.get("total_steps", -1)) == total_steps:
        return CurriculumPlan(tuple(stages_of(config)), tuple(int(e) for e in stored["ends"]),
                              None if step_ms is None else tuple(map(float, step_ms)), total_steps)  # fmt: skip
    return CurriculumPlan.build(config, total_steps, step_ms)


def apply_stage(x: Tensor, stage: Stage, mode: str) -> Tensor:
    """The stage's view of a ``[B, C, H, W]`` batch: reduced to its size (low-pass or resize), then jittered."""
    if x.dim() != 4:
        raise ConfigError(f"train.curriculum needs image batches [B, C, H, W], got shape {list(x.shape)}")
    full = (int(x.shape[-2]), int(x.shape[-1]))
    size = stage.input_size(full)
    if size != full:
        x = lowpass_crop(x, size) if mode == "lowpass" else resize_down(x, size)
    return jitter_batch(x, stage.magnitude)


@contextlib.contextmanager
def spatially_relaxed(model: StagedModel) -> Iterator[None]:
    """Let the model accept any height and width while the block runs (its input spec's last two dims)."""
    spec = model.input_spec
    if spec is None or len(spec.shape) < 2:
        yield
        return
    model.input_spec = dataclasses.replace(spec, shape=(*spec.shape[:-2], None, None))
    try:
        yield
    finally:
        model.input_spec = spec


def measure_step_ms(
    model: StagedModel,
    strategy: Strategy,
    batch: tuple[Tensor, Tensor],
    stages: Sequence[Stage],
    mode: str,
    *,
    rounds: int = 3,
    warmup_s: float = 0.5,
    timer: Timer | None = None,
) -> list[float]:
    """Median milliseconds of one training step (stage transform, forward, loss, backward) at every stage.

    Runs on deep copies of the model and the strategy (their weights, statistics and state are untouched) and
    leaves every random generator as it found it, so measuring changes nothing about the run. Stages are timed
    interleaved by :func:`~adaptnn.measure.timing.interleaved_medians`.
    """
    with preserved_rng():
        probe = copy.deepcopy(model)
        probe.train()
        strat = copy.deepcopy(strategy)
        strat.train_mode(probe)
        x, y = batch

        def forward(inp: Tensor) -> list[Tensor]:
            return strat.forward(probe, inp)

        def step_at(stage: Stage) -> Callable[[int], None]:
            def run(_: int) -> None:
                probe.zero_grad(set_to_none=True)
                ctx = StepContext(probe, forward, 0.0, 0, 0, 1)
                strat.training_step(ctx, apply_stage(x, stage, mode), y).loss.backward()

            return run

        with spatially_relaxed(probe):
            variants = {str(i): step_at(stage) for i, stage in enumerate(stages)}
            medians = interleaved_medians(variants, [0], rounds=rounds, warmup_s=warmup_s, timer=timer)
    return [medians[str(i)][0] for i in range(len(stages))]


def broadcast_step_ms(step_ms: list[float] | None, world_size: int) -> list[float] | None:
    """Rank 0's step times on every process (all processes must follow one plan)."""
    if world_size <= 1 or not dist.is_initialized():
        return step_ms
    box: list[Any] = [step_ms]
    dist.broadcast_object_list(box, src=0)
    return box[0]
