"""Long steps report progress: the library calls ``progress(done, total, item)``; the CLI shows
a Rich bar on stderr only when stderr is a terminal, and --json stays one document."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from shapely.affinity import translate

from qpseg.cli import _common
from qpseg.edits import evaluate_edits
from qpseg.evaluate import evaluate
from qpseg.manifest import import_project
from qpseg.qupath.geojson import QuPathObject, read_geojson, write_geojson
from qpseg.testing.projects import SyntheticProject, make_project


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SyntheticProject:
    p = make_project(tmp_path_factory.mktemp("proj"), n_slides=2, width=600, height=500,
                     mpp=0.5, seed=5)
    pred_dir = p.folder / "qpseg" / "predictions"
    pred_dir.mkdir()
    for f in (p.folder / "qpseg" / "annotations").glob("*.geojson"):
        write_geojson(pred_dir / f.name, [
            QuPathObject(translate(o.geometry, 10, 0), classification=o.classification,
                         metadata={"qpseg_model": "m", "qpseg_model_sha256": "0" * 64})
            for o in read_geojson(f)])
    return p


class Calls:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, str]] = []

    def __call__(self, done: int, total: int, item: str) -> None:
        self.calls.append((done, total, item))


def test_evaluate_reports_each_slide(project: SyntheticProject, tmp_path: Path) -> None:
    calls = Calls()
    evaluate(project.path, project.path, tmp_path / "o", report=False, n_bootstrap=0,
             progress=calls)
    names = [s.path.name for s in project.slides]
    assert calls.calls == [(0, 2, ""), (1, 2, names[0]), (2, 2, names[1])]


def test_import_project_reports_each_entry(project: SyntheticProject, tmp_path: Path) -> None:
    calls = Calls()
    import_project(project.path, tmp_path / "o", use_paquo=False, ai_objects="all-out",
                   progress=calls)
    names = [s.path.name for s in project.slides]
    assert calls.calls == [(1, 4, names[0]), (2, 4, names[1]), (3, 4, names[0]),
                           (4, 4, names[1])]


def test_evaluate_edits_reports_each_entry(project: SyntheticProject, tmp_path: Path) -> None:
    calls = Calls()
    evaluate_edits(project.path, tmp_path / "o", progress=calls)
    names = [s.path.name for s in project.slides]
    assert calls.calls == [(1, 4, names[0]), (2, 4, names[1]), (3, 4, names[0]),
                           (4, 4, names[1])]


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    with _common.StepProgress("work") as bar:
        assert not bar.enabled
        bar(1, 2, "a")
    assert err.getvalue() == ""


def test_cli_bar_on_a_terminal_leaves_json_alone(project: SyntheticProject, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """On a terminal the bar is drawn on stderr; stdout holds only the JSON summary."""
    from qpseg.cli.evaluate import evaluate as evaluate_cmd

    monkeypatch.setattr(_common, "stderr_is_terminal", lambda: True)
    seen: list[Any] = []
    real_call = _common.StepProgress.__call__

    def spy(self: _common.StepProgress, done: int, total: int, item: str = "") -> None:
        seen.append((self.enabled, done, total))
        real_call(self, done, total, item)

    monkeypatch.setattr(_common.StepProgress, "__call__", spy)
    truth = tmp_path / "proj"
    shutil.copytree(project.folder, truth)
    code = evaluate_cmd(truth=truth / "project.qpproj", pred=truth / "project.qpproj",
                        out=tmp_path / "o", classes=None, mpp=None, mpp_override=False,
                        eval_mpp=None, truth_mode="exhaustive", mask_mpp=None,
                        lesion_class=None, instances=None, no_report=True, seed=0, workers=1,
                        ai_objects="unreviewed-out", model=None, as_json=True)
    out, err = capfd.readouterr()
    assert code == 0
    assert json.loads(out)["n_scored"] == 2
    assert seen[-1] == (True, 2, 2)
    assert "scoring slides" in err
