"""The import graph of the embedkit package, read from the source (ast; no module is imported): no
import cycle between embedkit's modules, and embedkit/_triton imports nothing of embedkit outside
embedkit/_triton (the kernels depend on torch and triton only; embedkit.ops calls them, never the
other way).

Every import counts, function-local ones too (a lazy import that closes a cycle is still a cycle
of the design, only one that fails later), and relative imports are resolved. An edge goes to the
module named: `from embedkit.ops import _native` to embedkit.ops._native, `from embedkit import
set_backend` to embedkit itself. The parent packages an import initializes on the way are not
counted, since every package's __init__ imports its own modules.

(tests/test_packaging.py's older check of the _triton rule reads absolute imports only; this one
also sees relative ones.)"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "embedkit"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of the package's modules (None: outside embedkit)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its source)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from X import y`: the submodule X.y where there is one, else X itself
                named = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges.update(t for t in (_target(n, modules) for n in named) if t is not None and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_graph_sees_relative_and_function_local_imports():
    graph = import_graph()
    assert "embedkit.ops" in graph and "embedkit._triton" in graph
    assert graph["embedkit.ops.pool_project"], "embedkit.ops.pool_project imports nothing of embedkit?"
    # a cycle finder that finds nothing would pass the test below
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_embedkit():
    found = cycles(import_graph())
    assert not found, "import cycles (each: modules that import each other, directly or not):\n" + \
        "\n".join(" <-> ".join(c) for c in found)


def test_triton_kernels_import_nothing_of_embedkit_outside_them():
    bad = sorted(f"{m} imports {t}" for m, targets in import_graph().items() if m.startswith("embedkit._triton")
                 for t in targets if not (t == "embedkit._triton" or t.startswith("embedkit._triton.")))
    assert not bad, bad
