"""CLI start-up, help, and the error -> exit-code mapping."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qpseg.cli import main

COMMANDS = ["info", "validate", "import-project", "models", "model-info", "train", "infer",
            "evaluate", "evaluate-edits", "demo"]


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
