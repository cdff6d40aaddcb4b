"""Training strategies for multi-exit models: losses over the list of per-exit logits, plus hooks.

``get(name, **options)`` returns a :class:`Strategy`: calling it as ``(exit_logits: list[Tensor],
targets: Tensor) -> Tensor`` gives the training loss; methods that need more (a meta step, gradient
rescaling, a frozen backbone, an ensemble at inference) override the hooks described in
:mod:`adaptnn.strategies.base`, which :class:`adaptnn.training.Trainer` calls.

========== ====================================================================================
name       method
========== ====================================================================================
joint      weighted sum of per-exit cross-entropies (uniform, linear ramp or given weights)
distill    self-distillation of earlier exits from the last exit or the ensemble of later exits
boost      BoostNet: exits trained as an additive ensemble; ensemble policy at inference
l2w        L2W-DEN: per-sample exit weights from a meta-trained weight network
imta       IMTA gradient equilibrium (optionally with one-for-all distillation)
imta_isc   IMTA stage two: collaborative exit classifiers on a frozen stage-one model, one-for-all distillation
frozen     train only the exit heads of a frozen (pretrained) backbone
sorted     sandwich-rule training of every member of an elastic family (+ in-place distillation)
matryoshka every listed truncation of Matryoshka (nested-embedding) exit heads classifies
skip       per-sample layer skipping: Gumbel gates of GatedBlocks + a compute-cost penalty
dynamicvit DynamicViT: learned token dropping in a token ViT (ratio + distillation losses)
========== ====================================================================================
"""

from __future__ import annotations

import difflib
import inspect

from ..errors import ConfigError
from .base import StepContext, StepOutput, Strategy, as_strategy, per_exit_cross_entropy
from .boost import BoostLoss, boosted_logits
from .distill import SelfDistillation
from .dynamicvit import DynamicViT
from .frozen import FrozenBackbone, fit_heads_cached
from .imta import GradientEquilibrium
from .isc import InlineCollaborationLoss
from .joint import JointLoss, exit_weights
from .l2w import L2WLoss
from .matryoshka import MatryoshkaLoss
from .skipgates import SkipGateLoss
from .sortednet import SortedLoss

__all__ = [
    "Strategy",
    "StepContext",
    "StepOutput",
    "as_strategy",
    "JointLoss",
    "SelfDistillation",
    "BoostLoss",
    "L2WLoss",
    "SortedLoss",
    "MatryoshkaLoss",
    "SkipGateLoss",
    "GradientEquilibrium",
    "InlineCollaborationLoss",
    "FrozenBackbone",
    "boosted_logits",
    "exit_weights",
    "fit_heads_cached",
    "per_exit_cross_entropy",
    "get",
    "available",
    "resolved_options",
]

_STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (JointLoss, SelfDistillation, BoostLoss, L2WLoss, GradientEquilibrium, FrozenBackbone, SortedLoss)
}
_STRATEGIES[DynamicViT.name] = DynamicViT  # token ViTs: learned token dropping (issue 15)
_STRATEGIES[MatryoshkaLoss.name] = MatryoshkaLoss  # nested-embedding exit heads (issue 16)
_STRATEGIES[SkipGateLoss.name] = SkipGateLoss  # per-sample layer skipping (issue 16)
_STRATEGIES[InlineCollaborationLoss.name] = InlineCollaborationLoss  # IMTA stage two (issue 12)


def available() -> list[str]:
    """Names accepted by :func:`get`."""
    return sorted(_STRATEGIES)


def resolved_options(name: str, **options: object) -> dict[str, object]:
    """Every option strategy ``name`` would run with: ``options`` plus its defaults for the rest.

    Reports record these, so a figure says what it was trained with even after a default changes.
    """
    get(name, **options)  # the same checks and one-line errors as building it
    signature = inspect.signature(_STRATEGIES[name].__init__)
    bound = signature.bind_partial(None, **options)
    bound.apply_defaults()
    resolved = dict(bound.arguments)
    resolved.pop(next(iter(signature.parameters)))  # self
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in resolved.items()}


def get(name: str, **options: object) -> Strategy:
    """Build strategy ``name`` with ``options``, e.g. ``get("joint", weights="linear")`` or ``get("boost", r=0.5)``."""
    if name not in _STRATEGIES:
        close = difflib.get_close_matches(name, available(), n=2)
        raise ConfigError(
            f"unknown strategy {name!r}; available: {available()}" + (f" (did you mean {close[0]}?)" if close else "")
        )
    try:
        return _STRATEGIES[name](**options)
    except TypeError as err:
        raise ConfigError(f"strategy {name!r}: {err}") from err
