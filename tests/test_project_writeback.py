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


# ---- the review rule on write-back: only unreviewed predictions are replaced


def _objects_of(p: Any, eid: int) -> list[fake_qupath.PathObject]:
    return list(fake_qupath.read_qpdata(p.folder / "data" / str(eid) / "data.qpdata")._objects)


def _run(pred: Path, objects: list[QuPathObject], eid: int, status: str = "done"
         ) -> list[SlideResult]:
    """What `qpseg infer --overwrite` leaves: the new predictions written as run.py writes
    them (write_predictions: the previous file kept as a backup)."""
    from qpseg.objects import write_predictions

    if status == "done":
        write_predictions(pred, objects, overwrite=pred.exists(),
                          summary={"qpseg_model": "m"})
    return [SlideResult(key=str(eid), name="s", slide="", output=str(pred), status=status,
                        entry_id=eid, summary={"qpseg_model": "m"})]


def _predictions(run: str, n: int = 5, *, dx: float = 0.0) -> list[QuPathObject]:
    import uuid

    return [QuPathObject(box(20 * k + dx, 0, 20 * k + 10 + dx, 10), classification="Tumor",
                         metadata={"qpseg_model": "m", "qpseg_run": run},
                         id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{run}/{k}")))
            for k in range(n)]


def test_write_back_replaces_only_the_predictions_nobody_reviewed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run 1's predictions are written into the project; the pathologist reshapes one,
    reclassifies one, locks one and leaves two alone. Run 2 (--overwrite) must replace only
    the two left alone: the reshaped and reclassified objects are the pathologist's work
    (the review rule calls them edited), the locked one is accepted. Before, every unlocked
    qpseg object was removed and the edits were lost."""
    from qpseg.testing.projects import make_project

    fake_qupath.install(monkeypatch)
    p = make_project(tmp_path / "p", n_slides=1, width=128, height=64, annotations=False)
    eid = p.entry_ids[0]
    pred = p.folder / "qpseg" / "predictions" / f"{eid}.geojson"
    first = _predictions("run1")
    assert [w.added for w in write_back(p.path, _run(pred, first, eid))] == [5]

    objs = {str(o.getID()): o for o in _objects_of(p, eid)}
    ids = [o.id for o in first]
    reshaped, reclassified, locked, untouched = objs[ids[0]], objs[ids[1]], objs[ids[2]], \
        [objs[ids[3]], objs[ids[4]]]
    reshaped._roi = {"type": "Polygon",
                     "coordinates": [[[0, 0], [14, 0], [14, 10], [0, 10], [0, 0]]]}
    reclassified._class = "Stroma"
    locked._locked = True
    fake_qupath.write_qpdata(p.folder / "data" / str(eid) / "data.qpdata", list(objs.values()))

    second = _predictions("run2", dx=1.0)
    [wb] = write_back(p.path, _run(pred, second, eid))
    assert wb.error == ""
    assert (wb.removed, wb.added, wb.kept_edited, wb.kept_locked) == (2, 5, 2, 1)
    assert "kept: 2 edited, 1 locked" in wb.describe()
    held = {str(o.getID()): o for o in _objects_of(p, eid)}
    assert set(held) == {ids[0], ids[1], ids[2], *(o.id for o in second)}
    assert held[ids[0]]._roi == reshaped._roi
    assert held[ids[1]]._class == "Stroma"
    assert held[ids[2]].isLocked()
    assert not {o.getID() for o in untouched} & {o.getID() for o in held.values()}


def test_an_ai_object_without_its_original_is_kept(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous predictions are gone (no file, no backup): nothing proves the project's
    qpseg objects unchanged, so none is removed, and the result says why they stay."""
    from qpseg.testing.projects import make_project

    fake_qupath.install(monkeypatch)
    p = make_project(tmp_path / "p", n_slides=1, width=128, height=64, annotations=False)
    eid = p.entry_ids[0]
    pred = p.folder / "qpseg" / "predictions" / f"{eid}.geojson"
    write_back(p.path, _run(pred, _predictions("run1", 3), eid))
    for f in pred.parent.iterdir():
        f.unlink()
    [wb] = write_back(p.path, _run(pred, _predictions("run2", 2), eid))
    assert (wb.removed, wb.added, wb.kept_unproven) == (0, 2, 3)
    assert "3 without the earlier predictions" in wb.describe()
    assert len(_objects_of(p, eid)) == 5


def test_a_skipped_slide_is_compared_with_its_own_predictions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished slide skipped by a rerun keeps its file: that file is what the project holds,
    so writing it back again replaces the unreviewed objects by identical ones (no copies),
    and an edited object keeps its id without the prediction being added beside it."""
    from qpseg.testing.projects import make_project

    fake_qupath.install(monkeypatch)
    p = make_project(tmp_path / "p", n_slides=1, width=128, height=64, annotations=False)
    eid = p.entry_ids[0]
    pred = p.folder / "qpseg" / "predictions" / f"{eid}.geojson"
    first = _predictions("run1", 3)
    write_back(p.path, _run(pred, first, eid))
    objs = _objects_of(p, eid)
    objs[0]._class = "Stroma"
    fake_qupath.write_qpdata(p.folder / "data" / str(eid) / "data.qpdata", objs)
    [wb] = write_back(p.path, _run(pred, first, eid, status="skipped"))
    assert (wb.removed, wb.added, wb.kept_edited, wb.not_added) == (2, 2, 1, 1)
    held = _objects_of(p, eid)
    assert sorted(str(o.getID()) for o in held) == sorted(o.id for o in first)
    assert next(o for o in held if str(o.getID()) == first[0].id)._class == "Stroma"


def test_the_qpdata_backup_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    # A `data.qpdata.bak` link (a project folder from someone else) must not make the write-back
    # overwrite the file it points to, neither when backing up nor when restoring.
    from qpseg.qupath.paquo_backend import _backup_image_data, _restore_image_data

    marker = tmp_path / "elsewhere.txt"
    marker.write_bytes(b"precious")
    data = tmp_path / "data" / "1" / "data.qpdata"
    data.parent.mkdir(parents=True)
    data.write_bytes(b"qpdata v1")
    (data.parent / "data.qpdata.bak").symlink_to(marker)
    assert _backup_image_data(data, tmp_path / "project.qpproj") is True
    bak = data.parent / "data.qpdata.bak"
    assert not bak.is_symlink() and bak.read_bytes() == b"qpdata v1"
    assert marker.read_bytes() == b"precious"
    data.write_bytes(b"half-written")
    _restore_image_data(data, True, tmp_path / "project.qpproj")
    assert data.read_bytes() == b"qpdata v1" and marker.read_bytes() == b"precious"
