"""``report.json`` assembled from its parts: dataset, operating point, policy, calibrator (schema in README.md).

Every function here only arranges figures computed elsewhere (:mod:`.evaluate`); nothing is measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..version import __version__

__all__ = [
    "build_report",
    "dataset_section",
    "operating_point_section",
    "policy_section",
    "read_report",
    "selection_rule",
]


def _read_json_object(path: Path, what: str, fix: str, error: type[Exception]) -> dict[str, Any]:
    """A JSON object from ``path``, or ``error`` in one line naming the file and ``fix``."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"no {what} at {path}; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise error(f"{path} is not a readable {what} ({' '.join(str(err).split())[:200]}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a readable {what} (a JSON {type(data).__name__}, not an object); {fix}")
    return data


def read_report(path: str | Path) -> dict[str, Any]:
    """A ``report.json``, checked for the parts readers use (``anytime``, ``budgeted``, ``operating_point``).

    Raises:
        ConfigError: missing, not JSON or not a report (one line naming the file and the fix).
    """
    path = Path(path)
    fix = f"run `adaptnn evaluate {path.parent}` to write it again"
    report = _read_json_object(path, "report", fix, ConfigError)
    anytime = report.get("anytime")
    problems = [
        name
        for name, ok in (
            ("anytime", isinstance(anytime, list) and bool(anytime) and all(isinstance(a, dict) for a in anytime)),
            ("budgeted", isinstance(report.get("budgeted"), list)),
            ("operating_point", isinstance(report.get("operating_point"), dict)),
        )
        if not ok
    ]
    if problems:
        raise ConfigError(f"{path} is not a readable report (bad or missing {', '.join(problems)}); {fix}")
    return report


def dataset_section(run_dir: Path) -> dict[str, Any]:
    """``splits.json`` of the run without the validation indices.

    Raises:
        DataError: ``splits.json`` is missing or unreadable (one line).
    """
    fix = f"train the run again (adaptnn train --config {run_dir / 'config.yaml'} --run_dir {run_dir})"
    splits = _read_json_object(run_dir / "splits.json", "split record", fix, DataError)
    return {k: v for k, v in splits.items() if k != "val_indices"}


def selection_rule(calibrator: dict[str, Any]) -> str:
    """One line saying how the operating point was chosen."""
    method = calibrator.get("method", "budgeted_sweep_tolerance")
    if method == "budgeted_sweep_tolerance":
        return "cheapest budgeted point (validation MACs) with validation accuracy >= last exit's - tolerance"
    return f"{method} calibrator (see calibrator)"


def operating_point_section(
    calibration: dict[str, Any],
    simulated: dict[str, Any],
    realised: dict[str, Any],
    realised_equals_simulated: bool,
    last_exit: dict[str, Any],
) -> dict[str, Any]:
    """The chosen point: how it was selected (validation figures), simulated and realised on test, vs the last exit.

    Args:
        calibration: ``calibration.json`` (as :func:`~adaptnn.runs.calibrate.read_calibration` returns it).
        simulated, realised: test figures of the policy replayed on cached logits and run for real.
        realised_equals_simulated: every test sample took the simulated exit.
        last_exit: the last exit's ``anytime`` entry (``macs``, ``accuracy``).
    """
    point = calibration["operating_point"]
    return {
        "p": point["p"],
        "thresholds": point["thresholds"],
        "selection": {
            "rule": selection_rule(calibration["calibrator"]),
            "tolerance": calibration["tolerance"],
            "val_accuracy": point["val_accuracy"],
            "val_avg_macs": point["val_avg_macs"],
            "last_exit_val_accuracy": calibration["last_exit_val_accuracy"],
        },
        "simulated": simulated,
        "realised": realised,
        "realised_equals_simulated": realised_equals_simulated,
        "macs_reduction_vs_last_exit": last_exit["macs"] / realised["avg_macs"],
        "accuracy_change_vs_last_exit": realised["accuracy"] - last_exit["accuracy"],
    }


def policy_section(policy_spec: dict[str, Any]) -> dict[str, Any]:
    """The operating point's exit rule; a learned rule's weights stay in calibration.json (the report stays light)."""
    if policy_spec.get("name") == "learned":
        return {k: v for k, v in policy_spec.items() if k != "state_dict"}
    return policy_spec


def build_report(
    run_dir: Path,
    *,
    model: dict[str, Any],
    exit_macs: list[float],
    anytime: list[dict[str, Any]],
    calibration: dict[str, Any],
    operating_point: dict[str, Any],
    per_class: list[dict[str, Any]],
) -> dict[str, Any]:
    """``report.json`` without the optional policy comparison (``policies``, added by the caller).

    Args:
        run_dir: the run directory (its ``splits.json`` is read).
        model: the model spec (registry name and arguments).
        exit_macs: cumulative MACs to reach each exit.
        anytime: ``[{exit, macs, accuracy}]`` on test.
        calibration: ``calibration.json`` (budgeted sweep, policy, calibrator).
        operating_point: :func:`operating_point_section`.
        per_class: per-class exits of the operating point on test.
    """
    return {
        "adaptnn_version": __version__,
        "run_dir": str(run_dir),
        "model": model,
        "dataset": dataset_section(run_dir),
        "exit_macs": exit_macs,
        "anytime": anytime,
        "budgeted": calibration["budgeted"],
        "operating_point": operating_point,
        "policy": policy_section(calibration["policy_spec"]),
        "calibrator": calibration["calibrator"],
        "legacy": bool(calibration["legacy"]),
        "per_class": per_class,
    }
