"""Per-slide summaries and the predictions files.

:func:`slide_summary` makes one flat row per slide (counts, areas, lesions),
:func:`summary_metadata` turns it into QuPath entry metadata, and :func:`write_predictions`
writes ``<entryID>.geojson`` atomically, its summary ``<entryID>.metadata.json`` first, so an
existing GeoJSON always means a finished slide.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qpseg.errors import QpsegError
from qpseg.labels import ClassMap
from qpseg.objects_measure import AREA, CELL, MAX_DIAMETER, _fmt
from qpseg.qupath.geojson import QuPathObject

__all__ = [
    "PredictionsExistError",
    "metadata_path",
    "predictions_path",
    "slide_summary",
    "summary_metadata",
    "write_predictions",
]


class PredictionsExistError(QpsegError):
    """The predictions file exists and ``overwrite`` was not asked for (the slide is done)."""


# ----------------------------------------------------------------------------------- summary


def _object_area(obj: QuPathObject) -> float:
    for key in (AREA, CELL + AREA):
        v = obj.measurements.get(key)
        if v is not None and math.isfinite(v):
            return float(v)
    return 0.0


def slide_summary(objects: Iterable[QuPathObject], *, lesion_classes: Sequence[str] = (),
                  classes: ClassMap | None = None,
                  provenance: Mapping[str, Any] | None = None) -> dict[str, str | int | float]:
    """Per-slide summary as one flat row (a CSV row, or entry metadata via
    :func:`summary_metadata`).

    Keys: the provenance given; ``qpseg_n_objects``; ``qpseg_count_<class>`` and
    ``qpseg_area_um2_<class>`` per class (every non-background class of ``classes`` when given,
    so rows of different slides share columns; else the classes present; ``Unclassified`` for
    objects without a class); ``qpseg_n_lesions``, ``qpseg_lesion_area_um2``,
    ``qpseg_largest_lesion_um`` (0 without lesions) and ``qpseg_slide_category``
    (``negative``/``itc``/``micro``/``macro``: the largest lesion's) over objects of
    ``lesion_classes`` (left out when there are none). Areas are the objects' ``Area µm^2``
    (cells: ``Cell: Area µm^2``).
    """
    from qpseg.metrics.lesion import NEGATIVE, size_category

    lesion_keys = {n.strip().lower() for n in lesion_classes}
    row: dict[str, str | int | float] = {}
    for key, value in (provenance or {}).items():
        row[str(key)] = _fmt(value)
    counts: dict[str, int] = {}
    areas: dict[str, float] = {}
    if classes is not None:
        for info in classes.classes[1:]:
            counts[info.name] = 0
            areas[info.name] = 0.0
    n_obj = n_les = 0
    les_area = 0.0
    largest = 0.0
    for obj in objects:
        n_obj += 1
        name = obj.classification or "Unclassified"
        area = _object_area(obj)
        counts[name] = counts.get(name, 0) + 1
        areas[name] = areas.get(name, 0.0) + area
        if obj.classification and obj.classification.strip().lower() in lesion_keys:
            n_les += 1
            les_area += area
            d = obj.measurements.get(MAX_DIAMETER, 0.0)
            if math.isfinite(d):
                largest = max(largest, float(d))
    row["qpseg_n_objects"] = n_obj
    for name in counts:
        row[f"qpseg_count_{name}"] = counts[name]
        row[f"qpseg_area_um2_{name}"] = areas[name]
    if lesion_keys:  # a model without lesion classes says nothing about lesions
        row["qpseg_n_lesions"] = n_les
        row["qpseg_lesion_area_um2"] = les_area
        row["qpseg_largest_lesion_um"] = largest
        row["qpseg_slide_category"] = size_category(largest) if n_les else NEGATIVE
    return row


def summary_metadata(summary: Mapping[str, Any]) -> dict[str, str]:
    """A summary row as flat str -> str (QuPath entry metadata holds text only)."""
    out: dict[str, str] = {}
    for key, value in summary.items():
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[str(key)] = _fmt(value)
    return out


# ------------------------------------------------------------------------------------ files


def predictions_path(project_dir: str | os.PathLike[str], entry_id: str | int) -> Path:
    """``<project>/qpseg/predictions/<entryID>.geojson``, where the import script looks."""
    return Path(project_dir) / "qpseg" / "predictions" / f"{entry_id}.geojson"


def metadata_path(geojson_path: str | os.PathLike[str]) -> Path:
    """``<entryID>.metadata.json`` beside ``<entryID>.geojson`` (or ``.geojson.gz``)."""
    path = Path(geojson_path)
    name = path.name
    for suffix in (".gz", ".geojson", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return path.with_name(name + ".metadata.json")


def write_predictions(path: str | os.PathLike[str], objects: Iterable[QuPathObject], *,
                      overwrite: bool = False,
                      summary: Mapping[str, Any] | None = None) -> int:
    """Write ``objects`` as QuPath GeoJSON at ``path`` (atomically); returns how many.

    An existing ``path`` is a finished slide: :class:`PredictionsExistError` unless
    ``overwrite``, in which case the previous file is kept as ``<name>.bak``. ``summary`` (see
    :func:`slide_summary`) is written first, as flat str -> str JSON at :func:`metadata_path`,
    so a GeoJSON never exists without its summary.
    """
    from qpseg._io import write_json_atomic
    from qpseg.qupath.geojson import write_geojson

    path = Path(path)
    if path.is_dir():
        raise QpsegError("is a directory, not a predictions file", path)
    if path.exists() and not overwrite:
        raise PredictionsExistError("predictions exist; pass --overwrite to replace them "
                                    "(the previous file is kept as .bak)", path)
    try:
        if summary is not None:
            write_json_atomic(metadata_path(path), summary_metadata(summary), backup=True)
        return write_geojson(path, objects, backup=True)
    except OSError as exc:
        raise QpsegError(f"cannot write predictions ({exc.strerror or exc})", path) from exc
