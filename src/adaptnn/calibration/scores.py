"""The score matrices of a threshold policy: the bridge from cached logits to the budgeted-batch engine.

Every calibrator works on the same object, :class:`~adaptnn.calibration.budgeted.ExitScores`: the policy's
score of every sample at every exit (``[K, N]``, computed once from cached ``forward_all`` logits), the class
each exit predicts, and the labels. A sample with thresholds ``T`` exits at the first ``k < K-1`` with
``scores[k] >= T_k`` (:func:`~adaptnn.calibration.budgeted.assign_exits`), so any threshold vector is
evaluated without touching the model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..policies import ThresholdPolicy
from .budgeted import ExitScores

__all__ = ["exit_scores"]


def exit_scores(policy: ThresholdPolicy, logits: Tensor, labels: Tensor | np.ndarray) -> ExitScores:
    """:class:`ExitScores` of ``policy`` on cached ``forward_all`` logits ``[K, N, C]`` and labels ``[N]``.

    Scores are float32, predictions and labels int64 (numpy).
    """
    if not isinstance(policy, ThresholdPolicy):
        raise ConfigError(
            f"calibration needs a threshold policy (adaptnn.policies.ThresholdPolicy), got {type(policy).__name__}"
        )
    logits = torch.as_tensor(logits)
    if logits.dim() != 3:
        raise ConfigError(f"logits must have shape [K, N, C] (exits, samples, classes); got {list(logits.shape)}")
    labels_np = np.asarray(torch.as_tensor(labels).cpu().numpy(), dtype=np.int64)
    if labels_np.shape != (logits.shape[1],):
        raise ConfigError(f"labels must have shape [N] = [{logits.shape[1]}]; got {list(labels_np.shape)}")
    if not torch.isfinite(logits).all():
        raise ConfigError("logits contain NaN or inf")
    scores, preds = policy.scores(logits)
    scores_np = scores.float().cpu().numpy()
    if np.isnan(scores_np).any():
        raise ConfigError(f"{type(policy).__name__} produced NaN scores")
    return ExitScores(scores_np, preds.cpu().numpy().astype(np.int64), labels_np)
