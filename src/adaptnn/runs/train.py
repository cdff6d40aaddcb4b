"""Training a run: build the configured model for its data, train it, save the final weights."""

from __future__ import annotations

import logging
from pathlib import Path

from ..data import DataSplits, build_datasets
from ..errors import ConfigError
from ..io import save_checkpoint, write_json
from ..models import create_model, model_accepts, model_spec
from ..runtime.staged import StagedModel
from ..training import Trainer, seed_everything
from ..version import __version__
from .config import RunConfig
from .rundir import write_config_once

__all__ = ["train_run", "build_model_for_data"]

log = logging.getLogger(__name__)


def build_model_for_data(config: RunConfig, splits: DataSplits) -> StagedModel:
    """Create the configured model, filling ``num_classes`` from the data and checking the input shape."""
    kwargs = dict(config.model.kwargs)
    if model_accepts(config.model.name, "num_classes") and "num_classes" not in kwargs:
        kwargs["num_classes"] = splits.num_classes
    model = create_model(config.model.name, **kwargs)
    if model.num_classes is not None and model.num_classes != splits.num_classes:
        raise ConfigError(
            f"model.kwargs.num_classes={model.num_classes} but dataset {splits.name!r} has {splits.num_classes} classes"
        )
    spec = model.input_spec
    if spec is not None:
        mismatch = len(spec.shape) != len(splits.input_size) or any(
            want is not None and want != got for want, got in zip(spec.shape, splits.input_size, strict=False)
        )
        if mismatch:
            raise ConfigError(
                f"model {config.model.name!r} expects inputs shaped {list(spec.shape)} but dataset "
                f"{splits.name!r} gives {list(splits.input_size)}; pick a matching model (adaptnn.list_models()) "
                "or set model.kwargs (e.g. in_chans, input_size)"
            )
    return model


def train_run(config: RunConfig, run_dir: str | Path, *, resume: bool = True, overwrite: bool = False) -> Path:
    """Train the configured model; writes the run directory and returns the final weights' path.

    Seeds Python, NumPy and torch with ``config.train.seed`` first (the seed fixes the initial weights too).

    Args:
        config: the run's configuration.
        run_dir: output directory.
        resume: continue from ``checkpoints/last.safetensors`` when present.
        overwrite: replace an existing run with a different config (its checkpoints are discarded).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    splits = build_datasets(config.data)
    seed_everything(config.train.seed)
    model = build_model_for_data(config, splits)
    write_config_once(config, run_dir, overwrite)
    write_json(run_dir / "splits.json", splits.split_info())
    log.info(
        "training %s on %s: %d train / %d val / %d test samples, %d epochs",
        config.model.name,
        splits.name,
        len(splits.train),
        len(splits.val),
        len(splits.test),
        config.train.epochs,
    )
    data = config.to_dict()["data"]
    trainer = Trainer(
        model,
        splits.train,
        config.train,
        run_dir,
        val_set=splits.val,
        meta={"data": data, "adaptnn_version": __version__},
    )
    trainer.fit(resume=resume and not overwrite)
    final = run_dir / "model.safetensors"
    if not trainer.is_main:  # under torchrun only rank 0 writes the final weights
        return final
    save_checkpoint(final, model.cpu(), {"model_spec": model_spec(model), "data": data, "adaptnn_version": __version__})
    log.info("saved %s", final)
    return final
