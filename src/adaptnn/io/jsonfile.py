"""Strict JSON files: non-finite floats become ``null``, tensors and arrays become lists, writes are atomic."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

__all__ = ["to_jsonable", "write_json"]


def to_jsonable(obj: Any) -> Any:
    """Strict-JSON version of ``obj``: non-finite floats become ``None``, tensors/arrays become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # torch / numpy
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON, atomically."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")
