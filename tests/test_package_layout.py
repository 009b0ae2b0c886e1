"""The package layout rules of docs/ARCHITECTURE.md: no import circles, no module over 600
lines, and nothing inside the stage folders importing the entry points (``api``, ``cli``).

The import graph is read from the source (``ast``), lazy imports inside functions included:
a circle through a function-level import is still a circle for a reader.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "mxqn_onnx"
MAX_LINES = 600


def _modules() -> Dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: Dict[str, Path]) -> Set[str]:
    """Package modules that ``name`` imports (``from . import x`` counts as importing ``x``)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in mods:
                    out.add(f"{target}.{alias.name}")
                elif target in mods:
                    out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in mods)
    # importing mxqn_onnx.room.module runs mxqn_onnx/room/__init__.py first (the top package's
    # __init__, which every import runs, re-exports the API and is left out)
    for target in list(out):
        parts = target.split(".")
        parents = (".".join(parts[:i]) for i in range(2, len(parts)))
        out.update(p for p in parents if not (name + ".").startswith(p + "."))
    out.discard(name)
    return out


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_read():
    graph = _graph()
    assert "mxqn_onnx.quant.quantizers" in graph["mxqn_onnx.quant.choose"]
    assert "mxqn_onnx.mixed.search" in graph["mxqn_onnx.api"]  # a module imported as a name
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_no_module_over_600_lines():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_stage_folders_do_not_import_the_entry_points():
    entry = {"mxqn_onnx.api", "mxqn_onnx.cli"}
    bad = {name: sorted(deps & entry) for name, deps in _graph().items()
           if name.count(".") >= 2 and deps & entry}
    assert bad == {}


def test_the_quantizer_math_is_pure():
    assert _graph()["mxqn_onnx.quant.quantizers"] == set()
