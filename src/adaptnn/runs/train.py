"""Training a run: build the configured model for its data, train it, save the final weights.

:func:`train_run` is one transaction on the run directory: it holds the directory's lock (rank 0 under
torchrun), recovers from killed writers first, and starts a run over (``overwrite``, or ``resume=False`` on
a directory that holds a run) in a staging directory swapped in at the new run's first checkpoint, so the
old run stays complete until then; training from scratch over anything else in the directory is staged the
same way. Files computed from the weights (calibration, report) are deleted before new final weights are
written.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from ..data import DataSplits, build_datasets
from ..io import RunLock, write_json
from ..io.checkpoint import load_weights
from ..layers.collaboration import collaborative_exits, inline_collaboration
from ..models import create_model, load_model, model_accepts, model_spec
from ..runtime.staged import StagedModel
from ..training import Trainer, seed_everything
from ..training.distributed import process_layout
from ..training.trainer import commit_checkpoint
from ..version import __version__
from .config import RunConfig, save_config
from .integrity import check_model_data, check_resume_splits
from .rundir import StagedOverwrite, check_config, holds_run, invalidate_derived, recover_run_dir

__all__ = ["train_run", "build_model_for_data", "initialise_from"]

log = logging.getLogger(__name__)


def build_model_for_data(config: RunConfig, splits: DataSplits) -> StagedModel:
    """Create the configured model, filling ``num_classes`` from the data and checking the input shape."""
    kwargs = dict(config.model.kwargs)
    if model_accepts(config.model.name, "num_classes") and "num_classes" not in kwargs:
        kwargs["num_classes"] = splits.num_classes
    model = create_model(config.model.name, **kwargs)
    check_model_data(model, splits, built_from_config=True, model_name=config.model.name)
    return model


def initialise_from(model: StagedModel, path: str | Path) -> None:
    """Load the weights of checkpoint ``path`` into ``model`` (``model.init_from``; the header is data, never code).

    The checkpoint must hold ``model``'s architecture, or the plain architecture of a collaborative ``model``
    (IMTA's stage two): that one is given its collaborative exits first, each starting from the exit's own classifier.

    Raises:
        CheckpointError: unreadable file, refused header, or weights that do not fit ``model`` (one line).
    """
    source = load_model(path)
    if collaborative_exits(model) and not collaborative_exits(source):
        source = inline_collaboration(source, freeze=False)
    load_weights(model, source.state_dict(), source=f"model.init_from {path}")
    log.info("initialised the weights from %s", path)


def train_run(config: RunConfig, run_dir: str | Path, *, resume: bool = True, overwrite: bool = False) -> Path:
    """Train the configured model; writes the run directory and returns the final weights' path.

    Seeds Python, NumPy and torch with ``config.train.seed`` first (the seed fixes the initial weights too).

    Args:
        config: the run's configuration.
        run_dir: output directory.
        resume: continue from ``checkpoints/last.safetensors`` when present (the checkpoint must have been
            written with this config); ``False`` starts over.
        overwrite: replace an existing run, even one with a different config. The new run is built beside
            the old one, which stays complete until the new run's first checkpoint replaces it in one step.

    Raises:
        RunLockedError: another process is writing ``run_dir``.
        ConfigError: ``run_dir`` holds a run with a different config (and not ``overwrite``), or its
            checkpoint was written with another config.
    """
    config.validate()  # every section, before anything is written or trained
    given, run_dir = Path(run_dir), Path(run_dir).absolute()  # absolute: the swap renames directories
    is_main = process_layout(config.train.distributed)[1] == 0  # under torchrun only rank 0 writes
    with RunLock(run_dir) if is_main else contextlib.nullcontext() as lock:
        if is_main:
            recover_run_dir(run_dir)
        if not overwrite:
            check_config(config, run_dir)
        splits = build_datasets(config.data)
        if resume and not overwrite and (run_dir / "checkpoints" / "last.safetensors").exists():
            check_resume_splits(run_dir, splits)  # the data must not have changed under a resumed run
        seed_everything(config.train.seed)
        model = build_model_for_data(config, splits)
        start_over = overwrite or not resume
        # training from scratch never happens in place over another run: it is staged and swapped in
        from_scratch = start_over or not (run_dir / "checkpoints" / "last.safetensors").exists()
        if from_scratch and config.model.init_from is not None:
            initialise_from(model, config.model.init_from)
        staged = StagedOverwrite(run_dir, lock) if is_main and from_scratch and holds_run(run_dir) else None
        target = staged.path if staged is not None else run_dir
        if is_main:
            save_config(config, target / "config.yaml")
            write_json(target / "splits.json", splits.split_info())
        log.info(
            "training %s on %s: %d train / %d val / %d test samples, %d epochs",
            config.model.name,
            splits.name,
            len(splits.train),
            len(splits.val),
            len(splits.test),
            config.train.epochs,
        )

        def swap_in_new_run(trainer: Trainer) -> None:  # after the new run's first commit
            if staged is not None and not staged.swapped:
                staged.swap()
                trainer.run_dir = run_dir

        data = config.to_dict()["data"]
        trainer = Trainer(
            model,
            splits.train,
            config.train,
            target,
            val_set=splits.val,
            meta={"data": data, "adaptnn_version": __version__},
            after_epoch=swap_in_new_run,
        )
        try:
            history = trainer.fit(resume=not start_over)
            swap_in_new_run(trainer)
        finally:
            if staged is not None:
                staged.close()  # before the swap: discards the new run, the old one is intact
        final = run_dir / "model.safetensors"
        if trainer.is_main and (history or not final.exists()):
            invalidate_derived(run_dir)  # calibration and report of older weights
            meta = {"model_spec": model_spec(model), "data": data, "adaptnn_version": __version__}
            commit_checkpoint(final, model.cpu(), meta)
            log.info("saved %s", final)
    return given / "model.safetensors"
