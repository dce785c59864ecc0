"""``--write-to-project`` after a run: every finished entry written through one paquo session,
on the fake QuPath of tests/fake_qupath.py (paquo's real Python code, no JVM)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from shapely.geometry import box

import fake_qupath
from qpseg.engine.project_writeback import write_back
from qpseg.engine.run import SlideResult
from qpseg.qupath.geojson import QuPathObject, write_geojson


def _results(tmp_path: Path, p: Any) -> list[SlideResult]:
    out = []
    for i, eid in enumerate(p.entry_ids):
        pred = tmp_path / "pred" / f"{eid}.geojson"
        write_geojson(pred, [QuPathObject(box(k, k, k + 5, k + 5), classification="Tumor",
                                          metadata={"qpseg_model": "m"}) for k in range(i + 1)])
        out.append(SlideResult(key=str(eid), name=f"s{i}", slide="", output=str(pred),
                               status="done" if i else "skipped", entry_id=eid,
                               summary={"qpseg objects": i + 1, "qpseg model": "m"}))
    out.append(SlideResult(key="x", name="x", slide="", output="", status="failed",
                           entry_id=99))
    return out


def test_one_session_opens_each_written_slide_once(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """paquo's project save asks every entry whether it changed, which reads its image data
    and so opens its slide: opening and saving the project per entry opened n² slides. Now
    the project is opened once and each written entry's slide once."""
    from qpseg.testing.projects import make_project

    qupath = fake_qupath.install(monkeypatch)
    p = make_project(tmp_path / "p", n_slides=3, width=64, height=64, annotations=False)
    written = write_back(p.folder, _results(tmp_path, p))
    assert [(w.entry_id, w.added, w.error) for w in written] == [
        (eid, i + 1, "") for i, eid in enumerate(p.entry_ids)]
    assert qupath.slides_opened == 3
    assert qupath.opened_projects == [str(p.path.resolve())]
    images = json.loads(p.path.read_text(encoding="utf-8"))["images"]
    assert [i["metadata"]["qpseg objects"] for i in images] == ["1", "2", "3"]


def test_an_entry_that_cannot_be_written_is_reported_and_the_others_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qpseg.testing.projects import make_project

    fake_qupath.install(monkeypatch)
    p = make_project(tmp_path / "p", n_slides=3, width=64, height=64, annotations=False)
    p.slides[1].path.unlink()
    written = write_back(p.path, _results(tmp_path, p))
    assert [bool(w.error) for w in written] == [False, True, False]
    assert "not on this machine" in written[1].error
    assert not (p.folder / "data" / str(p.entry_ids[1]) / "data.qpdata").exists()
    images = json.loads(p.path.read_text(encoding="utf-8"))["images"]
    assert ["qpseg objects" in (i.get("metadata") or {}) for i in images] == [True, False, True]
