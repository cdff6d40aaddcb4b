"""End-to-end workflows over a run directory: train, calibrate, evaluate (and the quickstart).

A run directory holds everything about one run::

    config.yaml              resolved RunConfig (refuses to be overwritten by a different config)
    splits.json              dataset, split sizes, seed and the validation indices
    metrics.jsonl            one line per epoch
    checkpoints/last.*       resumable training state (atomic safetensors + JSON)
    model.safetensors/.json  final weights + model spec
    calibration.json         budgeted-batch sweep on validation/test and the chosen operating point
    report.json/.png         anytime, budgeted and realised results

The CLI (:mod:`adaptnn.cli`) is a thin layer over these functions.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .calibrate import budgeted_sweep, choose_operating_point
from .checkpoint import load_model, save_checkpoint
from .config import RunConfig, load_config, save_config
from .cost import cost_breakdown
from .data import DataSplits, build_datasets
from .errors import ConfigError
from .evaluate import anytime_results, collect_logits, realised_run, simulate_policy
from .models import create_model, model_accepts, model_spec
from .policies import ConfidencePolicy
from .report import plot_report, write_json
from .staged import StagedModel
from .train import Trainer, resolve_device, seed_everything

__all__ = ["train_run", "calibrate_run", "evaluate_run", "quickstart_config", "build_model_for_data"]

log = logging.getLogger(__name__)


def quickstart_config() -> RunConfig:
    """The embedded quickstart config (digits, 4-exit CNN) shipped inside the package."""
    text = resources.files("adaptnn").joinpath("configs/quickstart.yaml").read_text()
    import yaml

    return RunConfig.from_dict(yaml.safe_load(text))


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


def _write_config_once(config: RunConfig, run_dir: Path, overwrite: bool) -> None:
    path = run_dir / "config.yaml"
    if path.exists() and not overwrite:
        existing = load_config(path)
        if existing.to_dict() != config.to_dict():
            diff = _diff(existing.to_dict(), config.to_dict())
            raise ConfigError(
                f"{run_dir} already holds a run with a different config ({'; '.join(diff[:5])}). Fix: choose "
                "another run_dir, restore the same config to resume, or pass overwrite=True (--overwrite) to "
                "start that run over"
            )
    save_config(config, path)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def train_run(config: RunConfig, run_dir: str | Path, *, resume: bool = True, overwrite: bool = False) -> Path:
    """Train the configured model; writes the run directory and returns the final weights' path.

    Args:
        config: the run's configuration.
        run_dir: output directory.
        resume: continue from ``checkpoints/last.safetensors`` when present.
        overwrite: replace an existing run with a different config (its checkpoints are discarded).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    splits = build_datasets(config.data)
    seed_everything(config.train.seed)  # the seed fixes the initial weights too
    model = build_model_for_data(config, splits)
    _write_config_once(config, run_dir, overwrite)
    if overwrite:
        resume = False
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
    trainer = Trainer(
        model,
        splits.train,
        config.train,
        run_dir,
        val_set=splits.val,
        meta={"data": config.to_dict()["data"], "adaptnn_version": __version__},
    )
    trainer.fit(resume=resume)
    final = run_dir / "model.safetensors"
    save_checkpoint(
        final,
        model.cpu(),
        {"model_spec": model_spec(model), "data": config.to_dict()["data"], "adaptnn_version": __version__},
    )
    log.info("saved %s", final)
    return final


def _load_run(run_dir: Path) -> tuple[RunConfig, StagedModel, DataSplits, torch.device]:
    config = load_config(run_dir / "config.yaml")
    model = load_model(run_dir / "model.safetensors")
    splits = build_datasets(config.data)
    return config, model, splits, resolve_device(config.eval.device)


def calibrate_run(run_dir: str | Path, *, tolerance: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Fit the budgeted-batch thresholds on the validation split and pick the operating point.

    Writes ``calibration.json``: exit MACs, the sweep (validation and test figures for every p) and the
    operating point, chosen on validation figures only.
    """
    run_dir = Path(run_dir)
    config, model, splits, device = _load_run(run_dir)
    tolerance = config.calibration.tolerance if tolerance is None else tolerance
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance is a fraction of accuracy in [0, 1), got {tolerance}")
    costs = cost_breakdown(model, splits.input_size).exit_macs
    bs = config.eval.batch_size
    val_logits, val_labels = collect_logits(
        model, splits.val, batch_size=bs, device=device, progress=progress, desc="val"
    )
    test_logits, test_labels = collect_logits(
        model, splits.test, batch_size=bs, device=device, progress=progress, desc="test"
    )
    sweep = budgeted_sweep(
        val_logits.softmax(-1), val_labels, test_logits.softmax(-1), test_labels, costs, config.calibration.p_values
    )
    last_val_acc = float((val_logits[-1].argmax(-1) == val_labels).double().mean())
    point = choose_operating_point(sweep, last_val_acc, tolerance)
    calibration = {
        "exit_macs": costs,
        "policy": "confidence",
        "last_exit_val_accuracy": last_val_acc,
        "tolerance": tolerance,
        "operating_point": point,
        "budgeted": sweep,
    }
    write_json(run_dir / "calibration.json", calibration)
    log.info(
        "operating point p=%.2f thresholds=%s (val acc %.4f, val MACs %.0f)",
        point["p"],
        [round(t, 4) for t in point["thresholds"]],
        point["val_accuracy"],
        point["val_avg_cost"],
    )
    return calibration


def evaluate_run(run_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Anytime, budgeted and realised evaluation; writes ``report.json`` and ``report.png``.

    Calibrates first when ``calibration.json`` is missing.
    """
    import json

    run_dir = Path(run_dir)
    calib_path = run_dir / "calibration.json"
    if not calib_path.exists():
        calibrate_run(run_dir, progress=progress)
    calibration = json.loads(calib_path.read_text())
    config, model, splits, device = _load_run(run_dir)
    costs = cost_breakdown(model, splits.input_size).exit_macs
    if [round(c) for c in costs] != [round(c) for c in calibration["exit_macs"]]:
        raise ConfigError(f"{calib_path} was made for another model (exit MACs differ); run `adaptnn calibrate` again")
    test_logits, test_labels = collect_logits(
        model, splits.test, batch_size=config.eval.batch_size, device=device, progress=progress, desc="test"
    )
    point = calibration["operating_point"]
    thresholds = [float("inf") if t is None else t for t in point["thresholds"]]
    policy = ConfidencePolicy(thresholds)
    simulated = simulate_policy(policy, test_logits, test_labels, costs)
    realised = realised_run(model, splits.test, policy, batch_size=config.eval.batch_size, device=device)
    matches = bool(torch.equal(simulated.pop("exit_index"), realised.pop("exit_index")))
    anytime = anytime_results(test_logits, test_labels, costs)
    last = anytime[-1]
    report = {
        "adaptnn_version": __version__,
        "run_dir": str(run_dir),
        "model": model_spec(model),
        "dataset": {k: v for k, v in json.loads((run_dir / "splits.json").read_text()).items() if k != "val_indices"},
        "exit_macs": costs,
        "anytime": anytime,
        "budgeted": calibration["budgeted"],
        "operating_point": {
            "p": point["p"],
            "thresholds": point["thresholds"],
            "selection": {
                "rule": "cheapest budgeted point (validation MACs) with validation accuracy >= last exit's - tolerance",
                "tolerance": calibration["tolerance"],
                "val_accuracy": point["val_accuracy"],
                "val_avg_macs": point["val_avg_cost"],
                "last_exit_val_accuracy": calibration["last_exit_val_accuracy"],
            },
            "simulated": simulated,
            "realised": realised,
            "realised_equals_simulated": matches,
            "macs_reduction_vs_last_exit": last["macs"] / realised["avg_macs"],
            "accuracy_change_vs_last_exit": realised["accuracy"] - last["accuracy"],
        },
    }
    write_json(run_dir / "report.json", report)
    plot_report(report, run_dir / "report.png")
    return report
