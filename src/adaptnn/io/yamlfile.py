"""Untrusted YAML read safely: every config adaptnn reads (a ``--config`` file, a run's ``config.yaml``) comes here.

A config is data, never code, and is small. The reader enforces that before anything else sees the text:

* at most :data:`MAX_BYTES` (1 MiB) of UTF-8 text, from a regular file (a FIFO or device would block or never end);
* the safe loader only (no ``!!python/...`` tags), and only plain values: mappings with text keys, lists,
  strings, numbers, booleans and null (``!!binary``, ``!!set``, ``!!timestamp`` ... are refused; dates stay text);
* **no anchors or aliases** (``&name`` / ``*name``, hence no ``<<: *name`` merges): an alias bomb ("billion
  laughs") is a few hundred bytes that expand to gigabytes, and configs have no need of them;
* at most :data:`MAX_DEPTH` levels of nesting and :data:`MAX_NODES` values;
* ``1e-3`` is a float (YAML 1.2 spelling, as the command line reads it), not the string YAML 1.1 makes of it.

Every refusal is a :class:`~adaptnn.errors.ConfigError` with a one-line message naming the source, what was
found and what is expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "check_yaml_text",
    "load_yaml_text",
    "read_yaml",
    "require_mapping",
]

#: largest config accepted, in bytes of UTF-8 text
MAX_BYTES = 1 << 20
#: deepest nesting of mappings and lists accepted (a run config is three levels deep)
MAX_DEPTH = 32
#: most YAML nodes (mappings, lists, scalars) accepted in one document
MAX_NODES = 10_000

_PLAIN = (str, int, float, bool, type(None))
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Refused(yaml.YAMLError):
    """A construct the config reader does not accept (turned into a ConfigError naming the source)."""


#: libyaml's parser when PyYAML was built with it (the same rules, many times faster), else the pure-Python one
_SafeBase: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DROPPED_TAGS = ("tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")


class _ConfigLoader(_SafeBase):  # type: ignore[misc, valid-type]
    """The safe loader with YAML 1.2 floats (``1e-3``) and no timestamps (dates stay text)."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in _DROPPED_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _check_events(text: str) -> None:
    """Refuse anchors and aliases, and bound the nesting depth and node count, from the parser's events alone.

    Runs before anything is composed or constructed, so an alias bomb is refused at its first anchor.
    """
    loader = _ConfigLoader(text)
    try:
        depth = nodes = 0
        while loader.check_event():
            event = loader.get_event()
            if not isinstance(event, yaml.NodeEvent):
                if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                    depth -= 1
                continue
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent) or event.anchor is not None:
                found = ("*" if isinstance(event, yaml.AliasEvent) else "&") + str(event.anchor)
                raise _Refused(
                    f"uses a YAML anchor/alias ({found} at line {line}); configs do not accept anchors or "
                    "aliases (an alias can expand exponentially): write the values out"
                )
            nodes += 1
            if nodes > MAX_NODES:
                raise _Refused(f"holds more than {MAX_NODES} values (at line {line})")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _Refused(f"is nested more than {MAX_DEPTH} levels deep (at line {line})")
    finally:
        loader.dispose()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A one-line description of a YAML error: the problem and where it is."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        context = f"{err.context}: " if err.context else ""
        return _one_line(f"{context}{err.problem}{where}")
    return _one_line(str(err))


def _check_plain(value: Any, where: str, source: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is plain data: text-keyed mappings, lists and scalars."""
    stack = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise ConfigError(
                        f"{source}: keys must be text, got {key!r} ({type(key).__name__}) in {at or '<root>'}"
                    )
                stack.append((sub, f"{at}.{key}" if at else key))
        elif isinstance(item, list):
            stack.extend((sub, f"{at}[{i}]") for i, sub in enumerate(item))
        elif not isinstance(item, _PLAIN):
            raise ConfigError(
                f"{source}: {at or '<root>'} holds a {type(item).__name__}; expected text, a number, a boolean, "
                "null, a list or a mapping"
            )


def check_yaml_text(text: str, source: str = "<string>") -> None:
    """Size, anchors/aliases, nesting depth and node count of YAML text, from the parser's events only.

    Nothing is composed or constructed, so this is safe to run before handing the text to another YAML reader.

    Raises:
        ConfigError: too large, not YAML, an anchor or alias, too deep or too many values; names ``source``.
    """
    if len(text) > MAX_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError(f"{source} is larger than {MAX_BYTES // 1024} KiB; a config is expected to be small")
    _guarded(_check_events, text, source)


def load_yaml_text(text: str, source: str = "<string>") -> Any:
    """Parse config text under the rules of the module docstring; ``None`` for an empty document.

    Raises:
        ConfigError: the text is too large, not YAML, or uses a refused construct; the message names ``source``.
    """
    check_yaml_text(text, source)
    data = _guarded(yaml.load, text, source, Loader=_ConfigLoader)  # a SafeLoader: builds plain data only
    _check_plain(data, "", source)
    return data


def _guarded(fn: Any, text: str, source: str, **kwargs: Any) -> Any:
    """``fn(text, **kwargs)`` with every parsing failure turned into a one-line :class:`ConfigError`."""
    try:
        return fn(text, **kwargs)
    except _Refused as err:
        raise ConfigError(f"{source} {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {_yaml_problem(err)}") from None
    except (ValueError, OverflowError) as err:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{source} cannot be read as YAML: {_one_line(str(err))[:200]}") from None


def read_yaml(path: str | Path, *, what: str = "config file") -> Any:
    """Read and parse the YAML file at ``path`` (see :func:`load_yaml_text`); ``None`` when it is empty.

    Raises:
        ConfigError: no regular file at ``path``, unreadable, larger than :data:`MAX_BYTES`, not UTF-8, or
            refused by :func:`load_yaml_text`. ``what`` names the file in messages.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no {what} at {path}")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a regular file")
    try:
        if path.stat().st_size > MAX_BYTES:
            size = path.stat().st_size
            raise ConfigError(
                f"{what} {path} is {size} bytes; the limit is {MAX_BYTES // 1024} KiB (a config is small)"
            )
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_BYTES // 1024} KiB (a config is small)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None
    return load_yaml_text(text, str(path))


def require_mapping(data: Any, source: str, expected: str = "a mapping") -> dict[str, Any]:
    """``data`` if it is a mapping; otherwise a :class:`ConfigError` saying what ``source`` held instead.

    ``None`` (an empty document, or one holding only comments) is reported as empty.
    """
    if data is None:
        raise ConfigError(f"{source} is empty; expected {expected}")
    if not isinstance(data, dict):
        shown = _one_line(repr(data))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ConfigError(f"{source} holds a {type(data).__name__} ({shown}); expected {expected}")
    return data
