"""The optional paquo backend: only runs where paquo finds a QuPath installation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from shapely.geometry import box

import fake_qupath
from qpseg.errors import ProjectError
from qpseg.qupath import paquo_backend
from qpseg.qupath.geojson import QuPathObject

needs_qupath = pytest.mark.skipif(
    not paquo_backend.qupath_available(),
    reason="paquo found no QuPath installation (set PAQUO_QUPATH_DIR to run these)",
)


def test_without_qupath_the_backend_refuses_cleanly(tmp_path: Path) -> None:
    if paquo_backend.qupath_available():
        pytest.skip("QuPath is installed here")
    with pytest.raises(ProjectError, match="QuPath"):
        paquo_backend.read_annotations(tmp_path / "project.qpproj", 1)


@needs_qupath
def test_round_trip_through_qpdata(tmp_path: Path) -> None:  # pragma: no cover - needs QuPath
    from qpseg.testing.projects import make_project

    p = make_project(tmp_path / "p", n_slides=1, width=300, height=300, annotations=False)
    obj = QuPathObject(box(10, 10, 50, 60), classification="Tumor", class_color=(200, 0, 0))
    assert paquo_backend.add_objects(p.path, p.entry_ids[0], [obj]) == 1
    back = paquo_backend.read_annotations(p.path, p.entry_ids[0])
    assert len(back) == 1 and back[0].classification == "Tumor"
    assert back[0].geometry.area == pytest.approx(40 * 50)


# ---- writing through paquo's real Python code on a fake QuPath (tests/fake_qupath.py): the
# saves, failures and URI checks of paquo 0.9 as they happen, without a JVM.

MODEL = {"qpseg_model": "m2"}


@pytest.fixture
def qupath(monkeypatch: pytest.MonkeyPatch) -> fake_qupath.State:
    return fake_qupath.install(monkeypatch, version="0.5.1")


def _project(folder: Path, n: int = 1) -> Any:
    from qpseg.testing.projects import make_project

    return make_project(folder, n_slides=n, width=64, height=64, annotations=False)


def _data(p: Any, eid: int) -> Path:
    return p.folder / "data" / str(eid) / "data.qpdata"


def _seed(p: Any, eid: int, objects: list[Any]) -> bytes:
    """Give an entry a data.qpdata with ``objects``; returns its bytes."""
    fake_qupath.write_qpdata(_data(p, eid), objects)
    return _data(p, eid).read_bytes()


def _held(p: Any, eid: int) -> list[tuple[str, str, bool, dict[str, str]]]:
    """What the entry's data.qpdata holds: (kind, id, locked, metadata) per object."""
    return [(o.KIND, str(o.getID()), o.isLocked(), dict(o._metadata))
            for o in fake_qupath.read_qpdata(_data(p, eid))._objects]


def _entry_metadata(p: Any, eid: int) -> dict[str, str]:
    import json

    images = json.loads(p.path.read_text(encoding="utf-8"))["images"]
    return next(dict(i.get("metadata") or {}) for i in images if i["entryID"] == eid)


def _ring(x0: float, y0: float, x1: float, y1: float) -> dict[str, Any]:
    return {"type": "Polygon",
            "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def _old_objects() -> tuple[Any, Any, Any]:
    user = fake_qupath.make_object("annotation", id="11111111-1111-4111-8111-111111111111")
    old_ai = fake_qupath.make_object("annotation", id="22222222-2222-4222-8222-222222222222",
                                     metadata={"qpseg_model": "m1"}, path_class="Tumor",
                                     roi=_ring(0, 0, 8, 8))
    old_cell = fake_qupath.make_object("cell", id="33333333-3333-4333-8333-333333333333",
                                       metadata={"qpseg_model": "m1"}, path_class="Tumor",
                                       roi=_ring(20, 20, 30, 30), nucleus=_ring(23, 23, 27, 27))
    return user, old_ai, old_cell


def _originals(*objects: Any) -> list[QuPathObject]:
    """What qpseg saved for these objects: QuPath's own GeoJSON of them, read by qpseg."""
    from qpseg.qupath.geojson import parse_features

    return parse_features([fake_qupath.feature_of(o) for o in objects])


def _predictions(n: int = 2, *, cell: bool = False, run: str = "r") -> list[QuPathObject]:
    import uuid

    preds = [QuPathObject(box(i * 10, 0, i * 10 + 8, 8), classification="Tumor",
                          metadata=dict(MODEL), id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{run}{i}")))
             for i in range(n)]
    if cell:
        preds.append(QuPathObject(box(40, 40, 50, 50), object_type="cell",
                                  classification="Tumor", metadata=dict(MODEL),
                                  nucleus_geometry=box(43, 43, 47, 47)))
    return preds


@pytest.mark.parametrize("version", ["0.5.1", "0.7.0"])
def test_cells_are_written_and_old_objects_replaced(tmp_path: Path, version: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """paquo's load_geojson asks Gson for an annotation when it meets a cell and QuPath throws
    ClassCastException, after the old objects were removed; paquo's ``with`` block then saved
    the entry without them. Now the cell goes in with its nucleus, and only qpseg's earlier
    objects leave (0.7: hasMetadata, getURIs)."""
    fake_qupath.install(monkeypatch, version=version)
    p = _project(tmp_path / "p")
    eid = p.entry_ids[0]
    user, old_ai, old_cell = _old_objects()
    _seed(p, eid, [user, old_ai, old_cell])
    done = paquo_backend.replace_qpseg_objects(p.path, eid, _predictions(2, cell=True),
                                               originals=_originals(old_ai, old_cell),
                                               entry_metadata={"qpseg objects": "3"})
    assert (done.removed, done.added) == (2, 3)
    assert done.kept_edited == done.kept_locked == done.kept_unproven == done.not_added == 0
    held = _held(p, eid)
    assert held[0][:2] == ("annotation", str(user.getID()))
    assert sorted(k for k, _, _, md in held[1:] if md == MODEL) == [
        "annotation", "annotation", "cell"]
    assert len(held) == 4
    cell = next(o for o in fake_qupath.read_qpdata(_data(p, eid))._objects if o.isCell())
    nucleus = cell.getNucleusROI()
    assert nucleus is not None
    assert sorted(map(tuple, nucleus["coordinates"][0][:4])) == [
        (43, 43), (43, 47), (47, 43), (47, 47)]
    assert _entry_metadata(p, eid)["qpseg objects"] == "3"
    assert (_data(p, eid).parent / "data.qpdata.bak").read_bytes()  # the previous version


@pytest.mark.parametrize("where", ["adding", "saving"])
def test_a_failure_leaves_the_entry_exactly_as_it_was(tmp_path: Path, where: str,
                                                      qupath: fake_qupath.State) -> None:
    """QuPath throws half-way through adding the objects, or half-way through writing
    data.qpdata (a RuntimeException: QuPath restores its own backup only on an IOException):
    the entry's data is byte-identical afterwards and its summary is not stored."""
    p = _project(tmp_path / "p")
    eid = p.entry_ids[0]
    before = _seed(p, eid, list(_old_objects()))
    project_before = p.path.read_bytes()
    if where == "adding":
        qupath.insert_fails_after = 1
    else:
        qupath.save_fails = True
    with pytest.raises(ProjectError) as failed:
        paquo_backend.replace_qpseg_objects(p.path, eid, _predictions(3),
                                            entry_metadata={"qpseg objects": "3"})
    assert _data(p, eid).read_bytes() == before
    assert p.path.read_bytes() == project_before
    assert "(the entry is unchanged): RuntimeException" in str(failed.value)


def test_every_object_is_converted_and_checked_before_anything_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QuPath 0.4 keeps GeoJSON metadata only on TMA cores: its objects would lose the
    'qpseg_model' marker, so the next run could not replace them (every run would add a copy
    of every prediction). The entry is refused, untouched, with the reason."""
    qupath = fake_qupath.install(monkeypatch, version="0.4.4")
    p = _project(tmp_path / "p")
    eid = p.entry_ids[0]
    before = _seed(p, eid, list(_old_objects()))
    with pytest.raises(ProjectError, match=r"0\.4\.4.*does not keep object metadata"):
        paquo_backend.replace_qpseg_objects(p.path, eid, _predictions(2))
    assert _data(p, eid).read_bytes() == before
    assert qupath.slides_opened == 0  # refused before the entry's data was even read


def test_locked_objects_and_user_annotations_are_never_replaced(
        tmp_path: Path, qupath: fake_qupath.State) -> None:
    """Only unlocked objects with qpseg's marker go; a prediction whose id is that of a locked
    object is not added beside it (the locked one is the pathologist's version)."""
    p = _project(tmp_path / "p")
    eid = p.entry_ids[0]
    user, old_ai, old_cell = _old_objects()
    user_md = fake_qupath.make_object("annotation", metadata={"reviewer": "AB"})
    reviewed = fake_qupath.make_object("annotation", id="44444444-4444-4444-8444-444444444444",
                                       locked=True, metadata={"qpseg_model": "m1"},
                                       roi={"type": "Point", "coordinates": [1, 2]})
    locked_user = fake_qupath.make_object("detection", locked=True)
    _seed(p, eid, [user, user_md, old_ai, reviewed, locked_user, old_cell])
    again = QuPathObject(box(0, 0, 9, 9), classification="Tumor", metadata=dict(MODEL),
                         id=str(reviewed.getID()).upper())
    done = paquo_backend.replace_qpseg_objects(p.path, eid, [again, *_predictions(1)],
                                               originals=_originals(old_ai, old_cell))
    assert (done.removed, done.added, done.kept_locked, done.not_added) == (2, 1, 1, 1)
    held = {i: (k, locked, md) for k, i, locked, md in _held(p, eid)}
    assert len(held) == 5
    for kept in (user, user_md, locked_user):
        assert str(kept.getID()) in held
    assert held[str(reviewed.getID())] == ("annotation", True, {"qpseg_model": "m1"})
    stored = next(o for o in fake_qupath.read_qpdata(_data(p, eid))._objects
                  if str(o.getID()) == str(reviewed.getID()))
    assert stored._roi == {"type": "Point", "coordinates": [1, 2]}  # the reviewed version
    assert str(old_ai.getID()) not in held and str(old_cell.getID()) not in held


@pytest.mark.parametrize("how", ["moved", "missing"])
def test_an_entry_paquo_would_not_save_fails_with_the_reason(
        tmp_path: Path, how: str, qupath: fake_qupath.State) -> None:
    """paquo's save() skips an entry whose image URI is not a reachable file with only a log
    warning: a moved project (or a missing slide) looked written. It fails, untouched."""
    import shutil

    p = _project(tmp_path / "p")
    eid = p.entry_ids[0]
    before = _seed(p, eid, list(_old_objects()))
    if how == "moved":
        shutil.move(p.folder, tmp_path / "elsewhere")
        qpproj = tmp_path / "elsewhere" / "project.qpproj"
        data = tmp_path / "elsewhere" / "data" / str(eid) / "data.qpdata"
        reason = "project was moved.*update the image paths"
    else:
        p.slides[0].path.unlink()
        qpproj, data, reason = p.path, _data(p, eid), "not on this machine"
    with pytest.raises(ProjectError, match=reason):
        paquo_backend.replace_qpseg_objects(qpproj, eid, _predictions(2))
    assert data.read_bytes() == before


def test_paquo_gets_the_resolved_project_file(tmp_path: Path,
                                              qupath: fake_qupath.State) -> None:
    """paquo appends project.qpproj only to a name without a suffix (a folder 'study.v2' is
    refused) and keeps links; it is given the real .qpproj."""
    p = _project(tmp_path / "study.v2")
    link = tmp_path / "link"
    link.symlink_to(p.folder, target_is_directory=True)
    eid = p.entry_ids[0]
    paquo_backend.replace_qpseg_objects(p.folder, eid, _predictions(1))
    paquo_backend.replace_qpseg_objects(link, eid, _predictions(2, run="s"),
                                        originals=_predictions(1))
    assert qupath.opened_projects == [str(p.path.resolve())] * 2
    assert len(_held(p, eid)) == 2


def _edited_objects() -> dict[str, Any]:
    """An earlier qpseg object of each review status, as the pathologist left them."""
    user, old_ai, old_cell = _old_objects()
    return {
        "user": user,
        "unreviewed": old_ai,
        "nucleus reshaped": old_cell,
        "reclassified": fake_qupath.make_object(
            "annotation", id="55555555-5555-4555-8555-555555555555", path_class="Stroma",
            metadata={"qpseg_model": "m1"}, roi=_ring(40, 0, 48, 8)),
        "moved a little": fake_qupath.make_object(
            "detection", id="66666666-6666-4666-8666-666666666666", path_class="Tumor",
            metadata={"qpseg_model": "m1"}, roi=_ring(0.004, 50, 8.004, 58)),
        "made a detection": fake_qupath.make_object(
            "detection", id="77777777-7777-4777-8777-777777777777", path_class="Tumor",
            metadata={"qpseg_model": "m1"}, roi=_ring(50, 50, 58, 58)),
        "another run's": fake_qupath.make_object(
            "annotation", id="88888888-8888-4888-8888-888888888888", path_class="Tumor",
            metadata={"qpseg_model": "m0"}, roi=_ring(60, 0, 63, 3)),
    }


def test_only_unreviewed_objects_are_replaced(tmp_path: Path,
                                              qupath: fake_qupath.State) -> None:
    """The review rule decides what an earlier qpseg object is: unchanged and unlocked
    (within QuPath's float rounding) is replaced; a reshaped nucleus, another class or another
    object type is the pathologist's edit and stays, as does an object whose original is not
    among the saved predictions (another run's). Before, all unlocked ones were removed."""
    p = _project(tmp_path / "p")
    eid = p.entry_ids[0]
    objs = _edited_objects()
    saved = _originals(objs["unreviewed"], objs["nucleus reshaped"], objs["reclassified"],
                       objs["moved a little"], objs["made a detection"])
    objs["nucleus reshaped"]._nucleus = _ring(22, 22, 28, 28)
    objs["reclassified"]._class = "Tumor"  # qpseg said Stroma
    objs["moved a little"]._roi = _ring(0, 50, 8, 58)  # 0.004 px: float32 rounding
    made = objs["made a detection"]
    objs["made a detection"] = fake_qupath.make_object(
        "annotation", id=str(made.getID()), path_class="Tumor", metadata={"qpseg_model": "m1"},
        roi=made._roi)
    _seed(p, eid, list(objs.values()))
    done = paquo_backend.replace_qpseg_objects(p.path, eid, _predictions(1), originals=saved)
    assert (done.removed, done.added, done.kept_edited, done.kept_unproven) == (2, 1, 3, 1)
    held = {i for _, i, _, _ in _held(p, eid)}
    gone = {str(objs[k].getID()) for k in ("unreviewed", "moved a little")}
    assert not held & gone
    assert {str(o.getID()) for k, o in objs.items() if k not in
            ("unreviewed", "moved a little")} <= held


def test_without_the_earlier_predictions_nothing_is_removed(
        tmp_path: Path, qupath: fake_qupath.State) -> None:
    """No saved predictions: no earlier qpseg object can be shown unchanged, so all stay."""
    p = _project(tmp_path / "p")
    eid = p.entry_ids[0]
    _seed(p, eid, list(_old_objects()))
    done = paquo_backend.replace_qpseg_objects(p.path, eid, _predictions(1))
    assert (done.removed, done.added, done.kept_unproven) == (0, 1, 2)
    assert len(_held(p, eid)) == 4


def test_add_objects_keeps_everything_there(tmp_path: Path, qupath: fake_qupath.State) -> None:
    p = _project(tmp_path / "p")
    eid = p.entry_ids[0]
    _seed(p, eid, list(_old_objects()))
    user = QuPathObject(box(1, 1, 9, 9), classification="Stroma")  # no marker: the user's
    assert paquo_backend.add_objects(p.path, eid, [user]) == 1
    assert len(_held(p, eid)) == 4


def test_replace_without_qupath_refuses_cleanly(tmp_path: Path) -> None:
    if paquo_backend.qupath_available():
        pytest.skip("QuPath is installed here")
    with pytest.raises(ProjectError, match="QuPath"):
        paquo_backend.replace_qpseg_objects(tmp_path / "project.qpproj", 1, [])


@needs_qupath
def test_replace_through_qpdata(tmp_path: Path) -> None:  # pragma: no cover - needs QuPath
    from qpseg.testing.projects import make_project

    p = make_project(tmp_path / "p", n_slides=1, width=300, height=300, annotations=False)
    eid = p.entry_ids[0]
    user = QuPathObject(box(1, 1, 9, 9), classification="Stroma", class_color=(0, 200, 0))
    paquo_backend.add_objects(p.path, eid, [user])
    ai = _predictions(1, run="a")
    assert paquo_backend.replace_qpseg_objects(p.path, eid, ai)[:2] == (0, 1)
    assert paquo_backend.replace_qpseg_objects(p.path, eid, _predictions(2, run="b"),
                                               originals=ai)[:2] == (1, 2)
    back = paquo_backend.read_annotations(p.path, eid)
    assert sorted(o.classification or "" for o in back) == ["Stroma", "Tumor", "Tumor"]
