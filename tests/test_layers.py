"""The package's import graph follows the data flow: no module imports one from a layer above.

Layers, bottom up: the helpers every layer may use (:data:`BOTTOM`), then
data < models < mixsd < diagnostics < fisher < train < report, then the entry points (:data:`TOP`: the
public API in ``forgetkit/__init__.py``, the command-line modules and the trainer
integrations in ``forgetkit/integrations.py``), which nothing imports.
The Fisher itself sits below the trainer (ewc and fisher_orthogonal train with it); the
report job (:data:`REPORT`: it trains default fine-tunes, then diagnoses them) above both.
Every import counts, also those inside functions. The only import cycle allowed is inside
``forgetkit.data`` (records and formats know each other; the corpora register with records).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "forgetkit"
LAYERS = ("data", "models", "mixsd", "diagnostics", "fisher", "train", "report")
REPORT = {"forgetkit.fisher.report", "forgetkit.fisher.render", "forgetkit.fisher.__main__"}
BOTTOM = {"forgetkit.files", "forgetkit.seeding", "forgetkit.stats", "forgetkit.cli_config",
          "forgetkit.plots"}
TOP = {"forgetkit", "forgetkit.nll", "forgetkit.toyworld", "forgetkit.integrations"}
CYCLES_ALLOWED_IN = "forgetkit.data"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(name: str) -> str | None:
    """The forgetkit module ``name`` refers to (a module, or the module that defines it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str) -> set[str]:
    """The forgetkit modules ``name`` imports (anywhere in the file, also through
    ``importlib.import_module``); importing the bare
    package (``import forgetkit``, ``from forgetkit import __version__``) is no edge: it has
    run before any of its modules."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                package = name if is_package(name) else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}".rstrip(".")
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):  # importlib.import_module("...")
            targets = [node.args[0].value]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "forgetkit" and target != "forgetkit":
                module = resolve(target)
                if module not in (None, "forgetkit", name):
                    found.add(module)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def layer(name: str) -> int:
    """-1 for the bottom helpers, 0..6 for data..report, 7 for the entry points."""
    if name in BOTTOM:
        return -1
    if name in REPORT:
        return LAYERS.index("report")
    if name in TOP:
        return len(LAYERS)
    return LAYERS.index(name.split(".")[1])


def test_every_module_has_a_layer():
    unplaced = [name for name in MODULES if name not in BOTTOM | TOP | REPORT
                and (len(name.split(".")) < 2 or name.split(".")[1] not in LAYERS)]
    assert not unplaced, (f"{unplaced}: place each module in a layer ({', '.join(LAYERS)}), "
                          "the bottom helpers or the entry points (tests/test_layers.py)")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_from_a_layer_above(name):
    upward = sorted(target for target in GRAPH[name] if layer(target) > layer(name))
    assert not upward, (f"{name} (layer {layer(name)}) imports {upward} from above; the order is "
                        f"bottom helpers < {' < '.join(LAYERS)} < entry points")


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_import_cycles_only_inside_data():
    cycles = [sorted(c) for c in strongly_connected(GRAPH) if len(c) > 1]
    outside = [c for c in cycles if not all(m.startswith(CYCLES_ALLOWED_IN + ".") for m in c)]
    assert not outside, f"import cycles outside {CYCLES_ALLOWED_IN}: {outside}"


def test_the_graph_sees_known_edges():
    """The walker is not vacuous: edges that must exist are found, lazy imports included."""
    assert "forgetkit.models.toyworld" in GRAPH["forgetkit.models.loading"]
    assert "forgetkit.train" in GRAPH["forgetkit.fisher.report"]  # inside a function
    assert "forgetkit.data.corpora" in GRAPH["forgetkit.data.records"]  # importlib.import_module
