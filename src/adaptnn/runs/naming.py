"""Cost figures in the run directory's JSON are named by their unit.

The calibration engine (:mod:`adaptnn.calibration`) is generic over the cost unit and calls an average cost
``avg_cost``. In ``calibration.json``, ``report.json`` and the policy comparison the unit is known, so the key
says it: average MACs per sample are ``avg_macs`` (test) and ``val_avg_macs`` (validation), per-exit MACs
``exit_macs``; latency figures are ``avg_latency_ms`` and ``exit_latency_ms``. :func:`named_by_unit` renames
the engine's keys when the runs layer copies its figures, and reads files of older adaptnn (``avg_cost``)
the same way.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

__all__ = ["UNIT_WORDS", "named_by_unit"]

#: the calibration engine's ``unit`` -> the word that replaces ``cost`` in the keys of run-directory JSON
UNIT_WORDS: dict[str, str] = {"MACs": "macs", "ms": "latency_ms"}

#: the engine's generic keys -> their run-directory name, with ``{}`` standing for the unit's word
_GENERIC_KEYS: dict[str, str] = {
    "avg_cost": "avg_{}",
    "val_avg_cost": "val_avg_{}",
    "avg_cost_std_error": "avg_{}_std_error",
    "exit_costs": "exit_{}",
}


def named_by_unit(data: Any, unit: str = "MACs") -> Any:
    """A copy of ``data`` (nested dicts and lists) with the engine's generic cost keys named for ``unit``.

    ``{"avg_cost": 3.0}`` becomes ``{"avg_macs": 3.0}`` for ``"MACs"`` and ``{"avg_latency_ms": 3.0}`` for
    ``"ms"``; every other key and value is kept. Data already named by unit comes back unchanged.
    """
    if unit not in UNIT_WORDS:
        raise ConfigError(f"unknown cost unit {unit!r}; expected one of {list(UNIT_WORDS)}")
    if isinstance(data, dict):
        word = UNIT_WORDS[unit]
        return {
            (_GENERIC_KEYS[k].format(word) if k in _GENERIC_KEYS else k): named_by_unit(v, unit)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [named_by_unit(v, unit) for v in data]
    return data
