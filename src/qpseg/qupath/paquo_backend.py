"""Optional paquo backend: read/write objects in ``data.qpdata`` through a QuPath install.

Only used when paquo is installed *and* finds QuPath (paquo starts QuPath's JVM). Everything
else in qpseg uses the pure-Python readers; objects still travel as QuPath GeoJSON, parsed and
written by :mod:`qpseg.qupath.geojson`, so both paths give the same :class:`QuPathObject`.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ProjectError, QpsegError
from qpseg.objects import MARKER_KEY

if TYPE_CHECKING:
    from qpseg.qupath.geojson import QuPathObject

__all__ = ["add_objects", "qupath_available", "read_annotations", "replace_qpseg_objects"]

QPSEG_MARKER = MARKER_KEY  # metadata key on every object qpseg writes


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


def replace_qpseg_objects(
    project_path: str | os.PathLike[str], entry_id: int, objects: Iterable[QuPathObject], *,
    entry_metadata: dict[str, str] | None = None, marker: str = QPSEG_MARKER,
) -> tuple[int, int]:
    """Put qpseg's objects into an entry's ``data.qpdata`` via paquo, as
    ``groovy/import_predictions.groovy`` does in QuPath; returns (removed, added).

    Earlier qpseg objects (metadata key ``marker``) are removed unless the pathologist locked
    them; objects without the key (the user's own annotations) are never touched. The new
    objects are added, ``entry_metadata`` (the per-slide summary) is stored on the entry, and
    the project is saved. The entry's previous ``data.qpdata`` is kept as
    ``data.qpdata.bak`` first.
    """
    from qpseg.qupath.geojson import to_feature

    features = [f for f in (to_feature(o) for o in objects) if f is not None]
    with _open(project_path, "r+") as qp:
        image = _image(qp, entry_id, project_path)
        _backup_image_data(image, project_path)
        try:
            counts = replace_in_image(image, features, marker=marker,
                                      entry_metadata=entry_metadata)
            qp.save()
        except QpsegError:
            raise
        except Exception as exc:  # QuPath (Java) refused: say so in one line
            raise ProjectError(f"QuPath could not store entry {entry_id}'s objects: "
                               f"{type(exc).__name__}: {exc}", project_path) from None
    return counts


def replace_in_image(image: Any, features: list[dict[str, Any]], *, marker: str = QPSEG_MARKER,
                     entry_metadata: dict[str, str] | None = None) -> tuple[int, int]:
    """The work of :func:`replace_qpseg_objects` on an open paquo image entry."""
    hierarchy = image.hierarchy
    removed = 0
    for proxy in (hierarchy.annotations, hierarchy.detections):  # detections include cells
        previous = [o for o in proxy if not o.locked and _metadata_value(o, marker) is not None]
        if previous:
            proxy -= previous  # paquo's in-place removal; children are kept
            removed += len(previous)
    if features:
        hierarchy.load_geojson(features)
    for key, value in (entry_metadata or {}).items():
        image.metadata[str(key)] = str(value)
    return removed, len(features)


def _metadata_value(obj: Any, key: str) -> str | None:
    """An object's metadata value: ``getMetadata()`` on every object since QuPath 0.5,
    ``retrieveMetadataValue`` on annotations in 0.4 (paquo exposes neither)."""
    java = getattr(obj, "java_object", None)
    if java is None:
        return None
    for getter in ("getMetadata", "retrieveMetadataValue"):
        fn = getattr(java, getter, None)
        if fn is None:
            continue
        try:
            value = fn().get(key) if getter == "getMetadata" else fn(key)
        except Exception:  # a Java exception: this QuPath does not have that call
            continue
        return None if value is None else str(value)
    return None


def _backup_image_data(image: Any, project_path: str | os.PathLike[str]) -> None:
    """Keep the entry's ``data.qpdata`` as ``data.qpdata.bak`` before paquo rewrites it."""
    from qpseg._io import backup_path

    try:
        data = Path(image.entry_path) / "data.qpdata"
    except Exception:  # paquo could not say where the entry's data lives
        return
    if data.is_file():
        try:
            shutil.copy2(data, backup_path(data))
        except OSError as exc:
            raise ProjectError(f"cannot back up {data} before writing it ({exc.strerror or exc})",
                               project_path) from exc
