"""A learned exit rule: a tiny network predicts from per-exit features whether the current exit is right.

Features of a sample at exit ``k`` (all from its own logits at exits ``0..k``): max softmax, top-1/top-2
margin, normalised certainty ``1 - H / log C``, whether the prediction equals the previous exit's, the
previous exit's max softmax, the length of the current run of unchanged predictions (divided by K) and
a one-hot of ``k``. :func:`fit_learned_policy` trains :class:`ExitCorrectnessNet` on the validation
split (binary cross-entropy against "the prediction at exit k is correct"); the policy's score is the
predicted probability of being correct, thresholded per exit like any other rule (calibrate the
thresholds with :mod:`adaptnn.calibration`; for the accuracy guarantee, fit the network and run the
risk-control test on disjoint parts of the validation split).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime.state import State
from .base import ThresholdPolicy, _saved_thresholds, normalised_certainty

__all__ = ["ExitCorrectnessNet", "LearnedPolicy", "exit_features", "fit_learned_policy", "NUM_BASE_FEATURES"]

log = logging.getLogger(__name__)

NUM_BASE_FEATURES = 6


def exit_features(
    exit_index: int, logits: Tensor, state: State, num_exits: int, temperature: float | None = None
) -> tuple[Tensor, State]:
    """Features ``[b, NUM_BASE_FEATURES + K]`` (float32) at one exit and the state carried to the next."""
    z = logits.float() if temperature is None else logits.float() / temperature
    probs = z.softmax(dim=-1)
    top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    conf = top[:, 0]
    margin = top[:, 0] - top[:, 1] if top.shape[-1] > 1 else conf
    pred = logits.argmax(dim=-1)
    if state is None:
        agree = torch.zeros_like(conf)
        prev_conf = torch.zeros_like(conf)
        streak = torch.zeros_like(conf)
    else:
        prev_pred, prev_conf, prev_streak = state
        agree = (pred == prev_pred).float()
        streak = torch.where(agree > 0, prev_streak + 1, torch.zeros_like(prev_streak))
    onehot = torch.zeros(conf.shape[0], num_exits, dtype=torch.float32, device=conf.device)
    onehot[:, exit_index] = 1.0
    base = torch.stack([conf, margin, normalised_certainty(z), agree, prev_conf, streak / num_exits], dim=1)
    return torch.cat([base, onehot], dim=1), (pred, conf, streak)


class ExitCorrectnessNet(nn.Module):
    """MLP ``features -> logit of P(prediction at this exit is correct)``, shared by all exits."""

    def __init__(self, num_exits: int, hidden: int = 16) -> None:
        super().__init__()
        self.num_exits = int(num_exits)
        self.body = nn.Sequential(
            nn.Linear(NUM_BASE_FEATURES + self.num_exits, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.body(features).squeeze(-1)


class LearnedPolicy(ThresholdPolicy):
    """Stop at exit k when the learned probability that exit k is already correct is ``>= T_k``.

    Args:
        net: a trained :class:`ExitCorrectnessNet` (see :func:`fit_learned_policy`).
        thresholds: ``T_0 .. T_{K-2}`` on the predicted probability.
        temperatures: optional per-exit temperatures applied to the logits before the features.
    """

    name = "learned"
    score_name = "learned probability that the exit is correct"

    def __init__(
        self,
        net: ExitCorrectnessNet,
        thresholds: Sequence[float | None],
        *,
        temperatures: Sequence[float] | None = None,
    ) -> None:
        super().__init__(thresholds, temperatures=temperatures)
        self.net = net.eval()

    def check_num_exits(self, num_exits: int) -> None:
        if self.net.num_exits != num_exits:
            raise ConfigError(
                f"LearnedPolicy's network was trained for {self.net.num_exits} exits but the model has {num_exits}"
            )
        super().check_num_exits(num_exits)

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "hidden": self.net.body[0].out_features,
            "num_exits": self.net.num_exits,
            "state_dict": {k: v.detach().cpu().tolist() for k, v in self.net.state_dict().items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearnedPolicy:
        try:
            net = ExitCorrectnessNet(int(data["num_exits"]), int(data["hidden"]))
            net.load_state_dict({k: torch.tensor(v) for k, v in data["state_dict"].items()})
        except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"the saved learned policy is incomplete or corrupt: {exc}") from exc
        return cls(net, _saved_thresholds(data), temperatures=data.get("temperatures"))

    def step(self, exit_index: int, logits: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        temperature = None if self.temperatures is None else self.temperatures[exit_index]
        feats, state = exit_features(exit_index, logits, state, self.net.num_exits, temperature)
        param = next(self.net.parameters())
        if param.device != feats.device:
            self.net.to(feats.device)
        with torch.no_grad():
            score = torch.sigmoid(self.net(feats))
        return score, logits, state


def fit_learned_policy(
    exit_logits: Sequence[Tensor] | Tensor,
    labels: Tensor,
    *,
    thresholds: Sequence[float | None] | None = None,
    temperatures: Sequence[float] | None = None,
    hidden: int = 16,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> LearnedPolicy:
    """Train the exit-correctness network on (validation) logits and return a :class:`LearnedPolicy`.

    Full-batch AdamW on every (sample, exit) pair with the target "argmax at this exit == label".

    Args:
        exit_logits: ``[K, N, C]`` validation logits.
        labels: ``[N]`` validation labels.
        thresholds: thresholds of the returned policy (default 0.5 everywhere; calibrate them).
        temperatures: optional per-exit temperatures used for the features (and by the policy).
        hidden: hidden width of the MLP.
        steps, lr, weight_decay: optimisation.
        seed: initialisation seed (the result is deterministic given it).
    """
    num_exits = len(exit_logits)
    labels = torch.as_tensor(labels).long().cpu()
    if num_exits < 1:
        raise ConfigError("fit_learned_policy needs logits of at least one exit")
    state: State = None
    feats, targets = [], []
    with torch.inference_mode():
        for k in range(num_exits):
            z = torch.as_tensor(exit_logits[k]).cpu()
            if z.shape[0] != labels.shape[0]:
                raise ConfigError(f"exit {k}: {z.shape[0]} logits rows for {labels.shape[0]} labels")
            temp = None if temperatures is None else temperatures[k]
            f, state = exit_features(k, z, state, num_exits, temp)
            feats.append(f)
            targets.append((z.argmax(-1) == labels).float())
    x = torch.cat(feats).clone()
    y = torch.cat(targets).clone()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = ExitCorrectnessNet(num_exits, hidden)
    torch.random.set_rng_state(generator_state)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(net(x), y)
            loss.backward()
            opt.step()
    log.debug("learned exit policy: final BCE %.4f on %d pairs", float(loss.detach()), len(y))
    if thresholds is None:
        thresholds = [0.5] * (num_exits - 1)
    return LearnedPolicy(net.eval(), thresholds, temperatures=temperatures)
