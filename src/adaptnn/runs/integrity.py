"""Trust nothing in a run directory: its recorded split against the data found now, its model against the data.

* :func:`read_splits` reads ``splits.json`` (missing or corrupt: a one-line :class:`DataError` before any work);
* :func:`check_splits` compares it with the splits rebuilt from the run's config: data fingerprint, sizes, class
  names, input size, normalisation and the validation indices (a changed split would evaluate or calibrate on
  former training samples);
* :func:`check_model_data` compares a model with the data (classes, input shape), naming both sides; training
  uses it for the configured model, every other command for the checkpoint it loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..data import DataSplits
from ..data.fingerprint import fingerprint_changes
from ..errors import CheckpointError, ConfigError, DataError
from ..runtime.staged import StagedModel

__all__ = [
    "SPLITS_FILE",
    "check_model_data",
    "check_resume_splits",
    "check_splits",
    "model_data_mismatches",
    "read_splits",
    "split_changes",
]

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"
_SPLIT_NAMES = ("train", "val", "test")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _schema_problem(data: object) -> str | None:
    """What makes ``data`` not a ``splits.json`` written by :meth:`DataSplits.split_info` (None when fine)."""
    if not isinstance(data, dict):
        return f"expected a JSON object, found {type(data).__name__}"
    if not isinstance(data.get("dataset"), str):
        return "'dataset' is missing or not a string"
    sizes = data.get("sizes")
    if not isinstance(sizes, dict) or not all(_is_count(sizes.get(k)) for k in _SPLIT_NAMES):
        return "'sizes' must hold train/val/test counts"
    indices = data.get("val_indices")
    if not isinstance(indices, list) or not all(_is_count(i) for i in indices):
        return "'val_indices' is missing or not a list of sample indices"
    if len(indices) != sizes["val"]:
        return f"'val_indices' holds {len(indices)} indices but 'sizes' says {sizes['val']} validation samples"
    names = data.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        return "'class_names' is not a list of strings"
    fingerprint = data.get("fingerprint")
    if fingerprint is not None and (
        not isinstance(fingerprint, dict)
        or not isinstance(fingerprint.get("sha256"), str)
        or not isinstance(fingerprint.get("parts"), dict)
    ):
        return "'fingerprint' is malformed"
    return None


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def read_splits(run_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``run_dir/splits.json`` (as :meth:`DataSplits.split_info` wrote it at training).

    Cheap: call it before loading data or models, so a broken run directory fails before any work.

    Raises:
        DataError: the file is missing, unreadable, not strict JSON or lacks what a check needs (one line,
            naming the file).
    """
    path = Path(run_dir) / SPLITS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing, so the data split this run was trained with is unknown; restore the file "
            "from the training run or train it again (adaptnn train)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise DataError(f"{path} is corrupt (not valid JSON: {e}); restore it from the training run") from None
    problem = _schema_problem(data)
    if problem is not None:
        raise DataError(f"{path} is corrupt ({problem}); restore it from the training run")
    return data


def _list_change(what: str, old: list[Any], new: list[Any]) -> str:
    removed = [x for x in old if x not in new]
    added = [x for x in new if x not in old]
    if not removed and not added:
        return f"{what} reordered"
    return f"{what} changed (removed {removed[:5]}, added {added[:5]})"


def split_changes(stored: Mapping[str, Any], current: DataSplits) -> list[str]:
    """One short phrase per difference between a stored ``splits.json`` and rebuilt splits ([] when equal).

    Compares the dataset name, data fingerprint (when both have one), class names, input size, split sizes,
    normalisation and validation indices.
    """
    changes: list[str] = []
    if stored.get("dataset") != current.name:
        changes.append(f"the dataset was {stored.get('dataset')!r}, now {current.name!r}")
    old_fp, new_fp = stored.get("fingerprint"), current.fingerprint
    if isinstance(old_fp, Mapping) and new_fp is not None:
        changes += fingerprint_changes(old_fp, new_fp)
    old_classes = stored.get("class_names")
    if old_classes is not None and list(old_classes) != list(current.class_names):
        changes.append(_list_change("class names", list(old_classes), list(current.class_names)))
    elif old_classes is None and stored.get("num_classes") not in (None, current.num_classes):
        changes.append(f"{stored['num_classes']} classes, now {current.num_classes}")
    if stored.get("input_size") is not None and list(stored["input_size"]) != list(current.input_size):
        changes.append(f"input size was {list(stored['input_size'])}, now {list(current.input_size)}")
    old_sizes = [stored.get("sizes", {}).get(k) for k in _SPLIT_NAMES]
    new_sizes = [len(current.train), len(current.val), len(current.test)]
    if old_sizes != new_sizes:
        changes.append(
            f"train/val/test sizes were {'/'.join(map(str, old_sizes))}, now {'/'.join(map(str, new_sizes))}"
        )
    for key in ("mean", "std"):
        if stored.get(key) is not None and [float(v) for v in stored[key]] != [float(v) for v in getattr(current, key)]:
            changes.append(f"normalisation {key} was {list(stored[key])}, now {list(getattr(current, key))}")
    old_val, new_val = stored.get("val_indices"), [int(i) for i in current.val_indices]
    if old_val is not None and list(old_val) != new_val:
        moved = len(set(new_val) - set(old_val))
        changes.append(
            f"the validation split would contain former training samples ({moved} of its {len(new_val)} "
            "indices were not in the recorded split)"
        )
    return changes


def check_splits(
    stored: Mapping[str, Any],
    current: DataSplits,
    *,
    allow_data_change: bool = False,
    run_dir: str | Path | None = None,
) -> list[str]:
    """Refuse data or a split that differs from what the run recorded at training (``stored``: :func:`read_splits`).

    Args:
        stored: the run's ``splits.json``.
        current: the splits rebuilt now from the run's config.
        allow_data_change: log the differences as a warning and go on instead of raising.
        run_dir: named in the message.

    Returns:
        The differences (empty when none; non-empty only with ``allow_data_change``).

    Raises:
        DataError: the data or split changed (one line naming every change, at most a few per kind).
    """
    changes = split_changes(stored, current)
    if not changes:
        if stored.get("fingerprint") is None:
            log.info("splits.json of %s has no data fingerprint (older adaptnn): sizes and split checked", run_dir)
        return []
    where = "this run" if run_dir is None else f"run {run_dir}"
    message = f"the data of {where} changed since training: {'; '.join(changes)}"
    if allow_data_change:
        log.warning("%s; going on as asked (allow_data_change)", message)
        return changes
    raise DataError(f"{message}; pass --allow_data_change (allow_data_change=True) to proceed knowingly")


def check_resume_splits(run_dir: str | Path, current: DataSplits, *, allow_data_change: bool = False) -> list[str]:
    """Before training resumes in ``run_dir``: refuse data or a split other than its first epochs saw.

    Only when ``splits.json`` exists and was made with the same dataset, seed and ``val_size`` as ``current``:
    a changed data config is the checkpoint's config check's to report (it names the changed keys).

    Raises:
        DataError: ``splits.json`` is corrupt, or the data changed (see :func:`check_splits`).
    """
    if not (Path(run_dir) / SPLITS_FILE).exists():
        return []
    stored = read_splits(run_dir)
    recorded = (stored["dataset"], stored.get("seed"), stored.get("val_size"))
    if recorded != (current.name, current.seed, current.val_size):
        return []
    return check_splits(stored, current, allow_data_change=allow_data_change, run_dir=run_dir)


def _model_name(model: StagedModel) -> str:
    spec = getattr(model, "model_spec", None)
    return str(spec["name"]) if isinstance(spec, Mapping) and "name" in spec else type(model).__name__


def model_data_mismatches(model: StagedModel, splits: DataSplits, *, model_name: str | None = None) -> list[str]:
    """Where ``model`` (``num_classes``, ``input_spec``) does not fit ``splits``, one phrase naming both sides each."""
    name, data = model_name or _model_name(model), splits.name or "the dataset"
    out = []
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != splits.num_classes:
        out.append(f"model {name!r} predicts {num_classes} classes but dataset {data!r} has {splits.num_classes}")
    spec = getattr(model, "input_spec", None)
    if spec is not None:
        shape, got = list(spec.shape), list(splits.input_size)
        if spec.dtype_kind != "float":
            out.append(f"model {name!r} takes token ids shaped {shape} but dataset {data!r} gives images {got}")
        elif len(shape) != len(got) or any(w is not None and w != g for w, g in zip(shape, got, strict=False)):
            out.append(f"model {name!r} expects inputs shaped {shape} but dataset {data!r} gives {got}")
    return out


def check_model_data(
    model: StagedModel,
    splits: DataSplits,
    *,
    checkpoint: str | Path | None = None,
    built_from_config: bool = False,
    model_name: str | None = None,
) -> None:
    """Refuse a model whose classes or input shape do not fit the data, before any work.

    Args:
        model: a loaded checkpoint's model (the default) or, with ``built_from_config``, one just created from a
            run config (training).
        splits: the data it is meant for.
        checkpoint: the file the model was loaded from, named in the message.
        built_from_config: the model comes from the config, not a checkpoint (the message then says how to
            configure a matching model).
        model_name: the model's name in messages (default: its registered name).

    Raises:
        CheckpointError: a loaded model does not fit the data: the checkpoint looks foreign.
        ConfigError: ``built_from_config`` and the configured model does not fit the data.
    """
    mismatches = model_data_mismatches(model, splits, model_name=model_name)
    if not mismatches:
        return
    if built_from_config:
        raise ConfigError(
            f"{'; '.join(mismatches)}; pick a matching model (adaptnn.list_models()) or set model.kwargs "
            "(e.g. num_classes, in_chans, input_size)"
        )
    where = "the checkpoint" if checkpoint is None else f"checkpoint {checkpoint}"
    raise CheckpointError(
        f"{where} does not fit the run's data ({'; '.join(mismatches)}): it looks foreign (trained on other data "
        "or copied from another run); restore the run's own model.safetensors or train again"
    )
