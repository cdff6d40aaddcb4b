"""The folder tree is the architecture: imports point down the layers, and no import cycle exists.

An ``ast`` walk over ``src/adaptnn`` (function-local imports included) checks every import against
:data:`LAYERS`: a module may import its own package and any package of a *lower* layer; packages of the same
layer are siblings and may not import each other. Cycles are checked between modules (imports under
``if TYPE_CHECKING:`` never run, so they do not make a cycle, but they still obey the layers).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "adaptnn"

#: bottom to top; one entry per layer, each a set of top-level packages/modules of ``adaptnn``
LAYERS: list[set[str]] = [
    {"errors", "version"},  # foundations: no adaptnn imports at all
    {"io"},  # atomic files, strict JSON, safetensors checkpoints
    {"runtime", "data"},  # staged model + early-exit loop + MACs; datasets
    {"layers", "policies"},  # exit heads; exit rules (implement runtime.ExitPolicy)
    {"models", "calibration"},  # registered families; budgeted-batch engine and calibrators
    {"adapters", "measure", "strategies"},  # timm/torchvision/HF; wall-clock measurement; training losses
    {"training"},  # Trainer, schedules, DDP batching
    {"evaluation"},  # cached logits, curves, realised runs, plots
    {"export"},  # ONNX export (stages, graph, cond) and the onnxruntime stages runner
    {"runs"},  # run-directory workflows and their config
    {"serve"},  # stage-level serving engine (pools survivors across requests), ASGI app, Ray Serve deployment
    {"cli"},  # the command line
]
#: the façade and the old-path shims sit above everything and may import anything
EXEMPT = {"adaptnn", "adaptnn._deprecated"}

RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> Iterator[tuple[str, int, bool]]:
    """``(imported adaptnn module, line, under TYPE_CHECKING)`` for every import in ``source``."""
    tree = ast.parse(source)
    guarded = _type_checking_lines(tree)
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "adaptnn":
                    yield alias.name, node.lineno, node.lineno in guarded
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "adaptnn":
                continue
            for alias in node.names:  # `from . import msdnet` imports the submodule itself
                sub = f"{target}.{alias.name}"
                yield (sub if sub in known else target), node.lineno, node.lineno in guarded


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def check_tree(files: dict[str, tuple[str, bool]]) -> tuple[list[str], list[list[str]]]:
    """Layer violations and import cycles of ``{module: (source, is_package)}``."""
    known = set(files)
    violations: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, (source, is_package) in sorted(files.items()):
        for target, line, guarded in imports_of(source, module, is_package, known):
            if not guarded and target in known and target != module:
                graph[module].add(target)
            if module in EXEMPT:
                continue
            src_layer, dst_layer = layer_of(module), layer_of(target)
            if target == "adaptnn":
                violations.append(f"{module}:{line} imports the adaptnn façade (import the defining module instead)")
                continue
            if src_layer == dst_layer:
                continue
            if src_layer not in RANK or dst_layer not in RANK:
                violations.append(f"{module}:{line}: {src_layer!r} or {dst_layer!r} is in no layer of LAYERS")
            elif RANK[dst_layer] >= RANK[src_layer]:
                kind = "a sibling" if RANK[dst_layer] == RANK[src_layer] else "a layer above"
                violations.append(f"{module}:{line} imports {target} ({kind}: {src_layer} -> {dst_layer})")
    return violations, _cycles(graph)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def source_tree() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(), p.name == "__init__.py") for p in sorted(SRC.rglob("*.py"))}


def test_every_package_has_a_layer():
    entries = [p for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()]
    tops = {p.stem if p.is_file() else p.name for p in entries}
    tops -= {"__init__", "_deprecated"}
    assert tops <= set(RANK) | {"configs"}, f"packages without a layer: {sorted(tops - set(RANK))}"


def test_imports_point_down_the_layers_and_never_cycle():
    violations, cycles = check_tree(source_tree())
    assert not violations, "upward or sideways imports:\n" + "\n".join(violations)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("adaptnn.runtime.staged", "from ..training import Trainer\n", "a layer above"),
        ("adaptnn.runtime.staged", "def f():\n    from adaptnn.cli import main\n", "a layer above"),
        ("adaptnn.models.msdnet", "from ..calibration import budgeted\n", "a sibling"),
        ("adaptnn.policies.base", "import adaptnn.evaluation.curves\n", "a layer above"),
    ],
)
def test_the_check_catches_an_upward_import(module, source, expected):
    files = source_tree()
    files[module] = (files[module][0] + source, False)
    violations, _ = check_tree(files)
    assert any(expected in v and module in v for v in violations), violations


def test_the_check_catches_a_hidden_cycle():
    files = source_tree()
    cost_source, _ = files["adaptnn.runtime.cost"]
    files["adaptnn.runtime.cost"] = (cost_source + "\ndef f():\n    from .staged import StagedModel\n", False)
    _, cycles = check_tree(files)
    assert ["adaptnn.runtime.cost", "adaptnn.runtime.staged"] in cycles
