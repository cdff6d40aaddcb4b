"""Self-distillation: earlier exits also learn the softened predictions of the last (or later) exits, or of the
model's own earlier weights (an EMA, snapshots or checkpoints attached by the Trainer)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import StepContext, StepOutput, Strategy
from .joint import exit_weights

__all__ = ["SelfDistillation"]


class SelfDistillation(Strategy):
    """Cross-entropy plus distillation from the deeper exits, the teacher being detached.

    For every exit ``k < K-1`` the loss is ``(1 - alpha) * CE(f_k, y) + alpha * T^2 * KL(q_k || softmax(f_k/T))``,
    with ``q_k`` the teacher's temperature-softened distribution; the last exit gets ``CE(f_K, y)``. The
    per-exit terms are summed with the weights of :func:`~adaptnn.strategies.joint.exit_weights`. The ``T^2``
    factor keeps the distillation gradients on the scale of the cross-entropy's (Hinton et al., 2015).

    Args:
        temperature: softening temperature ``T > 0``.
        alpha: mixing weight of the distillation term, in [0, 1].
        teacher: ``"last"`` (the last exit teaches all), ``"ensemble"`` (exit k learns the mean of the
            softened distributions of exits k+1..K) or ``"model"``: every exit, the last included, learns the mean
            softened last-exit prediction of frozen copies of the model's own weights (``train.teacher``: EMA,
            snapshots, earlier checkpoints), attached with :meth:`attach_teacher`; until it has a member the loss is
            the cross-entropy alone.
        weights: per-exit weights (``"uniform"``, ``"linear"`` or a list).
        label_smoothing: of the cross-entropy terms.
    """

    name = "distill"

    def __init__(
        self,
        temperature: float = 3.0,
        alpha: float = 0.5,
        teacher: str = "last",
        weights: str | Sequence[float] = "uniform",
        label_smoothing: float = 0.0,
    ) -> None:
        if not temperature > 0:
            raise ConfigError(f"distill: temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distill: alpha must be in [0, 1], got {alpha}")
        if teacher not in ("last", "ensemble", "model"):
            raise ConfigError(f"distill: teacher must be 'last', 'ensemble' or 'model', got {teacher!r}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.teacher = teacher
        self.weights = weights
        self.label_smoothing = label_smoothing
        self._model_teacher: Callable[[Tensor], list[Tensor]] | None = None

    def attach_teacher(self, teacher: Callable[[Tensor], list[Tensor]]) -> None:
        """Use ``teacher(x) -> list of [B, C] logits`` (frozen models) as the teacher of ``teacher="model"``."""
        self._model_teacher = teacher

    def training_step(self, ctx: StepContext, x: Tensor, y: Tensor) -> StepOutput:
        """The default step, or with ``teacher="model"`` the loss against the attached teacher's logits."""
        if self.teacher != "model":
            return super().training_step(ctx, x, y)
        if self._model_teacher is None:
            raise ConfigError(
                "distill: teacher='model' needs a teacher (train.teacher: ema_decay, snapshots or checkpoints)"
            )
        return StepOutput(self.loss_from_teacher(ctx.forward(x), y, self._model_teacher(x)))

    def loss_from_teacher(self, exit_logits: list[Tensor], targets: Tensor, teacher_logits: Sequence[Tensor]) -> Tensor:
        """Every exit: ``(1 - alpha) CE + alpha T^2 KL`` to the mean softened ``teacher_logits`` (CE alone if none)."""
        weights = exit_weights(self.weights, len(exit_logits))
        t = self.temperature
        target = None
        if teacher_logits:
            target = torch.stack([F.softmax(lg.detach().float() / t, dim=-1) for lg in teacher_logits]).mean(0)
        total = exit_logits[0].new_zeros((), dtype=torch.float32)
        for k, logits in enumerate(exit_logits):
            term = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
            if target is not None:
                kd = F.kl_div(F.log_softmax(logits.float() / t, dim=-1), target, reduction="batchmean") * t * t
                term = (1 - self.alpha) * term + self.alpha * kd
            total = total + weights[k] * term
        return total

    def _teachers(self, exit_logits: Sequence[Tensor]) -> list[Tensor]:
        """Teacher distributions ``[B, C]`` for exits 0..K-2 (detached)."""
        t = self.temperature
        soft = [F.softmax(lg.detach().float() / t, dim=-1) for lg in exit_logits]
        if self.teacher == "last":
            return [soft[-1]] * (len(exit_logits) - 1)
        # mean of exits k+1..K-1 for each k, from a reversed running sum
        teachers: list[Tensor] = []
        running = torch.zeros_like(soft[-1])
        for k in range(len(soft) - 1, 0, -1):
            running = running + soft[k]
            teachers.append(running / (len(soft) - k))
        return teachers[::-1]

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        if self.teacher == "model":  # the teacher needs the inputs: training_step; here the cross-entropy alone
            return self.loss_from_teacher(exit_logits, targets, [])
        num_exits = len(exit_logits)
        weights = exit_weights(self.weights, num_exits)
        t = self.temperature
        teachers = self._teachers(exit_logits)
        total = exit_logits[0].new_zeros((), dtype=torch.float32)
        for k, logits in enumerate(exit_logits):
            ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
            if k == num_exits - 1:
                term = ce
            else:
                log_student = F.log_softmax(logits.float() / t, dim=-1)
                kd = F.kl_div(log_student, teachers[k], reduction="batchmean") * t * t
                term = (1 - self.alpha) * ce + self.alpha * kd
            total = total + weights[k] * term
        return total
