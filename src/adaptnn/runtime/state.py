"""Batch-indexable state: a tensor, or a tuple/list/dict of tensors (nested).

Segments of a :class:`~adaptnn.runtime.StagedModel` pass a *state* to each other: a feature map for a
CNN, one map per scale for MSDNet, tokens plus an attention mask for an encoder. Early exit only needs
one operation on it: keep some samples of the batch. These helpers do that for any nesting, so the
engine works for every backbone without knowing its state layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import torch
from torch import Tensor

__all__ = ["State", "cat_states", "copy_rows", "index_state", "map_state", "slice_state", "state_tensors"]

State: TypeAlias = Any
"""A tensor, ``None``, or a (nested) tuple/list/dict of them; every tensor has the batch as dim 0."""


def map_state(state: State, fn: Callable[[Tensor], Tensor]) -> State:
    """Apply ``fn`` to every tensor of a nested state, keeping its structure (NamedTuples included).

    ``None`` and non-tensor leaves (e.g. Python ints carried along) are returned unchanged.
    """
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, tuple):
        items = [map_state(s, fn) for s in state]
        return type(state)(*items) if hasattr(state, "_fields") else tuple(items)
    if isinstance(state, list):
        return [map_state(s, fn) for s in state]
    if isinstance(state, Mapping):
        return type(state)((k, map_state(v, fn)) for k, v in state.items())
    return state


def cat_states(states: list[State]) -> State:
    """Concatenate same-structured states along the batch (the inverse of splitting a batch into chunks)."""
    first = states[0]
    if isinstance(first, Tensor):
        return torch.cat(states)
    if isinstance(first, tuple):
        items = [cat_states([s[i] for s in states]) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else tuple(items)
    if isinstance(first, list):
        return [cat_states([s[i] for s in states]) for i in range(len(first))]
    if isinstance(first, Mapping):
        return type(first)((k, cat_states([s[k] for s in states])) for k in first)
    return first


def index_state(state: State, index: Tensor) -> State:
    """Keep the samples ``index`` (1-D long tensor of batch positions) of every tensor in ``state``.

    Tensors keep their memory format where PyTorch allows it (indexing a channels_last tensor returns a
    contiguous one, so such tensors are converted back).
    """

    def pick(t: Tensor) -> Tensor:
        if t.dim() == 0:
            return t
        picked = t.index_select(0, index)
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
            picked = picked.contiguous(memory_format=torch.channels_last)
        return picked

    return map_state(state, pick)


def slice_state(state: State, n: int) -> State:
    """The first ``n`` samples of every tensor in ``state`` (views, no copies)."""
    return map_state(state, lambda t: t if t.dim() == 0 else t[:n])


def state_tensors(state: State) -> list[Tensor]:
    """All tensors of ``state`` in a fixed traversal order."""
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [t for s in state for t in state_tensors(s)]
    if isinstance(state, Mapping):
        return [t for v in state.values() for t in state_tensors(v)]
    return []


def copy_rows(dst: State, src: State) -> None:
    """Copy every tensor of ``src`` into the leading rows of the same-structured ``dst`` (static buffers)."""
    for d, s in zip(state_tensors(dst), state_tensors(src), strict=True):
        d[: s.shape[0]].copy_(s)
