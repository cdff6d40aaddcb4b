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
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .calibrate import choose_operating_point
from .calibration import (
    calibrate_accuracy_guarantee,
    calibrate_to_budget,
    calibrate_to_latency,
    exit_scores,
    policy_sweep,
    split_figures,
)
from .checkpoint import load_model, save_checkpoint
from .config import RunConfig, load_config, save_config
from .cost import cost_breakdown
from .data import DataSplits, build_datasets
from .errors import ConfigError
from .evaluate import anytime_results, collect_logits, curve_table, per_class_exits, realised_run, simulate_policy
from .models import create_model, model_accepts, model_spec
from .policies import POLICY_NAMES, make_policy, policy_from_dict, policy_to_dict, simulate_exits
from .report import plot_report, write_json
from .staged import StagedModel
from .train import Trainer, build_strategy, resolve_device, seed_everything

__all__ = [
    "train_run",
    "calibrate_run",
    "evaluate_run",
    "compare_policies",
    "quickstart_config",
    "build_model_for_data",
]

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
    if not trainer.is_main:  # under torchrun only rank 0 writes the final weights
        return final
    save_checkpoint(
        final,
        model.cpu(),
        {"model_spec": model_spec(model), "data": config.to_dict()["data"], "adaptnn_version": __version__},
    )
    log.info("saved %s", final)
    return final


def strategy_policy(config: RunConfig) -> tuple[str, dict[str, Any]]:
    """The exit rule consistent with how the run was trained: a ``boost`` run predicts with its additive
    ensemble (``boosted`` with the same ``r``); every other strategy with each exit's own logits."""
    if config.train.strategy == "boost":
        return "boosted", {"r": float(config.train.strategy_options.get("r", 0.5))}
    return "confidence", {}


def _load_run(run_dir: Path) -> tuple[RunConfig, StagedModel, DataSplits, torch.device]:
    config = load_config(run_dir / "config.yaml")
    model = load_model(run_dir / "model.safetensors")
    splits = build_datasets(config.data)
    return config, model, splits, resolve_device(config.eval.device)


def _validation_logits(
    model: StagedModel, splits: DataSplits, bs: int, device: torch.device, progress: bool, legacy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation logits; ``legacy`` reads the split with the *training* transforms (reference-code quirk)."""
    val_set = splits.val
    if legacy:
        if not hasattr(val_set, "view") or not hasattr(splits.train, "transform"):
            raise ConfigError("legacy calibration needs datasets with views (adaptnn.data datasets)")
        val_set = val_set.view(val_set.indices, splits.train.transform)
        torch.manual_seed(0)  # the augmentation draws are random: make them repeatable
    return collect_logits(model, val_set, batch_size=bs, device=device, progress=progress, desc="val")


def calibrate_run(
    run_dir: str | Path,
    *,
    tolerance: float | None = None,
    progress: bool = True,
    policy: str | None = None,
    temperature: bool = False,
    budget_macs: float | None = None,
    budget_ms: float | None = None,
    exit_latency_ms: Sequence[float] | None = None,
    latency_batch_size: int = 1,
    epsilon: float | None = None,
    delta: float = 0.1,
    legacy: bool = False,
) -> dict[str, Any]:
    """Fit an exit policy's thresholds on the validation split and pick the operating point.

    The budgeted-batch sweep of ``policy`` is always computed (validation and test figures for every p).
    The operating point comes from one calibrator: ``budget_macs`` (average MACs per sample),
    ``budget_ms`` with measured ``exit_latency_ms`` (average latency per sample), ``epsilon``/``delta``
    (accuracy drop vs the last exit at most ``epsilon`` with probability ``>= 1 - delta``, Learn then Test),
    or by default the cheapest sweep point within ``tolerance`` of the last exit's validation accuracy.

    Args:
        policy: exit-rule family, one of :data:`adaptnn.policies.POLICY_NAMES`; default: the rule the run's
            training strategy predicts with (``boosted`` with its ``r`` for ``boost``, else ``confidence``).
        temperature: fit per-exit temperatures on the validation split first.
        legacy: reproduce the reference code: validation read with training augmentation and the test
            curve post-processed into its upper envelope (see :mod:`adaptnn.calibration.sweep`).

    Writes ``calibration.json`` (exit MACs, the policy, the sweep, the calibrator's figures, the operating
    point, all choices made on validation figures only).
    """
    run_dir = Path(run_dir)
    chosen = [
        name
        for name, v in (("budget_macs", budget_macs), ("budget_ms", budget_ms), ("epsilon", epsilon))
        if v is not None
    ]
    if len(chosen) > 1:
        raise ConfigError(f"give at most one of budget_macs, budget_ms and epsilon; got {chosen}")
    if budget_ms is not None and exit_latency_ms is None:
        profile = run_dir / "latency_profile.json"
        if not profile.exists():
            raise ConfigError(
                "budget_ms needs per-exit latencies: run `adaptnn profile RUN_DIR` first (writes "
                "latency_profile.json), or pass exit_latency_ms (K cumulative ms per sample on your device)"
            )
        from .latency import LatencyModel

        # per-sample cumulative latency to each exit at the chosen batch size, from the fitted latency model
        exit_latency_ms = [
            t / latency_batch_size for t in LatencyModel.load(profile).exit_latency_ms(latency_batch_size)
        ]
    config, model, splits, device = _load_run(run_dir)
    tolerance = config.calibration.tolerance if tolerance is None else tolerance
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance is a fraction of accuracy in [0, 1), got {tolerance}")
    costs = cost_breakdown(model, splits.input_size).exit_macs
    bs = config.eval.batch_size
    val_logits, val_labels = _validation_logits(model, splits, bs, device, progress, legacy)
    test_logits, test_labels = collect_logits(
        model, splits.test, batch_size=bs, device=device, progress=progress, desc="test"
    )
    policy, policy_kwargs = (policy, {}) if policy is not None else strategy_policy(config)
    family = make_policy(
        policy, model.num_exits, val_logits=val_logits, val_labels=val_labels, temperature=temperature, **policy_kwargs
    )
    sweep = policy_sweep(
        family, val_logits, val_labels, test_logits, test_labels, costs, config.calibration.p_values, legacy=legacy
    )
    last_val_acc = float((val_logits[-1].argmax(-1) == val_labels).double().mean())
    calibrator: dict[str, Any] = {"method": "budgeted_sweep_tolerance", "tolerance": tolerance}
    if chosen:
        if budget_macs is not None:
            result = calibrate_to_budget(family, val_logits, val_labels, costs, budget_macs)
        elif budget_ms is not None:
            result = calibrate_to_latency(
                family, val_logits, val_labels, list(exit_latency_ms or []), budget_ms, batch_size=latency_batch_size
            )
        else:
            result = calibrate_accuracy_guarantee(family, val_logits, val_labels, costs, float(epsilon), delta)
        calibrator = result.to_dict()
        point = {
            "p": None,
            "thresholds": result.thresholds,
            "val_accuracy": result.val["accuracy"],
            "val_avg_cost": float(split_figures(exit_scores(family, val_logits, val_labels), result.thresholds,
                                                np.asarray(costs))["avg_cost"]),
        }  # fmt: skip
    else:
        point = choose_operating_point(sweep, last_val_acc, tolerance)
    calibration = {
        "exit_macs": costs,
        "policy": policy,
        "policy_spec": policy_to_dict(family.with_thresholds(point["thresholds"])),
        "temperature": temperature,
        "legacy": legacy,
        "last_exit_val_accuracy": last_val_acc,
        "tolerance": tolerance,
        "calibrator": calibrator,
        "operating_point": point,
        "budgeted": sweep,
    }
    write_json(run_dir / "calibration.json", calibration)
    log.info(
        "operating point (%s, %s) thresholds=%s (val acc %.4f, val MACs %.0f)",
        policy,
        calibrator["method"],
        [round(t, 4) for t in point["thresholds"]],
        point["val_accuracy"],
        point["val_avg_cost"],
    )
    return calibration


def compare_policies(
    val_logits: torch.Tensor,
    val_labels: torch.Tensor,
    test_logits: torch.Tensor,
    test_labels: torch.Tensor,
    costs: Sequence[float],
    policies: Sequence[str] = POLICY_NAMES,
    *,
    p_values: Sequence[float] | None = None,
    temperature_variants: bool = True,
) -> dict[str, Any]:
    """Budgeted-batch sweep of several policy families on cached logits, with a comparison table.

    Returns ``{label: {curve: [{p, avg_cost, test_accuracy, val_accuracy, val_avg_cost}], auc, auc_range,
    macs_at_last_exit_accuracy, macs_saved_at_last_exit_accuracy, ...}}``; labels are the family names, plus
    ``<name>+ts`` for confidence-based families with per-exit temperature scaling when ``temperature_variants``.
    """
    last_acc = float((test_logits[-1].argmax(-1) == test_labels).double().mean())
    num_exits = test_logits.shape[0]
    curves: dict[str, list[dict[str, Any]]] = {}
    for name in policies:
        variants = [False, True] if temperature_variants and name in ("confidence", "entropy", "margin") else [False]
        for temp in variants:
            family = make_policy(name, num_exits, val_logits=val_logits, val_labels=val_labels, temperature=temp)
            sweep = policy_sweep(family, val_logits, val_labels, test_logits, test_labels, costs, p_values)
            curves[name + ("+ts" if temp else "")] = [
                {k: pt[k] for k in ("p", "avg_cost", "test_accuracy", "val_accuracy", "val_avg_cost")} for pt in sweep
            ]
    table = curve_table(
        {k: ([pt["avg_cost"] for pt in v], [pt["test_accuracy"] for pt in v]) for k, v in curves.items()},
        {k: (float(costs[-1]), last_acc) for k in curves},
    )
    return {
        row["label"]: {"curve": curves[row["label"]], **{k: v for k, v in row.items() if k != "label"}} for row in table
    }


def evaluate_run(
    run_dir: str | Path, *, progress: bool = True, policies: Sequence[str] | None = POLICY_NAMES
) -> dict[str, Any]:
    """Anytime, budgeted and realised evaluation; writes ``report.json`` and ``report.png``.

    Calibrates first when ``calibration.json`` is missing. With ``policies`` (default: every family) the
    report also compares their budgeted curves (``policies`` key; one extra pass over the validation split).
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
    if "policy_spec" in calibration:
        policy = policy_from_dict(calibration["policy_spec"])
    else:  # calibration.json written before policies were configurable
        policy = policy_from_dict({"name": "confidence", "thresholds": point["thresholds"]})
    simulated = simulate_policy(policy, test_logits, test_labels, costs)
    realised = realised_run(model, splits.test, policy, batch_size=config.eval.batch_size, device=device)
    matches = bool(torch.equal(simulated.pop("exit_index"), realised.pop("exit_index")))
    # each exit's prediction as the training strategy defines it (boost: the additive ensemble)
    exit_predictions = torch.stack(build_strategy(config.train).predictions(list(test_logits)))
    anytime = anytime_results(exit_predictions, test_labels, costs)
    last = anytime[-1]
    sim_exit, sim_pred = simulate_exits(policy, test_logits)
    calibrator = calibration.get("calibrator", {"method": "budgeted_sweep_tolerance"})
    if calibrator.get("method", "budgeted_sweep_tolerance") == "budgeted_sweep_tolerance":
        rule = "cheapest budgeted point (validation MACs) with validation accuracy >= last exit's - tolerance"
    else:
        rule = f"{calibrator['method']} calibrator (see calibrator)"
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
                "rule": rule,
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
        "policy": calibration.get("policy_spec", {"name": "confidence"}),
        "calibrator": calibrator,
        "legacy": bool(calibration.get("legacy", False)),
        "per_class": per_class_exits(sim_exit, sim_pred, test_labels, costs, splits.class_names),
    }
    if report["policy"].get("name") == "learned":  # weights are in calibration.json; keep the report light
        report["policy"] = {k: v for k, v in report["policy"].items() if k != "state_dict"}
    if policies:
        val_logits, val_labels = collect_logits(
            model, splits.val, batch_size=config.eval.batch_size, device=device, progress=progress, desc="val"
        )
        report["policies"] = compare_policies(
            val_logits, val_labels, test_logits, test_labels, costs, policies, p_values=config.calibration.p_values
        )
    write_json(run_dir / "report.json", report)
    plot_report(report, run_dir / "report.png")
    return report
