"""Deployment knobs of a run: the settings one knob can take, applying a chosen one, and the joint choice as JSON.

A *knob* is a discrete setting fixed per deployment that changes what every exit costs and predicts: the token
reduction of a ViT (``tome``: ToMe ``r``; ``evit``: EViT keep rate; always competing with no reduction) or the
member of an elastic family (``variant``: a width x depth trained into the checkpoint). ``adaptnn calibrate
--knob`` and ``adaptnn menu --joint`` both choose a setting *and* the exit thresholds for a budget with THE knob
engine (:func:`~adaptnn.calibration.calibrate_knob_and_exits`); this module gives them the settings
(:func:`knob_settings`, which refuses a knob the model does not have or a variant it was not trained for), the
per-setting latencies (:func:`settings_exit_ms`), the JSON of a choice (:func:`joint_choice`), and the record
``calibration.json`` keeps so ``adaptnn evaluate`` runs the chosen setting (:func:`apply_knob`).
"""

from __future__ import annotations

import copy
import functools
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..calibration import CalibrationResult, calibrate_knob_and_exits, fit_to_batch_latency
from ..errors import ConfigError
from ..layers.elastic import ElasticStagedModel, Variant
from ..layers.tokens import TokenKnob, set_token_knob, token_blocks
from ..measure.latency import LatencyModel, exit_policy, profile_settings
from ..measure.timing import interleaved_medians, pinned_threads, to_model
from ..policies import ThresholdPolicy
from ..runtime.staged import StagedModel

__all__ = [
    "KNOBS",
    "DEFAULT_KNOB_VALUES",
    "KnobSetting",
    "apply_knob",
    "joint_choice",
    "knob_settings",
    "measure_choice",
    "parse_variant",
    "settings_exit_ms",
    "shown_thresholds",
    "stack_inputs",
]

#: the knobs ``adaptnn calibrate --knob`` takes (``none``: exit thresholds only)
KNOBS = ("none", "tome", "evit", "variant")
#: values tried when none are given (``variant``: every member of the checkpoint)
DEFAULT_KNOB_VALUES: dict[str, tuple[float, ...]] = {"tome": (2, 4, 6, 8), "evit": (0.9, 0.7, 0.5)}
_VARIANT_NAME = re.compile(r"^w(\d+(?:\.\d*)?|\.\d+)(?:_d(\d+))?$")


@dataclass
class KnobSetting:
    """One setting of a knob: its label, its record for ``calibration.json``, and the model set to it.

    ``model`` computes logits and MACs (and runs ``run_dynamic`` in ``adaptnn evaluate``); ``deployed`` is what a
    deployment times: the same model for token knobs, the materialised (plain, smaller) member for variants.
    """

    label: str
    record: dict[str, Any]
    model: StagedModel
    deployed: StagedModel


def parse_variant(name: str) -> Variant:
    """``"w0.5_d2"`` -> ``Variant(0.5, 2)``, ``"w1"`` -> ``Variant(1.0)`` (the names of ``Variant.name``)."""
    match = _VARIANT_NAME.match(str(name).strip())
    if match is None:
        raise ConfigError(f"variant {name!r} is not a variant name; expected names such as 'w0.5_d2' or 'w1'")
    return Variant(float(match.group(1)), None if match.group(2) is None else int(match.group(2)))


def _token_knob(kind: str, value: Any) -> TokenKnob:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--knob {kind} takes numbers (ToMe r, EViT keep rate); got {value!r}") from None
    return TokenKnob(kind, int(number) if kind == "tome" and number.is_integer() else number)


def _require(model: StagedModel, kind: str) -> None:
    if kind in ("tome", "evit") and not token_blocks(model):
        raise ConfigError(
            f"--knob {kind} needs a token ViT (token blocks, e.g. vit_tiny_conv_fmnist); this run's model is a "
            f"{type(model).__name__} without them"
            + ("; it is elastic: use --knob variant" if isinstance(model, ElasticStagedModel) else "")
        )
    if kind == "variant" and not isinstance(model, ElasticStagedModel):
        raise ConfigError(
            f"--knob variant needs an elastic run (e.g. elastic_cnn_mnist trained with strategy sorted); this run's "
            f"model is a {type(model).__name__}"
            + ("; it has token blocks: use --knob tome or --knob evit" if token_blocks(model) else "")
        )


def knob_settings(model: StagedModel, kind: str, values: Sequence[Any] | None = None) -> list[KnobSetting]:
    """The settings ``kind`` takes on ``model``, the default one first (so it wins exact ties).

    Token knobs: no reduction, then one setting per value (ToMe ``r`` / EViT keep rate; default
    :data:`DEFAULT_KNOB_VALUES`). ``variant``: the members named in ``values`` (default: all), largest first.
    Each setting gets its own copy of ``model``; ``model`` is left as it is.

    Raises:
        ConfigError: an unknown knob, one the model does not have, a bad value, or a variant the checkpoint was
            not trained for (one line naming the valid ones).
    """
    if kind not in KNOBS or kind == "none":
        raise ConfigError(f"knob must be one of {list(KNOBS[1:])} to choose a setting; got {kind!r}")
    _require(model, kind)
    if kind == "variant":
        assert isinstance(model, ElasticStagedModel)
        wanted = list(model.variants) if not values else [model.resolve(parse_variant(v)) for v in values]
        members = sorted(dict.fromkeys(wanted), key=Variant.key, reverse=True)
        out = []
        for v in members:
            copy_ = copy.deepcopy(model).eval()
            copy_.set_variant(v)
            record = {"kind": "variant", "label": v.name, "variant": {"width": v.width, "depth": v.depth}}
            out.append(KnobSetting(v.name, record, copy_, model.materialise(v).eval()))
        return out
    knobs = [TokenKnob()] + [_token_knob(kind, v) for v in (values or DEFAULT_KNOB_VALUES[kind])]
    unique: dict[str, TokenKnob] = {}
    for knob in knobs:
        unique.setdefault("none" if knob.is_off else knob.label(), TokenKnob() if knob.is_off else knob)
    out = []
    for label, knob in unique.items():
        copy_ = set_token_knob(copy.deepcopy(model).eval(), knob)
        record = {"kind": kind, "label": label, "token_knob": _knob_dict(knob)}
        out.append(KnobSetting(label, record, copy_, copy_))
    return out


def _knob_dict(knob: TokenKnob) -> dict[str, Any]:
    data = knob.to_dict()
    data["locations"] = None if knob.locations is None else list(knob.locations)
    return data


def apply_knob(model: StagedModel, record: Mapping[str, Any] | None) -> StagedModel:
    """Set ``model`` to the setting ``record`` (``calibration.json``'s ``knob``; ``None``: leave it). Returns it.

    Raises:
        ConfigError: the record is unreadable, or names a knob or variant this model does not have.
    """
    if record is None:
        return model
    try:
        if "token_knob" in record:
            _require(model, "evit" if record.get("kind") == "evit" else "tome")
            spec = dict(record["token_knob"])
            if spec.get("locations") is not None:
                spec["locations"] = tuple(int(i) for i in spec["locations"])
            return set_token_knob(model, TokenKnob(**spec))
        if "variant" in record:
            _require(model, "variant")
            assert isinstance(model, ElasticStagedModel)
            depth = record["variant"].get("depth")
            model.set_variant(Variant(float(record["variant"]["width"]), None if depth is None else int(depth)))
            return model
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ConfigError(f"the calibration's knob {dict(record)!r} is unreadable ({err})") from None
    raise ConfigError(f"the calibration's knob {dict(record)!r} names neither a token knob nor a variant")


def settings_exit_ms(
    models: Mapping[str, StagedModel],
    pool: Tensor,
    batch_size: int,
    *,
    repeats: int = 10,
    warmup_s: float = 0.5,
    num_threads: int | None = None,
) -> tuple[dict[str, list[float]], dict[str, LatencyModel]]:
    """Each setting's cumulative ms *per sample* to each exit at ``batch_size``, and its latency model.

    The ms are measured in the engine (``run_dynamic`` with every sample leaving at that exit), all settings and
    exits interleaved on the same batches, so drift between settings does not bias the choice; the latency models
    (:func:`~adaptnn.measure.latency.profile_settings`, per piece, for predictions of mixed exits) are anchored
    to the last exit's measurement.
    """
    b = int(batch_size)
    if b < 1:
        raise ConfigError(f"the latency batch size must be >= 1, got {batch_size!r}")
    sizes = sorted({1, max(1, b // 4), b}) if b > 1 else [1]
    profiles = profile_settings(
        dict(models), pool, batch_sizes=sizes, repeats=repeats, warmup_s=warmup_s, num_threads=num_threads,
        anchor_batch=b,
    )  # fmt: skip
    # a later exit never costs less than an earlier one: a measured dip is noise (the running maximum)
    return {label: _cumulative([t / b for t in p.info["anchor"]["exit_ms"]]) for label, p in profiles.items()}, profiles


def reanchored(
    exit_ms: Mapping[str, Sequence[float]], profiles: Mapping[str, LatencyModel], factor: float
) -> tuple[dict[str, list[float]], dict[str, LatencyModel]]:
    """Every setting's exit ms and latency model times ``factor``: the machine's speed now over when profiled.

    ``factor`` is a check's ``drift`` (:func:`measure_choice`: the chosen setting's last exit timed now, in the
    check's own protocol, over its anchor). The load of a shared machine moves all settings alike, so one factor
    re-anchors them all; each profile's anchor times (``info["anchor"]``) are scaled too, so a later check's drift is
    measured from the re-anchored time. A factor that is not finite and > 0 is a one-line error
    (:meth:`LatencyModel.scaled`).
    """
    models = {}
    for label, profile in profiles.items():
        model = profile.scaled(factor)
        anchor = model.info.get("anchor")
        if anchor:
            model.info["anchor"] = {
                **anchor,
                "exit_ms": [float(t) * factor for t in anchor.get("exit_ms", [])],
                "last_exit_ms_by_batch": {
                    n: float(t) * factor for n, t in anchor.get("last_exit_ms_by_batch", {}).items()
                },
            }
            if "mixed" in anchor:  # its times (not its ratio to the last exit, nor its compaction count)
                times = ("ms", "predicted_ms", "compaction_shift_ms")
                model.info["anchor"]["mixed"] = {
                    key: float(value) * factor if key in times else value for key, value in anchor["mixed"].items()
                }
        models[label] = model
    return {label: [float(t) * factor for t in ms] for label, ms in exit_ms.items()}, models


def _cumulative(values: Sequence[float]) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(max(float(v), out[-1]) if out else float(v))
    return out


def joint_choice(
    policy: ThresholdPolicy,
    options: Mapping[str, tuple[Tensor, Sequence[float]]],
    labels: Tensor,
    budget: float,
    *,
    unit: str = "MACs",
    batch: int | None = None,
    latency_models: Mapping[str, LatencyModel] | None = None,
) -> tuple[CalibrationResult, dict[str, Any]]:
    """The setting and thresholds with the best validation accuracy within an average ``budget``: engine result, JSON.

    ``options``: setting label -> (validation ``forward_all`` logits, its ``K`` cumulative exit costs), the default
    setting first. ``unit``: ``"MACs"`` (costs and budget per sample) or ``"ms"`` (costs per sample at ``batch``;
    ``budget`` per sample too). Returns the knob engine's result and its choice as JSON: ``knob``,
    ``thresholds``, ``policy``, validation ``accuracy`` and ``avg_cost`` (per sample), ``exit_costs``,
    ``exit_fractions``, every setting's best point (``per_knob``, or why it could not meet the budget) and,
    for ms, ``predicted_ms_per_batch``.

    In ms, the engine's cost of a choice is linear (``sum_k fraction_k * exit_ms[k]``), but at batch > 1 the
    samples that go on run their later stages as a smaller batch. With ``latency_models`` (one per setting, e.g.
    from :func:`settings_exit_ms`) the budget the engine is given is re-fitted until the latency model's
    prediction for the validation samples in batches of ``batch`` (``LatencyModel.predict_batches``) meets ``budget``
    (:func:`~adaptnn.calibration.fit_to_batch_latency`):
    the most accurate choice the latency model keeps within the budget wins, and ``predicted_ms_per_batch`` is
    that prediction (``linear_ms_per_batch`` the engine's own).
    """
    if unit not in ("MACs", "ms"):
        raise ConfigError(f"unit must be 'MACs' or 'ms', got {unit!r}")
    if unit == "ms" and (batch is None or batch < 1):
        raise ConfigError(f"a budget in ms needs the batch size the latencies were measured at (>= 1), got {batch!r}")
    refit = unit == "ms" and latency_models is not None and int(batch) > 1  # type: ignore[arg-type]
    if not refit:
        result = calibrate_knob_and_exits(policy, options, labels, float(budget), unit=unit)
        predicted = result.val["avg_cost"] * int(batch) if unit == "ms" else None  # type: ignore[arg-type]
    else:
        batch_ms = {
            label: functools.partial(model.predict_batches, batch_size=int(batch))  # type: ignore[arg-type]
            for label, model in latency_models.items()  # type: ignore[union-attr]
        }
        result, predicted = fit_to_batch_latency(policy, options, labels, float(budget), int(batch), batch_ms)  # type: ignore[arg-type]
    per_knob = [
        {"knob": p["knob"], **{k: p[k] for k in ("accuracy", "avg_cost", "thresholds") if k in p}}
        if p["feasible"]
        else {"knob": p["knob"], "reason": p["reason"]}
        for p in result.details["per_knob"]
    ]
    out = {
        "knob": result.details["knob"],
        "thresholds": result.thresholds,
        "policy": result.policy.to_dict(),
        "accuracy": result.val["accuracy"],
        "avg_cost": result.val["avg_cost"],
        "exit_fractions": result.val.get("exit_fractions"),
        "exit_costs": result.details["exit_costs"],
        "budget": float(budget),
        "unit": unit,
        "per_knob": per_knob,
    }
    if unit == "ms":
        out["batch_size"] = int(batch)  # type: ignore[arg-type]
        out["predicted_ms_per_batch"] = predicted
        out["linear_ms_per_batch"] = result.val["avg_cost"] * int(batch)  # type: ignore[arg-type]
        out["prediction"] = "latency_model" if refit else "linear"
    return result, out


def measure_choice(
    deployed: StagedModel,
    latency_model: LatencyModel,
    exit_ms: Sequence[float],
    inputs: Tensor,
    policy: ThresholdPolicy,
    batch_size: int,
    *,
    rounds: int = 5,
    warmup_s: float = 0.5,
    num_threads: int | None = None,
    prediction: str = "linear",
) -> dict[str, Any]:
    """Predicted vs measured ms of the chosen setting and thresholds, running ``run_dynamic`` for real.

    ``inputs`` (held out from the choice: the test split) are cut into batches of ``batch_size``; ``run_dynamic``
    with the chosen policy and with every sample sent to the last exit are timed on them with the timing engine
    (:func:`~adaptnn.measure.timing.interleaved_medians`: interleaved, median of ``rounds`` calls per batch). Two
    predictions of the same batches: the linear one (``sum_k fraction_k * exit_ms[k]``) and the latency model's
    from each batch's exit counts (``LatencyModel.predict_batches``); ``predicted_ms_per_batch`` and ``error`` are the
    one the calibrator held the budget to (``prediction``: ``"linear"`` or ``"latency_model"``, as
    :func:`joint_choice` reports). On a shared machine the load can change between the profile and this check; the
    last-exit run timed at both moments measures that drift (``drift``: now / then), and ``error_drift_corrected``
    is the calibrator's error with the prediction scaled by it.
    """
    if prediction not in ("linear", "latency_model"):
        raise ConfigError(f"prediction must be 'linear' or 'latency_model', got {prediction!r}")
    b = int(batch_size)
    n = (inputs.shape[0] // b) * b
    if n == 0:
        raise ConfigError(f"{inputs.shape[0]} inputs are too few to time batches of {b}")
    deployed = deployed.eval()
    batches = [to_model(deployed, inputs[i : i + b]) for i in range(0, n, b)]
    with torch.inference_mode():
        exits = [deployed.run_dynamic(x, policy).exit_index.cpu() for x in batches]

    def dynamic(x: Tensor) -> Any:
        with torch.inference_mode():
            return deployed.run_dynamic(x, policy, check_finite=False)

    never = exit_policy(deployed.num_exits, deployed.num_exits - 1)

    def last(x: Tensor) -> Any:
        with torch.inference_mode():
            return deployed.run_dynamic(x, never, check_finite=False)

    with pinned_threads(num_threads):
        medians = interleaved_medians({"dynamic": dynamic, "last": last}, batches, rounds=rounds, warmup_s=warmup_s)
    measured = statistics.fmean(medians["dynamic"])
    last_now = statistics.fmean(medians["last"])
    costs = torch.as_tensor([float(t) for t in exit_ms], dtype=torch.float64)
    linear = float(costs[torch.cat(exits)].mean()) * b
    lm = statistics.fmean(latency_model.predict_batches(e, b) for e in exits)
    predicted = lm if prediction == "latency_model" else linear
    anchor = latency_model.info.get("anchor") or {}
    then = anchor["exit_ms"][-1] if anchor.get("batch_size") == b and anchor.get("exit_ms") else None
    drift = last_now / then if then else None
    out = {
        "batch_size": b,
        "samples": n,
        "rounds": rounds,
        "prediction": prediction,
        "predicted_ms_per_batch": predicted,
        "measured_ms_per_batch": measured,
        "error": predicted / measured - 1.0,
        "linear_ms_per_batch": linear,
        "linear_error": linear / measured - 1.0,
        "latency_model_ms_per_batch": lm,
        "latency_model_error": lm / measured - 1.0,
        "last_exit_ms_per_batch": last_now,
        "drift": drift,
        "error_drift_corrected": None if drift is None else predicted * drift / measured - 1.0,
        "exit_fractions": torch.bincount(torch.cat(exits), minlength=deployed.num_exits).div(n).tolist(),
    }
    return out


def shown_thresholds(thresholds: Sequence[float]) -> list[float | None]:
    """Thresholds for one printed line (``inf``, never exiting, as ``None``)."""
    return [None if not math.isfinite(t) else round(t, 4) for t in thresholds]


def stack_inputs(dataset: Any, n: int) -> Tensor:
    """The first ``n`` inputs of ``dataset`` (cycled when it is shorter) as one tensor."""
    if len(dataset) == 0:
        raise ConfigError("the split is empty: no inputs to time")
    return torch.stack([torch.as_tensor(dataset[i % len(dataset)][0]) for i in range(int(n))])
