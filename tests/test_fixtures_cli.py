"""`qpseg info` and `qpseg validate` on every real QuPath fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpseg.cli import main


def _projects(root: Path) -> list[Path]:
    names = ("project.qpproj", "project.qpproj.backup")
    return sorted(p for p in root.rglob("*") if p.name in names)


def test_info_on_every_fixture_project(qupath_fixtures: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    projects = _projects(qupath_fixtures)
    assert len(projects) == 11  # 8 project.qpproj + 3 backups
    for p in projects:
        assert main(["info", str(p), "--json"]) == 0, p
        data = json.loads(capsys.readouterr().out)
        assert data["entries"], p
        # None of the fixtures ships its images: every entry is reported missing, none fails.
        assert data["missing"] == len(data["entries"])
        assert main(["info", str(p)]) == 0  # the table form renders too
        capsys.readouterr()


def test_validate_every_fixture(qupath_fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(qupath_fixtures.rglob("*.geojson"))
    assert len(files) == 15
    rc = main(["validate", "--json", *map(str, files), *map(str, _projects(qupath_fixtures))])
    reports = json.loads(capsys.readouterr().out)
    assert len(reports) == 26
    assert all(r["kind"] in ("geojson", "project") for r in reports)
    assert rc in (0, 1)
    assert all(r["ok"] for r in reports if r["kind"] == "project")
