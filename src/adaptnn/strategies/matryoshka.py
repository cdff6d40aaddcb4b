"""Matryoshka Representation Learning on exits: every listed truncation of each exit's embedding learns to classify.

A model whose exit heads are :class:`~adaptnn.layers.elastic.MatryoshkaHead` s (e.g. ``elastic_cnn_mnist`` with
``matryoshka_dims``) is trained with ``sum_k w_k * sum_m c_m * CE(logits_{k,m}, y)``: exit weights ``w`` as the
``joint`` strategy's, truncation weights ``c`` as MRL's (default 1). The nested logits come from the ordinary
forward pass (:func:`~adaptnn.layers.elastic.record_nested`), so one pass trains every exit x truncation; exits
with a plain head get their plain cross-entropy. The ``sorted`` strategy uses this loss per member with
``exit_loss: matryoshka`` (a width x exit x truncation grid trained at once).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.elastic import MatryoshkaHead, matryoshka_loss, record_nested
from .base import StepContext, StepOutput, Strategy
from .joint import exit_weights

__all__ = ["MatryoshkaLoss"]


def _matryoshka_exits(model: nn.Module) -> list[bool]:
    heads = getattr(model, "heads", None)
    if heads is None:
        return []
    return [any(isinstance(m, MatryoshkaHead) for m in head.modules()) for head in heads]


class MatryoshkaLoss(Strategy):
    """Nested-truncation cross-entropy at every Matryoshka exit, weighted per exit and per truncation.

    Args:
        weights: per-exit weights: ``"uniform"``, ``"linear"`` or a list (as the ``joint`` strategy's).
        truncation_weights: per-truncation weights, smallest truncation first (default: all 1).
    """

    name = "matryoshka"

    def __init__(
        self, weights: str | Sequence[float] = "uniform", truncation_weights: Sequence[float] | None = None
    ) -> None:
        exit_weights(weights, 1 if isinstance(weights, str) else len(weights))  # validates the scheme now
        self.weights = weights
        self.truncation_weights = None if truncation_weights is None else [float(c) for c in truncation_weights]
        if self.truncation_weights is not None and any(c < 0 for c in self.truncation_weights):
            raise ConfigError(f"matryoshka: truncation_weights must be >= 0, got {self.truncation_weights}")

    def setup(self, model: nn.Module) -> None:
        if not any(_matryoshka_exits(model)):
            raise ConfigError(
                f"strategy 'matryoshka' needs exit heads that are MatryoshkaHeads (e.g. elastic_cnn_mnist with "
                f"matryoshka_dims), got {type(model).__name__} without one"
            )

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        """The loss on the active truncations only (what a plain network of these exits would use)."""
        w = exit_weights(self.weights, len(exit_logits))
        return sum(wk * F.cross_entropy(lg.float(), targets) for wk, lg in zip(w, exit_logits, strict=True))

    def nested_loss(
        self, model: nn.Module, exit_logits: list[Tensor], records: list[list[Tensor]], y: Tensor
    ) -> Tensor:
        """The loss of one forward pass from its exit logits and the nested logits recorded during it."""
        nested = _matryoshka_exits(model)
        if len(records) != sum(nested) or len(nested) != len(exit_logits):
            raise ConfigError(
                f"matryoshka: recorded {len(records)} Matryoshka head calls for {sum(nested)} Matryoshka exits of "
                f"{len(exit_logits)} (run the training forward pass under record_nested)"
            )
        w = exit_weights(self.weights, len(exit_logits))
        total = exit_logits[0].new_zeros((), dtype=torch.float32)
        calls = iter(records)
        for wk, is_nested, logits in zip(w, nested, exit_logits, strict=True):
            if is_nested:
                total = total + wk * matryoshka_loss(next(calls), y, self.truncation_weights)
            else:
                total = total + wk * F.cross_entropy(logits.float(), y)
        return total

    def training_step(self, ctx: StepContext, x: Tensor, y: Tensor) -> StepOutput:
        with record_nested(ctx.model) as records:
            logits = ctx.forward(x)
        loss = self.nested_loss(ctx.model, logits, records, y)
        return StepOutput(loss, {"loss_active": self(logits, y).detach()})
