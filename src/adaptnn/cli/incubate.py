"""Deep Incubation: train the meta model, every target segment as an independent job, then assemble and fine-tune.

``adaptnn incubate --config RUN.yaml --run_dir D`` runs the whole recipe (:mod:`adaptnn.training.incubation`):

1. the shallow meta model, trained end to end (``D/incubate/meta.safetensors``);
2. one job per target segment, each a separate process (``--incubate.jobs`` at a time) that reads only the
   config, the data and the meta weights and writes ``D/incubate/stage<i>.safetensors`` atomically; a job can
   be run by hand on another machine: ``adaptnn incubate --config D/incubate/job.yaml --stage i``;
3. the target assembled from the jobs' tensors (unchanged), fine-tuned end to end, saved as
   ``D/model.safetensors`` with ``config.yaml`` and ``splits.json`` (so ``adaptnn evaluate D`` works).

Every phase whose output exists is skipped, and each phase's Trainer resumes from its own checkpoint, so
running the command again continues. ``D/incubate/summary.json`` has each phase's wall time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace

from ._shared import add_run_config, run_config_from_args

HELP = "Deep Incubation: train a model's segments independently inside a shallow meta model, then assemble."


def build(parser: ArgumentParser) -> None:
    from ..training.incubation import IncubationConfig

    add_run_config(parser)
    parser.add_class_arguments(IncubationConfig, "incubate", help="Phases of Deep Incubation.")
    parser.add_argument("--stage", type=int | None, default=None, help="Run only stage job i (what the driver runs).")


def _setup(config: Any) -> tuple[Any, Any, Any, tuple[int, ...]]:
    """Data splits, the target (seeded: every process builds the same one) and its meta model."""
    from ..data import build_datasets
    from ..runs.train import build_model_for_data
    from ..training import seed_everything
    from ..training.incubation import build_meta_model

    splits = build_datasets(config.data)
    seed_everything(config.train.seed)
    target = build_model_for_data(config, splits)
    input_shape = tuple(splits.train[0][0].shape)
    meta = build_meta_model(target, input_shape, seed=config.train.seed)
    return splits, target, meta, input_shape


def run_stage_job(config: Any, incubate: Any, run_dir: Path, index: int) -> Path:
    """One stage job: train target segment ``index`` inside the trained meta model; returns its checkpoint."""
    from ..errors import CheckpointError
    from ..io import load_checkpoint, load_weights
    from ..training.incubation import train_stage

    work = run_dir / "incubate"
    splits, target, meta, _ = _setup(config)
    meta_path = work / "meta.safetensors"
    if not meta_path.is_file():
        raise CheckpointError(
            f"{meta_path} does not exist: train the meta model first (adaptnn incubate without --stage)"
        )
    load_weights(meta, load_checkpoint(meta_path).model_state, source=str(meta_path))
    if not 0 <= index < len(target.segments):
        from ..errors import ConfigError

        raise ConfigError(f"--stage must be in [0, {len(target.segments) - 1}], got {index}")
    started = time.perf_counter()
    out = train_stage(
        meta, target, index, splits.train, config.train, work / f"stage{index}_run", work / f"stage{index}.safetensors",
        incubate.stage_epochs, meta_info={"data": config.to_dict()["data"], "pid": os.getpid()},
    )  # fmt: skip
    (work / f"stage{index}_time.json").write_text(f'{{"seconds": {time.perf_counter() - started}}}\n')
    return out


def _launch_jobs(job_file: Path, indices: list[int], parallel: int) -> None:
    from ..errors import AdaptnnError

    pending, running = list(indices), []
    failures = []
    while pending or running:
        while pending and len(running) < parallel:
            i = pending.pop(0)
            cmd = [sys.executable, "-m", "adaptnn.cli", "incubate", "--config", str(job_file), "--stage", str(i)]
            running.append((i, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        i, proc = running.pop(0)
        _, err = proc.communicate()
        if proc.returncode != 0:
            failures.append(
                f"stage {i} exited {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"
            )
    if failures:
        raise AdaptnnError("incubation stage job(s) failed: " + "; ".join(failures))


def incubate_run(config: Any, incubate: Any, run_dir: Path) -> Path:
    """The whole recipe in ``run_dir``; returns the final weights' path."""
    from ..io import atomic_write_text, write_json
    from ..models import model_spec
    from ..runs.config import save_config
    from ..training import Trainer
    from ..training.incubation import assemble, train_meta
    from ..training.trainer import commit_checkpoint
    from ..version import __version__

    work = run_dir / "incubate"
    work.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    job = dict(config.to_dict(), incubate=vars(incubate), run_dir=str(run_dir))
    atomic_write_text(work / "job.yaml", yaml.safe_dump(job, sort_keys=False))
    splits, target, meta, _ = _setup(config)
    data = config.to_dict()["data"]
    meta_path = work / "meta.safetensors"
    if not meta_path.is_file():
        started = time.perf_counter()
        train_meta(meta, splits.train, config.train, work / "meta_run", incubate.meta_epochs)
        commit_checkpoint(meta_path, meta.cpu(), {"model_spec": model_spec(meta), "data": data})
        summary["meta_s"] = time.perf_counter() - started
    stages = list(range(len(target.segments)))
    missing = [i for i in stages if not (work / f"stage{i}.safetensors").is_file()]
    started = time.perf_counter()
    _launch_jobs(work / "job.yaml", missing, incubate.jobs)
    summary["stage_jobs_wall_s"] = time.perf_counter() - started
    assemble(target, [work / f"stage{i}.safetensors" for i in stages])
    started = time.perf_counter()
    if incubate.finetune_epochs > 0:
        phase = run_config_from_dict(config.to_dict())
        phase.train.epochs = incubate.finetune_epochs
        Trainer(target, splits.train, phase.train, work / "finetune_run", val_set=splits.val).fit()
    summary["finetune_s"] = time.perf_counter() - started
    save_config(config, run_dir / "config.yaml")
    write_json(run_dir / "splits.json", splits.split_info())
    final = run_dir / "model.safetensors"
    commit_checkpoint(
        final, target.cpu(), {"model_spec": model_spec(target), "data": data, "adaptnn_version": __version__}
    )
    write_json(work / "summary.json", summary)
    return final


def run_config_from_dict(data: dict[str, Any]) -> Any:
    from ..runs.config import RunConfig

    return RunConfig.from_dict(data).validate()


def run(args: Namespace) -> None:
    from ..training.incubation import IncubationConfig

    config = run_config_from_args(args)
    incubate = IncubationConfig(**args.incubate.as_dict())
    incubate.validate()
    run_dir = Path(args.run_dir)
    if args.stage is not None:
        print(run_stage_job(config, incubate, run_dir, args.stage))
        return
    print(incubate_run(config, incubate, run_dir))
