"""Registry of the named state types (NamedTuples) a state may hold, by a stable name.

Segments may pass typed states (a ViT's :class:`~adaptnn.layers.tokens.TokenState`) rather than plain tuples.
Exports describe a state as data (``manifest.json``); to rebuild the type on the other side they name it, and
only types registered here by the library's own modules can be named: a manifest never makes anything import a
class. A field may be declared a *constant* (an integer of the traced graph, such as the number of protected
prefix tokens): it is recorded as a number with an allowed range instead of a tensor.

It sits in the runtime (the bottom layer) so the module defining a state type (e.g. ``layers.tokens``) and the
export reading it can both import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["StateType", "register_state_type", "registered_state_type", "state_type_of"]


@dataclass(frozen=True)
class StateType:
    """A registered NamedTuple state type.

    Attributes:
        name: the stable name exports record (not the class's import path).
        cls: the NamedTuple class.
        constants: field name -> inclusive ``(low, high)`` range of an integer constant field.
    """

    name: str
    cls: type
    constants: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def fields(self) -> tuple[str, ...]:
        """The NamedTuple's fields, in order."""
        return tuple(self.cls._fields)  # type: ignore[attr-defined]

    def check_constant(self, name: str, value: Any) -> int:
        """``value`` if it is an integer within the field's range; ``ValueError`` (one line) otherwise."""
        low, high = self.constants[name]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{self.name}.{name} must be an integer in {low}..{high}, got {value!r}")
        return value

    def build(self, items: list[Any]) -> Any:
        """An instance from its field values, in field order."""
        return self.cls(*items)


_BY_NAME: dict[str, StateType] = {}
_BY_CLASS: dict[type, StateType] = {}


def register_state_type(name: str, cls: type, constants: Mapping[str, tuple[int, int]] | None = None) -> type:
    """Register the NamedTuple ``cls`` under ``name``; returns ``cls``. Registering the same pair again is a no-op.

    Raises:
        ConfigError: ``cls`` is not a NamedTuple, a constant names no field, or ``name``/``cls`` is taken.
    """
    fields = getattr(cls, "_fields", None)
    if not (isinstance(cls, type) and issubclass(cls, tuple) and isinstance(fields, tuple)):
        raise ConfigError(f"state type {name!r} must be a NamedTuple class, got {cls!r}")
    constants = dict(constants or {})
    unknown = [c for c in constants if c not in fields]
    if unknown:
        raise ConfigError(f"state type {name!r}: constants {unknown} are not fields of {cls.__name__} {list(fields)}")
    entry = StateType(name, cls, {k: (int(lo), int(hi)) for k, (lo, hi) in constants.items()})
    known = _BY_NAME.get(name) or _BY_CLASS.get(cls)
    if known is not None:
        if known != entry:
            raise ConfigError(f"state type {name!r} ({cls.__name__}) clashes with the registered {known.name!r}")
        return cls
    _BY_NAME[name] = entry
    _BY_CLASS[cls] = entry
    return cls


def registered_state_type(name: object) -> StateType:
    """The type registered as ``name``; ``ValueError`` (one line) for any other value."""
    entry = _BY_NAME.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"unknown state type {name!r} (known: {sorted(_BY_NAME)})")
    return entry


def state_type_of(value: object) -> StateType | None:
    """The registration of ``value``'s exact type, ``None`` if it has none."""
    return _BY_CLASS.get(type(value))
