"""Rebuild a registered model from a checkpoint: its ``model_spec`` (registry name + kwargs) and weights."""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import AdaptnnError, CheckpointError
from ..io.checkpoint import check_weights, load_checkpoint, load_weights
from ._registry import builds_on_meta, checkpoint_args, checkpoint_kwargs, create_model

__all__ = ["load_model"]


def load_model(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu", trust_code: bool = False
) -> nn.Module:
    """Rebuild the model saved in checkpoint ``path`` (from its ``model_spec``) and load its weights.

    The header is data, never a capability. Its ``model_spec`` may name a registered factory and set only the
    arguments that factory declares for checkpoints (:func:`~adaptnn.models.declare_checkpoint_args`), as JSON
    values of the declared type; it is checked in full before anything is built or imported. It may not name a
    local folder or a hub/prefixed model to read (``hf_staged``'s ``path`` must be a packaged model such as
    ``"all-MiniLM-L6-v2"``; ``timm_staged``/``torchvision_staged``'s ``arch`` a plain registry name), pass options
    through to a third-party loader beyond each factory's allow-list (``hf_kwargs``, ``timm_kwargs``,
    ``tv_kwargs``), or enable ``trust_remote_code`` anywhere: those need ``trust_code=True`` (the CLI's
    ``--trust_code``), which says you trust the file's author as you would trust their Python code. Download
    switches (``pretrained``, ``weights``) are always off on load: the weights come from the checkpoint. Factories
    declared ``build_on_meta`` are first built on the meta device and their tensor shapes compared with the file's,
    so a header cannot make adaptnn allocate a model larger than the weights it holds.

    Args:
        path: the ``.safetensors`` checkpoint.
        map_location: device the model is moved to.
        trust_code: allow the header's capabilities (local paths, pass-through options, remote code).

    Raises:
        CheckpointError: unreadable or malformed file, a refused ``model_spec`` (one line naming the key, the value
            and what was expected), or weights that do not fit the model.
    """
    ckpt = load_checkpoint(path)
    spec = ckpt.meta.get("model_spec")
    if spec is None:
        raise CheckpointError(f"{path} has no model_spec in its metadata, so the model cannot be rebuilt")
    name, saved_kwargs = spec["name"], spec.get("kwargs", {})  # shape checked by load_checkpoint
    kwargs = checkpoint_kwargs(name, saved_kwargs, trust_code=trust_code, where=f"{path}: model_spec")
    if builds_on_meta(name):
        _check_on_meta(name, kwargs, ckpt.model_state, path)
    model = _build(name, kwargs, path)
    load_weights(model, ckpt.model_state, source=str(path))
    model.model_spec = {"name": name, "kwargs": copy.deepcopy(saved_kwargs)}  # as saved: re-saving round-trips
    return model.to(map_location)


def _check_on_meta(name: str, kwargs: dict, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Build ``name`` on the meta device and compare its tensor shapes with the checkpoint's, before the real build.

    The build may register at most a few times as many modules, parameters and buffers as the file holds tensors,
    so a header cannot make it run away either. A meta build that fails for another reason (an architecture whose
    constructor reads tensor values) is skipped: the real build then reports its own errors.
    """
    limit = 8 * len(state) + 10_000
    meta_kwargs = {**kwargs, "verify": False} if "verify" in checkpoint_args(name) else kwargs
    try:
        with torch.device("meta"), _registration_budget(limit, path, len(state)):
            shell = _build(name, meta_kwargs, path)
    except _TooLarge:
        raise
    except CheckpointError as err:
        if isinstance(err.__cause__, AdaptnnError) or err.__cause__ is None:
            raise
        return  # the factory does not build on the meta device; the real build checks shapes when loading
    check_weights(shell, state, source=str(path))


class _TooLarge(CheckpointError):
    """A meta build registered far more modules and tensors than the checkpoint holds."""


@contextlib.contextmanager
def _registration_budget(limit: int, path: str | os.PathLike, tensors: int) -> Iterator[None]:
    """Abort (with :class:`_TooLarge`) a build in this thread that registers more than ``limit`` modules/tensors."""
    owner, count = threading.get_ident(), 0

    def hook(module: nn.Module, name: str, value: object) -> None:
        nonlocal count
        if threading.get_ident() == owner:
            count += 1
            if count > limit:
                raise _TooLarge(
                    f"{path}: its model_spec describes a model far larger than the {tensors} tensor(s) the file holds"
                )

    registry = torch.nn.modules.module
    handles = [
        registry.register_module_module_registration_hook(hook),
        registry.register_module_parameter_registration_hook(hook),
        registry.register_module_buffer_registration_hook(hook),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _build(name: str, kwargs: dict, path: str | os.PathLike) -> nn.Module:
    """``create_model`` on checked arguments; any failure of the factory is a bad checkpoint, reported in one line."""
    try:
        return create_model(name, **kwargs)
    except _TooLarge:
        raise
    except AdaptnnError as err:
        raise CheckpointError(f"{path}: cannot rebuild {name!r} from its model_spec: {_line(err)}") from None
    except Exception as err:  # the arguments came from a file: whatever the factory raises is the file's fault
        raise CheckpointError(
            f"{path}: building {name!r} from its model_spec failed ({type(err).__name__}: {_line(err)})"
        ) from err


def _line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."
