"""Inline subnetwork collaboration (ISC; Li et al., "Improved Techniques for Training Adaptive Deep Networks",
ICCV 2019).

IMTA trains in two stages. Stage one trains the whole multi-exit network (with gradient equilibrium: adaptnn's
``imta`` strategy). Stage two keeps that network frozen and gives every exit a new linear classifier that reads
the exit's own pooled features *and* the previous exit's prediction, mapped by a small ISC module
(``Linear(C, d) + BatchNorm1d + ReLU``, ``d`` the exit's feature width; the linear layer has no bias, which the
normalisation would cancel); only the new classifiers and ISC modules
train (with one-for-all distillation from the last exit in the paper). :func:`inline_collaboration` builds the
stage-two model from a trained :class:`~adaptnn.runtime.StagedModel`.

Early exit stays real. Exit k's prediction is computed at the end of stage k (the last segment before exit k
runs the segment, the exit's feature layers and its classifier) and carried in the state as
``(backbone_state, logits_k)``, where stage k + 1 reads it; the transformed model's heads only return it. So
:meth:`~adaptnn.runtime.StagedModel.run_dynamic`, the MACs counter and the stage executors run it unchanged, and a
sample pays for exit k's classifier only once it reaches exit k (in this architecture a later exit needs every
earlier prediction anyway).

adaptnn's choices, against the reference code: each new classifier starts as the exit's old linear layer on the
features with zero weights on the ISC input, so stage two starts from stage one's predictions (the reference
initialises the new classifiers at random); the frozen network's normalisation statistics keep updating in
training mode, as in the reference (which trains with ``model.train()``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime.staged import StagedModel
from ..runtime.state import State

__all__ = ["CarryPrediction", "PredictExit", "ReadPrediction", "collaborative_exits", "inline_collaboration"]


class PredictExit(nn.Module):
    """The last segment of a stage, then its exit's collaborative classifier: ``state -> (state, logits)``.

    Args:
        segment: the backbone segment that ends the stage.
        features: the exit head without its final linear layer (pooled features ``[b, d]``).
        classifier: ``Linear(d + d_isc, C)`` on the features and the ISC output (``d_isc = 0`` for exit 0).
        isc: maps the previous exit's logits to ``d_isc`` features; ``None`` for the first exit, whose input is
            the plain backbone state rather than a ``(state, logits)`` pair.
    """

    def __init__(self, segment: nn.Module, features: nn.Module, classifier: nn.Linear, isc: nn.Module | None) -> None:
        super().__init__()
        self.segment = segment
        self.features = features
        self.classifier = classifier
        self.isc = isc

    def forward(self, state: State) -> tuple[State, Tensor]:
        if self.isc is None:
            inner = self.segment(state)
            return inner, self.classifier(self.features(inner))
        inner, previous = state
        inner = self.segment(inner)
        return inner, self.classifier(torch.cat([self.features(inner), self.isc(previous)], dim=1))


class CarryPrediction(nn.Module):
    """A segment between two exits: runs on the backbone state and carries the last prediction along."""

    def __init__(self, segment: nn.Module) -> None:
        super().__init__()
        self.segment = segment

    def forward(self, state: tuple[State, Tensor]) -> tuple[State, Tensor]:
        inner, previous = state
        return self.segment(inner), previous


class ReadPrediction(nn.Module):
    """The exit head of a collaborative model: the logits its stage computed and carries in the state."""

    def forward(self, state: tuple[State, Tensor]) -> Tensor:
        return state[1]


def collaborative_exits(model: nn.Module) -> list[PredictExit]:
    """The collaborative exits of ``model`` (empty for a model :func:`inline_collaboration` did not build)."""
    return [m for m in model.modules() if isinstance(m, PredictExit)]


def _split_head(k: int, head: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``(feature layers, final linear layer)`` of exit head ``k``: the head with its ``fc`` made an identity."""
    fc = getattr(head, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ConfigError(
            f"inline collaboration needs exit heads ending in a linear layer named 'fc'; head {k} "
            f"({type(head).__name__}) has {type(fc).__name__ if fc is not None else 'none'}"
        )
    head.fc = nn.Identity()
    return head, fc


def inline_collaboration(model: StagedModel, *, freeze: bool = True) -> StagedModel:
    """IMTA's stage-two model: every exit's classifier also reads the previous exit's prediction.

    Args:
        model: a trained staged model whose exit heads end in a linear layer named ``fc`` (every adaptnn head
            kind does). It is not modified: the result holds a copy.
        freeze: make every parameter of ``model`` non-trainable, so only the new classifiers and ISC modules
            train (IMTA's stage two).

    Returns:
        A :class:`~adaptnn.runtime.StagedModel` with the same exits, input spec and class count. With its ISC
        weights still zero (as built) its exits predict exactly what ``model``'s do.
    """
    model = copy.deepcopy(model)
    if freeze:
        model.requires_grad_(False)
    parts = [_split_head(k, head) for k, head in enumerate(model.heads)]
    num_classes = parts[0][1].out_features
    if any(fc.out_features != num_classes for _, fc in parts):
        raise ConfigError(
            "inline collaboration needs every exit to predict the same classes, got "
            f"{[fc.out_features for _, fc in parts]}"
        )
    stage_end = {segment: k for k, segment in enumerate(model.exit_after)}
    segments: list[nn.Module] = []
    for j, segment in enumerate(model.segments):
        k = stage_end.get(j)
        if k is None:  # a segment inside a stage: before the first exit the state is the backbone's alone
            segments.append(segment if j < model.exit_after[0] else CarryPrediction(segment))
            continue
        features, fc = parts[k]
        width, like = fc.in_features, {"device": fc.weight.device, "dtype": fc.weight.dtype}
        isc = None
        if k > 0:
            isc = nn.Sequential(
                nn.Linear(num_classes, width, bias=False, **like), nn.BatchNorm1d(width, **like), nn.ReLU()
            )
        classifier = nn.Linear(width + (0 if k == 0 else width), num_classes, bias=fc.bias is not None, **like)
        with torch.no_grad():
            classifier.weight.zero_()
            classifier.weight[:, :width].copy_(fc.weight)
            if fc.bias is not None:
                classifier.bias.copy_(fc.bias)
        segments.append(PredictExit(segment, features, classifier, isc))
    return StagedModel(
        segments,
        [ReadPrediction() for _ in parts],
        model.exit_after,
        input_spec=model.input_spec,
        num_classes=model.num_classes,
    )
