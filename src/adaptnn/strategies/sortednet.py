"""SortedNet / sandwich-rule training of an elastic family: several nested members per step, one set of weights.

Each step trains the largest member, the smallest member and ``num_random`` members drawn from the others
(the sandwich rule of universally slimmable networks; SortedNet's sorted sub-networks). Every member's loss is an
exit loss over all its exits (``joint``, ``distill``, or ``matryoshka`` for nested-embedding exit heads), so the
whole width x exit grid (x truncation) is trained at once; with
``distill=True`` every member but the largest also learns the largest member's softened predictions, exit by exit
(in-place distillation: the teacher is the same forward pass, detached). The member losses are summed, so each
member's gradient is the one it would get trained alone.

Given the Trainer's :attr:`~adaptnn.strategies.StepContext.backward` and a single process, each member is
back-propagated right after its forward (the gradients accumulate to those of the sum): only one member's graph
is alive at a time, so the peak activation memory is one member's, not the sum of all of them, and the allocator
does not hand the members' memory back to the OS and fault it in again every step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..layers.elastic import ElasticStagedModel, Variant, record_nested
from .base import StepContext, StepOutput, Strategy
from .distill import SelfDistillation
from .joint import JointLoss
from .matryoshka import MatryoshkaLoss

__all__ = ["SortedLoss", "sandwich_members"]

_EXIT_LOSSES: dict[str, type[Strategy]] = {
    "joint": JointLoss,
    "distill": SelfDistillation,
    "matryoshka": MatryoshkaLoss,
}


def sandwich_members(variants: Sequence[Variant], num_random: int, step: int, seed: int = 0) -> list[Variant]:
    """The members trained at ``step``: largest, smallest, then ``num_random`` distinct others (seeded by step).

    ``variants`` are sorted smallest first. The draw depends only on ``(seed, step)``, so a resumed run draws the
    same members as an uninterrupted one.
    """
    largest, smallest = variants[-1], variants[0]
    members = [largest] if largest == smallest else [largest, smallest]
    middle = list(variants[1:-1])
    if num_random > 0 and middle:
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
        order = torch.randperm(len(middle), generator=gen)[: min(num_random, len(middle))]
        members += [middle[int(i)] for i in order]
    return members


class SortedLoss(Strategy):
    """Sandwich-rule training of every member of an :class:`~adaptnn.layers.elastic.ElasticStagedModel`.

    Args:
        num_random: members drawn each step besides the largest and the smallest.
        distill: in-place distillation from the largest member (its exit k teaches the member's exit k).
        temperature: softening temperature of the distillation.
        alpha: weight of the distillation term for the members taught (``(1 - alpha) * exit loss + alpha * KD``).
        exit_loss: ``"joint"``, ``"distill"`` or ``"matryoshka"`` (every truncation of Matryoshka exit heads):
            the loss over each member's exits.
        exit_options: keyword options of that exit loss (e.g. ``{"weights": "linear"}``).
        seed: seeds the draw of the random members.
    """

    name = "sorted"

    def __init__(
        self,
        num_random: int = 1,
        distill: bool = True,
        temperature: float = 1.0,
        alpha: float = 0.5,
        exit_loss: str = "joint",
        exit_options: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        if num_random < 0:
            raise ConfigError(f"sorted: num_random must be >= 0, got {num_random}")
        if not temperature > 0:
            raise ConfigError(f"sorted: temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"sorted: alpha must be in [0, 1], got {alpha}")
        if exit_loss not in _EXIT_LOSSES:
            raise ConfigError(f"sorted: exit_loss must be one of {sorted(_EXIT_LOSSES)}, got {exit_loss!r}")
        self.num_random = int(num_random)
        self.distill = bool(distill)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.exit_loss = exit_loss
        self.exit_options = dict(exit_options or {})
        self.seed = int(seed)
        try:
            self._exit_loss = _EXIT_LOSSES[exit_loss](**self.exit_options)
        except TypeError as err:
            raise ConfigError(f"sorted: exit_options for {exit_loss!r}: {err}") from None

    def setup(self, model: Any) -> None:
        if not isinstance(model, ElasticStagedModel):
            raise ConfigError(
                f"strategy 'sorted' trains an elastic model (e.g. elastic_cnn_mnist, elastic_vit_tiny_conv_fmnist), "
                f"got {type(model).__name__}"
            )
        if isinstance(self._exit_loss, MatryoshkaLoss):
            self._exit_loss.setup(model)

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        """The exit loss of one member (what the Trainer would use for a single network)."""
        return self._exit_loss(exit_logits, targets)

    def kd_loss(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        """``T^2 * sum_k KL(softmax(teacher_k / T) || softmax(student_k / T))`` over the exits (batch mean)."""
        return self._kd_from_soft(student, self._soft_targets(teacher))

    def _soft(self, logits: Tensor) -> Tensor:
        """``logits / T`` in float32 (no division at ``T = 1``: one op fewer, forward and backward, per exit)."""
        logits = logits.float()
        return logits if self.temperature == 1.0 else logits / self.temperature

    def _soft_targets(self, teacher: Sequence[Tensor]) -> list[Tensor]:
        """The teacher's softened probabilities, computed once per step and shared by every member taught."""
        return [F.softmax(self._soft(q.detach()), dim=-1) for q in teacher]

    def _kd_from_soft(self, student: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        t = self.temperature
        total = student[0].new_zeros((), dtype=torch.float32)
        for s, p in zip(student, targets, strict=True):
            total = total + F.kl_div(F.log_softmax(self._soft(s), dim=-1), p, reduction="batchmean")
        return total * t * t

    def _member_loss(self, ctx: StepContext, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """The active member's exit logits and exit loss (nested truncations recorded for ``matryoshka``)."""
        if isinstance(self._exit_loss, MatryoshkaLoss):
            with record_nested(ctx.model) as records:
                logits = ctx.forward(x)
            return logits, self._exit_loss.nested_loss(ctx.model, logits, records, y)
        logits = ctx.forward(x)
        return logits, self._exit_loss(logits, y)

    def training_step(self, ctx: StepContext, x: Tensor, y: Tensor) -> StepOutput:
        model = ctx.model
        if not isinstance(model, ElasticStagedModel):
            self.setup(model)
        members = sandwich_members(model.variants, self.num_random, ctx.step, self.seed)
        # one backward per member (graph freed before the next forward) when the caller offers it; under DDP one
        # summed backward: DDP's reducer expects one backward per synced forward (it would all-reduce after every
        # member), and a member that skips blocks leaves parameters without gradients, which the reducer rejects
        backward = ctx.backward if ctx.world_size == 1 else None
        total = x.new_zeros((), dtype=torch.float32)
        metrics: dict[str, Tensor | float] = {}
        soft_targets: list[Tensor] | None = None
        previous = model.variant
        try:  # one switch per member and one back (not a switch and a restore per member: each walks the model)
            for i, variant in enumerate(members):  # the largest first: its detached soft targets teach the others
                model.set_variant(variant)
                logits, loss = self._member_loss(ctx, x, y)
                if i == 0:
                    metrics["loss_largest"] = loss.detach()
                    if self.distill and len(members) > 1:
                        soft_targets = self._soft_targets(logits)
                else:
                    if i == 1:
                        metrics["loss_smallest"] = loss.detach()
                    if soft_targets is not None:
                        loss = (1 - self.alpha) * loss + self.alpha * self._kd_from_soft(logits, soft_targets)
                if backward is not None:
                    backward(loss)
                    loss = loss.detach()
                total = total + loss
        finally:
            model.set_variant(previous)
        return StepOutput(total, metrics, backward_done=backward is not None)
