"""CLI start-up, help, and the error -> exit-code mapping."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from qpseg.cli import main

COMMANDS = ["info", "validate", "import-project", "models", "model-info", "train", "infer",
            "evaluate", "evaluate-edits", "demo", "groovy"]


def test_import_cli_does_not_import_heavy_modules() -> None:
    code = (
        "import sys, qpseg.cli; heavy = [m for m in ('torch', 'openslide', 'skimage', 'tifffile',"
        " 'shapely', 'numpy', 'PIL', 'pandas', 'rich') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("cmd", [[], *([c] for c in COMMANDS)])
def test_help_works_without_torch(cmd: list[str]) -> None:
    code = (
        "import sys; from qpseg.cli import main; rc = main(sys.argv[1:] + ['--help']);"
        " assert 'torch' not in sys.modules and 'openslide' not in sys.modules; sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


def test_console_script_version() -> None:
    exe = Path(sys.executable).with_name("qpseg")
    if not exe.exists():
        pytest.skip("console script not installed next to this interpreter")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("qpseg ")


def test_user_error_is_one_line_with_file_and_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "project.qpproj"
    bad.write_text('{"version": "0.5.1", "images": [', encoding="utf-8")
    rc = main(["info", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0]
    assert "Traceback" not in "\n".join(err)


def test_debug_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--debug", "info", str(tmp_path / "missing.qpproj")])
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_bad_option_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 2  # missing argument: click usage error


def test_validate_reports_bad_geojson(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.geojson"
    good.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon",
                                        "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]},
        "properties": {"objectType": "annotation",
                       "classification": {"name": "Tumor", "color": [200, 0, 0]}}}]}))
    broken = tmp_path / "broken.geojson"
    broken.write_text("{not json")
    assert main(["validate", str(good)]) == 0
    capsys.readouterr()
    assert main(["validate", "--json", str(good), str(broken)]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert [r["ok"] for r in reports] == [True, False]
    assert reports[0]["counts"] == {"annotation/Tumor": 1}


def _feature(coords: list, **props: object) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": {"objectType": "annotation",
                           "classification": {"name": "Tumor", "color": [200, 0, 0]}, **props}}


SQUARE = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]


@pytest.mark.parametrize("coords", [
    [[[0, 0], [2, 2], [2, 0], [0, 2], [0, 0]]],                      # self-intersection
    [SQUARE[0], [[20, 20], [21, 20], [21, 21], [20, 20]]],           # hole outside its shell
    [[[0, 0], [1e308, 0], [1e308, 10], [0, 10], [0, 0]]],            # out of range
], ids=["self-intersection", "hole-outside-shell", "out-of-range"])
def test_validate_problem_exits_1_without_ok(tmp_path: Path, coords: list,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps([_feature(SQUARE), _feature(coords)]))
    assert main(["validate", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"FAILED {path} (geojson): ") and "1 problem(s)" in lines[0]
    assert not any(line.startswith("ok") for line in lines)
    assert lines[1].strip().startswith("error: feature 1: ")
    assert main(["validate", "--json", str(path)]) == 1
    (report,) = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and len(report["problems"]) == 1


def test_validate_warnings_are_listed_and_exit_0(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "warn.geojson"
    nan_measurement = _feature(SQUARE, measurements={"Area": None, "Perimeter": math.nan})
    no_colour = _feature(SQUARE)
    no_colour["properties"]["classification"] = {"name": "Stroma"}
    path.write_text(json.dumps([nan_measurement, no_colour]))
    assert main(["validate", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"ok {path} (geojson): ") and "2 warning(s)" in lines[0]
    assert "problem" not in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["warning", "warning"]
    assert main(["validate", "--json", str(path)]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["problems"] == [] and len(report["warnings"]) == 2
