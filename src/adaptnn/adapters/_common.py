"""Building blocks shared by the adapters: module shells, shape tracing, exit placement, assembly, the lossless check.

An adapter turns a model that computes ``head(units[-1](...units[0](x)))`` into a
:class:`~adaptnn.runtime.StagedModel`: the *units* (stem, stages, blocks) are grouped into segments that end
where an exit sits, intermediate exits get a head from :func:`adaptnn.layers.heads.make_head`, and the last
exit is the original model's own classifier, so the wrapped model's last exit returns the original logits
exactly. Every adapter places its exits with :func:`resolve_exits` (the one meaning of ``exits=``) and proves
the cut lossless with :func:`check_last_exit`.

The wrapped model shares its modules (and so its weights) with the original; nothing is copied.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedModelError
from ..layers.heads import HEAD_KINDS, make_head
from ..models._registry import CheckpointArg, options_of
from ..runtime.staged import InputSpec, StagedModel

__all__ = [
    "ShellCall",
    "shell",
    "require",
    "trace_shapes",
    "stage_ends",
    "resolve_exits",
    "assemble",
    "check_last_exit",
    "default_head",
    "HEAD_OPTIONS",
    "plain_name",
]

_HEAD_KEYS = options_of(*HEAD_KINDS.values(), skip=("in_features", "num_classes"))
#: what a checkpoint may put in an adapter's ``head_kwargs``: the typed options of the exit heads' constructors (a
#: head's hidden ``width`` bounded: ``hf_staged`` is built for real, without the meta-device shape check)
HEAD_OPTIONS = CheckpointArg(keys={**_HEAD_KEYS, "width": dataclasses.replace(_HEAD_KEYS["width"], bounds=(1, 4096))})

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")


def plain_name(value: object) -> bool:
    """Whether ``value`` is a plain model name (letters, digits, ``_.-``): no ``hf-hub:``-style prefix, no path."""
    return isinstance(value, str) and _PLAIN_NAME.fullmatch(value) is not None


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


def resolve_exits(
    exits: str | int | Sequence[int], positions: Sequence[int], what: str, *, stages: Sequence[int] | None = None
) -> list[int]:
    """Where the exits sit: the one meaning of the ``exits=`` argument of every adapter (timm, torchvision, HF).

    An adapter lists the *positions* where an exit can sit, in order: the stage ends of a CNN (the last unit
    at each resolution with a reduction of 4 or more), the blocks of a vision transformer, the layers of a
    text encoder. The last position is the end of the backbone: its exit is the original model's own
    classifier, always present. ``exits`` chooses the exits before it:

    * ``"stages"`` (the default of every adapter): one exit per stage of the backbone. CNNs: every stage end;
      vision transformers: after each quarter of the blocks (4 exits); text encoders: after every layer.
    * ``"all"``: every position (same as ``"stages"`` for CNNs and text encoders).
    * an int ``N``: every N-th position (positions ``N-1, 2N-1, ...``). Only for stacks of equal blocks or
      layers (vision transformers, text encoders); a CNN's stages differ, so it is refused there.
    * a list of position indices, 0-based. The last position may be listed (its exit is there anyway);
      negative indices count back from the exits *before* it (``-1`` is the position just before the
      original classifier), as the last one needs no choosing.

    Args:
        exits: the user's choice, as above.
        positions: unit index of each position, increasing; the last is the unit the original classifier reads.
        what: what a position is: ``"stage"`` (CNN; an int ``exits`` is refused), ``"block"`` or ``"layer"``.
        stages: indices into ``positions`` that ``"stages"`` selects (default: all of them).

    Returns:
        The unit indices after which exits sit, increasing, ending with ``positions[-1]``.
    """
    count = len(positions)
    if exits == "all":
        chosen = set(range(count))
    elif exits == "stages":
        chosen = set(range(count) if stages is None else stages)
    elif isinstance(exits, int) and not isinstance(exits, bool):
        if what == "stage":
            raise ConfigError(
                f"exits={exits}: an int (one exit every N blocks or layers) is for vision transformers and text "
                "encoders; this model has stages: use 'stages' or a list of stage indices"
            )
        if exits < 1:
            raise ConfigError(f"exits={exits}: an int means one exit every N {what}s, N >= 1")
        chosen = set(range(exits - 1, count, exits))
    elif isinstance(exits, Sequence) and not isinstance(exits, str) and all(_is_int(e) for e in exits):
        bad = [e for e in exits if not -(count - 1) <= e < count]
        if bad:
            back = f", or -1..-{count - 1} counting back from the one before the last" if count > 1 else ""
            raise ConfigError(
                f"exits {list(exits)}: {what} indices {bad} out of range; this model has {count} {what}s "
                f"(0..{count - 1}{back})"
            )
        chosen = {e if e >= 0 else count - 1 + e for e in exits}
    else:
        raise ConfigError(
            f"exits must be 'stages', 'all', an int (every N {what}s) or a list of {what} indices, got {exits!r}"
        )
    return [positions[i] for i in sorted(chosen | {count - 1})]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


def check_last_exit(
    original: nn.Module,
    staged: StagedModel,
    x: Tensor,
    *,
    reference: Callable[[Tensor], Tensor] | None = None,
    hint: str = "",
) -> None:
    """The lossless check of every adapter: the staged model's last exit must equal the original model exactly.

    Both run on ``x`` in eval mode without gradients (their train/eval modes are restored afterwards): the
    original as ``reference(x)`` (default ``original(x)``), the staged model through every segment and only
    its last head. Raises :class:`~adaptnn.errors.UnsupportedModelError` when the logits differ at all: the
    cut changed what the model computes, so the architecture cannot be wrapped this way.

    Args:
        original: the model that was cut.
        staged: the staged model built from its modules.
        x: a small input batch on the model's device (the staged model's input spec is not checked).
        reference: how to call the original and get its logits (e.g. keyword inputs, ``.logits``).
        hint: what probably went wrong, appended to the message.
    """
    last = staged.num_exits - 1
    was_training = (original.training, staged.training)
    original.eval()
    staged.eval()
    try:
        with torch.no_grad():
            ref = original(x) if reference is None else reference(x)
            got = staged.walk(x, head=lambda k, head, state: head(state) if k == last else None)[-1]
    finally:
        original.train(was_training[0])
        staged.train(was_training[1])
    if ref.shape == got.shape and torch.equal(ref, got):
        return
    diff = f"max diff {(ref - got).abs().max().item():.3g}" if ref.shape == got.shape else f"shape {list(got.shape)}"
    raise UnsupportedModelError(
        f"cutting {type(original).__name__} into segments changes its last exit's logits ({diff}, expected shape "
        f"{list(ref.shape)}){': ' + hint if hint else ''}; this architecture is not supported"
    )
