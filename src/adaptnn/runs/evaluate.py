"""Evaluating a run: anytime, budgeted and realised results (``report.json``/``.png``), and policy comparison."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..calibration import policy_sweep
from ..errors import ConfigError
from ..evaluation import (
    anytime_results,
    collect_logits,
    curve_table,
    macs_curve,
    per_class_exits,
    plot_report,
    realised_run,
    simulate_policy,
)
from ..io import RunLock, write_json
from ..models import model_spec
from ..policies import POLICY_NAMES, make_policy, policy_from_dict, simulate_exits
from ..runtime.cost import cost_breakdown
from ..training import build_strategy
from .calibrate import calibrate_run, read_calibration
from .knobs import apply_knob
from .naming import named_by_unit
from .report import build_report, operating_point_section
from .rundir import LoadedRun, load_run, recover_run_dir, require_trained

__all__ = ["evaluate_run", "compare_policies"]

#: the figures of each sweep point a policy comparison keeps (engine names; stored named by unit)
_CURVE_KEYS = ("p", "avg_cost", "test_accuracy", "val_accuracy", "val_avg_cost")


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

    ``costs`` are the exits' cumulative MACs. Returns ``{label: {curve: [{p, avg_macs, test_accuracy,
    val_accuracy, val_avg_macs}], auc, auc_range, macs_at_last_exit_accuracy, macs_saved_at_last_exit_accuracy,
    ...}}``; labels are the family names, plus ``<name>+ts`` for confidence-based families with per-exit
    temperature scaling when ``temperature_variants``.
    """
    last_acc = float((test_logits[-1].argmax(-1) == test_labels).double().mean())
    num_exits = test_logits.shape[0]
    curves: dict[str, list[dict[str, Any]]] = {}
    for name in policies:
        variants = [False, True] if temperature_variants and name in ("confidence", "entropy", "margin") else [False]
        for temp in variants:
            family = make_policy(name, num_exits, val_logits=val_logits, val_labels=val_labels, temperature=temp)
            sweep = policy_sweep(family, val_logits, val_labels, test_logits, test_labels, costs, p_values)
            curves[name + ("+ts" if temp else "")] = named_by_unit([{k: pt[k] for k in _CURVE_KEYS} for pt in sweep])
    table = curve_table(
        {k: macs_curve(v) for k, v in curves.items()}, {k: (float(costs[-1]), last_acc) for k in curves}
    )
    return {
        row["label"]: {"curve": curves[row["label"]], **{k: v for k, v in row.items() if k != "label"}} for row in table
    }


def evaluate_run(
    run_dir: str | Path,
    *,
    progress: bool = True,
    policies: Sequence[str] | None = POLICY_NAMES,
    trust_code: bool = False,
    allow_data_change: bool = False,
) -> dict[str, Any]:
    """Anytime, budgeted and realised evaluation; writes ``report.json`` and ``report.png`` and returns the report.

    Calibrates first when ``calibration.json`` is missing. With ``policies`` (default: every family) the
    report also compares their budgeted curves (``policies`` key; one extra pass over the validation split).
    ``trust_code`` and ``allow_data_change`` say how the run is read (:func:`~adaptnn.runs.rundir.load_run`).
    Holds the run directory's lock; ``report.json`` is removed first and written last, so it is never older
    than ``report.png`` beside it.

    Raises:
        RunLockedError: another process is writing ``run_dir``.
        ConfigError: ``calibration.json`` is unreadable or belongs to another model.
    """
    run_dir = Path(run_dir)
    require_trained(run_dir, weights=False)
    with RunLock(run_dir):
        recover_run_dir(run_dir)
        require_trained(run_dir)
        access = {"trust_code": trust_code, "allow_data_change": allow_data_change}
        calib_path = run_dir / "calibration.json"
        if not calib_path.exists():
            calibrate_run(run_dir, progress=progress, **access)
        return _evaluate(run_dir, load_run(run_dir, **access), progress, policies)


def _evaluate(run_dir: Path, run: LoadedRun, progress: bool, policies: Sequence[str] | None) -> dict[str, Any]:
    calib_path = run_dir / "calibration.json"
    calibration = read_calibration(calib_path)
    # the deployment setting chosen with the thresholds (token knob, elastic member), if any: the run uses it
    model, splits, bs = apply_knob(run.model, calibration.get("knob")), run.splits, run.config.eval.batch_size
    costs = cost_breakdown(model, splits.input_size).exit_macs
    if [round(c) for c in costs] != [round(c) for c in calibration["exit_macs"]]:
        raise ConfigError(f"{calib_path} was made for another model (exit MACs differ); run `adaptnn calibrate` again")
    test_logits, test_labels = collect_logits(
        model, splits.test, batch_size=bs, device=run.device, progress=progress, desc="test"
    )
    try:
        policy = policy_from_dict(calibration["policy_spec"])
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(
            f"{calib_path} holds an unreadable exit policy ({' '.join(str(err).split())[:200]}); run "
            f"`adaptnn calibrate {run_dir}` again"
        ) from None
    simulated = simulate_policy(policy, test_logits, test_labels, costs)
    realised = realised_run(model, splits.test, policy, batch_size=bs, device=run.device)
    matches = bool(torch.equal(simulated.pop("exit_index"), realised.pop("exit_index")))
    # each exit's prediction as the training strategy defines it (boost: the additive ensemble)
    exit_predictions = torch.stack(build_strategy(run.config.train).predictions(list(test_logits)))
    anytime = anytime_results(exit_predictions, test_labels, costs)
    sim_exit, sim_pred = simulate_exits(policy, test_logits)
    report = build_report(
        run_dir,
        model=model_spec(model),
        exit_macs=costs,
        anytime=anytime,
        calibration=calibration,
        operating_point=operating_point_section(calibration, simulated, realised, matches, anytime[-1]),
        per_class=per_class_exits(sim_exit, sim_pred, test_labels, costs, splits.class_names),
    )
    if calibration.get("knob") is not None:
        report["knob"] = calibration["knob"]
    if policies:
        val_logits, val_labels = collect_logits(
            model, splits.val, batch_size=bs, device=run.device, progress=progress, desc="val"
        )
        report["policies"] = compare_policies(
            val_logits, val_labels, test_logits, test_labels, costs, policies, p_values=run.config.calibration.p_values
        )
    (run_dir / "report.json").unlink(missing_ok=True)  # the plot below is never beside an older report
    plot_report(report, run_dir / "report.png")
    write_json(run_dir / "report.json", report)
    return report
