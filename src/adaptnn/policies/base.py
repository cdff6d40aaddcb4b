"""The exit-policy protocol, the threshold-rule base class and the cached-logit simulator.

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
:meth:`~adaptnn.runtime.StagedModel.run_dynamic` makes with compaction. Calibration relies on this.

Threshold rules (:class:`ThresholdPolicy`). Every shipped rule computes, at exit ``k``, a per-sample
*score* (higher = surer) and stops a sample when ``score >= T_k``. The score sequence of a sample does
not depend on the thresholds (only on that sample's logits at exits ``0..k``), so
:meth:`ThresholdPolicy.scores` computes the ``[K, N]`` score matrix once from cached logits and the
calibrators (:mod:`adaptnn.calibration`) choose thresholds on it for any rule alike.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..runtime.policy import ExitPolicy
from ..runtime.state import State

__all__ = [
    "ExitPolicy",
    "ThresholdPolicy",
    "simulate_exits",
    "max_softmax",
    "softmax_margin",
    "normalised_certainty",
]


def max_softmax(logits: Tensor) -> Tensor:
    """Confidence of each sample: the largest softmax probability, computed in float32 ``[b]``."""
    return logits.float().softmax(dim=-1).amax(dim=-1)


def softmax_margin(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 softmax probability in float32 ``[b]`` (1 with a single class)."""
    probs = logits.float().softmax(dim=-1)
    if probs.shape[-1] < 2:
        return probs[..., 0]
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def normalised_certainty(logits: Tensor) -> Tensor:
    """``1 - H(softmax) / log(C)`` in float32 ``[b]``: 1 for a one-hot prediction, 0 for a uniform one."""
    logp = logits.float().log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    n_classes = logits.shape[-1]
    return 1.0 - entropy / math.log(n_classes) if n_classes > 1 else torch.ones_like(entropy)


def _parse_thresholds(thresholds: Sequence[float | None], owner: str) -> list[float]:
    try:
        values = [math.inf if t is None else float(t) for t in thresholds]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{owner} thresholds must be numbers or None, got {thresholds!r}") from exc
    if any(math.isnan(t) for t in values):
        raise ConfigError(f"{owner} thresholds must not be NaN, got {list(thresholds)}")
    return values


def _saved_thresholds(data: dict[str, Any]) -> list[float | None]:
    """Thresholds of a saved description (``null`` = disabled exit), checked to be a list."""
    saved = data.get("thresholds", [])
    if not isinstance(saved, list):
        raise ConfigError(f"saved policy thresholds must be a list, got {type(saved).__name__}")
    return [None if t is None else t for t in saved]


class ThresholdPolicy:
    """Base of the rules "stop at exit k when ``score_k >= T_k``".

    Subclasses implement :meth:`step` (score, prediction and new state at one exit) and, when they carry
    state, :meth:`init_state`. Everything else (threshold bookkeeping, per-exit temperatures, the score
    matrix for calibration) lives here.

    Args:
        thresholds: ``T_0 .. T_{K-2}`` for the K-1 exits before the last one (the last exit always takes
            the rest). ``None`` or ``inf`` disables an exit. A list of length K is accepted too; its last
            entry is ignored (it has no effect).
        temperatures: optional per-exit softmax temperatures (K positive floats, e.g. from
            :func:`~adaptnn.policies.fit_temperatures`); logits are divided by ``temperatures[k]`` before
            the score is computed. Predictions (argmax) are unchanged by temperature scaling.
    """

    #: registry name of the family (``policy_from_dict`` finds the class by it); set by subclasses
    name: str = ""
    #: what the score measures, for reports
    score_name: str = "score"

    def __init__(self, thresholds: Sequence[float | None], *, temperatures: Sequence[float] | None = None) -> None:
        self.thresholds: list[float] = _parse_thresholds(thresholds, type(self).__name__)
        self.temperatures: list[float] | None = None
        if temperatures is not None:
            temps = [float(t) for t in temperatures]
            if any(not math.isfinite(t) or t <= 0 for t in temps):
                raise ConfigError(f"temperatures must be finite and > 0, got {temps}")
            self.temperatures = temps

    # -- protocol ------------------------------------------------------------------------------------
    def check_num_exits(self, num_exits: int) -> None:
        """Raise :class:`ConfigError` unless this policy fits a model with ``num_exits`` exits (never mutates)."""
        if len(self.thresholds) not in (num_exits - 1, num_exits) or num_exits < 1:
            raise ConfigError(
                f"{type(self).__name__} has {len(self.thresholds)} thresholds but the model has {num_exits} exits: "
                f"give one threshold per exit before the last ({num_exits - 1})"
            )
        if self.temperatures is not None and len(self.temperatures) != num_exits:
            raise ConfigError(
                f"{type(self).__name__} has {len(self.temperatures)} temperatures but the model has {num_exits} "
                "exits: give one temperature per exit"
            )

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return None

    def decide(self, exit_index: int, logits: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        score, prediction, state = self.step(exit_index, logits, state)
        return score >= self.threshold_at(exit_index), prediction, state

    def threshold_at(self, exit_index: int) -> float:
        """``T_k``; ``inf`` (nobody stops) past the given thresholds. The runtime stops everyone at the last exit."""
        return self.thresholds[exit_index] if exit_index < len(self.thresholds) else math.inf

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: ``{name, thresholds, temperatures}`` plus the family's own parameters."""
        return {"name": self.name, "thresholds": list(self.thresholds), "temperatures": self.temperatures}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThresholdPolicy:
        """Inverse of :meth:`to_dict` for this family (``null`` thresholds read back as disabled exits)."""
        return cls(_saved_thresholds(data), temperatures=data.get("temperatures"))

    # -- for subclasses ------------------------------------------------------------------------------
    def step(self, exit_index: int, logits: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        """Score ``[b]`` (float32), prediction ``[b, C]`` and new state at exit ``exit_index``."""
        raise NotImplementedError

    def scaled(self, exit_index: int, logits: Tensor) -> Tensor:
        """``logits`` divided by this exit's temperature (unchanged without temperatures)."""
        if self.temperatures is None:
            return logits
        return logits.float() / self.temperatures[exit_index]

    # -- calibration support -------------------------------------------------------------------------
    def with_thresholds(self, thresholds: Sequence[float | None]) -> ThresholdPolicy:
        """A copy of this policy (same temperatures and parameters) with other thresholds."""
        new = copy.copy(self)
        new.thresholds = _parse_thresholds(thresholds, type(self).__name__)
        return new

    @torch.inference_mode()
    def scores(self, exit_logits: Sequence[Tensor] | Tensor) -> tuple[Tensor, Tensor]:
        """Scores ``[K, N]`` (float32) and predicted classes ``[K, N]`` (long) of every sample at every exit.

        Computed on the whole batch from cached ``forward_all`` logits; they do not depend on the
        thresholds, so a sample exits at the first ``k < K-1`` with ``scores[k] >= T_k``.
        """
        num_exits = len(exit_logits)
        if num_exits == 0:
            raise ConfigError("scores needs logits of at least one exit")
        if self.temperatures is not None and len(self.temperatures) != num_exits:
            raise ConfigError(f"{len(self.temperatures)} temperatures for logits of {num_exits} exits")
        first = exit_logits[0]
        state = self.init_state(first.shape[0], first.device)
        all_scores, all_preds = [], []
        for k in range(num_exits):
            score, prediction, state = self.step(k, exit_logits[k], state)
            all_scores.append(score.float())
            all_preds.append(prediction.argmax(dim=-1))
        return torch.stack(all_scores), torch.stack(all_preds)

    def __repr__(self) -> str:
        extra = "" if self.temperatures is None else f", temperatures={[round(t, 4) for t in self.temperatures]}"
        return f"{type(self).__name__}(thresholds={self.thresholds}{extra})"


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
    prediction: Tensor | None = None
    undecided = torch.ones(n, dtype=torch.bool, device=first.device)
    for k in range(num_exits):
        done, pred, state = policy.decide(k, exit_logits[k], state)
        if prediction is None:
            prediction = pred.new_empty((n, *pred.shape[1:]))
        if k == num_exits - 1:
            done = torch.ones_like(done)
        newly = done & undecided
        exit_index[newly] = k
        prediction[newly] = pred[newly].to(prediction.dtype)
        undecided &= ~done
    assert prediction is not None
    return exit_index, prediction
