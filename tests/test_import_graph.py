"""No import circles anywhere in ``src/qpseg``: every module can be read, tested and split on
its own. Imports inside functions and under ``TYPE_CHECKING`` count too (a lazy import that
comes back is still a circle a reader has to keep in their head)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root: Path, top: str = "qpseg") -> dict[str, set[str]]:
    """Module -> the modules of ``top`` it imports anywhere in its body. ``from a.b import c``
    names module ``a.b.c`` when that is a module, else ``a.b``; relative imports are resolved."""
    files = {module_name(p, root): p for p in (root / top).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[: len(up) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in files else base)
            for t in targets:
                while t and t not in files:  # import a.b.c where only a.b is ours
                    t = t.rpartition(".")[0]
                if t and t.split(".")[0] == top and t != name:
                    found.add(t)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_graph_sees_lazy_relative_and_submodule_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "qpseg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("def __getattr__(n):\n    from . import a\n")
    (pkg / "sub" / "a.py").write_text("from qpseg.sub import helper\n")
    (pkg / "b.py").write_text("def f():\n    from qpseg.c import g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from qpseg import b\n")
    (pkg / "d.py").write_text("import qpseg.sub.a\nimport os\n")
    graph = import_graph(tmp_path)
    assert graph["qpseg.sub.a"] == {"qpseg.sub"} and graph["qpseg.sub"] == {"qpseg.sub.a"}
    assert graph["qpseg.b"] == {"qpseg.c"} and graph["qpseg.c"] == {"qpseg.b"}
    assert graph["qpseg.d"] == {"qpseg.sub.a"}
    assert cycles(graph) == [["qpseg.b", "qpseg.c"], ["qpseg.sub", "qpseg.sub.a"]]


def test_no_import_circle_in_src() -> None:
    if not (SRC / "qpseg").is_dir():
        pytest.skip(f"no source tree at {SRC}")
    graph = import_graph(SRC)
    assert len(graph) > 50
    assert cycles(graph) == []
