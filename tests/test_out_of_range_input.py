"""Out-of-range numbers in annotation exports, end to end: every command that reads GeoJSON
skips the feature with a warning naming it, validate fails, and no file gets ``inf``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from qpseg.cli import main
from qpseg.qupath.geojson import QuPathObject, write_geojson
from qpseg.testing.projects import SyntheticProject, make_project

# A coordinate no QuPath image has (1e308), and one whose square overflows a double (1e200).
HUGE = [1e308, 1e200]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SyntheticProject:
    return make_project(tmp_path_factory.mktemp("huge"), n_slides=1, width=256, height=256,
                        mpp=0.5, seed=2)


def _with_huge_features(project: SyntheticProject, folder: Path) -> tuple[Path, Path, int]:
    """A copy of ``project`` whose annotation export ends with features at HUGE coordinates;
    returns the project file, the export and the index of the first bad feature."""
    dest = folder / "proj"
    shutil.copytree(project.folder, dest)
    export = dest / "qpseg" / "annotations" / project.annotation_files[0].name
    data = json.loads(export.read_text())
    first_bad = len(data["features"])
    for v in HUGE:
        data["features"].append({
            "type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": [[[0, 0], [v, 0], [v, 10], [0, 10], [0, 0]]]},
            "properties": {"objectType": "annotation",
                           "classification": {"name": "Tumor", "color": [200, 0, 0]}}})
    export.write_text(json.dumps(data))
    return dest / "project.qpproj", export, first_bad


def _finite_json(value: object) -> None:
    if isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, dict):
        for v in value.values():
            _finite_json(v)
    elif isinstance(value, list):
        for v in value:
            _finite_json(v)


def test_import_project_skips_the_feature_and_names_it(
        project: SyntheticProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qpproj, export, first_bad = _with_huge_features(project, tmp_path)
    out = tmp_path / "labels"
    rc = main(["import-project", str(qpproj), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "Traceback" not in err
    for i in range(first_bad, first_bad + len(HUGE)):
        line = next(x for x in err.splitlines() if f"feature {i}:" in x)
        assert export.name in line and "out of range" in line
    manifest = json.loads((out / "manifest.json").read_text())
    _finite_json(manifest)  # parsed with the stdlib: Infinity/NaN would come back as floats


def test_validate_fails_on_out_of_range_coordinates(
        project: SyntheticProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, export, first_bad = _with_huge_features(project, tmp_path)
    assert main(["validate", str(export)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED ")
    assert f"feature {first_bad}: out-of-range-coordinates" in out
    assert f"feature {first_bad + 1}: out-of-range-coordinates" in out


def test_evaluate_edits_csvs_hold_no_inf(project: SyntheticProject, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from shapely.geometry import box

    qpproj, export, _ = _with_huge_features(project, tmp_path)
    entry = project.entry_ids[0]
    predictions = qpproj.parent / "qpseg" / "predictions" / f"{entry}.geojson"
    ai = [QuPathObject(box(0, 0, 50, 50), classification="Tumor",
                       id="6f1c1a64-3f5e-4c1e-9a57-3d2c1b0a9e8f",
                       metadata={"qpseg_model": "tiny_unet", "qpseg_run": "r1"})]
    write_geojson(predictions, ai)
    data = json.loads(export.read_text())
    data["features"].append(json.loads(json.dumps(data["features"][-1])))
    data["features"][-1]["properties"]["metadata"] = {"qpseg_model": "tiny_unet"}
    data["features"][-1]["id"] = ai[0].id  # the AI object, reshaped to a huge one
    export.write_text(json.dumps(data))
    out = tmp_path / "edits"
    rc = main(["evaluate-edits", str(qpproj), "--out", str(out)])
    capsys.readouterr()
    assert rc in (0, 1)
    csvs = sorted(out.glob("*.csv"))
    assert csvs
    for f in csvs:
        text = f.read_text().lower()
        assert "inf" not in text.replace("info", ""), f.name
        assert ",nan" not in text or f.name == "edits_summary.csv", f.name
