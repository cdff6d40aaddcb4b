"""Training strategies for multi-exit models: losses over the list of per-exit logits.

``get(name, **options)`` returns a callable ``(exit_logits: list[Tensor], targets: Tensor) -> Tensor``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import Tensor

from ..errors import ConfigError
from .joint import JointLoss

__all__ = ["JointLoss", "get", "available"]

_STRATEGIES: dict[str, Callable[..., Callable[[list[Tensor], Tensor], Tensor]]] = {"joint": JointLoss}


def available() -> list[str]:
    """Names accepted by :func:`get`."""
    return sorted(_STRATEGIES)


def get(name: str, **options: object) -> Callable[[list[Tensor], Tensor], Tensor]:
    """Build the strategy ``name`` with ``options`` (e.g. ``get("joint", weights="linear")``)."""
    if name not in _STRATEGIES:
        close = difflib.get_close_matches(name, available(), n=2)
        raise ConfigError(
            f"unknown strategy {name!r}; available: {available()}" + (f" (did you mean {close[0]}?)" if close else "")
        )
    try:
        return _STRATEGIES[name](**options)
    except TypeError as err:
        raise ConfigError(f"strategy {name!r}: {err}") from err
