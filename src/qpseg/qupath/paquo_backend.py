"""Optional paquo backend: read/write objects in ``data.qpdata`` through a QuPath install.

Only used when paquo is installed *and* finds QuPath (paquo starts QuPath's JVM). Everything
else in qpseg uses the pure-Python readers; objects still travel as QuPath GeoJSON, parsed and
written by :mod:`qpseg.qupath.geojson`, so both paths give the same :class:`QuPathObject`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ProjectError

if TYPE_CHECKING:
    from qpseg.qupath.geojson import QuPathObject

__all__ = ["add_objects", "qupath_available", "read_annotations"]


@functools.cache
def qupath_available() -> bool:
    """True when paquo is installed and can find a QuPath installation (no JVM is started)."""
    try:
        from paquo._config import settings, to_kwargs
        from paquo.jpype_backend import find_qupath
    except Exception:  # paquo missing or broken: the pure-Python path is used
        return False
    try:
        find_qupath(**to_kwargs(settings))
    except Exception:
        return False
    return True


def _open(project_path: str | os.PathLike[str], mode: str) -> Any:
    if not qupath_available():
        raise ProjectError("paquo cannot find a QuPath installation", project_path)
    from paquo.projects import QuPathProject

    try:
        return QuPathProject(Path(project_path), mode=mode)  # type: ignore[arg-type]
    except Exception as exc:
        raise ProjectError(f"paquo cannot open the project: {exc}", project_path) from None


def _image(qp: Any, entry_id: int, project_path: str | os.PathLike[str]) -> Any:
    for image in qp.images:
        if str(getattr(image, "entry_id", "")) == str(entry_id):
            return image
    raise ProjectError(f"no entry with id {entry_id}", project_path)


def read_annotations(project_path: str | os.PathLike[str], entry_id: int) -> list[QuPathObject]:
    """An entry's annotations read from its ``data.qpdata`` via paquo."""
    from qpseg.qupath.geojson import parse_features

    with _open(project_path, "r") as qp:
        image = _image(qp, entry_id, project_path)
        features = image.hierarchy.to_geojson()
    return parse_features(features, source=f"{project_path}#entry{entry_id}")


def add_objects(
    project_path: str | os.PathLike[str], entry_id: int, objects: Iterable[QuPathObject]
) -> int:
    """Add objects to an entry's hierarchy via paquo and save; returns the number added.

    User annotations are left as they are: objects are only added.
    """
    from qpseg.qupath.geojson import to_feature

    features = [f for f in (to_feature(o) for o in objects) if f is not None]
    with _open(project_path, "r+") as qp:
        image = _image(qp, entry_id, project_path)
        image.hierarchy.load_geojson(features)
        qp.save()
    return len(features)
