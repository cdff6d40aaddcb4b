"""Compute cost of a staged model: multiply-accumulates (MACs) to reach each exit.

Convention. MACs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` and halved (it counts
one multiply-add as 2 FLOPs). What it counts is what we count: convolutions (incl. transposed), matrix
products (``linear``, ``mm``/``addmm``/``bmm``/``baddbmm``, batched and scaled-dot-product attention).
Normalisation, activations, pooling, element-wise ops and bias additions are *not* counted; on the
networks in this field they are a few percent at most, and the published per-exit figures use the
same convention.

Counting runs on a copy of the model on the ``meta`` device: only shapes are propagated, so any input
size is cheap and the real weights are never touched. Costs are per sample (batch size 1). The cost of
exit k is cumulative: every segment up to k and every head up to and including k (a sample that exits
at k evaluated all earlier heads on its way).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import InputError
from .state import State

if TYPE_CHECKING:  # the staged model imports this module to price its exits
    from .staged import StagedModel

__all__ = ["CostBreakdown", "cost_breakdown", "exit_macs", "heads_share", "count_macs", "count_params"]


@dataclass(frozen=True)
class CostBreakdown:
    """Per-sample MACs of each segment and head, and the cumulative MACs to reach each exit."""

    input_size: tuple[int, ...]
    segment_macs: list[float]
    head_macs: list[float]
    exit_macs: list[float]
    exit_params: list[int]

    def to_dict(self) -> dict:
        return asdict(self)

    def heads_share(self) -> dict:
        """MACs of the exit heads reported separately from the backbone's (per sample).

        Returns:
            ``{"head_macs": [per head], "heads_total": sum over all heads, "backbone_macs": sum over segments,
            "share": heads_total / backbone_macs, "added_heads_total": sum over all heads but the last (the
            ones early exit adds to a single-exit network), "added_share": added_heads_total / backbone_macs}``.
        """
        backbone = float(sum(self.segment_macs))
        total = float(sum(self.head_macs))
        added = float(sum(self.head_macs[:-1]))
        return {
            "head_macs": list(self.head_macs),
            "heads_total": total,
            "backbone_macs": backbone,
            "share": total / backbone if backbone else float("nan"),
            "added_heads_total": added,
            "added_share": added / backbone if backbone else float("nan"),
        }


def _macs_of(fn, *args) -> tuple[float, object]:
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return counter.get_total_flops() / 2.0, out


def count_macs(module: nn.Module, input_size: Sequence[int], *, dtype: torch.dtype = torch.float32) -> float:
    """MACs of one forward pass of ``module`` on a single sample of shape ``input_size`` (meta device)."""
    meta = copy.deepcopy(module).to(device="meta").eval()
    x = torch.empty((1, *input_size), dtype=dtype, device="meta")
    macs, _ = _macs_of(meta, x)
    return macs


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module`` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def cost_breakdown(
    model: StagedModel, input_size: Sequence[int], *, dtype: torch.dtype = torch.float32
) -> CostBreakdown:
    """Per-segment, per-head and cumulative per-exit MACs (and parameters) for one sample.

    Args:
        model: the staged model.
        input_size: shape of ONE sample without the batch dim, e.g. ``(3, 32, 32)``.
        dtype: input dtype (``torch.long`` for token ids).
    """
    input_size = tuple(int(s) for s in input_size)
    if model.input_spec is not None and len(input_size) != len(model.input_spec.shape):
        raise InputError(
            f"input_size {input_size} has {len(input_size)} dims; the model expects one sample shaped "
            f"{model.input_spec.shape} (no batch dim)"
        )
    meta: StagedModel = copy.deepcopy(model).to(device="meta").eval()
    segment_macs: list[float] = []
    head_macs: list[float] = []

    def count_segment(j: int, segment: nn.Module, state: State) -> State:
        macs, out = _macs_of(segment, state)
        segment_macs.append(macs)
        return out

    def count_head(k: int, head: nn.Module, state: State) -> None:
        head_macs.append(_macs_of(head, state)[0])

    with torch.no_grad():
        meta.walk(torch.empty((1, *input_size), dtype=dtype, device="meta"), segment=count_segment, head=count_head)
    cumulative: list[float] = []
    exit_params: list[int] = []
    for k, seg_idx in enumerate(model.exit_after):
        cumulative.append(sum(segment_macs[: seg_idx + 1]) + sum(head_macs[: k + 1]))
        exit_params.append(
            sum(count_params(model.segments[i]) for i in range(seg_idx + 1))
            + sum(count_params(model.heads[j]) for j in range(k + 1))
        )
    return CostBreakdown(input_size, segment_macs, head_macs, cumulative, exit_params)


def exit_macs(model: StagedModel, input_size: Sequence[int], *, dtype: torch.dtype = torch.float32) -> list[float]:
    """Cumulative MACs to reach each exit for one sample of shape ``input_size``, heads included."""
    return cost_breakdown(model, input_size, dtype=dtype).exit_macs


def heads_share(model: StagedModel, input_size: Sequence[int], *, dtype: torch.dtype = torch.float32) -> dict:
    """:meth:`CostBreakdown.heads_share` of ``model`` for one sample of shape ``input_size``."""
    return cost_breakdown(model, input_size, dtype=dtype).heads_share()
