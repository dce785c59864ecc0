"""``qpseg validate``: check GeoJSON files and QuPath projects before QuPath sees them."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpseg.errors import MissingImageWarning, QpsegError

__all__ = ["FileReport", "validate_paths"]

GEOJSON_SUFFIXES = (".geojson", ".geojson.gz", ".json")


@dataclass
class FileReport:
    """What ``validate`` found in one file.

    ``problems`` make the file fail (``ok`` is False exactly when there are any): a feature
    lost or changed by a guess (see ``qpseg.qupath.geojson.PROBLEM_SEVERITY``), a project or
    classes file QuPath would not read as written. ``warnings`` are listed but do not fail:
    things QuPath itself reads the same way (NaN measurements, missing class colours) and
    notes such as images not found on this machine.
    """

    path: Path
    kind: str  # "geojson" | "project" | "classes" | "unreadable"
    ok: bool
    summary: str
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ok = self.ok and not self.problems

    def to_json(self) -> dict[str, Any]:
        """JSON form for ``--json``."""
        return {"path": str(self.path), "kind": self.kind, "ok": self.ok,
                "summary": self.summary, "problems": self.problems,
                "warnings": self.warnings, "counts": self.counts}


def _is_project(p: Path) -> bool:
    return p.suffix == ".qpproj" or p.name.endswith(".qpproj.backup")


def _is_classes(p: Path) -> bool:
    return p.name == "classes.json"


def _expand(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*")
                if q.is_file() and not q.name.startswith(".") and (
                    _is_project(q) or _is_classes(q)
                    or q.name.endswith((".geojson", ".geojson.gz")))
            )
            files.extend(found or [p])
        else:
            files.append(p)
    return files


def _validate_geojson(path: Path) -> FileReport:
    from qpseg.qupath.geojson import validate_geojson

    rep = validate_geojson(path)
    counts = {f"{t}/{c or 'Unclassified'}": n for (t, c), n in sorted(
        rep.counts.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1])))}
    problems = [f"feature {p.index}: {p.kind}: {p.message}" for p in rep.problems
                if p.severity == "error"]
    warned = [f"feature {p.index}: {p.kind}: {p.message}" for p in rep.problems
              if p.severity != "error"]
    n_objects = sum(rep.counts.values())
    summary = f"{n_objects} object(s) in {rep.n_features} feature(s)"
    if counts:
        summary += " (" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ")"
    if problems:
        summary += f", {len(problems)} problem(s)"
    if warned:
        summary += f", {len(warned)} warning(s)"
    return FileReport(path, "geojson", rep.ok, summary, problems, counts, warned)


def _validate_project(path: Path) -> FileReport:
    from qpseg.qupath.project import QuPathProject

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qp = QuPathProject.load(path)
    # Missing images are normal for a project made on another machine: a note, not an error.
    errors = [w for w in caught if not issubclass(w.category, MissingImageWarning)]
    problems = [f"error: {w.message}" for w in errors]
    missing = qp.missing_images()
    notes = [f"note: entry {e.entry_id} ({e.image_name}): image not found at {e.uri}"
             for e in missing]
    summary = (f"QuPath {qp.version or '?'}, {len(qp.entries)} entries, {len(missing)} image(s) "
               f"missing, {len(qp.classes)} classes")
    counts = {"entries": len(qp.entries), "missing_images": len(missing)}
    return FileReport(path, "project", not errors, summary, problems, counts, notes)


def _validate_classes(path: Path) -> FileReport:
    from qpseg.qupath.classes import read_classes

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        classes = read_classes(path)
    problems = [f"error: {w.message}" for w in caught]
    summary = f"{len(classes)} classes"
    return FileReport(path, "classes", not caught, summary, problems, {"classes": len(classes)})


def validate_paths(paths: Iterable[str | os.PathLike[str]]) -> list[FileReport]:
    """Validate each path (folders are searched for projects and GeoJSON files).

    Never raises for a bad file: an unreadable one gives a report with ``ok=False``.
    """
    reports = []
    for p in _expand(paths):
        try:
            if p.is_dir():
                raise QpsegError("no .qpproj or .geojson files in this folder", p)
            if not p.exists():
                raise QpsegError("no such file", p)
            if _is_project(p):
                rep = _validate_project(p)
            elif _is_classes(p):
                rep = _validate_classes(p)
            else:
                rep = _validate_geojson(p)
        except QpsegError as exc:
            rep = FileReport(p, "unreadable", False, exc.message, [f"error: {exc.message}"])
        reports.append(rep)
    return reports
