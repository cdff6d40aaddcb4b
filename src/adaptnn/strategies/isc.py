"""IMTA stage two: train only the inline-collaboration classifiers, with one-for-all distillation.

IMTA (Li et al., ICCV 2019) trains a multi-exit network in two stages: stage one trains the whole network with
gradient equilibrium (the ``imta`` strategy); stage two freezes it and trains, on the same data, a new classifier
per exit that also reads the previous exit's prediction (inline subnetwork collaboration, ISC: the model that
:func:`adaptnn.layers.collaboration.inline_collaboration` or MSDNet's ``collaboration: inline`` builds) with the
paper's one-for-all knowledge distillation: exit ``k < K-1`` minimises
``(1 - kd_alpha) * CE + kd_alpha * T^2 * KL(teacher || exit)`` with the last exit as teacher, the last exit its
cross-entropy. The defaults are the reference's only published stage-two command (ImageNet: ``T`` 1, ``gamma``
0.1).

Differences from the reference code: its teacher is stage one's last classifier (frozen), here it is the
stage-two model's own last exit, detached (which starts equal to stage one's, see ``inline_collaboration``); its
KL term uses PyTorch's legacy element-wise mean (a further ``1 / C``), here the per-sample mean. As there, the
frozen network's normalisation statistics keep updating in training mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from ..errors import ConfigError
from ..layers.collaboration import collaborative_exits
from .base import Strategy
from .distill import SelfDistillation

if TYPE_CHECKING:
    from ..runtime.staged import StagedModel

__all__ = ["InlineCollaborationLoss"]


class InlineCollaborationLoss(Strategy):
    """One-for-all distillation on the collaborative classifiers of a frozen stage-one model.

    Args:
        kd_alpha: weight of the distillation term of every exit but the last (the reference's ``gamma``).
        temperature: distillation temperature (the reference's ``T``).
        weights: per-exit loss weights (``"uniform"``, ``"linear"`` or a list).
        label_smoothing: of the cross-entropies.
    """

    name = "imta_isc"

    def __init__(
        self,
        kd_alpha: float = 0.1,
        temperature: float = 1.0,
        weights: str | Sequence[float] = "uniform",
        label_smoothing: float = 0.0,
    ) -> None:
        if not 0.0 <= kd_alpha <= 1.0:
            raise ConfigError(f"imta_isc: kd_alpha must be in [0, 1], got {kd_alpha}")
        self.kd_alpha = float(kd_alpha)
        self.temperature = float(temperature)
        self.weights = weights
        self.label_smoothing = label_smoothing
        self._loss = SelfDistillation(temperature, kd_alpha, "last", weights, label_smoothing)

    def setup(self, model: StagedModel) -> None:
        """Freeze everything but the collaborative classifiers and ISC modules (refuses a model without them)."""
        ends = collaborative_exits(model)
        if not ends:
            raise ConfigError(
                "imta_isc trains IMTA's stage-two model, whose exits read the previous exit's prediction; this "
                "model has none: build it with MSDNet's collaboration='inline' or "
                "adaptnn.layers.inline_collaboration(model) from a stage-one checkpoint"
            )
        model.requires_grad_(False)
        for end in ends:
            end.classifier.requires_grad_(True)
            if end.isc is not None:
                end.isc.requires_grad_(True)

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        return self._loss(exit_logits, targets)
