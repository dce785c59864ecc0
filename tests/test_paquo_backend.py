"""The optional paquo backend: only runs where paquo finds a QuPath installation."""

from __future__ import annotations

from pathlib import Path

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
