"""The optional paquo backend: only runs where paquo finds a QuPath installation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from shapely.geometry import box

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


# ---- replacing qpseg objects: the logic run on paquo's image entry, with a stand-in for paquo
# (the real thing needs QuPath; test_round_trip_through_qpdata covers it where QuPath is).


class _Java:
    def __init__(self, metadata: dict[str, str], old_api: bool) -> None:
        self._md = metadata
        if old_api:  # QuPath 0.4: only annotations had retrieveMetadataValue
            self.retrieveMetadataValue = metadata.get

    def getMetadata(self) -> dict[str, str]:
        if hasattr(self, "retrieveMetadataValue"):
            raise RuntimeError("java.lang.NoSuchMethodException")
        return self._md


class _Obj:
    def __init__(self, name: str, metadata: dict[str, str], locked: bool = False,
                 old_api: bool = False) -> None:
        self.name, self.locked = name, locked
        self.java_object = _Java(metadata, old_api)


class _Proxy(list):  # type: ignore[type-arg]
    def __isub__(self, other: Any) -> _Proxy:  # paquo: in-place removal only
        for o in list(other):
            self.remove(o)
        return self


class _Hierarchy:
    def __init__(self, annotations: list[_Obj], detections: list[_Obj]) -> None:
        self.annotations, self.detections = _Proxy(annotations), _Proxy(detections)
        self.loaded: list[dict[str, Any]] = []

    def load_geojson(self, features: list[dict[str, Any]]) -> bool:
        self.loaded.extend(features)
        return bool(features)


class _Image:
    def __init__(self, hierarchy: _Hierarchy) -> None:
        self.hierarchy, self.metadata = hierarchy, {}  # type: dict[str, str]


def test_replace_in_image_keeps_user_and_locked_objects() -> None:
    from qpseg.qupath.geojson import to_feature

    user = _Obj("user", {})
    user_tagged_other = _Obj("user with own metadata", {"reviewer": "AB"})
    old_ai = _Obj("old AI", {"qpseg_model": "m1"})
    old_ai_04 = _Obj("old AI, QuPath 0.4", {"qpseg_model": "m1"}, old_api=True)
    locked_ai = _Obj("reviewed AI", {"qpseg_model": "m1"}, locked=True)
    old_cell = _Obj("old cell", {"qpseg_model": "m1"})
    image = _Image(_Hierarchy([user, user_tagged_other, old_ai, old_ai_04, locked_ai],
                              [old_cell]))
    new = [to_feature(QuPathObject(box(0, 0, 5, 5), classification="Tumor",
                                   metadata={"qpseg_model": "m2"}))]
    removed, added = paquo_backend.replace_in_image(
        image, [f for f in new if f is not None], entry_metadata={"qpseg tumour area µm^2": "12"})
    assert (removed, added) == (3, 1)
    assert [o.name for o in image.hierarchy.annotations] == [
        "user", "user with own metadata", "reviewed AI"]
    assert list(image.hierarchy.detections) == []
    assert image.hierarchy.loaded[0]["properties"]["metadata"]["qpseg_model"] == "m2"
    assert image.metadata == {"qpseg tumour area µm^2": "12"}


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
    ai = QuPathObject(box(10, 10, 50, 60), classification="Tumor", metadata={"qpseg_model": "a"})
    assert paquo_backend.replace_qpseg_objects(p.path, eid, [ai]) == (0, 1)
    assert paquo_backend.replace_qpseg_objects(p.path, eid, [ai, ai]) == (1, 2)
    back = paquo_backend.read_annotations(p.path, eid)
    assert sorted(o.classification or "" for o in back) == ["Stroma", "Tumor", "Tumor"]
