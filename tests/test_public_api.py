"""Public surface: importing adaptnn has no side effects, and the 0.1 module paths still work (with a warning).

Every check runs in a fresh interpreter (``python -c``): in the test process other tests have already imported
adaptnn, its old paths and matplotlib, so module caching would hide both side effects and one-time warnings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

#: Variables adaptnn or its dependencies could plausibly set (often with ``os.environ.setdefault``); the child
#: starts without them, so that setting one shows up as a change.
_WATCHED_PREFIXES = ("HF_", "TRANSFORMERS_", "TOKENIZERS_", "MPL", "PYTORCH_", "TORCH", "CUDA_", "KMP_", "OMP_", "MKL_")


def _run(code: str, *args: str) -> Any:
    """Run ``code`` in a fresh interpreter; it prints one JSON document as its last line, returned here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_WATCHED_PREFIXES)}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- no side effects -------------------------------------------------------------------------------------------

_SIDE_EFFECTS = """
import json, os, sys
import matplotlib

if sys.argv[2] != "auto":
    matplotlib.use(sys.argv[2])  # a user who picked a backend before importing adaptnn


def snapshot():
    # the raw rcParams entry: reading rcParams["backend"] or get_backend() would resolve (and so change) it
    return {"env": dict(os.environ), "backend": repr(dict.__getitem__(matplotlib.rcParams, "backend"))}


before = snapshot()
import adaptnn
imported = snapshot()
from adaptnn.evaluation import plot_curves

plot_curves({"rule": ([1e6, 2e6, 3e6], [0.5, 0.6, 0.65])}, sys.argv[1])
plotted = snapshot()
pyplot = "matplotlib.pyplot" in sys.modules  # before get_backend(), which may import it to resolve "auto"
print(json.dumps({
    "before": before, "imported": imported, "plotted": plotted, "pyplot": pyplot,
    "get_backend": matplotlib.get_backend(),
}))
"""

_BACKEND_ALONE = "import json, matplotlib; print(json.dumps(matplotlib.get_backend()))"


def _changed(before: dict[str, str], after: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    return {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


@pytest.mark.parametrize("backend", ["auto", "svg"])
def test_import_and_plotting_leave_environment_and_matplotlib_alone(tmp_path: Path, backend: str) -> None:
    out = _run(_SIDE_EFFECTS, str(tmp_path / "curves.png"), backend)
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert _changed(out["before"]["env"], out["imported"]["env"]) == {}, "import adaptnn changed os.environ"
    assert _changed(out["before"]["env"], out["plotted"]["env"]) == {}, "plot_curves changed os.environ"
    assert out["imported"]["backend"] == out["before"]["backend"], "import adaptnn changed matplotlib's backend"
    assert out["plotted"]["backend"] == out["before"]["backend"], "plot_curves changed matplotlib's backend"
    assert not out["pyplot"], "adaptnn imported matplotlib.pyplot (global figure state)"
    # the backend matplotlib resolves is the one it resolves without adaptnn (or the user's choice)
    assert out["get_backend"] == (_run(_BACKEND_ALONE) if backend == "auto" else backend)


# --- the 0.1 module paths --------------------------------------------------------------------------------------

#: Names the 0.1 README imports from the old flat modules, and where they live now (written out here rather
#: than read from adaptnn._deprecated.MOVED, so that a change of the map is caught).
README_PATHS: dict[str, dict[str, str]] = {
    "adaptnn.cost": {"exit_macs": "adaptnn.runtime.cost", "cost_breakdown": "adaptnn.runtime.cost"},
    "adaptnn.staged": {n: "adaptnn.runtime.staged" for n in ("StagedModel", "InputSpec", "DynamicOutput")},
    "adaptnn.checkpoint": {"load_model": "adaptnn.models", "save_checkpoint": "adaptnn.io"},
    "adaptnn.calibrate": {n: "adaptnn.calibration.budgeted" for n in ("budgeted_sweep", "choose_operating_point")},
    "adaptnn.train": {"Trainer": "adaptnn.training", "TrainConfig": "adaptnn.training"},
    "adaptnn.evaluate": {"collect_logits": "adaptnn.evaluation"},
    "adaptnn.report": {"write_json": "adaptnn.io", "plot_report": "adaptnn.evaluation"},
    "adaptnn.heads": {"make_head": "adaptnn.layers.heads", "heads_share": "adaptnn.runtime.cost"},
    "adaptnn.cuda_graphs": {"GraphedModel": "adaptnn.runtime.cuda_graphs"},
    "adaptnn.speed": {"bench_at_budget": "adaptnn.measure.speed"},
    "adaptnn.latency": {"profile_latency": "adaptnn.measure.latency"},
    "adaptnn.timing": {"Timer": "adaptnn.measure.timing"},
    "adaptnn.targets": {"resolve_target": "adaptnn.runs.targets"},
    "adaptnn.config": {"RunConfig": "adaptnn.runs.config"},
    "adaptnn.state": {"index_state": "adaptnn.runtime.state"},
    "adaptnn.execution": {"dynamic_loop": "adaptnn.runtime.execution"},
}

#: ``__all__`` of each flat module in adaptnn 0.1 (the last flat-layout commit): every name should still resolve.
OLD_ALL: dict[str, list[str]] = {
    "adaptnn.staged": "StagedModel DynamicOutput InputSpec split_finished".split(),
    "adaptnn.execution": "StageExecutor EagerStages dynamic_loop oracle_loop split_finished stage_segments".split(),
    "adaptnn.state": "State copy_rows index_state map_state slice_state state_batch_size state_tensors".split(),
    "adaptnn.cuda_graphs": "GraphedModel GraphedStages default_buckets power_of_two_buckets".split(),
    "adaptnn.cost": "CostBreakdown cost_breakdown exit_macs count_macs count_params".split(),
    "adaptnn.heads": (
        "PoolLinearHead ConvPoolHead MSDNetConvHead TokenHead HEAD_KINDS FAMILY_DEFAULT_HEADS "
        "FAMILY_DEFAULT_OPTIONS default_head_kind make_head heads_share"
    ).split(),
    "adaptnn.timing": "Timer median_ms pinned_threads machine_info warm_up model_device_dtype to_model".split(),
    "adaptnn.latency": "PiecewiseLinear LatencyModel profile_latency validate_latency_model alive_per_segment".split(),
    "adaptnn.speed": "full_model_macs thresholds_for_macs_fraction bench_policy bench_at_budget percentiles".split(),
    "adaptnn.targets": "Target resolve_target".split(),
    "adaptnn.calibrate": "DEFAULT_P_VALUES assign_exits budgeted_sweep choose_operating_point".split(),
    "adaptnn.train": (
        "TrainConfig Trainer build_strategy resolve_device seed_everything cosine_warmup_factor micro_batch_indices"
    ).split(),
    "adaptnn.checkpoint": (
        "Checkpoint save_checkpoint load_checkpoint load_model load_weights atomic_write_bytes "
        "atomic_write_text pack_tensors unpack_tensors"
    ).split(),
    "adaptnn.config": (
        "ModelConfig CalibrationConfig EvalConfig RunConfig load_config save_config dataclass_from_dict"
    ).split(),
    "adaptnn.report": "to_jsonable write_json plot_report plot_curves".split(),
    "adaptnn.evaluate": (
        "collect_logits anytime_results simulate_policy realised_run exit_fractions common_range curve_auc "
        "cost_at_accuracy curve_table per_class_exits"
    ).split(),
}

#: 0.1 public names the regrouping dropped (an old-path lookup raises AttributeError). Keep this list exact:
#: restoring a name, or dropping another, must be a decision visible here.
REMOVED: dict[str, set[str]] = {
    "adaptnn.state": {"state_batch_size"},
    "adaptnn.cuda_graphs": {"power_of_two_buckets"},
}

_OLD_PATHS = """
import importlib, json, sys, warnings

cases = json.loads(sys.argv[1])  # {old module: {name: new module}}
with warnings.catch_warnings(record=True) as caught:  # adaptnn and the new homes must not warn
    warnings.simplefilter("always")
    import adaptnn
    for new in {n for names in cases.values() for n in names.values()}:
        importlib.import_module(new)
report = {"new_paths_warn": [str(w.message) for w in caught if issubclass(w.category, FutureWarning)], "old": {}}
for old, names in cases.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        __import__(old)  # as an import statement does (import_module would be the warning's caller)
    module = sys.modules[old]
    resolved = {}
    for name, new in names.items():
        try:
            value = getattr(module, name)
        except AttributeError:
            resolved[name] = "missing"
            continue
        resolved[name] = "same" if value is getattr(importlib.import_module(new), name) else "different"
    report["old"][old] = {
        "warnings": [[w.category.__name__, str(w.message), w.filename] for w in caught],
        "resolved": resolved,
    }
print(json.dumps(report))
"""


def _new_home(old: str, name: str) -> str:
    """Where ``old.name`` lives now: the README table above, else adaptnn's own migration map."""
    if name in README_PATHS.get(old, {}):
        return README_PATHS[old][name]
    from adaptnn._deprecated import MOVED

    entry = MOVED[old]
    return entry if isinstance(entry, str) else entry.get(name, entry["*"])


@pytest.fixture(scope="module")
def old_paths() -> dict[str, Any]:
    assert set(README_PATHS) == set(OLD_ALL), "README_PATHS and OLD_ALL cover the same old modules"
    cases = {old: {n: _new_home(old, n) for n in {*README_PATHS[old], *OLD_ALL[old]}} for old in OLD_ALL}
    return _run(_OLD_PATHS, json.dumps(cases))


def test_every_moved_module_is_checked() -> None:
    from adaptnn._deprecated import MOVED

    assert set(MOVED) == set(README_PATHS)


def test_new_paths_do_not_warn(old_paths: dict[str, Any]) -> None:
    assert old_paths["new_paths_warn"] == []  # a new module importing an old path would also eat its warning


@pytest.mark.parametrize("old", sorted(README_PATHS))
def test_old_readme_path_imports_warns_and_resolves(old_paths: dict[str, Any], old: str) -> None:
    result = old_paths["old"][old]
    future = [(message, filename) for category, message, filename in result["warnings"] if category == "FutureWarning"]
    assert len(future) == 1, f"importing {old} should warn once with a FutureWarning, got {result['warnings']}"
    message, filename = future[0]
    for new in set(README_PATHS[old].values()):
        assert new in message, f"the warning for {old} does not name {new}: {message!r}"
    assert "importlib" not in filename, f"the warning points into importlib ({filename}), not at the importer"
    assert {n: result["resolved"][n] for n in README_PATHS[old]} == dict.fromkeys(README_PATHS[old], "same")


@pytest.mark.parametrize("old", sorted(OLD_ALL))
def test_old_public_names_resolve_to_the_new_objects(old_paths: dict[str, Any], old: str) -> None:
    resolved = old_paths["old"][old]["resolved"]
    removed = REMOVED.get(old, set())
    assert {n for n, r in resolved.items() if r == "missing"} == removed
    assert {n: r for n, r in resolved.items() if n not in removed} == dict.fromkeys(set(OLD_ALL[old]) - removed, "same")
