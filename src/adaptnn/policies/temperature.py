"""Per-exit temperature scaling (Guo et al. 2017), fitted on the validation split."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["fit_temperatures"]

log = logging.getLogger(__name__)


def fit_temperatures(
    exit_logits: Sequence[Tensor] | Tensor,
    labels: Tensor,
    *,
    max_iter: int = 200,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> list[float]:
    """One temperature per exit minimising the validation negative log-likelihood of ``softmax(z / tau)``.

    Temperature scaling changes confidences, not predictions: an over-confident early exit (common after
    joint training) gets ``tau > 1``, so its max-softmax scores become comparable across exits. Fit on the
    validation split only.

    Args:
        exit_logits: ``[K, N, C]`` logits (or a list of K ``[N, C]``) of the validation split.
        labels: ``[N]`` integer labels.
        max_iter: L-BFGS iterations per exit.
        bounds: the temperature is clamped to this range (guards against degenerate splits).

    Returns:
        K temperatures (floats > 0).
    """
    labels = torch.as_tensor(labels).long().cpu().clone()  # clone: may be an inference-mode tensor
    if len(exit_logits) == 0:
        raise ConfigError("fit_temperatures needs logits of at least one exit")
    temps: list[float] = []
    for k in range(len(exit_logits)):
        z = torch.as_tensor(exit_logits[k]).detach().double().cpu().clone()
        if z.dim() != 2 or z.shape[0] != labels.shape[0]:
            raise ConfigError(
                f"exit {k}: logits of shape {list(z.shape)} do not match labels of shape {list(labels.shape)}"
            )
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")
        y = labels

        def closure(z=z, y=y, log_t=log_t, opt=opt) -> Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        t = float(log_t.detach().exp())
        if not math.isfinite(t):
            t = 1.0
        temps.append(min(max(t, bounds[0]), bounds[1]))
    log.debug("fitted temperatures %s", temps)
    return temps
