"""BoostNet: exits trained as an additive ensemble (Yu et al., "Boosted Dynamic Neural Networks", AAAI 2023).

Exit ``s`` (0-based) outputs logits ``f_s``. The prediction at exit ``s`` is the additive ensemble

    A_s = f_s + E_{s-1},   E_s = r * A_s = r * (f_s + E_{s-1}),   E_{-1} = 0,

and training minimises ``sum_s CE(f_s + stopgrad(E_{s-1}), y)``: each exit learns to correct the
(frozen) ensemble of the exits before it, like a boosting stage, while the whole network is trained
end to end in one pass. At inference an early-exit policy must use the same ensemble: see
:meth:`BoostLoss.policy_spec` (``("boosted", {"r": r})``, i.e. ``adaptnn.policies.BoostedEnsemblePolicy``,
which carries ``E`` per sample through :meth:`~adaptnn.runtime.StagedModel.run_dynamic`). With
``gradient_rescaling`` the trunk uses the gradient rescaling of :mod:`adaptnn.strategies.gradient`, as
BoostNet does on MSDNet backbones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import Strategy
from .gradient import RescaleScope, check_scope, forward_all_rescaled
from .joint import exit_weights

if TYPE_CHECKING:
    from ..runtime.staged import StagedModel

__all__ = ["BoostLoss", "boosted_logits"]


def boosted_logits(exit_logits: Sequence[Tensor], r: float = 0.5, *, detach_previous: bool = False) -> list[Tensor]:
    """The additive ensembles ``A_s = f_s + E_{s-1}`` of every exit.

    Args:
        exit_logits: ``f_0 .. f_{K-1}``, each ``[B, C]``.
        r: shrinkage of the carried ensemble, ``E_s = r * A_s``.
        detach_previous: stop gradients through ``E_{s-1}`` (the training form).
    """
    out: list[Tensor] = []
    carried: Tensor | None = None
    for logits in exit_logits:
        if carried is None:
            total = logits
        else:
            total = logits + (carried.detach() if detach_previous else carried)
        out.append(total)
        carried = r * total
    return out


class BoostLoss(Strategy):
    """BoostNet training loss ``sum_s w_s * CE(f_s + stopgrad(E_{s-1}), y)`` (uniform weights by default).

    Args:
        r: ensemble shrinkage (0.5 in the paper).
        gradient_rescaling: rescale gradients on the trunk (head i by ``1/(K-i)``, later blocks by
            ``(K-i-1)/(K-i)``), as the paper does on MSDNet. On by default: on the reference CIFAR-10 recipe it
            was worth 1.3 points of mean accuracy over budgets (74.15 vs 72.83, seed 0,
            ``benchmarks/results/fidelity_cifar10_controlled.md``).
        rescale_scope: which state tensors carry the rescaled trunk gradient: ``"head_inputs"`` (the default: the
            tensors each head reads, the coarsest map on MSDNet, as the paper's code does) or ``"state"`` (every
            tensor of the state); see :mod:`adaptnn.strategies.gradient`. Identical for single-tensor states.
        weights: per-exit weights (``"uniform"``, ``"linear"`` or a list).
        label_smoothing: of the cross-entropies.
    """

    name = "boost"

    def __init__(
        self,
        r: float = 0.5,
        gradient_rescaling: bool = True,
        weights: str | Sequence[float] = "uniform",
        label_smoothing: float = 0.0,
        rescale_scope: RescaleScope = "head_inputs",
    ) -> None:
        if not 0.0 <= r <= 1.0:
            raise ConfigError(f"boost: r must be in [0, 1], got {r}")
        self.r = float(r)
        self.gradient_rescaling = bool(gradient_rescaling)
        self.rescale_scope = check_scope(rescale_scope)
        self._read_masks: dict[int, list[bool]] = {}
        self.weights = weights
        self.label_smoothing = label_smoothing

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        weights = exit_weights(self.weights, len(exit_logits))
        ensembles = boosted_logits([lg.float() for lg in exit_logits], self.r, detach_previous=True)
        losses = torch.stack([F.cross_entropy(a, targets, label_smoothing=self.label_smoothing) for a in ensembles])
        return (losses * losses.new_tensor(weights)).sum()

    def forward(self, model: StagedModel, x: Tensor) -> list[Tensor]:
        if not self.gradient_rescaling:
            return model.forward_all(x)
        return forward_all_rescaled(model, x, self.rescale_scope, self._read_masks)

    def predictions(self, exit_logits: Sequence[Tensor]) -> list[Tensor]:
        return boosted_logits(exit_logits, self.r)

    def policy_spec(self) -> tuple[str, dict[str, Any]]:
        """``("boosted", {"r": r})``: the confidence of the same additive ensemble at every exit."""
        return "boosted", {"r": self.r}
