"""Building blocks shared by the adapters: module shells, shape tracing, stage exits, assembly.

An adapter turns a model that computes ``head(units[-1](...units[0](x)))`` into a
:class:`~adaptnn.staged.StagedModel`: the *units* (stem, stages, blocks) are grouped into segments that end
where an exit sits, intermediate exits get a head from :func:`adaptnn.heads.make_head`, and the last exit is
the original model's own classifier, so the wrapped model's last exit returns the original logits exactly.

The wrapped model shares its modules (and so its weights) with the original; nothing is copied.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.heads import make_head
from ..runtime.staged import InputSpec, StagedModel

__all__ = [
    "ShellCall",
    "shell",
    "require",
    "trace_shapes",
    "stage_ends",
    "resolve_exits",
    "assemble",
]


def require(module: str, extra: str) -> object:
    """Import an optional dependency or raise a :class:`ConfigError` telling how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"this adapter needs the optional package {module!r} ({err}); install it with "
            f"`pip install 'adaptnn[{extra}]'`"
        ) from None


def shell(model: nn.Module, keep: set[str], *, keep_direct_tensors: bool = True) -> nn.Module:
    """A shallow copy of ``model`` holding only the child modules named in ``keep``.

    The copy keeps the class (so its methods, e.g. timm's ``forward_head`` or ``_pos_embed``, work) and its
    plain attributes; the kept children are the original modules (shared weights). Parameters and buffers
    registered directly on ``model`` (e.g. a ViT's class token) are kept only with ``keep_direct_tensors``.
    """
    out = copy.copy(model)
    out._modules = {k: v for k, v in model._modules.items() if k in keep}
    out._parameters = dict(model._parameters) if keep_direct_tensors else {}
    out._buffers = dict(model._buffers) if keep_direct_tensors else {}
    out._non_persistent_buffers_set = set(model._non_persistent_buffers_set) if keep_direct_tensors else set()
    for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks"):
        if hasattr(model, name):
            setattr(out, name, type(getattr(model, name))())
    return out


class ShellCall(nn.Module):
    """Calls ``method`` of a :func:`shell` (e.g. ``forward_head``): the original code on the kept modules."""

    def __init__(self, shell_module: nn.Module, method: str) -> None:
        super().__init__()
        self.shell = shell_module
        self.method = method

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.shell, self.method)(x)

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


def trace_shapes(units: Sequence[nn.Module], input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> list:
    """Output shape of every unit for one sample (batch dim dropped), run on a meta-device copy."""
    meta = copy.deepcopy(nn.ModuleList(units)).to("meta").eval()
    x = torch.empty((1, *input_shape), dtype=dtype, device="meta")
    shapes = []
    with torch.no_grad():
        for unit in meta:
            x = unit(x)
            shapes.append(tuple(x.shape[1:]))
    return shapes


def stage_ends(shapes: Sequence[tuple[int, ...]], input_hw: int, min_reduction: int = 4) -> list[int]:
    """Indices of units that end a stage: the last unit at each spatial resolution (CNN maps ``[c, h, w]``).

    Resolutions with a reduction below ``min_reduction`` (the stem) get no exit; the last unit always ends one.
    """
    ends = []
    for i, shape in enumerate(shapes):
        nxt = shapes[i + 1] if i + 1 < len(shapes) else None
        if len(shape) != 3:
            continue
        if nxt is None or len(nxt) != 3 or nxt[-1] != shape[-1]:
            if input_hw / max(shape[-1], 1) >= min_reduction:
                ends.append(i)
    if not ends or ends[-1] != len(shapes) - 1:
        ends.append(len(shapes) - 1)
    return ends


def resolve_exits(exits: object, candidates: Sequence[int], num_units: int, what: str) -> list[int]:
    """Unit indices after which exits sit, from ``"stages"`` (all candidates) or a list of candidate positions.

    Args:
        exits: ``"stages"`` or a list of 0-based positions into ``candidates`` (negative counts from the end).
        candidates: unit indices that may carry an exit (stage ends), increasing.
        num_units: number of units; the last unit always carries the final exit.
        what: word for the candidates in error messages (``"stage"``, ``"block"``).
    """
    if exits == "stages" or exits == "all":
        chosen = list(candidates)
    elif isinstance(exits, Sequence) and not isinstance(exits, str) and all(isinstance(e, int) for e in exits):
        n = len(candidates)
        bad = [e for e in exits if not -n <= e < n]
        if bad:
            raise ConfigError(f"exits {list(exits)}: {what} indices {bad} out of range; this model has {n} {what}s")
        chosen = sorted({candidates[e] for e in exits})
    else:
        raise ConfigError(f"exits must be 'stages' or a list of {what} indices, got {exits!r}")
    if not chosen or chosen[-1] != num_units - 1:
        chosen.append(num_units - 1)
    return chosen


def assemble(
    units: Sequence[nn.Module],
    exit_units: Sequence[int],
    final_head: nn.Module,
    head_for: Callable[[int], nn.Module],
    *,
    input_spec: InputSpec,
    num_classes: int,
) -> StagedModel:
    """Group ``units`` into segments ending at ``exit_units`` and attach heads.

    Args:
        units: the backbone's units in order; applying all of them then ``final_head`` is the original model.
        exit_units: increasing unit indices after which an exit sits; the last must be the last unit.
        final_head: the original classifier (last exit).
        head_for: builds the head of the intermediate exit after unit ``i``.
    """
    if list(exit_units) != sorted(set(exit_units)) or exit_units[-1] != len(units) - 1:
        raise ConfigError(f"exit positions {list(exit_units)} must increase and end at the last unit {len(units) - 1}")
    segments, heads, start = [], [], 0
    for end in exit_units:
        segments.append(nn.Sequential(*units[start : end + 1]))
        heads.append(final_head if end == len(units) - 1 else head_for(end))
        start = end + 1
    return StagedModel(segments, heads, input_spec=input_spec, num_classes=num_classes)


def default_head(family: str, head: str, head_kwargs: dict | None) -> Callable[[int, int], nn.Module]:
    """A ``(in_features, num_classes) -> head`` builder for ``head`` (``"default"`` = the family's default)."""
    kind = family if head == "default" else head
    kwargs = dict(head_kwargs or {})
    return lambda in_features, num_classes: make_head(kind, in_features, num_classes, **kwargs)
