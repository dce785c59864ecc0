"""``qpseg validate`` for one GeoJSON file: :func:`validate_geojson` (counts and problems).

Reads the file as :func:`~qpseg.qupath.geojson_read.read_geojson` does and checks each object
against what the writer would do with it; ``PROBLEM_SEVERITY`` says which problems are errors.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from qpseg.qupath.geojson_model import FeatureProblem, GeoJSONReport, QuPathObject
from qpseg.qupath.geojson_read import _parse_file
from qpseg.qupath.geojson_write import _prepare_geometry

__all__ = ["validate_geojson"]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_object(index: int, obj: QuPathObject, valid: bool | None = None,
                  writable: bool = False, nucleus_valid: bool | None = None
                  ) -> list[FeatureProblem]:
    """The problems of one object. ``valid`` / ``nucleus_valid``: whether its geometry /
    nucleus is valid, when already known; ``writable``: its geometry is known to be written
    unchanged (a valid, finite, non-empty Polygon or MultiPolygon; see :func:`_geometry_flags`).
    """
    import shapely

    problems = []
    geom = obj.geometry
    if not (geom.is_valid if valid is None else valid):
        problems.append(FeatureProblem(index, "invalid-geometry",
                                       f"invalid {geom.geom_type} "
                                       f"({shapely.is_valid_reason(geom)}); qpseg would repair "
                                       "it (make_valid), a guess at what was drawn"))
    if not writable:
        prepared = _prepare_geometry(geom, obj.object_type)
        if prepared.geometry is None:
            problems.append(FeatureProblem(index, prepared.kind,
                                           f"{prepared.reason}; would not be written"))
    nucleus = obj.nucleus_geometry
    if nucleus is not None and not (nucleus.is_valid if nucleus_valid is None
                                    else nucleus_valid):
        problems.append(FeatureProblem(index, "invalid-geometry",
                                       f"invalid nucleus {nucleus.geom_type} "
                                       f"({shapely.is_valid_reason(nucleus)}); qpseg would "
                                       "repair it (make_valid)"))
    if obj.classification is not None and obj.class_color is None:
        problems.append(FeatureProblem(index, "missing-colour",
                                       f"class {obj.classification!r} has no colour; QuPath "
                                       "needs one (a default is written)"))
    if obj.measurements:
        bad = [k for k, v in obj.measurements.items() if not math.isfinite(v)]
        if bad:
            problems.append(FeatureProblem(index, "non-finite-measurement",
                                           "measurements that are NaN or infinite: "
                                           + ", ".join(map(repr, bad))))
    return problems


def _geometry_flags(geoms: list[Any]) -> tuple[list[bool | None], list[bool]]:
    """Per geometry, worked out in bulk: (valid, or None where a geometry is not a shapely
    one; written unchanged by :func:`_prepare_geometry`, which is so for a valid, non-empty
    Polygon or MultiPolygon with finite coordinates)."""
    import numpy as np
    import shapely
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.geometry.base import BaseGeometry

    n = len(geoms)
    valid: list[bool | None] = [None] * n
    writable = [False] * n
    take = [i for i, g in enumerate(geoms) if isinstance(g, BaseGeometry)]
    if not take:
        return valid, writable
    arr = np.empty(len(take), dtype=object)
    arr[:] = [geoms[i] for i in take]
    try:
        ok = shapely.is_valid(arr)
        coords, owner = shapely.get_coordinates(arr, return_index=True)
    except (ValueError, TypeError, shapely.errors.GEOSException):
        return valid, writable  # one by one: _check_object says what is wrong
    finite = np.bincount(owner[~np.isfinite(coords).all(axis=1)], minlength=len(take)) == 0
    plain = np.fromiter((type(g) is Polygon or type(g) is MultiPolygon for g in arr.tolist()),
                        bool, len(take))
    good = ok & finite & plain & ~shapely.is_empty(arr)
    for i, v, w in zip(take, ok.tolist(), good.tolist(), strict=True):
        valid[i], writable[i] = v, w
    return valid, writable


def validate_geojson(path: str | os.PathLike[str]) -> GeoJSONReport:
    """Check a GeoJSON file as ``qpseg validate`` does: counts and per-feature problems.

    Never raises for a problem with a feature (it becomes a :class:`FeatureProblem`; see
    ``PROBLEM_SEVERITY``); raises :class:`GeoJSONError` for whole-file problems.
    """
    path = Path(path)
    n_features, objects, problems = _parse_file(path)
    counts: Counter[tuple[str, str | None]] = Counter()
    first_with_id: dict[str, int] = {}
    valid, writable = _geometry_flags([obj.geometry for _, obj in objects])
    nuclei = [k for k, (_, obj) in enumerate(objects) if obj.nucleus_geometry is not None]
    nucleus_valid: list[bool | None] = [None] * len(objects)
    for k, v in zip(nuclei, _geometry_flags([objects[k][1].nucleus_geometry
                                             for k in nuclei])[0], strict=True):
        nucleus_valid[k] = v
    for k, (index, obj) in enumerate(objects):
        counts[(obj.object_type, obj.classification)] += 1
        problems.extend(_check_object(index, obj, valid[k], writable[k], nucleus_valid[k]))
        if obj.id is not None:
            if obj.id in first_with_id:
                problems.append(FeatureProblem(index, "duplicate-id",
                                               f"id {obj.id} is also used by feature "
                                               f"{first_with_id[obj.id]}"))
            else:
                first_with_id[obj.id] = index
    problems.sort(key=lambda p: p.index)
    return GeoJSONReport(path=path, n_features=n_features, n_objects=len(objects),
                         counts=dict(counts), problems=problems)
