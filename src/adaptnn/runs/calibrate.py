"""Calibrating a run: fit an exit policy on the validation split and choose its operating point.

The budgeted-batch sweep of the policy is always computed; the operating point comes from one calibrator of
:data:`~adaptnn.runs.calibrators.CALIBRATORS`. ``calibration.json`` is written and read back here
(:func:`read_calibration` also reads files of older adaptnn).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..calibration import policy_sweep
from ..errors import BudgetError, ConfigError
from ..evaluation import collect_logits
from ..io import RunLock, write_json
from ..measure.latency import LatencyModel
from ..policies import ThresholdPolicy, make_policy
from ..runtime.cost import cost_breakdown
from ..training import build_strategy
from .calibrators import CALIBRATORS, CalibrationInputs, CalibrationOptions, point_from_result, select_calibrator
from .config import RunConfig
from .knobs import joint_choice, knob_settings, measure_choice, reanchored, settings_exit_ms, stack_inputs
from .naming import named_by_unit
from .rundir import LoadedRun, load_run, recover_run_dir, require_trained

__all__ = ["KnobTiming", "calibrate_run", "strategy_policy", "read_calibration"]

log = logging.getLogger(__name__)


def strategy_policy(config: RunConfig) -> tuple[str, dict[str, Any]]:
    """The exit rule consistent with how the run was trained: ``(family name, make_policy parameters)``.

    It is the training strategy's :meth:`~adaptnn.strategies.Strategy.policy_spec` (a ``boost`` run predicts
    with its additive ensemble, ``boosted`` with the same ``r``; other strategies with each exit's own logits).
    """
    return build_strategy(config.train).policy_spec()


def _exit_latencies(run_dir: Path, batch_size: int) -> tuple[list[float], LatencyModel]:
    """Per-sample cumulative latency to each exit at ``batch_size``, and the run's fitted latency model."""
    if int(batch_size) < 1:
        raise ConfigError(f"latency_batch_size must be >= 1, got {batch_size!r}")
    profile = run_dir / "latency_profile.json"
    if not profile.exists():
        raise ConfigError(
            "budget_ms needs per-exit latencies: run `adaptnn profile RUN_DIR` first (writes "
            "latency_profile.json), or pass exit_latency_ms (K cumulative ms per sample on your device)"
        )
    model = LatencyModel.load(profile)
    return [t / batch_size for t in model.exit_latency_ms(batch_size)], model


def _profile_check(latency_model: LatencyModel) -> list[dict[str, float]] | None:
    """The saved profile's own held-out check (``adaptnn profile``: dynamic runs at held-out batch sizes), or None.

    A record for ``calibration.json`` and the user, not needed for the choice: a profile saved without it, or with
    one that is not a list of ``{batch_size, error}`` numbers, has none.
    """
    check = latency_model.info.get("validation") if isinstance(latency_model.info, dict) else None
    rows = check.get("rows") if isinstance(check, dict) else None
    if not isinstance(rows, list) or not rows:
        return None

    def finite(value: Any) -> bool:
        return isinstance(value, (int, float)) and math.isfinite(value)

    if not all(isinstance(r, dict) and finite(r.get("batch_size")) and finite(r.get("error")) for r in rows):
        return None
    return [{"batch_size": int(r["batch_size"]), "error": float(r["error"])} for r in rows]


def _validation_logits(run: LoadedRun, progress: bool, legacy: bool) -> tuple[Tensor, Tensor]:
    """Validation logits; ``legacy`` reads the split with the *training* transforms (reference-code quirk)."""
    splits, val_set = run.splits, run.splits.val
    if not legacy:
        return collect_logits(
            run.model, val_set, batch_size=run.config.eval.batch_size, device=run.device, progress=progress, desc="val"
        )
    if not hasattr(val_set, "view") or not hasattr(splits.train, "transform"):
        raise ConfigError("legacy calibration needs datasets with views (adaptnn.data datasets)")
    val_set = val_set.view(val_set.indices, splits.train.transform)
    with torch.random.fork_rng(devices=[]):  # repeatable augmentation draws; the caller's RNG is left as it was
        torch.manual_seed(0)
        return collect_logits(
            run.model, val_set, batch_size=run.config.eval.batch_size, device=run.device, progress=progress, desc="val"
        )


def _fit_inputs(
    run: LoadedRun,
    family_name: str,
    family_kwargs: dict[str, Any],
    *,
    temperature: bool,
    legacy: bool,
    progress: bool,
    val: tuple[Tensor, Tensor] | None = None,
    family: ThresholdPolicy | None = None,
) -> CalibrationInputs:
    """Logits of both splits, the policy family (temperatures fitted on validation) and its budgeted sweep.

    ``val`` and ``family``: validation logits and a fitted family computed already (the knob path) to reuse.
    """
    exit_macs = cost_breakdown(run.model, run.splits.input_size).exit_macs
    val_logits, val_labels = val if val is not None else _validation_logits(run, progress, legacy)
    test_logits, test_labels = collect_logits(
        run.model, run.splits.test, batch_size=run.config.eval.batch_size, device=run.device, progress=progress,
        desc="test",
    )  # fmt: skip
    if family is None:
        family = make_policy(
            family_name, run.model.num_exits, val_logits=val_logits, val_labels=val_labels, temperature=temperature,
            **family_kwargs,
        )  # fmt: skip
    sweep = policy_sweep(
        family, val_logits, val_labels, test_logits, test_labels, exit_macs, run.config.calibration.p_values,
        legacy=legacy,
    )  # fmt: skip
    last_val_acc = float((val_logits[-1].argmax(-1) == val_labels).double().mean())
    return CalibrationInputs(family, val_logits, val_labels, list(exit_macs), sweep, last_val_acc)


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
    trust_code: bool = False,
    allow_data_change: bool = False,
    knob: str | None = None,
    knob_values: Sequence[Any] | None = None,
    timing: KnobTiming | None = None,
) -> dict[str, Any]:
    """Fit an exit policy's thresholds on the validation split and pick the operating point.

    The budgeted-batch sweep of ``policy`` is always computed (validation and test figures for every p).
    The operating point comes from one calibrator: ``budget_macs`` (average MACs per sample),
    ``budget_ms`` with measured ``exit_latency_ms`` (average latency per sample), ``epsilon``/``delta``
    (accuracy drop vs the last exit at most ``epsilon`` with probability ``>= 1 - delta``, Learn then Test),
    or by default the cheapest sweep point within ``tolerance`` of the last exit's validation accuracy.

    With ``knob`` (``tome``, ``evit`` or ``variant``; :mod:`.knobs`) a deployment setting of the model is chosen
    *jointly* with the thresholds for ``budget_macs`` or ``budget_ms``: every setting (no token reduction and each
    of ``knob_values``; or the elastic members named, default all) gets its validation logits and its exit costs
    (MACs, or ms per sample at ``latency_batch_size`` measured per setting as deployed), and the knob engine
    (:func:`~adaptnn.calibration.calibrate_knob_and_exits`) picks the most accurate within the budget. The choice
    is kept as ``knob`` in ``calibration.json`` (``adaptnn evaluate`` runs it); for ms budgets the chosen point is
    then run for real on the test split and ``latency_check`` records predicted vs measured ms (``timing``); by
    default the choice is then re-made once from profiles re-anchored to that run's measured speed and checked
    again (``KnobTiming.refit``).

    Args:
        policy: exit-rule family, one of :data:`adaptnn.policies.POLICY_NAMES`; default: the rule the run's
            training strategy predicts with (:func:`strategy_policy`).
        temperature: fit per-exit temperatures on the validation split first.
        legacy: reproduce the reference code: validation read with training augmentation and the test
            curve post-processed into its upper envelope (see :mod:`adaptnn.calibration.sweep`).
        trust_code, allow_data_change: how the run is read (:func:`~adaptnn.runs.rundir.load_run`).
        knob, knob_values: the deployment knob chosen with the thresholds, and its values (default: see
            :func:`~adaptnn.runs.knobs.knob_settings`).
        timing: how the per-setting latencies are profiled and the choice measured (:class:`KnobTiming`).

    Writes ``calibration.json`` (exit MACs, the policy, the sweep, the calibrator's figures, the operating
    point, all choices made on validation figures only) atomically, holding the run directory's lock, and
    returns its content.

    Raises:
        RunLockedError: another process is writing ``run_dir``.
    """
    if knob not in (None, "none"):
        _check_knob_options(budget_macs, budget_ms, epsilon, exit_latency_ms, tolerance)
    if tolerance is not None and any(v is not None for v in (budget_macs, budget_ms, epsilon)):
        raise ConfigError(
            "tolerance only applies to the default calibrator (the cheapest sweep point within tolerance); "
            "budget_macs, budget_ms and epsilon choose the operating point themselves: drop --tolerance"
        )
    run_dir = Path(run_dir)
    require_trained(run_dir, weights=False)
    with RunLock(run_dir):
        recover_run_dir(run_dir)
        require_trained(run_dir)
        run = load_run(run_dir, trust_code=trust_code, allow_data_change=allow_data_change)
        if knob not in (None, "none"):
            return _calibrate_knob(
                run_dir, run, str(knob), knob_values, timing or KnobTiming(), progress=progress, policy=policy,
                temperature=temperature, budget_macs=budget_macs, budget_ms=budget_ms,
                latency_batch_size=latency_batch_size, legacy=legacy,
            )  # fmt: skip
        return _calibrate(
            run_dir, run, tolerance, progress, policy, temperature, budget_macs, budget_ms, exit_latency_ms,
            latency_batch_size, epsilon, delta, legacy,
        )  # fmt: skip


def _calibrate(
    run_dir: Path,
    run: LoadedRun,
    tolerance: float | None,
    progress: bool,
    policy: str | None,
    temperature: bool,
    budget_macs: float | None,
    budget_ms: float | None,
    exit_latency_ms: Sequence[float] | None,
    latency_batch_size: int,
    epsilon: float | None,
    delta: float,
    legacy: bool,
) -> dict[str, Any]:
    method = select_calibrator({"budget_macs": budget_macs, "budget_ms": budget_ms, "epsilon": epsilon})
    batch_latency_ms = profile_check = None
    if method == "latency_budget" and exit_latency_ms is None:
        exit_latency_ms, latency_model = _exit_latencies(run_dir, latency_batch_size)
        batch_latency_ms = functools.partial(latency_model.predict_batches, batch_size=int(latency_batch_size))
        profile_check = _profile_check(latency_model)
        if profile_check and max(abs(r["error"]) for r in profile_check) > 0.10:
            log.warning(
                "the budget is held to latency_profile.json, whose own check predicted held-out dynamic runs %s "
                "(adaptnn profile): the choice can miss the budget by as much",
                ", ".join(f"{100 * r['error']:+.1f}% at batch {r['batch_size']}" for r in profile_check),
            )
    tolerance = run.config.calibration.tolerance if tolerance is None else tolerance
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance is a fraction of accuracy in [0, 1), got {tolerance}")
    options = CalibrationOptions(
        tolerance, budget_macs, budget_ms, exit_latency_ms, latency_batch_size, epsilon=epsilon, delta=delta,
        batch_latency_ms=batch_latency_ms,
    )  # fmt: skip
    family_name, family_kwargs = (policy, {}) if policy is not None else strategy_policy(run.config)
    inputs = _fit_inputs(run, family_name, family_kwargs, temperature=temperature, legacy=legacy, progress=progress)
    point, calibrator = CALIBRATORS[method][1](inputs, options)
    calibration = _record(
        inputs, family_name, point, calibrator, temperature, legacy, inputs.last_exit_val_accuracy, tolerance
    )
    if profile_check is not None:  # how well the saved profile the budget was held to predicted held-out runs
        calibration["latency_profile_check"] = profile_check
    write_json(run_dir / "calibration.json", calibration)
    log.info(
        "operating point (%s, %s) thresholds=%s (val acc %.4f, val MACs %.0f)",
        family_name,
        method,
        [round(t, 4) for t in point["thresholds"]],
        point["val_accuracy"],
        point["val_avg_macs"],
    )
    return calibration


@dataclass
class KnobTiming:
    """How ``calibrate_run(knob=...)`` times settings for an ms budget and measures the chosen point.

    Attributes:
        repeats: timed passes per piece of each setting's latency profile (:func:`profile_latency`).
        warmup_s: warm-up seconds before each measurement.
        threads: torch CPU threads while timing (``None``: as is).
        measure_samples: test inputs timed through ``run_dynamic`` for predicted vs measured (0: skip).
        rounds: timed calls per batch of that measurement (median).
        refit: re-make the choice once from profiles re-anchored to the check's ``drift`` (the chosen setting's
            last exit timed now, in the check's protocol, over its profiled time) and check again: the budget is
            held to the machine's speed at the end of calibration, not minutes earlier (``latency_check["refit"]``
            keeps the first check).
    """

    repeats: int = 10
    warmup_s: float = 0.5
    threads: int | None = None
    measure_samples: int = 512
    rounds: int = 5
    refit: bool = True


def _refit_record(check: dict[str, Any], label: str) -> dict[str, Any]:
    """What the first check measured, kept when the choice is re-made from profiles re-anchored by its drift."""
    keys = ("predicted_ms_per_batch", "measured_ms_per_batch", "error", "drift", "error_drift_corrected")
    return {"factor": check["drift"], "first_choice": label, "first_check": {k: check[k] for k in keys}}


def _checked_choice(
    choose: Callable[[dict[str, list[float]], dict[str, LatencyModel]], tuple[Any, dict[str, Any]]],
    settings: dict[str, Any],
    exit_ms: dict[str, list[float]],
    profiles: dict[str, LatencyModel],
    inputs: Tensor,
    batch_size: int,
    timing: KnobTiming,
) -> tuple[tuple[Any, dict[str, Any]], dict[str, list[float]], dict[str, LatencyModel], dict[str, Any]]:
    """An ms choice run for real on ``inputs`` (:func:`measure_choice`): ``((result, choice), exit ms, profiles,
    check)``, the exit ms and profiles as the choice used them.

    With ``timing.refit`` the choice is re-made once from the profiles re-anchored to the check's drift
    (:func:`reanchored`) and checked again; ``check["refit"]`` keeps the first check. If nothing fits the budget at
    the speed measured now, the first choice stays and ``check["refit"]["infeasible"]`` says why.
    """

    def measure(chosen: Any, result: Any, choice: dict[str, Any], ms: dict, models: dict) -> dict[str, Any]:
        return measure_choice(
            chosen.deployed, models[chosen.label], ms[chosen.label], inputs, result.policy, batch_size,
            rounds=timing.rounds, warmup_s=timing.warmup_s, num_threads=timing.threads,
            prediction=choice["prediction"],
        )  # fmt: skip

    result, choice = choose(exit_ms, profiles)
    check = measure(settings[choice["knob"]], result, choice, exit_ms, profiles)
    if not timing.refit or check["drift"] is None:
        return (result, choice), exit_ms, profiles, check
    refit = _refit_record(check, choice["knob"])
    now_ms, now_profiles = reanchored(exit_ms, profiles, check["drift"])
    try:
        result, choice = choose(now_ms, now_profiles)
    except BudgetError as err:  # slower now than profiled: nothing fits; the first choice stays
        refit["infeasible"] = str(err)
        log.warning("after re-anchoring to the machine's speed now, %s; keeping the first choice", err)
        check["refit"] = refit
        return (result, choice), exit_ms, profiles, check
    check = measure(settings[choice["knob"]], result, choice, now_ms, now_profiles)
    check["refit"] = refit
    return (result, choice), now_ms, now_profiles, check


def _check_knob_options(
    budget_macs: float | None,
    budget_ms: float | None,
    epsilon: float | None,
    exit_latency_ms: Sequence[float] | None,
    tolerance: float | None,
) -> None:
    """A knob is chosen for a budget (one of budget_macs, budget_ms) from latencies measured per setting."""
    if epsilon is not None or tolerance is not None:
        raise ConfigError("a knob is chosen for a budget: give budget_macs or budget_ms, not epsilon or tolerance")
    if (budget_macs is None) == (budget_ms is None):
        raise ConfigError("a knob is chosen with the exit thresholds for one budget: give budget_macs or budget_ms")
    if exit_latency_ms is not None:
        raise ConfigError("with a knob the exit latencies are measured per setting: drop exit_latency_ms")


def _calibrate_knob(
    run_dir: Path,
    run: LoadedRun,
    kind: str,
    values: Sequence[Any] | None,
    timing: KnobTiming,
    *,
    progress: bool,
    policy: str | None,
    temperature: bool,
    budget_macs: float | None,
    budget_ms: float | None,
    latency_batch_size: int,
    legacy: bool,
) -> dict[str, Any]:
    """The knob setting and thresholds for the budget (see :func:`calibrate_run`); writes calibration.json."""
    settings = {s.label: s for s in knob_settings(run.model, kind, values)}
    labels = None
    val: dict[str, Tensor] = {}
    for label, setting in settings.items():
        val[label], labels = _validation_logits(dataclasses.replace(run, model=setting.model), progress, legacy)
    assert labels is not None
    base = next(iter(settings))
    family_name, family_kwargs = (policy, {}) if policy is not None else strategy_policy(run.config)
    family = make_policy(
        family_name, run.model.num_exits, val_logits=val[base], val_labels=labels, temperature=temperature,
        **family_kwargs,
    )  # fmt: skip
    b = int(latency_batch_size)
    profiles = {}
    if budget_ms is not None:
        pool = stack_inputs(run.splits.val, max(8 * b, 64))
        exit_ms, profiles = settings_exit_ms(
            {label: s.deployed for label, s in settings.items()}, pool, b, repeats=timing.repeats,
            warmup_s=timing.warmup_s, num_threads=timing.threads,
        )  # fmt: skip
        costs = exit_ms
    else:
        costs = {label: list(cost_breakdown(s.model, run.splits.input_size).exit_macs) for label, s in settings.items()}
    unit, budget = ("ms", float(budget_ms)) if budget_ms is not None else ("MACs", float(budget_macs))  # type: ignore[arg-type]

    def choose(exit_costs: dict[str, list[float]], models: dict[str, LatencyModel]) -> tuple[Any, dict[str, Any]]:
        options = {label: (val[label], exit_costs[label]) for label in settings}
        return joint_choice(
            family, options, labels, budget, unit=unit, batch=b if unit == "ms" else None,
            latency_models=models or None,
        )  # fmt: skip

    check = None
    if unit == "ms" and timing.measure_samples > 0:  # right away: the machine's load moves, the profiles are fresh
        test_inputs = stack_inputs(run.splits.test, max(b, min(timing.measure_samples, len(run.splits.test))))
        (result, choice), costs, profiles, check = _checked_choice(
            choose, settings, costs, profiles, test_inputs, b, timing
        )
    else:
        result, choice = choose(costs, profiles)
    chosen = settings[choice["knob"]]
    chosen_run = dataclasses.replace(run, model=chosen.model)
    inputs = _fit_inputs(
        chosen_run, family_name, family_kwargs, temperature=temperature, legacy=legacy, progress=progress,
        val=(val[chosen.label], labels), family=family,
    )  # fmt: skip
    point, _ = point_from_result(inputs, result)
    calibrator = {
        **named_by_unit(result.to_dict(), unit),
        "method": "joint_knob_budget",
        "knob": kind,
        "per_knob": named_by_unit(choice["per_knob"], unit),
        # every setting's exit costs (the knob as one more axis of the cost/latency model) and last-exit accuracy
        "settings": [
            named_by_unit(
                {
                    "knob": label,
                    "exit_costs": costs[label],
                    "last_exit_val_accuracy": float((val[label][-1].argmax(-1) == labels).double().mean()),
                    # what the setting's latency model was anchored to (whole runs; the mixed-exit run's ratio to
                    # the last exit and the cost per compaction it set), as the choice used it
                    **({"latency_anchor": profiles[label].info["anchor"]} if label in profiles else {}),
                },
                unit,
            )
            for label in settings
        ],
    }
    if unit == "ms":
        calibrator["latency_batch_size"] = b
        calibrator["predicted_ms_per_batch"] = choice["predicted_ms_per_batch"]
        calibrator["prediction"] = choice["prediction"]
    last_acc = float((val[base][-1].argmax(-1) == labels).double().mean())
    tolerance = run.config.calibration.tolerance
    calibration = _record(inputs, family_name, point, calibrator, temperature, legacy, last_acc, tolerance)
    calibration["knob"] = chosen.record
    if check is not None:
        calibration["latency_check"] = check
    write_json(run_dir / "calibration.json", calibration)
    log.info("knob %s: chose %s, thresholds %s", kind, chosen.label, point["thresholds"])
    return calibration


def _record(
    inputs: Any,
    family_name: str,
    point: dict[str, Any],
    calibrator: dict[str, Any],
    temperature: bool,
    legacy: bool,
    last_exit_val_accuracy: float,
    tolerance: float,
) -> dict[str, Any]:
    """The fields of ``calibration.json`` every calibration writes (the knob calibration adds ``knob``)."""
    return {
        "exit_macs": inputs.exit_macs,
        "policy": family_name,
        "policy_spec": inputs.family.with_thresholds(point["thresholds"]).to_dict(),
        "temperature": temperature,
        "legacy": legacy,
        "last_exit_val_accuracy": last_exit_val_accuracy,
        "tolerance": tolerance,
        "calibrator": calibrator,
        "operating_point": point,
        "budgeted": named_by_unit(inputs.sweep),
    }


def _check_calibration(data: dict[str, Any], point: Any) -> None:
    """Raise ``TypeError`` unless the parts every reader uses have their types."""
    macs = data.get("exit_macs")
    if not isinstance(macs, list) or not all(isinstance(m, (int, float)) for m in macs):
        raise TypeError("'exit_macs' is not a list of numbers")
    if not isinstance(point, dict) or not isinstance(point.get("thresholds"), list):
        raise TypeError("'operating_point' has no list of thresholds")
    if not isinstance(data.get("budgeted"), list):
        raise TypeError("'budgeted' is not a list of sweep points")
    if not isinstance(data.get("policy_spec", {}) or {}, dict):
        raise TypeError("'policy_spec' is not an object")
    if not isinstance(data.get("knob", {}) or {}, dict):
        raise TypeError("'knob' is not an object")


def read_calibration(path: str | Path) -> dict[str, Any]:
    """``calibration.json`` as :func:`calibrate_run` writes it today, also for files of older adaptnn.

    Older files are brought up to date: cost keys named by unit (``val_avg_cost`` -> ``val_avg_macs``, ...),
    ``policy_spec`` (the confidence rule at the operating point's thresholds), ``calibrator`` (the sweep with
    tolerance) and ``legacy`` (false) when missing.

    Raises:
        ConfigError: the file is missing, not JSON or not a calibration (one line naming the file and the fix).
    """
    path = Path(path)
    fix = f"run `adaptnn calibrate {path.parent}` to write it again"
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, found {type(data).__name__}")
        point = named_by_unit(data["operating_point"])
        calibrator = data.get("calibrator") or {"method": "budgeted_sweep_tolerance"}
        _check_calibration(data, point)
        return {
            **data,
            "policy_spec": data.get("policy_spec") or {"name": "confidence", "thresholds": point["thresholds"]},
            "legacy": bool(data.get("legacy", False)),
            "calibrator": named_by_unit(calibrator, calibrator.get("unit", "MACs")),
            "operating_point": point,
            "budgeted": named_by_unit(data["budgeted"]),
        }
    except FileNotFoundError:
        raise ConfigError(f"no calibration at {path}; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise ConfigError(f"{path} is not a readable calibration file ({reason}); {fix}") from None
