"""Registry of named model variants, the ``create_model`` factory (timm-style), and what a checkpoint may ask of them.

A checkpoint names a registered factory and its keyword arguments (its ``model_spec``); that header is data from a
file, never a capability. :func:`checkpoint_kwargs` admits only the arguments a factory declares
(:class:`CheckpointArg`, derived from its signature unless declared), as JSON values of the declared type, and
refuses *capabilities* (a path to read, a download, options passed straight to a third-party loader, remote code)
unless the user passes ``trust_code=True``. Download switches (``pretrained=True``) are forced off: the weights come
from the checkpoint itself.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import json
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Union, overload

from ..errors import AdaptnnError, CheckpointError, ConfigError
from ..runtime.staged import StagedModel

__all__ = [
    "CheckpointArg",
    "NO_OVERRIDE",
    "SIGNATURE",
    "builds_on_meta",
    "checkpoint_args",
    "checkpoint_kwargs",
    "create_model",
    "declare_checkpoint_args",
    "list_models",
    "model_accepts",
    "model_spec",
    "options_of",
    "register_model",
    "resolve_model_name",
]

Factory = Callable[..., StagedModel]

#: ``CheckpointArg.on_load`` default: the header's value (or the factory's default) is used as is.
NO_OVERRIDE: Any = type("_NoOverride", (), {"__repr__": lambda self: "NO_OVERRIDE"})()
#: ``CheckpointArg.type`` default: the annotation of the factory's parameter.
SIGNATURE: Any = type("_Signature", (), {"__repr__": lambda self: "SIGNATURE"})()

#: limits on one value from a header (a checkpoint never needs more; they bound the work of checking it)
MAX_STR = 1024
MAX_LIST = 1024
MAX_DEPTH = 32
MAX_INT = 2**31 - 1


@dataclass(frozen=True)
class CheckpointArg:
    """How one factory argument may be read from a checkpoint header (see :func:`checkpoint_kwargs`).

    Attributes:
        type: the annotation a JSON value must match (``int``, ``str | None``, ``list[int]``, ``Literal[...]``,
            ``dict``); :data:`SIGNATURE` (default): the factory's annotation.
        trusted: the argument is a capability (it names a path, downloads, or passes options through unchecked), so
            a header may set it only under ``trust_code=True``. ``True`` (any value but ``None``/``False``/empty),
            or a predicate telling which values are capabilities (e.g. "not a packaged model name").
        why: what the capability does, for the refusal message.
        keys: for a dict argument, the keys a header may set and their own rules (other keys need ``trust_code``).
        on_load: value used whenever the model is rebuilt from a checkpoint, whatever the header says (e.g.
            ``pretrained=False``: the weights come from the checkpoint, so nothing is downloaded or read).
        bounds: inclusive ``(low, high)`` for a number (or every number of a list), for sizes the factory turns into
            work or memory that the meta-device shape check cannot bound (MSDNet's blocks x step layer schedule, the
            input of an adapter's lossless check); lifted by ``trust_code``.
    """

    type: Any = SIGNATURE
    trusted: bool | Callable[[Any], bool] = False
    why: str = "it can read files, download or run code"
    keys: Mapping[str, CheckpointArg] | None = None
    on_load: Any = NO_OVERRIDE
    bounds: tuple[float, float] | None = None

    def is_capability(self, value: Any) -> bool:
        """Whether ``value`` of this argument is a capability (needs ``trust_code=True``)."""
        if callable(self.trusted):
            return bool(self.trusted(value))
        return bool(self.trusted) and value is not None and value is not False and value != {} and value != []


_MODELS: dict[str, Factory] = {}
_CHECKPOINT_ARGS: dict[str, dict[str, CheckpointArg]] = {}
_ON_META: set[str] = set()

#: parameter-name words that mark a capability when a factory does not declare its arguments
_CAPABILITY_WORDS = frozenset(
    "path paths dir dirs directory file files filename url urls uri root cache token revision hub repo remote code "
    "checkpoint weights".split()
)
_DOWNLOAD_WORDS = frozenset({"pretrained", "download"})


@overload
def register_model(fn: Factory, /) -> Factory: ...


@overload
def register_model(
    fn: None = None,
    /,
    *,
    checkpoint_args: Mapping[str, CheckpointArg] | None = None,
    args_like: Callable[..., Any] | None = None,
    build_on_meta: bool = False,
) -> Callable[[Factory], Factory]: ...


def register_model(
    fn: Factory | None = None,
    /,
    *,
    checkpoint_args: Mapping[str, CheckpointArg] | None = None,
    args_like: Callable[..., Any] | None = None,
    build_on_meta: bool = False,
) -> Factory | Callable[[Factory], Factory]:
    """Register a keyword-only factory under its function name (``@register_model`` or ``@register_model(...)``).

    Args:
        fn: the factory; a duplicate name raises ``ValueError``.
        checkpoint_args: rules for arguments a checkpoint may set, overriding those derived from the signature
            (see :func:`declare_checkpoint_args`).
        args_like: the function a ``**kwargs`` factory forwards to; its parameters are allowed too.
        build_on_meta: the factory also builds on the meta device (with ``verify=False`` if it takes ``verify``),
            so :func:`~adaptnn.models.load_model` first checks the checkpoint's tensor shapes against a meta build
            whose size is bounded by the file's tensor count: a header asking for a huge model allocates nothing.
    """

    def decorate(factory: Factory) -> Factory:
        name = factory.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = factory
        declare_checkpoint_args(name, checkpoint_args=checkpoint_args, args_like=args_like, build_on_meta=build_on_meta)
        return factory

    return decorate if fn is None else decorate(fn)


def declare_checkpoint_args(
    name: str,
    *,
    checkpoint_args: Mapping[str, CheckpointArg] | None = None,
    args_like: Callable[..., Any] | None = None,
    build_on_meta: bool | None = None,
) -> None:
    """Set which arguments of the registered factory ``name`` a checkpoint header may set, and how.

    Derived from the signature (of the factory, plus ``args_like`` for a ``**kwargs`` factory): every named
    parameter, typed by its annotation. Without a declaration, a parameter is a capability when its annotation is a
    dict (options passed through) or its name contains a word such as ``path``, ``dir``, ``file``, ``url``,
    ``cache``, ``token``, ``revision``, ``hub``, ``code`` or ``weights``; a bool named ``pretrained``/``download``
    is forced off on load. Entries of ``checkpoint_args`` replace the derived ones (a :data:`SIGNATURE` type keeps
    the annotation). A ``**kwargs`` factory with no ``args_like`` accepts no argument from a checkpoint unless the
    user passes ``trust_code=True``.
    """
    if name not in _MODELS:
        raise ValueError(f"model {name!r} is not registered")
    derived = options_of(args_like) if args_like is not None else {}
    derived.update(options_of(_MODELS[name]))
    for key, arg in (checkpoint_args or {}).items():
        base = derived.get(key, CheckpointArg(type=Any))
        derived[key] = replace(arg, type=base.type) if arg.type is SIGNATURE else arg
    _CHECKPOINT_ARGS[name] = derived
    if build_on_meta is not None:
        (_ON_META.add if build_on_meta else _ON_META.discard)(name)


def options_of(*targets: Callable[..., Any], skip: Sequence[str] = ()) -> dict[str, CheckpointArg]:
    """:class:`CheckpointArg` rules derived from the keyword parameters of functions or classes (constructors).

    Used for factories and for option dicts (e.g. the ``head_kwargs`` of :func:`adaptnn.layers.heads.make_head`).
    A name taken by several targets with different annotations accepts any of them.
    """
    out: dict[str, CheckpointArg] = {}
    for target in targets:
        func = target.__init__ if isinstance(target, type) else target
        try:
            hints = typing.get_type_hints(func)
        except Exception:  # an annotation that does not resolve: such parameters take plain JSON values
            hints = {}
        for pname, param in inspect.signature(target).parameters.items():
            if pname in skip or param.kind not in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
                continue
            arg = _default_arg(pname, hints.get(pname, Any))
            if pname in out and out[pname].type != arg.type:
                arg = replace(arg, type=Union[out[pname].type, arg.type])  # noqa: UP007 (runtime Union of types)
            out[pname] = arg
    return out


def _default_arg(name: str, annotation: Any) -> CheckpointArg:
    words = set(name.lower().split("_"))
    if words & _DOWNLOAD_WORDS and _has(annotation, bool):
        return CheckpointArg(annotation, on_load=False)
    if words & _CAPABILITY_WORDS:
        return CheckpointArg(annotation, trusted=True, why="its name says it names a file, a download or code")
    if _has(annotation, dict):
        return CheckpointArg(annotation, trusted=True, why="it passes options through unchecked")
    return CheckpointArg(annotation)


def _has(annotation: Any, kind: type) -> bool:
    """Whether ``annotation`` (or one member of a union) is ``kind`` (``dict`` also matches mappings)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_has(a, kind) for a in typing.get_args(annotation))
    base = typing.get_origin(annotation) or annotation
    if kind is dict:
        return base in (dict, Mapping, typing.Mapping)
    return base is kind


def checkpoint_args(name: str) -> dict[str, CheckpointArg]:
    """The arguments of the registered factory ``name`` a checkpoint may set (a copy)."""
    return dict(_CHECKPOINT_ARGS.get(name, {}))


def builds_on_meta(name: str) -> bool:
    """Whether the factory ``name`` was declared to build on the meta device (see :func:`register_model`)."""
    return name in _ON_META


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching the fnmatch ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs: object) -> StagedModel:
    """Build the registered model ``name`` with ``kwargs`` overriding its defaults.

    The name and kwargs are attached as ``model.model_spec`` so checkpoints can rebuild it. This is the call for
    arguments the user wrote; arguments read from a file go through :func:`checkpoint_kwargs` first (as
    :func:`adaptnn.models.load_model` does).

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


def checkpoint_kwargs(
    name: object,
    kwargs: object,
    *,
    trust_code: bool = False,
    where: str = "model_spec",
    error: type[AdaptnnError] = CheckpointError,
) -> dict[str, Any]:
    """Check a ``model_spec`` read from a file and return the kwargs to build it with (nothing is built or imported).

    ``name`` must be a registered factory; every kwarg must be one the factory declares for checkpoints
    (:func:`declare_checkpoint_args`), with a JSON value of the declared type. Capabilities are refused unless
    ``trust_code``: arguments declared ``trusted`` (local paths, prefixed hub names, pass-through option dicts
    beyond their allow-listed keys) and ``trust_remote_code`` under any spelling at any depth. ``on_load`` values
    (``pretrained=False`` ...) replace the header's, with or without ``trust_code``.

    Args:
        name: the registry name from the header.
        kwargs: the kwargs from the header.
        trust_code: the user vouches for the file (``--trust_code``): capabilities are allowed.
        where: how the message names the spec (e.g. ``"run/model.safetensors: model_spec"``).
        error: the exception raised (``CheckpointError``; ``ConfigError`` for a config file).

    Raises:
        AdaptnnError: ``error``, one line naming the key, the value received and what was expected.
    """
    if not isinstance(name, str) or name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3) if isinstance(name, str) else []
        hint = f"did you mean {', '.join(close)}?" if close else f"expected one of {', '.join(list_models())}"
        raise error(f"{where}.name = {_show(name)} is not a registered model; {hint}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise error(f"{where}.kwargs = {_show(kwargs)}: expected an object of named arguments")
    if not trust_code:
        _refuse_remote_code(kwargs, f"{where}.kwargs", error)
    allowed = _CHECKPOINT_ARGS.get(name, {})
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        at = f"{where}.kwargs{_key(key)}"
        arg = allowed.get(key)
        if arg is None:
            if trust_code and model_accepts(name, key):
                _check_json(value, at, error)
                out[key] = value
                continue
            more = " (allowed with trust_code=True / --trust_code)" if model_accepts(name, key) else ""
            raise error(
                f"{at} = {_show(value)}: {name} takes no argument {_show(key)} from a checkpoint{more}; "
                f"it may set {sorted(allowed) or 'none'}"
            )
        out[key] = _admit(value, arg, at, trust_code, error)
    for key, arg in allowed.items():
        if arg.on_load is not NO_OVERRIDE:
            out[key] = arg.on_load
    return out


def _admit(value: Any, arg: CheckpointArg, at: str, trust_code: bool, error: type[AdaptnnError]) -> Any:
    if not _matches(value, arg.type, 0):
        raise error(f"{at} = {_show(value)}: expected {_describe(arg.type)}")
    if arg.bounds is not None and not trust_code:
        low, high = arg.bounds
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, (int, float)) and not low <= v <= high for v in numbers):
            raise error(f"{at} = {_show(value)}: expected numbers in [{low}, {high}]")
    if arg.keys is not None and isinstance(value, dict):
        for key, sub in value.items():
            rule = arg.keys.get(key)
            if rule is None:
                if trust_code:
                    continue
                raise error(
                    f"{at}{_key(key)} = {_show(sub)}: not an option a checkpoint may set (allowed: "
                    f"{sorted(arg.keys)}); other options are passed through unchecked, so they need "
                    "trust_code=True / --trust_code"
                )
            _admit(sub, rule, f"{at}{_key(key)}", trust_code, error)
        return value
    if not trust_code and arg.is_capability(value):
        raise error(
            f"{at} = {_show(value)}: refused because {arg.why}; a checkpoint may set it only when you trust it "
            "(trust_code=True / --trust_code)"
        )
    return value


_REMOTE_CODE = re.compile(r"remotecode|trustcode")


def _refuse_remote_code(obj: Any, at: str, error: type[AdaptnnError]) -> None:
    """Refuse ``trust_remote_code`` (any spelling: ``trustRemoteCode``, ``trust-remote-code`` ...) at any depth."""
    stack = [(obj, at, 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise error(f"{path}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            for key, value in item.items():
                norm = re.sub(r"[^a-z]", "", str(key).lower())
                if _REMOTE_CODE.search(norm) and value is not None and value is not False:
                    raise error(
                        f"{path}{_key(key)} = {_show(value)}: a checkpoint cannot enable running code from a model "
                        "folder or hub; load it with trust_code=True / --trust_code only if you trust its author"
                    )
                stack.append((value, f"{path}{_key(key)}", depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((value, f"{path}[{i}]", depth + 1) for i, value in enumerate(item))


def _check_json(value: Any, at: str, error: type[AdaptnnError]) -> None:
    if not _is_json(value, 0):
        raise error(f"{at} = {_show(value)}: expected a JSON value (numbers, strings, bools, null, lists, objects)")


def _is_json(value: Any, depth: int) -> bool:
    if depth > MAX_DEPTH:
        return False
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= MAX_INT
    if isinstance(value, str):
        return len(value) <= MAX_STR
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return len(value) <= MAX_LIST and all(_is_json(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return len(value) <= MAX_LIST and all(isinstance(k, str) and _is_json(v, depth + 1) for k, v in value.items())
    return False


def _matches(value: Any, tp: Any, depth: int) -> bool:
    """Whether the JSON ``value`` fits the annotation ``tp`` (unknown annotations fit nothing)."""
    if depth > MAX_DEPTH:
        return False
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object or tp is SIGNATURE:  # undeclared: a scalar or a list of scalars
        return _is_json(value, depth) and not isinstance(value, dict)
    if tp is None or tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, a, depth) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str) and len(value) <= MAX_STR
    base = origin or tp
    if base in (list, tuple, Sequence, typing.Sequence):
        if not isinstance(value, (list, tuple)) or len(value) > MAX_LIST:
            return False
        if base is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a, depth + 1) for v, a in zip(value, args, strict=True))
        elem = args[0] if args else Any
        return all(_matches(v, elem, depth + 1) for v in value)
    if base in (dict, Mapping, typing.Mapping):
        if not isinstance(value, dict) or len(value) > MAX_LIST or not all(isinstance(k, str) for k in value):
            return False
        elem = args[1] if len(args) == 2 else None
        return all(_is_json(v, depth + 1) if elem is None else _matches(v, elem, depth + 1) for v in value.values())
    return False


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object or tp is SIGNATURE:
        return "a JSON number, string, bool, null or list of them"
    if tp is None or tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    named = {
        bool: "a bool",
        int: "an integer (32-bit)",
        float: "a finite number",
        str: f"a string (<= {MAX_STR} chars)",
    }
    if tp in named:
        return named[tp]
    base = origin or tp
    if base in (list, tuple, Sequence, typing.Sequence):
        return f"a list (<= {MAX_LIST} items)" + (f" of {_describe(args[0])}" if args else "")
    if base in (dict, Mapping, typing.Mapping):
        return "an object"
    return f"a value of type {getattr(tp, '__name__', tp)} (not readable from a checkpoint)"


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 60, 60, 6, 4, 3


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _key(key: object) -> str:
    """``.name`` for a plain key, ``[<repr>]`` for anything else (keys come from the file: never raw text)."""
    return f".{key}" if isinstance(key, str) and _IDENTIFIER.fullmatch(key) else f"[{_show(key)}]"


def _show(value: Any) -> str:
    """A short one-line repr of a value from a header."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile object's __repr__ (only reachable from Python callers)
        text = f"<{type(value).__name__}>"
    return text.replace("\n", "\\n")


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
