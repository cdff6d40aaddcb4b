"""Old module paths (adaptnn 0.1 had a flat layout) kept importable for one release, with a FutureWarning.

``import adaptnn.staged`` or ``from adaptnn.cost import exit_macs`` still work: a finder on ``sys.meta_path``
answers for the old names only, with a small module that forwards attribute lookups to the new home of each
name and warns once, naming the new path. The table below is the whole migration map.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED", "install"]

#: old module -> new module, or ``{name: new module}`` with ``"*"`` for every other name.
MOVED: dict[str, str | dict[str, str]] = {
    "adaptnn.staged": "adaptnn.runtime.staged",
    "adaptnn.execution": "adaptnn.runtime.execution",
    "adaptnn.state": "adaptnn.runtime.state",
    "adaptnn.cuda_graphs": "adaptnn.runtime.cuda_graphs",
    "adaptnn.cost": "adaptnn.runtime.cost",
    "adaptnn.heads": {"heads_share": "adaptnn.runtime.cost", "*": "adaptnn.layers.heads"},
    "adaptnn.timing": "adaptnn.measure.timing",
    "adaptnn.latency": "adaptnn.measure.latency",
    "adaptnn.speed": "adaptnn.measure.speed",
    "adaptnn.targets": "adaptnn.runs.targets",
    "adaptnn.calibrate": "adaptnn.calibration.budgeted",
    "adaptnn.train": "adaptnn.training",
    "adaptnn.checkpoint": {"load_model": "adaptnn.models", "*": "adaptnn.io"},
    "adaptnn.config": "adaptnn.runs.config",
    "adaptnn.report": {"plot_report": "adaptnn.evaluation", "plot_curves": "adaptnn.evaluation", "*": "adaptnn.io"},
    "adaptnn.evaluate": "adaptnn.evaluation",
}


def _targets(old: str) -> dict[str, str]:
    entry = MOVED[old]
    return {"*": entry} if isinstance(entry, str) else entry


class _MovedModule(types.ModuleType):
    """Stands at an old path; every attribute comes from the name's new module."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        targets = _targets(self.__name__)
        module = importlib.import_module(targets.get(name, targets["*"]))
        try:
            return getattr(module, name)
        except AttributeError:
            moved = f"module {self.__name__!r} (now {module.__name__!r})"
            raise AttributeError(f"{moved} has no attribute {name!r}") from None

    def __dir__(self) -> list[str]:
        names: set[str] = set()
        for target in set(_targets(self.__name__).values()):
            names.update(getattr(importlib.import_module(target), "__all__", ()))
        return sorted(names)


class _MovedLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MovedModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        targets = _targets(module.__name__)
        new = targets["*"] if len(targets) == 1 else ", ".join(sorted(set(targets.values())))
        warnings.warn(
            f"{module.__name__} moved to {new}; the old path works in this release only. "
            f"Import from {new} (or from adaptnn itself for the public names).",
            FutureWarning,
            stacklevel=2,
        )


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _MovedLoader())
        return None


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (called by ``adaptnn/__init__``)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
