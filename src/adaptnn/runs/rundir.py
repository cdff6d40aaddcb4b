"""A run directory: loading a trained run back, writing its config once, and changing it as one transaction.

A run directory holds everything about one run::

    config.yaml              resolved RunConfig (refuses to be overwritten by a different config)
    splits.json              dataset, split sizes, seed and the validation indices
    metrics.jsonl            one line per committed epoch
    checkpoints/last.*       resumable training state (atomic safetensors + JSON)
    model.safetensors/.json  final weights + model spec
    calibration.json         budgeted-batch sweep on validation/test and the chosen operating point
    report.json/.png         anytime, budgeted and realised results
    .adaptnn.lock            the writer lock (:class:`~adaptnn.io.RunLock`); never deleted

One writer at a time: every workflow that writes (train, calibrate, evaluate) holds the directory's
:class:`~adaptnn.io.RunLock` and first calls :func:`recover_run_dir`, which removes what killed writers left
(hidden temporary files, an unfinished ``--overwrite`` staging directory) and finishes an interrupted swap.

``--overwrite`` never mixes two runs: :class:`StagedOverwrite` builds the new run in the sibling directory
``.<name>.overwrite`` while ``run_dir`` keeps the old run, complete and usable, and swaps the two directories
in one atomic step (``renameat2(RENAME_EXCHANGE)`` / ``renamex_np(RENAME_SWAP)``) once the new run's first
checkpoint is committed. Where the platform cannot exchange directories, entries are moved under a small
journal (``.<name>.replaced``) that :func:`recover_run_dir` rolls forward after a crash.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import DataSplits, build_datasets
from ..errors import ConfigError
from ..io import LOCK_NAME, RunLock, exchange_dirs, fsync_dir, sweep_temp_files
from ..models import load_model
from ..runtime.staged import StagedModel
from ..training import resolve_device
from .config import RunConfig, load_config, save_config
from .integrity import check_model_data, check_splits, read_splits

__all__ = [
    "DERIVED_FILES",
    "LoadedRun",
    "StagedOverwrite",
    "check_config",
    "config_diff",
    "holds_run",
    "invalidate_derived",
    "load_run",
    "recover_run_dir",
    "require_trained",
    "staging_path",
    "write_config_once",
]

log = logging.getLogger(__name__)

#: files computed from ``model.safetensors``: stale as soon as the weights change
DERIVED_FILES = ("calibration.json", "report.json", "report.png")
_MOVED_MARK = ".old-run-moved"


@dataclass
class LoadedRun:
    """A trained run read back: its config, final model, data splits and the evaluation device."""

    config: RunConfig
    model: StagedModel
    splits: DataSplits
    device: torch.device


def load_run(run_dir: str | Path, *, allow_data_change: bool = False, trust_code: bool = False) -> LoadedRun:
    """Read ``config.yaml`` and ``model.safetensors`` of ``run_dir`` and rebuild its datasets.

    Everything read is data: the checkpoint's header builds only what it may declare (``trust_code`` lifts that,
    see :func:`adaptnn.models.load_model`). Before any work the rebuilt data and split must match ``splits.json``
    (unless ``allow_data_change``) and the model must fit the data (:mod:`.integrity`).
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    model = load_model(run_dir / "model.safetensors", trust_code=trust_code)
    stored = read_splits(run_dir)  # missing/corrupt: one line, before loading any data
    splits = build_datasets(config.data)
    check_splits(stored, splits, allow_data_change=allow_data_change, run_dir=run_dir)
    check_model_data(model, splits, checkpoint=run_dir / "model.safetensors")
    return LoadedRun(config, model, splits, resolve_device(config.eval.device))


def require_trained(run_dir: Path, *, weights: bool = True) -> None:
    """Raise a one-line :class:`ConfigError` unless ``run_dir`` holds a config and (``weights``) final weights.

    Check the config before taking the run's lock (locking creates the directory) and the weights after it
    (a run being trained has none yet, and the lock error says who is training it).
    """
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"no config file at {run_dir / 'config.yaml'}: {run_dir} is not a trained run directory")
    if weights and not (run_dir / "model.safetensors").exists():
        started = (run_dir / "checkpoints" / "last.safetensors").exists()
        raise ConfigError(
            f"{run_dir} has no model.safetensors: its training "
            + ("was interrupted" if started else "has not finished")
            + f"; resume it with `adaptnn train --config {run_dir / 'config.yaml'} --run_dir {run_dir}`"
        )


def check_config(config: RunConfig, run_dir: Path) -> None:
    """Refuse a ``run_dir`` whose ``config.yaml`` differs from ``config``.

    Raises:
        ConfigError: ``run_dir`` holds a run with another config; the message lists the first differences.
    """
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    existing = load_config(path).to_dict()
    if existing != config.to_dict():
        diff = config_diff(existing, config.to_dict())
        raise ConfigError(
            f"{run_dir} already holds a run with a different config ({'; '.join(diff[:5])}). Fix: choose "
            "another run_dir, restore the same config to resume, or pass overwrite=True (--overwrite) to "
            "start that run over"
        )


def write_config_once(config: RunConfig, run_dir: Path, overwrite: bool) -> None:
    """Write ``config.yaml``, refusing to replace a different config unless ``overwrite`` (see :func:`check_config`)."""
    if not overwrite:
        check_config(config, run_dir)
    save_config(config, run_dir / "config.yaml")


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``"section.key: old -> new"`` for every leaf that differs between two nested config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything besides its lock file."""
    return run_dir.is_dir() and any(entry.name != LOCK_NAME for entry in run_dir.iterdir())


def invalidate_derived(run_dir: Path) -> None:
    """Delete the files computed from the current weights (:data:`DERIVED_FILES`) before the weights change."""
    for name in DERIVED_FILES:
        (run_dir / name).unlink(missing_ok=True)


# ---- transactions -------------------------------------------------------------------------------------------
def staging_path(run_dir: Path) -> Path:
    """Where ``--overwrite`` builds the new run: the hidden sibling ``.<name>.overwrite``."""
    run_dir = Path(run_dir).absolute()
    return run_dir.with_name(f".{run_dir.name}.overwrite")


def _replaced_path(run_dir: Path) -> Path:
    return Path(run_dir).absolute().with_name(f".{Path(run_dir).absolute().name}.replaced")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _move_entries(source: Path, target: Path) -> None:
    """Move every entry of ``source`` but its lock file into ``target`` (replacing what is there)."""
    for entry in list(source.iterdir()):
        if entry.name == LOCK_NAME:
            continue
        _remove(target / entry.name)
        os.replace(entry, target / entry.name)
    fsync_dir(target)


def _swap_by_moves(staging: Path, run_dir: Path) -> None:
    """The swap where directories cannot be exchanged: old entries aside, new entries in, under a journal.

    ``.<name>.replaced`` exists from the first move on; its mark file says the old entries are all out.
    :func:`recover_run_dir` completes an interrupted swap from either step.
    """
    replaced = _replaced_path(run_dir)
    replaced.mkdir()
    fsync_dir(replaced.parent)
    _move_entries(run_dir, replaced)
    (replaced / _MOVED_MARK).touch()
    fsync_dir(replaced)
    _move_entries(staging, run_dir)
    shutil.rmtree(replaced, ignore_errors=True)


def recover_run_dir(run_dir: Path) -> list[Path]:
    """Clean up after killed writers; call only while holding ``run_dir``'s :class:`~adaptnn.io.RunLock`.

    Finishes a swap interrupted on a platform without directory exchange (the staged run was complete),
    removes an overwrite's staging directory that never got swapped in (the old run is intact) and the
    hidden temporary files of interrupted atomic writes. Returns what was removed.
    """
    run_dir = Path(run_dir).absolute()
    removed: list[Path] = []
    staging, replaced = staging_path(run_dir), _replaced_path(run_dir)
    if replaced.exists():  # an interrupted move-based swap
        moved_out = (replaced / _MOVED_MARK).exists()
        if staging.exists():  # the staged run is complete: roll forward
            if not moved_out:
                _move_entries(run_dir, replaced)
                (replaced / _MOVED_MARK).touch()
            _move_entries(staging, run_dir)
            log.warning("%s: finished an interrupted --overwrite swap", run_dir)
        elif not moved_out:  # nothing to move in: put the old entries back
            _move_entries(replaced, run_dir)
        _remove(replaced)
        removed.append(replaced)
    if staging.exists():
        log.warning("%s: removing %s, left by an interrupted --overwrite (the run itself is intact)", run_dir, staging)
        _remove(staging)
        removed.append(staging)
    if run_dir.is_dir():
        removed += sweep_temp_files(run_dir)
    return removed


class StagedOverwrite:
    """A new run built beside ``run_dir`` (in :func:`staging_path`) and swapped in by :meth:`swap`.

    Until the swap, ``run_dir`` keeps the old run, complete; a crash leaves it so (the staging directory
    is removed by the next writer's :func:`recover_run_dir`). The staging directory has its own lock, held
    here, so after the exchange the lock file at ``run_dir`` is one this process holds.

    Args:
        run_dir: the run directory being overwritten.
        lock: the held lock of ``run_dir``.
    """

    def __init__(self, run_dir: Path, lock: RunLock) -> None:
        if not lock.held:
            raise RuntimeError("StagedOverwrite needs the run directory's lock")
        self.run_dir = Path(run_dir).absolute()
        if os.path.ismount(self.run_dir):
            raise ConfigError(
                f"{self.run_dir} is a mount point: starting a run over builds the new run beside it and swaps the "
                "two, which cannot cross file systems; use a subdirectory of the mount as run_dir"
            )
        self.path = staging_path(self.run_dir)
        self.swapped = False
        self._closed = False
        self._run_lock = lock
        _remove(self.path)
        self._lock = RunLock(self.path, command=lock.command).acquire()

    def swap(self) -> None:
        """Make the staged run the run directory's content in one step; the old run is then deleted."""
        if self.swapped:
            return
        try:
            exchange_dirs(self.path, self.run_dir)
        except OSError as err:
            if err.errno != errno.ENOTSUP:
                raise
            _swap_by_moves(self.path, self.run_dir)
        else:
            self._run_lock.swap_with(self._lock)  # each lock object keeps the file now at its own path
        self.swapped = True
        log.info("swapped the new run into %s", self.run_dir)
        self.close()  # deletes the old run (or, after moves, the emptied staging directory)

    def close(self) -> None:
        """Delete the staging path and drop its lock; before :meth:`swap` this discards the new run."""
        if not self._closed:
            self._closed = True
            _remove(self.path)
            self._lock.release()
