"""Per-sample layer skipping (LAUDNet's layer mode) trained with Gumbel gates and a compute-cost penalty.

The model's :class:`~adaptnn.layers.skip.GatedBlock` s draw hard straight-through Gumbel decisions in training;
the loss is the exit loss (``joint`` or ``distill``) plus ``cost_weight * (keep rate - target)^2``, the keep rate
being the mean keep probability of the gates weighted by their blocks' relative MACs
(:func:`~adaptnn.layers.skip.skip_cost_penalty`), so the gates learn to keep about ``target`` of the gated compute
while the exits learn to live with it. At inference the gates decide per sample (``logit > threshold``) and the kept
samples of each block are gathered and run densely.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.skip import gated_blocks, record_gates, set_skip_mode, skip_cost_penalty
from ..runtime.cost import count_macs
from .base import StepContext, StepOutput, Strategy
from .distill import SelfDistillation
from .joint import JointLoss

__all__ = ["SkipGateLoss"]

_EXIT_LOSSES: dict[str, type[Strategy]] = {"joint": JointLoss, "distill": SelfDistillation}


def _block_costs(model: nn.Module) -> list[float] | None:
    """Per-sample MACs of every gated block, from its input shape in one meta-device pass (``None``: unknown)."""
    spec = getattr(model, "input_spec", None)
    if spec is None or any(s is None for s in spec.shape) or spec.dtype_kind != "float":
        return None
    meta = copy.deepcopy(model).to("meta").eval()
    set_skip_mode(meta, "dense")  # no data-dependent gather on the meta device
    blocks = gated_blocks(meta)
    shapes: dict[int, tuple[int, ...]] = {}

    def recorder(i: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            shapes.setdefault(i, tuple(args[0].shape[1:]))

        return hook

    hooks = [b.register_forward_pre_hook(recorder(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            meta.forward_all(torch.zeros((1, *spec.shape), device="meta"))
    finally:
        for h in hooks:
            h.remove()
    if len(shapes) != len(blocks):
        return None
    costs = [count_macs(b.block, shapes[i]) for i, b in enumerate(gated_blocks(model))]
    return costs if all(c > 0 for c in costs) else None


class SkipGateLoss(Strategy):
    """Exit loss + cost penalty pulling the gated blocks' keep rate to ``target``.

    Args:
        target: fraction of the gated blocks' compute to keep, in [0, 1].
        cost_weight: weight of the penalty.
        exit_loss: ``"joint"`` or ``"distill"``: the loss over the exits.
        exit_options: keyword options of that exit loss.
        cost_weighted: weight each gate by its block's MACs (default) rather than equally.
    """

    name = "skip"

    def __init__(
        self,
        target: float = 0.5,
        cost_weight: float = 2.0,
        exit_loss: str = "joint",
        exit_options: Mapping[str, Any] | None = None,
        cost_weighted: bool = True,
    ) -> None:
        if not 0.0 <= target <= 1.0:
            raise ConfigError(f"skip: target must be in [0, 1], got {target}")
        if cost_weight < 0:
            raise ConfigError(f"skip: cost_weight must be >= 0, got {cost_weight}")
        if exit_loss not in _EXIT_LOSSES:
            raise ConfigError(f"skip: exit_loss must be one of {sorted(_EXIT_LOSSES)}, got {exit_loss!r}")
        self.target = float(target)
        self.cost_weight = float(cost_weight)
        self.exit_loss = exit_loss
        self.exit_options = dict(exit_options or {})
        self.cost_weighted = bool(cost_weighted)
        try:
            self._exit_loss = _EXIT_LOSSES[exit_loss](**self.exit_options)
        except TypeError as err:
            raise ConfigError(f"skip: exit_options for {exit_loss!r}: {err}") from None
        self._costs: list[float] | None = None

    def setup(self, model: nn.Module) -> None:
        blocks = gated_blocks(model)
        if not blocks:
            raise ConfigError(
                f"strategy 'skip' trains per-sample gates of GatedBlocks (e.g. skip_resnet_mnist), "
                f"got {type(model).__name__} without one"
            )
        self._costs = _block_costs(model) if self.cost_weighted else None

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        """The exit loss alone (what the Trainer would use for the same network without gates)."""
        return self._exit_loss(exit_logits, targets)

    def training_step(self, ctx: StepContext, x: Tensor, y: Tensor) -> StepOutput:
        with record_gates(ctx.model) as probs:
            logits = ctx.forward(x)
        if not probs:
            raise ConfigError("skip: the training forward recorded no gate (is the model in train mode?)")
        costs = self._costs if self._costs is not None and len(self._costs) == len(probs) else None
        penalty = skip_cost_penalty(probs, self.target, costs)
        exit_loss = self._exit_loss(logits, y)
        with torch.no_grad():
            keep = torch.stack([p.float().mean() for p in probs]).mean()
        metrics: dict[str, Tensor | float] = {"keep_rate": keep, "skip_penalty": penalty.detach()}
        return StepOutput(exit_loss + self.cost_weight * penalty, metrics)
