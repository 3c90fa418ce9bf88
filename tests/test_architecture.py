"""The package's shape: imports go one way, from the layers below to the layers above.

The layer order is the README's ("Where things live"). A module may import from its own layer or
any lower one, never from a higher one, and imports never form a cycle. Every import counts,
those inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastslow"

# Bottom to top; a module belongs to the first group whose name is its own or its package's.
LAYERS = (
    ("foundation", ("config", "files", "distributed", "cache")),
    ("data", ("data",)),
    ("inputs", ("inputs", "batches", "negatives", "metrics", "intervals", "index")),
    ("models", ("models", "losses")),
    ("training", ("train", "features", "distill", "scoring")),
    ("stages", ("stages",)),
    ("experiments", ("evaluation", "bench", "rerank", "analysis")),
    ("reporting", ("results", "summary", "claims", "plots")),
    ("notebooks", ("notebook", "parameters", "checked_outputs", "__init__")),
)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    for index, (_, members) in enumerate(LAYERS):
        if name in members:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to the README's layer order")


def imports_of(path: Path) -> set[str]:
    """The fastslow modules ``path`` imports (``from fastslow import x`` names module ``fastslow.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("fastslow")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastslow"):
            if node.module == "fastslow":
                found |= {f"fastslow.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in imports_of(p) if i != m} for m, p in modules.items()}


def test_every_import_points_down_or_sideways():
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]) if target in path else target)
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # A package importing its own submodules (fastslow.data -> fastslow.data.shapes) is not a cycle
    # unless the submodule imports the package back.
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("module", ["fastslow.summary", "fastslow.claims", "fastslow.results"])
def test_the_reporting_layer_needs_neither_torch_nor_faiss(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'faiss') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"importing {module} loads {loaded}"
