"""Exit policies: the rules that decide, after each exit head, which samples are finished.

Protocol (:class:`ExitPolicy`). A policy is a small object with three methods:

* ``check_num_exits(num_exits)`` raises :class:`~adaptnn.errors.ConfigError` when the policy was
  built for another number of exits (e.g. a threshold list of the wrong length).
* ``init_state(batch_size, device)`` returns the per-sample state the policy carries from exit to exit
  (``None`` for stateless rules; a tensor or tuple/dict of tensors with the batch as dim 0 otherwise,
  e.g. patience counters or a running ensemble of logits). The engine compacts it together with the
  model's state, so a policy never sees samples that already left.
* ``decide(exit_index, logits, state) -> (done, prediction, new_state)``: ``logits`` are the head's
  outputs ``[b, C]`` for the ``b`` samples still running; ``done`` is a bool mask ``[b]``; ``prediction``
  ``[b, C]`` is what a sample that stops here returns (the logits themselves for most rules, an ensemble
  for ensemble rules). At the last exit every sample stops whatever ``done`` says.

Because decisions depend only on a sample's own history, running the policy on the whole batch at
every exit (:func:`simulate_exits`, on cached ``forward_all`` logits) makes exactly the decisions that
:meth:`~adaptnn.staged.StagedModel.run_dynamic` makes with compaction. Calibration relies on this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import ConfigError
from .state import State

__all__ = [
    "ExitPolicy",
    "ConfidencePolicy",
    "NeverExit",
    "simulate_exits",
    "max_softmax",
]


@runtime_checkable
class ExitPolicy(Protocol):
    """Decides after each exit head which samples stop there (see the module docstring)."""

    def check_num_exits(self, num_exits: int) -> None: ...

    def init_state(self, batch_size: int, device: torch.device) -> State: ...

    def decide(self, exit_index: int, logits: Tensor, state: State) -> tuple[Tensor, Tensor, State]: ...


def max_softmax(logits: Tensor) -> Tensor:
    """Confidence of each sample: the largest softmax probability, computed in float32 ``[b]``."""
    return logits.float().softmax(dim=-1).amax(dim=-1)


class ConfidencePolicy:
    """Max-softmax confidence with one threshold per exit: stop at exit k when confidence >= T_k.

    Args:
        thresholds: ``T_0 .. T_{K-2}`` for the K-1 exits before the last one (the last exit always takes
            the rest). ``None`` or ``inf`` disables an exit. A list of length K is accepted too when its
            last entry is ``None``/``-inf``/``inf`` (the last exit's threshold has no effect).
    """

    def __init__(self, thresholds: Sequence[float | None]) -> None:
        values = [math.inf if t is None else float(t) for t in thresholds]
        if any(math.isnan(t) for t in values):
            raise ConfigError(f"thresholds must not be NaN, got {list(thresholds)}")
        self.thresholds: list[float] = values

    def check_num_exits(self, num_exits: int) -> None:
        if len(self.thresholds) == num_exits and num_exits > 0:
            self.thresholds = self.thresholds[:-1]
        if len(self.thresholds) != num_exits - 1:
            raise ConfigError(
                f"ConfidencePolicy has {len(self.thresholds)} thresholds but the model has {num_exits} exits: "
                f"give one threshold per exit before the last ({num_exits - 1})"
            )

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return None

    def decide(self, exit_index: int, logits: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        if exit_index >= len(self.thresholds):  # last exit: everyone stops
            return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device), logits, state
        return max_softmax(logits) >= self.thresholds[exit_index], logits, state

    def __repr__(self) -> str:
        return f"ConfidencePolicy(thresholds={self.thresholds})"


class NeverExit(ConfidencePolicy):
    """Every sample runs to the last exit; ``run_dynamic`` then equals the full model."""

    def __init__(self) -> None:
        super().__init__([])

    def check_num_exits(self, num_exits: int) -> None:
        self.thresholds = [math.inf] * (num_exits - 1)


def simulate_exits(policy: ExitPolicy, exit_logits: Sequence[Tensor] | Tensor) -> tuple[Tensor, Tensor]:
    """Replay ``policy`` on cached logits of every exit, without compaction.

    Args:
        policy: any :class:`ExitPolicy`.
        exit_logits: ``[K, N, C]`` tensor or a list of K ``[N, C]`` tensors (``forward_all`` output).

    Returns:
        ``(exit_index [N] long, prediction [N, C])``: the exit each sample takes and what it returns.
    """
    num_exits = len(exit_logits)
    if num_exits == 0:
        raise ConfigError("simulate_exits needs logits of at least one exit")
    policy.check_num_exits(num_exits)
    first = exit_logits[0]
    n = first.shape[0]
    state = policy.init_state(n, first.device)
    exit_index = torch.full((n,), num_exits - 1, dtype=torch.long, device=first.device)
    prediction = torch.empty_like(first)
    undecided = torch.ones(n, dtype=torch.bool, device=first.device)
    for k in range(num_exits):
        done, pred, state = policy.decide(k, exit_logits[k], state)
        if k == num_exits - 1:
            done = torch.ones_like(done)
        newly = done & undecided
        exit_index[newly] = k
        prediction[newly] = pred[newly].to(prediction.dtype)
        undecided &= ~done
    return exit_index, prediction
