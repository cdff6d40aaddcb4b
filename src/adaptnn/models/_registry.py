"""Registry of named model variants and the ``create_model`` factory (timm-style)."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import json
from collections.abc import Callable

from ..errors import ConfigError
from ..runtime.staged import StagedModel

__all__ = ["register_model", "create_model", "list_models", "model_accepts", "model_spec", "resolve_model_name"]

_MODELS: dict[str, Callable[..., StagedModel]] = {}


def register_model(fn: Callable[..., StagedModel]) -> Callable[..., StagedModel]:
    """Register a keyword-only factory under its function name; a duplicate name raises."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching the fnmatch ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs: object) -> StagedModel:
    """Build the registered model ``name`` with ``kwargs`` overriding its defaults.

    The name and kwargs are attached as ``model.model_spec`` so checkpoints can rebuild the model.

    Raises:
        ConfigError: unknown name (with close matches) or an argument the factory does not take.
    """
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known models: {', '.join(list_models())}"
        raise ConfigError(f"unknown model {name!r}{hint}")
    fn = _MODELS[name]
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ConfigError(f"model {name!r} got unknown argument(s) {unknown}; it accepts {sorted(params)}")
    try:
        json.dumps(kwargs)
    except TypeError as err:
        raise ConfigError(
            f"model arguments must be JSON-serialisable (they are saved with checkpoints): {err}"
        ) from None
    try:
        model = fn(**kwargs)
    except TypeError as err:
        raise ConfigError(f"model {name!r}: {err}") from err
    model.model_spec = {"name": name, "kwargs": dict(kwargs)}
    return model


def model_accepts(name: str, argument: str) -> bool:
    """Whether the factory of model ``name`` takes keyword ``argument`` (or arbitrary keywords)."""
    fn = _MODELS.get(name)
    if fn is None:
        return False
    params = inspect.signature(fn).parameters
    return argument in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


_PREFIXES = {
    "timm": ("timm_staged", "arch"),
    "torchvision": ("torchvision_staged", "arch"),
    "tv": ("torchvision_staged", "arch"),
    "hf": ("hf_staged", "path"),
}


def resolve_model_name(model: str) -> tuple[str, dict]:
    """``(registered factory, its naming kwargs)`` for a user-facing model string.

    Accepts a registered name, ``timm:NAME``, ``torchvision:NAME`` (or ``tv:NAME``), ``hf:PATH``, or a plain
    timm name that is not a registered adaptnn model. Unknown names are passed through so that
    :func:`create_model` reports them with close matches.
    """
    prefix, sep, rest = model.partition(":")
    if sep:
        if prefix not in _PREFIXES or not rest:
            raise ConfigError(f"unknown model prefix in {model!r}; use timm:NAME, torchvision:NAME or hf:PATH")
        factory, key = _PREFIXES[prefix]
        return factory, {key: rest}
    if model in _MODELS:
        return model, {}
    try:
        import timm
    except ImportError:
        return model, {}
    if timm.is_model(model):
        return "timm_staged", {"arch": model}
    return model, {}


def model_spec(model: StagedModel) -> dict:
    """The ``{"name", "kwargs"}`` a model was created with (raises for models not made by create_model)."""
    spec = getattr(model, "model_spec", None)
    if spec is None:
        raise ConfigError(
            "this model was not built with adaptnn.create_model, so it cannot be rebuilt from a checkpoint"
        )
    return spec
