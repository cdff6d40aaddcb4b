"""``manifest.json`` of an ONNX export: written atomically, read strictly, never trusted to name outside files.

The manifest describes the exported files (one per stage for the ``stages`` mode), the exit MACs, the
calibrated thresholds and temperatures, the input spec and the layout of the state passed between stages (a
small JSON tree, see :func:`state_tree`). It is data: a manifest naming an absolute path or a path with ``..``
is refused, so a runner can only ever load files inside the export directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ConfigError
from ..io import write_json
from ..layers import tokens as _tokens  # noqa: F401  (registers TokenState, the ViTs' state)
from ..models import vit as _vit  # noqa: F401  (registers CascadeState, DVT's state)
from ..runtime.state_types import registered_state_type, state_type_of

__all__ = [
    "MANIFEST_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "write_manifest",
    "read_manifest",
    "safe_member",
    "state_tree",
    "flatten_state",
    "rebuild_state",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "adaptnn-onnx"
FORMAT_VERSION = 1
_MAX_BYTES = 4 * 1024 * 1024


def state_tree(state: Any) -> tuple[dict[str, Any], list[Any]]:
    """``(tree, tensors)``: a JSON description of a nested state and its tensors in tree order.

    Leaves are ``{"kind": "tensor", "index": i}``; containers ``tuple``/``list`` (``items``) and ``dict``
    (``keys`` and ``items``); ``None`` is ``{"kind": "none"}``. A NamedTuple registered with
    :func:`~adaptnn.runtime.state_types.register_state_type` is ``{"kind": "named", "type": name, "fields": [...],
    "items": [...]}``, its constant fields (e.g. ``TokenState.prefix``) ``{"kind": "const", "value": n}``: numbers
    baked into the traced graph, not tensors. Anything else cannot cross an ONNX boundary.
    """
    tensors: list[Any] = []

    def walk(node: Any) -> dict[str, Any]:
        if hasattr(node, "shape") and hasattr(node, "dtype"):
            tensors.append(node)
            return {"kind": "tensor", "index": len(tensors) - 1}
        if node is None:
            return {"kind": "none"}
        if hasattr(node, "_fields") and isinstance(node, tuple):
            entry = state_type_of(node)
            if entry is None:
                raise ConfigError(
                    f"the model's state holds a {type(node).__name__}, a NamedTuple no adaptnn module registered as "
                    "an exportable state type (adaptnn.runtime.state_types.register_state_type)"
                )
            items = []
            for name, value in zip(entry.fields, node, strict=True):
                if name in entry.constants:
                    try:
                        items.append({"kind": "const", "value": entry.check_constant(name, value)})
                    except ValueError as err:
                        raise ConfigError(f"the model's state cannot be exported: {err}") from None
                else:
                    items.append(walk(value))
            return {"kind": "named", "type": entry.name, "fields": list(entry.fields), "items": items}
        if isinstance(node, (tuple, list)):
            return {"kind": "tuple" if isinstance(node, tuple) else "list", "items": [walk(n) for n in node]}
        if isinstance(node, dict):
            keys = list(node)
            if not all(isinstance(k, str) for k in keys):
                raise ConfigError(f"state dict keys must be strings to be exported, got {keys!r}")
            return {"kind": "dict", "keys": keys, "items": [walk(node[k]) for k in keys]}
        raise ConfigError(f"the model's state holds a {type(node).__name__}; only tensors and containers export")

    return walk(state), tensors


def flatten_state(state: Any) -> list[Any]:
    """The tensors of ``state`` in the order :func:`state_tree` numbers them."""
    return state_tree(state)[1]


def rebuild_state(tree: dict[str, Any], tensors: list[Any]) -> Any:
    """Inverse of :func:`state_tree`: the nested state with ``tensors`` at its leaves."""
    kind = tree["kind"]
    if kind == "tensor":
        return tensors[tree["index"]]
    if kind == "none":
        return None
    if kind == "tuple":
        return tuple(rebuild_state(t, tensors) for t in tree["items"])
    if kind == "list":
        return [rebuild_state(t, tensors) for t in tree["items"]]
    if kind == "dict":
        return {k: rebuild_state(t, tensors) for k, t in zip(tree["keys"], tree["items"], strict=True)}
    if kind == "named":
        try:
            _check_tree(tree, len(tensors), "state")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        entry = registered_state_type(tree["type"])
        return entry.build([t["value"] if t["kind"] == "const" else rebuild_state(t, tensors) for t in tree["items"]])
    raise ConfigError(f"unknown state node kind {kind!r}")


def _check_tree(tree: Any, count: int, where: str) -> None:
    if not isinstance(tree, dict) or "kind" not in tree:
        raise ValueError(f"{where}: a state node must be an object with a kind")
    kind = tree["kind"]
    if kind == "tensor":
        index = tree.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
            raise ValueError(f"{where}: tensor index {index!r} out of range 0..{count - 1}")
    elif kind in ("tuple", "list", "dict"):
        items = tree.get("items")
        if not isinstance(items, list):
            raise ValueError(f"{where}: {kind} node without items")
        if kind == "dict":
            keys = tree.get("keys")
            if not isinstance(keys, list) or len(keys) != len(items) or not all(isinstance(k, str) for k in keys):
                raise ValueError(f"{where}: dict node keys must be strings, one per item")
        for item in items:
            _check_tree(item, count, where)
    elif kind == "named":
        entry = registered_state_type(tree.get("type"))
        items = tree.get("items")
        if tree.get("fields") != list(entry.fields) or not isinstance(items, list) or len(items) != len(entry.fields):
            raise ValueError(f"{where}: {entry.name} node must list the fields {list(entry.fields)} and one item each")
        for name, item in zip(entry.fields, items, strict=True):
            is_const = isinstance(item, dict) and item.get("kind") == "const"
            if name in entry.constants:
                if not is_const:
                    raise ValueError(f"{where}: {entry.name}.{name} must be a constant node")
                entry.check_constant(name, item.get("value"))
            elif is_const:
                raise ValueError(f"{where}: {entry.name}.{name} is not a constant field")
            else:
                _check_tree(item, count, where)
    elif kind == "const":
        raise ValueError(f"{where}: a constant node outside a registered state type's constant field")
    elif kind != "none":
        raise ValueError(f"{where}: unknown state node kind {kind!r}")


def safe_member(export_dir: str | Path, name: object) -> Path:
    """``export_dir / name`` for a plain relative file name; absolute paths and ``..`` are refused.

    Raises:
        ConfigError: the name is not a string, is absolute, contains ``..``, or resolves outside ``export_dir``.
    """
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ConfigError(f"manifest file name {name!r} is not a plain relative path")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or Path(name).is_absolute():
        raise ConfigError(f"manifest file name {name!r} points outside the export directory (absolute or '..')")
    root = Path(export_dir).resolve()
    path = (root / pure).resolve()
    if root not in path.parents:
        raise ConfigError(f"manifest file name {name!r} resolves outside the export directory {root}")
    return path


def _number_list(value: Any, where: str, allow_null: bool) -> list[float | None]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list")
    out: list[float | None] = []
    for v in value:
        if v is None and allow_null:
            out.append(None)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
        else:
            raise ValueError(f"{where} holds {v!r}, expected finite numbers" + (" or null" if allow_null else ""))
    return out


def write_manifest(export_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` into ``export_dir`` atomically (non-finite floats become ``null``)."""
    path = Path(export_dir) / MANIFEST_NAME
    write_json(path, manifest)
    return path


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of ``export_dir`` (a ``stages`` export).

    Raises:
        ConfigError: one line when the file is missing, not JSON, of another format, or inconsistent, or when a
            file it names would lie outside the export directory.
    """
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_NAME
    fix = "export the run again with `adaptnn export RUN_DIR --format onnx`"
    try:
        if path.stat().st_size > _MAX_BYTES:
            raise ValueError(f"larger than {_MAX_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, found {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {data.get('format_version')!r} is not {FORMAT_VERSION}")
        if data.get("mode") != "stages":
            raise ValueError(f"mode is {data.get('mode')!r}; this reader handles 'stages' exports")
        num_exits = data["num_exits"]
        if not isinstance(num_exits, int) or isinstance(num_exits, bool) or num_exits < 1:
            raise ValueError(f"num_exits {num_exits!r} is not a positive integer")
        macs = _number_list(data["exit_macs"], "exit_macs", allow_null=False)
        thresholds = _number_list(data["thresholds"], "thresholds", allow_null=True)
        if len(macs) != num_exits or len(thresholds) != num_exits - 1:
            raise ValueError(f"{len(macs)} exit MACs and {len(thresholds)} thresholds for {num_exits} exits")
        by_length = data.get("exit_macs_by_length")
        if by_length is not None:
            dim, coeffs = by_length["dim"], by_length["coefficients"]
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1 or not isinstance(coeffs, list):
                raise ValueError("exit_macs_by_length needs a dim >= 1 and coefficients")
            if len(coeffs) != num_exits or any(len(_number_list(c, "coefficients", False)) != 3 for c in coeffs):
                raise ValueError(f"exit_macs_by_length must give 3 coefficients for each of {num_exits} exits")
        inp = data["input"]
        if (
            not isinstance(inp, dict)
            or inp.get("dtype") not in ("float32", "int64")
            or not isinstance(inp.get("shape"), list)
        ):
            raise ValueError("input must give a dtype (float32 or int64) and a per-sample shape")
        stages = data["stages"]
        if not isinstance(stages, list) or len(stages) != num_exits:
            raise ValueError(f"stages must list {num_exits} entries")
    except FileNotFoundError:
        raise ConfigError(f"no {MANIFEST_NAME} in {export_dir}; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise ConfigError(f"{path} is not a readable adaptnn export manifest ({reason}); {fix}") from None
    for k, stage in enumerate(stages):
        try:
            if not isinstance(stage, dict):
                raise ValueError("not an object")
            stage["path"] = safe_member(export_dir, stage.get("file"))
            n_in, n_out = stage["num_state_in"], stage["num_state_out"]
            for n in (n_in, n_out):
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    raise ValueError(f"state tensor count {n!r}")
            _check_tree(stage["state_in"], n_in, "state_in")
            if stage["state_out"] is not None:
                _check_tree(stage["state_out"], n_out, "state_out")
        except (ValueError, KeyError, TypeError) as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
            raise ConfigError(f"{path}: stage {k} is malformed ({reason}); {fix}") from None
        if not stage["path"].is_file():
            raise ConfigError(f"{path}: stage {k} file {stage['file']!r} is missing; {fix}")
    return data
