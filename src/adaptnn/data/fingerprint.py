"""Fingerprints of a dataset's samples, recorded in a run's ``splits.json`` and compared by later commands.

A fingerprint is ``{"kind", "sha256", "parts": {name: {"sha256", "bytes", ...}}}``; ``sha256`` hashes the parts.

* image folders (``kind="image_folder"``): one part per class folder ``<split>/<class>`` with its file count,
  total bytes and the sha256 of its sorted ``name<TAB>size`` lines: names and sizes, not contents, all from
  the directory scan the loader does anyway (no file is opened);
* IDX files (``"idx"``, Fashion-MNIST): one part per file, named without ``.gz``: sha256 of the decoded array
  (dtype, shape, bytes), so a gzipped and a plain copy of the same data agree;
* CIFAR in torchvision's python format (``"cifar_files"``): one part per batch/meta file: sha256 of its bytes;
* digits (``"arrays"``): the train and test arrays (images and labels) after the seeded train/test split.

Nothing is cached: each command fingerprints the data it has just loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .folder import FolderSplit

__all__ = ["array_fingerprint", "file_fingerprint", "fingerprint_changes", "folder_fingerprint", "make_fingerprint"]

#: at most this many differing parts are named in a message; the rest are counted
MAX_NAMED_CHANGES = 6


def make_fingerprint(kind: str, parts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"kind", "sha256", "parts"}`` with ``sha256`` over the kind and the canonical JSON of the parts."""
    canonical = json.dumps({"kind": kind, "parts": parts}, sort_keys=True, separators=(",", ":"))
    return {"kind": kind, "sha256": hashlib.sha256(canonical.encode()).hexdigest(), "parts": dict(parts)}


def _encode(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")  # file names that are not UTF-8 still hash


def folder_fingerprint(splits: Sequence[FolderSplit]) -> dict[str, Any]:
    """Fingerprint of scanned image folders: per class folder, its file names and sizes (see the module doc)."""
    parts: dict[str, dict[str, Any]] = {}
    for split in splits:
        per_class = [(hashlib.sha256(), [0, 0]) for _ in split.classes]  # per class: digest, [files, bytes]
        for path, label, (n_bytes, _mtime) in zip(split.paths, split.labels, split.stats, strict=True):
            digest, counts = per_class[label]
            digest.update(_encode(f"{os.path.basename(path)}\t{n_bytes}\n"))
            counts[0] += 1
            counts[1] += n_bytes
        for name, (digest, (files, n_bytes)) in zip(split.classes, per_class, strict=True):
            parts[f"{split.directory.name}/{name}"] = {"files": files, "bytes": n_bytes, "sha256": digest.hexdigest()}
    return make_fingerprint("image_folder", parts)


def _array_digest(array: np.ndarray | torch.Tensor) -> tuple[str, int]:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{list(array.shape)}\n".encode())
    digest.update(memoryview(array.reshape(-1)).cast("B"))
    return digest.hexdigest(), array.nbytes


def array_fingerprint(kind: str, arrays: Mapping[str, Sequence[np.ndarray | torch.Tensor]]) -> dict[str, Any]:
    """Fingerprint with one part per name: sha256 of its arrays in order (dtype, shape and bytes of each)."""
    parts = {}
    for name, group in arrays.items():
        digest, total = hashlib.sha256(), 0
        for array in group:
            part_digest, n_bytes = _array_digest(array)
            digest.update(part_digest.encode())
            total += n_bytes
        parts[name] = {"bytes": total, "sha256": digest.hexdigest()}
    return make_fingerprint(kind, parts)


def file_fingerprint(kind: str, files: Mapping[str, Path]) -> dict[str, Any]:
    """Fingerprint with one part per name: the sha256 and size of the file's bytes (read in chunks)."""
    parts = {}
    for name, path in files.items():
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256")
            parts[name] = {"bytes": f.tell(), "sha256": digest.hexdigest()}
    return make_fingerprint(kind, parts)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _part_change(name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> str:
    if "files" in (new if old is None else old or {}):  # a class folder
        if old is None:
            return f"class folder {name}/ added ({_plural(new['files'], 'file')})"
        if new is None:
            return f"class folder {name}/ removed ({_plural(old['files'], 'file')})"
        before, after = old.get("files", 0), new.get("files", 0)
        if after > before:
            return f"{_plural(after - before, 'file')} added to {name}/ ({before} -> {after})"
        if after < before:
            return f"{_plural(before - after, 'file')} removed from {name}/ ({before} -> {after})"
        return f"files of {name}/ renamed, replaced or resized (still {before})"
    if old is None:
        return f"{name} added"
    if new is None:
        return f"{name} missing"
    return f"{name} changed (sha256 {str(old.get('sha256'))[:12]} -> {str(new.get('sha256'))[:12]})"


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, one short phrase per differing part ([] when they agree)."""
    if old.get("sha256") == new.get("sha256") and old.get("kind") == new.get("kind"):
        return []
    if old.get("kind") != new.get("kind"):
        return [f"the data source changed from {old.get('kind')!r} to {new.get('kind')!r}"]
    old_parts, new_parts = old.get("parts") or {}, new.get("parts") or {}
    changes = [
        _part_change(name, old_parts.get(name), new_parts.get(name))
        for name in sorted(set(old_parts) | set(new_parts))
        if old_parts.get(name) != new_parts.get(name)
    ]
    if len(changes) > MAX_NAMED_CHANGES:
        changes = changes[:MAX_NAMED_CHANGES] + [f"{len(changes) - MAX_NAMED_CHANGES} more parts changed"]
    return changes or ["the data fingerprint changed"]
