"""Rebuild a registered model from a checkpoint: its ``model_spec`` (registry name + kwargs) and weights."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import CheckpointError
from ..io.checkpoint import load_checkpoint, load_weights
from ._registry import create_model

__all__ = ["load_model"]


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved in checkpoint ``path`` (from its ``model_spec``) and load its weights."""
    ckpt = load_checkpoint(path)
    spec = ckpt.meta.get("model_spec")
    if not isinstance(spec, dict) or "name" not in spec:
        raise CheckpointError(f"{path} has no model_spec in its metadata, so the model cannot be rebuilt")
    model = create_model(spec["name"], **spec.get("kwargs", {}))
    load_weights(model, ckpt.model_state, source=str(path))
    return model.to(map_location)
