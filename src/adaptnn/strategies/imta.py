"""IMTA gradient equilibrium (Li et al., "Improved Techniques for Training Adaptive Deep Networks", ICCV 2019).

Implemented: *gradient equilibrium* (GE) - the per-exit losses are the joint loss's, but the backward
pass through the trunk is rescaled (:mod:`adaptnn.strategies.gradient`) so the gradient reaching an early
block is a convex combination of the exits' gradients rather than their sum, which the paper shows
reduces gradient variance and conflicts - and, optionally, the paper's *one-for-all knowledge
distillation* from the last exit (``kd_alpha > 0``). This is the paper's stage one. Its stage two, *inline
subnetwork collaboration* (each exit's classifier also reads the previous exit's prediction) trained with
one-for-all distillation on the frozen stage-one network, is the ``imta_isc`` strategy on the architecture
:func:`adaptnn.layers.collaboration.inline_collaboration` builds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from ..errors import ConfigError
from .base import Strategy
from .distill import SelfDistillation
from .gradient import RescaleScope, check_scope, forward_all_rescaled
from .joint import JointLoss

if TYPE_CHECKING:
    from ..runtime.staged import StagedModel

__all__ = ["GradientEquilibrium"]


class GradientEquilibrium(Strategy):
    """Joint (or self-distillation) loss with gradient-equilibrium rescaling on the trunk.

    Args:
        weights: per-exit loss weights (``"uniform"``, ``"linear"`` or a list).
        kd_alpha: weight of the distillation from the last exit (0 = plain GE).
        temperature: distillation temperature.
        label_smoothing: of the cross-entropies.
        rescale_scope: which state tensors carry the rescaled trunk gradient: ``"head_inputs"`` (the default, what
            the reference code does on MSDNet) or ``"state"``; see :mod:`adaptnn.strategies.gradient`.
    """

    name = "imta"

    def __init__(
        self,
        weights: str | Sequence[float] = "uniform",
        kd_alpha: float = 0.0,
        temperature: float = 3.0,
        label_smoothing: float = 0.0,
        rescale_scope: RescaleScope = "head_inputs",
    ) -> None:
        if not 0.0 <= kd_alpha <= 1.0:
            raise ConfigError(f"imta: kd_alpha must be in [0, 1], got {kd_alpha}")
        self.weights = weights
        self.kd_alpha = float(kd_alpha)
        self.temperature = float(temperature)
        self.label_smoothing = label_smoothing
        self.rescale_scope = check_scope(rescale_scope)
        self._read_masks: dict[int, list[bool]] = {}
        if self.kd_alpha > 0:
            self._loss: Strategy = SelfDistillation(temperature, kd_alpha, "last", weights, label_smoothing)
        else:
            self._loss = JointLoss(weights, label_smoothing)

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        return self._loss(exit_logits, targets)

    def forward(self, model: StagedModel, x: Tensor) -> list[Tensor]:
        return forward_all_rescaled(model, x, self.rescale_scope, self._read_masks)
