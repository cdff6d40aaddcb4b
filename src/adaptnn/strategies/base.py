"""The strategy protocol: a loss over per-exit logits plus optional hooks the Trainer calls.

A strategy is first of all a callable ``(exit_logits: list[Tensor], targets: Tensor) -> Tensor``. Methods
that need more than a loss override hooks of :class:`Strategy`:

* :meth:`Strategy.setup` once before the optimizer is built (e.g. freeze the backbone);
* :meth:`Strategy.train_mode` after every ``model.train()`` (e.g. keep a frozen backbone in eval mode);
* :meth:`Strategy.forward` is the training-time forward pass (e.g. gradient rescaling on the trunk);
* :meth:`Strategy.training_step` is one micro-batch given a :class:`StepContext` (e.g. a meta step before
  the backbone loss); it returns a :class:`StepOutput`: the loss to back-propagate and this step's metrics,
  which the Trainer averages over the epoch (the strategy keeps no running sums);
* :meth:`Strategy.predictions` maps the exits' raw logits to what each exit predicts at test time (e.g. an
  additive ensemble); :meth:`Strategy.policy_spec` names the matching early-exit policy family and
  :meth:`Strategy.policy` builds it;
* :meth:`Strategy.state_dict` / :meth:`Strategy.load_state_dict` carry the strategy's own trainable
  state (e.g. a weight network and its optimizer) through checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..policies import ThresholdPolicy, make_policy

if TYPE_CHECKING:
    from ..runtime.staged import StagedModel

__all__ = ["Strategy", "StepContext", "StepOutput", "as_strategy", "per_exit_cross_entropy"]


@dataclass
class StepContext:
    """What :meth:`Strategy.training_step` may use besides the batch.

    Attributes:
        model: the plain :class:`StagedModel` (not wrapped by DDP or ``torch.compile``), e.g. for
            ``torch.func.functional_call``.
        forward: the training forward pass ``x -> list of exit logits`` (wrapped for DDP/compile; use it
            for the loss that the Trainer back-propagates so gradients are synchronised).
        lr: the backbone's current learning rate.
        step: optimizer steps taken so far.
        epoch: 0-based epoch.
        world_size: number of data-parallel processes (1 without DDP).
        backward: back-propagates a part of this micro-batch's loss with the Trainer's loss scale (the
            micro-batch's share of the global batch, times the processes), gradients accumulating; a strategy
            that calls it returns ``StepOutput(..., backward_done=True)`` so that the Trainer does not
            back-propagate again. It lets a strategy free each part's graph before building the next (e.g. one
            backward per elastic member).
            ``None`` when the caller back-propagates ``StepOutput.loss`` itself (a hand-built context); under DDP
            a strategy should call it at most once per forward it syncs (DDP reduces once per iteration).
        lr_factor: the schedule's factor at this step (``lr`` over the configured base lr, warm-up included), for a
            strategy whose own optimizer follows the backbone's schedule.
    """

    model: StagedModel
    forward: Callable[[Tensor], list[Tensor]]
    lr: float
    step: int
    epoch: int
    world_size: int = 1
    backward: Callable[[Tensor], None] | None = None
    lr_factor: float = 1.0


@dataclass
class StepOutput:
    """What :meth:`Strategy.training_step` returns for one micro-batch.

    Attributes:
        loss: the scalar loss the Trainer back-propagates (mean over the micro-batch).
        metrics: this step's extra metrics by their ``metrics.jsonl`` key (detached tensors or floats); the
            Trainer averages each key over the micro-batches that report it (and over processes under DDP).
        backward_done: the strategy already back-propagated its loss through :attr:`StepContext.backward`;
            ``loss`` (then detached) is only checked to be finite and metered.
    """

    loss: Tensor
    metrics: dict[str, Tensor | float] = field(default_factory=dict)
    backward_done: bool = False


def per_exit_cross_entropy(exit_logits: Sequence[Tensor], targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-sample cross-entropy at every exit, ``[N, K]`` (computed in float32)."""
    return torch.stack(
        [
            nn.functional.cross_entropy(lg.float(), targets, reduction="none", label_smoothing=label_smoothing)
            for lg in exit_logits
        ],
        dim=1,
    )


class Strategy:
    """Base class of training strategies; subclasses implement :meth:`__call__` and override hooks as needed."""

    #: registry name (set by subclasses)
    name: str = "strategy"

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        """The training loss from the exits' logits ``[B, C]`` each and the targets ``[B]``."""
        raise NotImplementedError

    def setup(self, model: StagedModel) -> None:
        """Prepare ``model`` once before the optimizer is built (default: nothing)."""

    def train_mode(self, model: StagedModel) -> None:
        """Called after ``model.train()`` at the start of every epoch (default: nothing)."""

    def forward(self, model: StagedModel, x: Tensor) -> list[Tensor]:
        """Training-time forward pass (default: ``model.forward_all``)."""
        return model.forward_all(x)

    def training_step(self, ctx: StepContext, x: Tensor, y: Tensor) -> StepOutput:
        """Loss (and metrics) of one micro-batch, back-propagated by the Trainer (default: ``self(forward(x), y)``)."""
        return StepOutput(self(ctx.forward(x), y))

    def predictions(self, exit_logits: Sequence[Tensor]) -> list[Tensor]:
        """What each exit predicts at test time (default: its own logits)."""
        return list(exit_logits)

    def policy_spec(self) -> tuple[str, dict[str, Any]]:
        """``(family, params)`` of the early-exit policy consistent with :meth:`predictions`.

        ``family`` is one of ``adaptnn.policies.POLICY_NAMES`` and ``params`` its ``make_policy`` keywords, so
        configs and run directories can name the policy without building it (default ``("confidence", {})``).
        """
        return "confidence", {}

    def policy(self, thresholds: Sequence[float | None]) -> ThresholdPolicy:
        """The policy of :meth:`policy_spec` with ``thresholds`` (``K-1`` of them; ``None`` disables an exit)."""
        name, params = self.policy_spec()
        return make_policy(name, len(thresholds) + 1, **params).with_thresholds(thresholds)

    def state_dict(self) -> dict[str, Any]:
        """Trainable state of the strategy itself (nested dict of tensors and JSON values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (default: nothing to restore)."""

    def to(self, device: torch.device) -> Strategy:
        """Move the strategy's own modules to ``device`` (default: nothing)."""
        return self

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class _CallableStrategy(Strategy):
    """A plain ``(exit_logits, targets) -> loss`` callable with the default hooks."""

    name = "custom"

    def __init__(self, fn: Callable[[list[Tensor], Tensor], Tensor]) -> None:
        self.fn = fn

    def __call__(self, exit_logits: list[Tensor], targets: Tensor) -> Tensor:
        return self.fn(exit_logits, targets)


def as_strategy(loss: Strategy | Callable[[list[Tensor], Tensor], Tensor]) -> Strategy:
    """``loss`` itself when it is a :class:`Strategy`, else the plain loss callable wrapped with the default hooks."""
    return loss if isinstance(loss, Strategy) else _CallableStrategy(loss)
