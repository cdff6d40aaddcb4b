"""Checkpoints: safetensors files with a JSON description, written atomically.

A checkpoint is ONE ``.safetensors`` file. Its tensors are the model's ``state_dict`` (keys prefixed
``model.``) plus any extra tensors (optimizer moments, RNG states; prefixed by their group). Its header
metadata holds ``{"format": "adaptnn-checkpoint", "version": 1, "meta": <JSON>}`` where the JSON has
the model spec (registry name + kwargs), so :func:`adaptnn.models.load_model` rebuilds the model with no other input.
A readable copy of the JSON is written next to it (``<name>.json``); the safetensors header is the source
of truth, so the pair can never disagree in a way that matters.

Writes go to a temporary file in the same directory, are fsynced, then renamed over the target, so a
crash mid-write leaves the previous checkpoint intact.

A header is data, never a capability. Reading one parses JSON and nothing else: no pickle, no import, no file
other than the checkpoint. :func:`load_checkpoint` refuses a malformed header in one line (a
:class:`~adaptnn.errors.CheckpointError`): metadata that is not JSON, larger than :data:`MAX_META_CHARS`, nested
deeper than :data:`MAX_META_DEPTH`, not an object, or a ``model_spec`` that is not ``{"name": str, "kwargs":
{...}}``. What a ``model_spec`` may ask of a model factory (declared, typed arguments only; no paths, downloads,
pass-through options or remote code without the user's ``trust_code``) is checked by
:func:`adaptnn.models.load_model` before anything is built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from ..errors import CheckpointError
from .atomic import atomic_write_bytes, atomic_write_text

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "check_weights",
    "load_weights",
    "pack_tensors",
    "unpack_tensors",
]

FORMAT = "adaptnn-checkpoint"
VERSION = 1
#: largest JSON metadata read (characters); optimizer and strategy state stay far below it
MAX_META_CHARS = 32 * 1024 * 1024
#: deepest nesting of the JSON metadata (lists and objects)
MAX_META_DEPTH = 64


@dataclass
class Checkpoint:
    """A loaded checkpoint: model weights, extra tensor groups and the JSON metadata."""

    model_state: dict[str, Tensor]
    meta: dict[str, Any]
    extra: dict[str, dict[str, Tensor]] = field(default_factory=dict)


def pack_tensors(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Replace every tensor in a nested dict/list ``obj`` by a reference, moving it into ``tensors``.

    Returns a JSON-serialisable structure; dicts with non-string keys (optimizer state uses ints) are
    encoded so that :func:`unpack_tensors` restores the exact keys.
    """
    if isinstance(obj, Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, pack_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        packed = [pack_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return packed if isinstance(obj, list) else {"__tuple__": packed}
    return obj


def unpack_tensors(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`pack_tensors`.

    Raises:
        CheckpointError: a reference to a missing tensor or a malformed encoded dict/tuple.
    """
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            key = obj["__tensor__"]
            if not isinstance(key, str) or key not in tensors:
                raise CheckpointError(f"checkpoint is missing tensor {str(key)[:80]!r}")
            return tensors[key]
        if set(obj) == {"__items__"}:
            items = obj["__items__"]
            if not isinstance(items, list) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], (str, int, float, bool)) for p in items
            ):
                raise CheckpointError("checkpoint metadata: '__items__' must be a list of [key, value] pairs")
            return {k: unpack_tensors(v, tensors) for k, v in items}
        if set(obj) == {"__tuple__"}:
            if not isinstance(obj["__tuple__"], list):
                raise CheckpointError("checkpoint metadata: '__tuple__' must be a list")
            return tuple(unpack_tensors(v, tensors) for v in obj["__tuple__"])
        return {k: unpack_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack_tensors(v, tensors) for v in obj]
    return obj


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | dict[str, Tensor],
    meta: dict[str, Any],
    extra: dict[str, dict[str, Tensor]] | None = None,
) -> Path:
    """Save weights (+ extra tensor groups) and JSON ``meta`` atomically to ``path`` (``.safetensors``).

    Args:
        path: target file; a ``.json`` with the same stem is written next to it.
        model: a module (its ``state_dict`` is saved; unwrap DDP/compile first) or a state dict.
        meta: JSON-serialisable description; should hold ``model_spec`` for :func:`adaptnn.models.load_model`.
        extra: named groups of tensors, e.g. ``{"optim": {...}}``.
    """
    path = Path(path)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors: dict[str, Tensor] = {}
    for key, value in state.items():
        tensors[f"model.{key}"] = value.detach().cpu().contiguous().clone()
    for group, group_tensors in (extra or {}).items():
        if group == "model" or "." in group:
            raise ValueError(f"invalid extra tensor group name {group!r}")
        for key, value in group_tensors.items():
            tensors[f"{group}.{key}"] = value.detach().cpu().contiguous().clone()
    meta_json = json.dumps(meta, sort_keys=True)
    header = {"format": FORMAT, "version": str(VERSION), "meta": meta_json}
    atomic_write_bytes(path, safetensors_save(tensors, metadata=header))
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and JSON only; nothing is executed).

    Raises:
        CheckpointError: missing, truncated/corrupt, not an adaptnn checkpoint, or a malformed header (see the
            module docstring), in one line.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the .safetensors checkpoint file inside it")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not an adaptnn checkpoint (its metadata has no "
            f"format={FORMAT!r}); load foreign weights with adaptnn.io.load_weights"
        )
    version = str(header.get("version", "0"))
    if not version.isdigit() or len(version) > 6:
        raise CheckpointError(f"{path}: checkpoint format version {version[:40]!r} is not a number")
    if int(version) > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}; this adaptnn reads {VERSION}")
    meta = parse_meta(header.get("meta"), source=str(path))
    model_state: dict[str, Tensor] = {}
    extra: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        group, _, name = key.partition(".")
        if group == "model":
            model_state[name] = value
        else:
            extra.setdefault(group, {})[name] = value
    return Checkpoint(model_state=model_state, meta=meta, extra=extra)


def parse_meta(text: object, *, source: str = "checkpoint") -> dict[str, Any]:
    """The JSON metadata of a checkpoint header, checked: an object, bounded in size and depth, and a
    well-formed ``model_spec`` (``{"name": str, "kwargs": {...}}``) if it has one.

    Raises:
        CheckpointError: one line saying what is wrong.
    """
    if not isinstance(text, str):
        raise CheckpointError(f"{source}: the checkpoint header has no JSON metadata ('meta')")
    if len(text) > MAX_META_CHARS:
        raise CheckpointError(f"{source}: checkpoint metadata is {len(text)} characters; at most {MAX_META_CHARS}")
    try:
        meta = json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{source}: checkpoint metadata is nested deeper than {MAX_META_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, over-long integers
        reason = " ".join(str(err).split())
        raise CheckpointError(f"{source}: checkpoint metadata is not valid JSON: {reason}") from None
    _check_nesting(meta, source)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: checkpoint metadata must be a JSON object, got {type(meta).__name__}")
    spec = meta.get("model_spec")
    if spec is not None:
        if not isinstance(spec, dict) or set(spec) - {"name", "kwargs"} or not isinstance(spec.get("name"), str):
            raise CheckpointError(
                f'{source}: model_spec must be an object {{"name": str, "kwargs": object}}, got {json.dumps(spec)[:80]}'
            )
        if not isinstance(spec.get("kwargs", {}), dict):
            raise CheckpointError(
                f"{source}: model_spec.kwargs must be an object, got {json.dumps(spec['kwargs'])[:80]}"
            )
    return meta


def _check_nesting(meta: Any, source: str) -> None:
    """Refuse JSON nested deeper than :data:`MAX_META_DEPTH` (iteratively: nothing later recurses too deep)."""
    stack = [(meta, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_META_DEPTH:
            raise CheckpointError(f"{source}: checkpoint metadata is nested deeper than {MAX_META_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _mismatch(own: dict[str, Tensor], state: dict[str, Tensor]) -> list[str]:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s) e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[:3]}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) e.g. {shapes[:3]}")
    return parts


def check_weights(model: nn.Module, state: dict[str, Tensor], *, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``model``'s keys and shapes (loads nothing).

    Works on a model built on the meta device, to check a checkpoint before allocating the real model.
    """
    parts = _mismatch(model.state_dict(), state)
    if parts:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))


def load_weights(model: nn.Module, state: dict[str, Tensor], *, source: str = "checkpoint") -> None:
    """``load_state_dict`` with an error that lists missing, unexpected and mis-shaped keys."""
    check_weights(model, state, source=source)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # e.g. a dtype that cannot be copied into the parameter
        raise CheckpointError(f"{source} does not load into the model: {' '.join(str(err).split())[:300]}") from None
