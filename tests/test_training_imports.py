"""The training package's modules import one another one way only: no two of them import
each other (imports inside functions included), so each can be read and tested on its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TRAINING = Path(__file__).resolve().parents[1] / "src" / "qpseg" / "training"


def training_imports(folder: Path) -> dict[str, set[str]]:
    """Per module of ``folder`` (the ``qpseg.training`` package), the other modules of the
    package it imports anywhere in its body: ``from qpseg.training.x import ...``,
    ``from qpseg.training import x`` and ``import qpseg.training.x``."""
    names = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules: list[str] = []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for module in modules:
                parts = module.split(".")
                if parts[:2] == ["qpseg", "training"] and len(parts) > 2 and parts[2] in names:
                    found.add(parts[2])
        graph[path.stem] = found - {path.stem}
    return graph


def mutual_pairs(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The pairs of modules that import each other, each pair once, names sorted."""
    return sorted({(a, b) for a, deps in graph.items() for b in deps
                   if a < b and a in graph.get(b, set())})


def test_the_reader_sees_imports_inside_functions(tmp_path: Path) -> None:
    (tmp_path / "run.py").write_text("def f():\n    from qpseg.training.h2g import g\n")
    (tmp_path / "h2g.py").write_text("def g():\n    from qpseg.training.run import (\n"
                                     "        _save,\n    )\n")
    (tmp_path / "loop.py").write_text("from qpseg.training import run\nimport qpseg.errors\n")
    graph = training_imports(tmp_path)
    assert graph == {"run": {"h2g"}, "h2g": {"run"}, "loop": {"run"}}
    assert mutual_pairs(graph) == [("h2g", "run")]


def test_no_two_training_modules_import_each_other() -> None:
    if not TRAINING.is_dir():
        pytest.skip(f"no source tree at {TRAINING}")
    graph = training_imports(TRAINING)
    assert mutual_pairs(graph) == []
    assert {"run", "h2g", "run_record", "stage_setup"} <= set(graph)
    # the pieces both runs share import neither run
    for shared in ("run_record", "stage_setup"):
        assert not graph[shared] & {"run", "h2g"}, shared
