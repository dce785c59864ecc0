"""Parsed GeoJSON -> :class:`QuPathObject`: the lenient, feature-by-feature reader.

Takes the JSON value of a file (any top-level shape QuPath or a tool writes) and reads each
feature in every dialect QuPath has written (see :mod:`qpseg.qupath.geojson`): geometry exactly
as given, classification, measurements, metadata and the other properties. A feature that
cannot be read becomes a :class:`FeatureProblem` (``_Skip`` inside). Plain polygons are built in
bulk, a few vectorised shapely calls per 2048 features, with the one-by-one path as the
reference for anything odd. Files are opened by :mod:`qpseg.qupath.geojson_read`.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import GeoJSONError, GeoJSONWarning
from qpseg.qupath.geojson_model import (
    _GEOMETRY_MEMBERS,
    _KNOWN_PROPERTIES,
    _LEGACY_TYPE_IDS,
    _MAX_GEOMETRY_DEPTH,
    MAX_COORDINATE,
    RGB,
    FeatureProblem,
    QuPathObject,
    _gc_paused,
    _is_geometry_type,
    _is_number,
    _json_kind,
    _parse_rgb,
    _short,
    canonical_object_type,
)

if TYPE_CHECKING:  # numpy is imported lazily: the CLI must start fast
    import numpy as np

__all__ = ["parse_features"]


class _Skip(Exception):
    """A feature cannot be read (internal; becomes a warning and a FeatureProblem)."""

    def __init__(self, message: str, kind: str = "skipped-feature") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# --------------------------------------------------------------------------------------------
# Reading: the top-level shape
# --------------------------------------------------------------------------------------------


def _feature_list(data: Any, source: str | Path) -> list[Any]:
    """The features of any top-level shape QuPath (or a tool) writes; GeoJSONError otherwise."""
    expected = "expected a FeatureCollection, a list of Features, a Feature or a Geometry"
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        raise GeoJSONError(f"top-level JSON value is a {_json_kind(data)}; {expected}", source)
    kind = data.get("type")
    if kind == "FeatureCollection" or (kind is None and "features" in data):
        features = data.get("features")
        if not isinstance(features, list):
            raise GeoJSONError(f"FeatureCollection 'features' is a {_json_kind(features)}, "
                               "not an array", source)
        return features
    if kind == "Feature" or _is_geometry_type(kind) or (kind is None and "geometry" in data):
        return [data]
    raise GeoJSONError(f"top-level JSON object has type {_short(kind)}; {expected}", source)


# --------------------------------------------------------------------------------------------
# Reading: geometry
# --------------------------------------------------------------------------------------------


def _positions(value: Any, what: str) -> np.ndarray:
    """An (n, 2) float array from a GeoJSON position list; _Skip when it is not one."""
    import numpy as np

    if not isinstance(value, list):
        raise _Skip(f"{what} coordinates are a {_json_kind(value)}, not an array")
    if not value:
        return np.empty((0, 2))
    arr: np.ndarray | None
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError):  # ragged or mixed: diagnose below
        arr = None
    if arr is not None and arr.ndim == 2 and arr.shape[1] >= 2 and arr.dtype.kind in "iuf":
        xy = arr[:, :2].astype(np.float64)
    else:
        xy = _positions_slow(value, what)
    _check_range(xy, what)
    return xy


def _in_range(xy: np.ndarray) -> np.ndarray:
    """Per position (row of ``xy``): whether both coordinates are within ±MAX_COORDINATE
    (False for NaN and infinity)."""
    import numpy as np

    with np.errstate(invalid="ignore"):
        return (np.abs(xy) <= MAX_COORDINATE).all(axis=1)


def _check_range(xy: np.ndarray, what: str) -> None:
    """_Skip (kind ``out-of-range-coordinates``) when a coordinate is not a usable number."""
    import numpy as np

    bad = ~_in_range(xy)
    if not bad.any():
        return
    values = xy[bad]
    if not np.isfinite(values).all():
        raise _Skip(f"{what} has non-finite coordinates (NaN or infinity)",
                    "out-of-range-coordinates")
    worst = float(np.abs(values).max())
    raise _Skip(f"{what} has a coordinate out of range ({worst:.6g}; QuPath coordinates lie "
                "within ±2^31 px)", "out-of-range-coordinates")


def _positions_slow(value: list[Any], what: str) -> np.ndarray:
    import numpy as np

    out = np.empty((len(value), 2))
    for i, pos in enumerate(value):
        if not isinstance(pos, list) or len(pos) < 2:
            raise _Skip(f"{what} position {i} is not an [x, y] array")
        for j in (0, 1):
            c = pos[j]
            if not _is_number(c):
                raise _Skip(f"{what} position {i} has a non-numeric coordinate "
                            f"({_json_kind(c)})")
            try:
                out[i, j] = float(c)
            except OverflowError:
                out[i, j] = math.inf
    return out


def _ring(value: Any, what: str) -> Any:
    """A LinearRing (closed if the file left it open), or None for an empty ring."""
    import numpy as np
    import shapely

    xy = _positions(value, what)
    if len(xy) == 0:
        return None
    if xy[0, 0] != xy[-1, 0] or xy[0, 1] != xy[-1, 1]:
        xy = np.vstack([xy, xy[:1]])
    if len(xy) < 4:
        raise _Skip(f"{what} has fewer than 3 distinct positions")
    return shapely.linearrings(xy)


def _polygon(value: Any, what: str) -> Any:
    from shapely.geometry import Polygon

    if not isinstance(value, list):
        raise _Skip(f"{what} coordinates are a {_json_kind(value)}, not an array of rings")
    if not value:
        return Polygon()
    shell = _ring(value[0], f"{what} exterior ring")
    holes = [_ring(r, f"{what} ring {i}") for i, r in enumerate(value[1:], start=1)]
    holes = [h for h in holes if h is not None]
    if shell is None:
        if holes:
            raise _Skip(f"{what} has holes but an empty exterior ring")
        return Polygon()
    return Polygon(shell, holes)


def _geometry(obj: Any, what: str = "geometry", depth: int = 0) -> Any:
    """A shapely geometry from a GeoJSON geometry object, exactly as given; _Skip if invalid."""
    import shapely
    from shapely.geometry import (
        GeometryCollection,
        LineString,
        MultiLineString,
        MultiPoint,
        MultiPolygon,
        Point,
    )

    if obj is None:
        raise _Skip(f"{what} is missing (null)")
    if not isinstance(obj, dict):
        raise _Skip(f"{what} is a {_json_kind(obj)}, not a GeoJSON geometry object")
    kind = obj.get("type")
    if not _is_geometry_type(kind):
        raise _Skip(f"{what} has unknown type {_short(kind)}")
    try:
        if kind == "GeometryCollection":
            if depth >= _MAX_GEOMETRY_DEPTH:
                raise _Skip(f"{what} nests GeometryCollections too deeply")
            members = obj.get("geometries")
            if not isinstance(members, list):
                raise _Skip(f"{what} GeometryCollection has no 'geometries' array")
            parts = [_geometry(g, f"{what} member {i}", depth + 1)
                     for i, g in enumerate(members)]
            return GeometryCollection([p for p in parts if not p.is_empty])
        coords = obj.get("coordinates")
        if kind == "Point":
            if coords == []:
                return Point()
            return Point(_positions([coords], f"{what} Point")[0])
        if kind == "MultiPoint":
            xy = _positions(coords, f"{what} MultiPoint")
            return MultiPoint(xy) if len(xy) else MultiPoint()
        if kind == "LineString":
            xy = _positions(coords, f"{what} LineString")
            if len(xy) == 1:
                raise _Skip(f"{what} LineString has a single position")
            return LineString(xy) if len(xy) else LineString()
        if kind == "MultiLineString":
            if not isinstance(coords, list):
                raise _Skip(f"{what} MultiLineString coordinates are not an array")
            lines = []
            for i, part in enumerate(coords):
                xy = _positions(part, f"{what} line {i}")
                if len(xy) == 1:
                    raise _Skip(f"{what} line {i} has a single position")
                if len(xy):
                    lines.append(LineString(xy))
            return MultiLineString(lines)
        if kind == "Polygon":
            return _polygon(coords, f"{what} Polygon")
        # MultiPolygon
        if not isinstance(coords, list):
            raise _Skip(f"{what} MultiPolygon coordinates are not an array")
        polys = [_polygon(p, f"{what} polygon {i}") for i, p in enumerate(coords)]
        return MultiPolygon([p for p in polys if not p.is_empty])
    except (ValueError, TypeError, shapely.errors.GEOSException) as exc:
        raise _Skip(f"{what} cannot be built ({exc})") from exc


# --------------------------------------------------------------------------------------------
# Reading: properties
# --------------------------------------------------------------------------------------------


def _classification(value: Any, depth: int = 0) -> tuple[str | None, RGB | None, str | None]:
    """(name, colour, complaint) from any classification QuPath has written."""
    if value is None:
        return None, None, None
    if isinstance(value, str):
        return (value or None), None, None
    if not isinstance(value, dict):
        return None, None, f"classification is a {_json_kind(value)}; ignored"
    if not value:  # QuPath's NULL_CLASS serialises as {}
        return None, None, None
    names = value.get("names")
    name = value.get("name")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        name = ": ".join(names)
    elif not isinstance(name, str) or not name:
        return None, None, "classification has no name; read as unclassified"
    parent = value.get("parentClass")  # 0.3: derived classes nest their parent
    if isinstance(parent, dict) and depth < _MAX_GEOMETRY_DEPTH:
        parent_name = _classification(parent, depth + 1)[0]
        if parent_name:
            name = f"{parent_name}: {name}"
    color = _parse_rgb(value["color"]) if "color" in value else None
    if color is None and "colorRGB" in value:
        color = _parse_rgb(value["colorRGB"])
    return name, color, None


def _measurement_value(value: Any) -> float | None:
    if value is None:  # a missing value; QuPath's NaN
        return math.nan
    if _is_number(value):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        try:
            return float(value)  # "NaN", "Infinity", "1.5"
        except ValueError:
            return None
    return None


def _measurements(value: Any, notes: list[tuple[str, str]]) -> dict[str, float]:
    items: list[tuple[Any, Any]]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):  # 0.3: [{"name": ..., "value": ...}, ...]
        items = []
        for i, entry in enumerate(value):
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                items.append((entry["name"], entry.get("value")))
            else:
                notes.append(("non-numeric-measurement",
                              f"measurement {i} is not a {{name, value}} object; dropped"))
    else:
        notes.append(("bad-property",
                      f"measurements is a {_json_kind(value)}, not an object; ignored"))
        return {}
    out: dict[str, float] = {}
    dropped = []
    for name, raw in items:
        number = _measurement_value(raw)
        if number is None:
            dropped.append(str(name))
        else:
            out[str(name)] = number
    if dropped:
        notes.append(("non-numeric-measurement",
                      "non-numeric measurements dropped: " + ", ".join(map(repr, dropped))))
    return out


def _metadata(value: Any, notes: list[tuple[str, str]]) -> dict[str, str]:
    if not isinstance(value, dict):
        notes.append(("bad-property", f"metadata is a {_json_kind(value)}, not an object; "
                                      "ignored"))
        return {}
    out: dict[str, str] = {}
    dropped = []
    for key, raw in value.items():
        if isinstance(raw, str):
            out[key] = raw
        elif isinstance(raw, bool):  # as QuPath's getAsString() spells them
            out[key] = "true" if raw else "false"
        elif _is_number(raw):
            out[key] = json.dumps(raw)
        else:
            dropped.append(key)
    if dropped:
        notes.append(("bad-property", "metadata values that are not text dropped: "
                      + ", ".join(map(repr, dropped))))
    return out


def _plain_polygon_rings(raw: Any) -> list[Any] | None:
    """The rings of a GeoJSON Polygon whose geometry :func:`_build_polygons` can build in
    bulk (each ring a list of at least 3 items), else None (built one by one instead)."""
    if type(raw) is not dict or raw.get("type") != "Polygon":
        return None
    rings = raw.get("coordinates")
    if type(rings) is not list or not rings:
        return None
    for ring in rings:
        if type(ring) is not list or len(ring) < 3:
            return None
    return rings


# (object, attribute, rings): a polygon left for _build_polygons to make and set.
_Deferred = tuple["QuPathObject", str, list[Any]]


def _parse_feature(item: Any, notes: list[tuple[str, str]],
                   deferred: list[_Deferred] | None = None, lean: bool = False) -> QuPathObject:
    """One QuPathObject from one feature; _Skip when it cannot be read, notes for the rest.

    With ``deferred``, plain polygons (geometry and nucleus) are not built here: the object
    gets a placeholder and ``(object, attribute, rings)`` is appended, for
    :func:`_build_polygons` to make all of a file's polygons in one vectorised call.
    ``lean``: measurements are checked (the same notes) but not kept.
    """
    if not isinstance(item, dict):
        raise _Skip(f"feature is a {_json_kind(item)}, not an object")
    kind = item.get("type")
    if _is_geometry_type(kind):  # a bare geometry: an unclassified annotation
        item = {"type": "Feature", "geometry": item}
    elif kind not in ("Feature", None):
        raise _Skip(f"feature has type {_short(kind)}, not 'Feature'")
    if "geometry" not in item:
        raise _Skip("feature has no geometry")
    raw_geometry = item["geometry"]
    rings = _plain_polygon_rings(raw_geometry) if deferred is not None else None
    geometry: Any = None
    if rings is None:
        geometry = _geometry(raw_geometry)
        if geometry.is_empty:
            raise _Skip("geometry is empty", "empty-geometry")
    geometry_extra = {k: v for k, v in raw_geometry.items() if k not in _GEOMETRY_MEMBERS}

    props = item.get("properties")
    if props is None:
        props = {}
    elif not isinstance(props, dict):
        notes.append(("bad-property", f"properties is a {_json_kind(props)}, not an object; "
                                      "ignored"))
        props = {}
    consumed = set(_KNOWN_PROPERTIES)

    # Object type: 0.4+ objectType, 0.3 object_type, QuPath's 'type' alias, 0.2 type-as-id.
    fid = item.get("id")
    raw_type = props.get("objectType", props.get("object_type"))
    if raw_type is None and canonical_object_type(props.get("type")) is not None:
        raw_type = props["type"]
        consumed.add("type")
    if isinstance(fid, str) and fid in _LEGACY_TYPE_IDS:
        raw_type = fid if raw_type is None else raw_type
        fid = None
    object_type = "annotation"
    if raw_type is not None:
        canonical = canonical_object_type(raw_type)
        if canonical is None:
            notes.append(("unknown-object-type",
                          f"unknown object type {_short(raw_type)}; read as an annotation"))
        else:
            object_type = canonical
    if isinstance(fid, bool) or not isinstance(fid, str | int):
        fid = None
    elif isinstance(fid, int):
        fid = str(fid)

    class_name, class_color, complaint = _classification(props.get("classification"))
    if complaint:
        notes.append(("bad-property", complaint))

    name = props.get("name")
    if name is not None and not isinstance(name, str):
        if _is_number(name):
            name = json.dumps(name)
        else:
            notes.append(("bad-property", f"name is a {_json_kind(name)}; ignored"))
            name = None

    color = None
    if props.get("color") is not None:
        color = _parse_rgb(props["color"])
        if color is None:
            notes.append(("bad-property", f"color {_short(props['color'])} is not "
                                          "[r, g, b]; ignored"))

    locked = props.get("isLocked", False)
    if isinstance(locked, str) and locked.lower() in ("true", "false"):
        locked = locked.lower() == "true"
    if not isinstance(locked, bool):
        notes.append(("bad-property", f"isLocked is a {_json_kind(locked)}; ignored"))
        locked = False

    measurements = {}
    if props.get("measurements") is not None:
        measurements = _measurements(props["measurements"], notes)
        if lean:
            measurements = {}
    metadata = {}
    if props.get("metadata") is not None:
        metadata = _metadata(props["metadata"], notes)

    # QuPath writes the nucleus beside "geometry"; some tools put it into the properties.
    nucleus = None
    raw_nucleus = item.get("nucleusGeometry", props.get("nucleusGeometry"))
    nucleus_rings = _plain_polygon_rings(raw_nucleus) if deferred is not None else None
    if raw_nucleus is not None and nucleus_rings is None:
        try:
            nucleus = _geometry(raw_nucleus, "nucleusGeometry")
        except _Skip as exc:
            kind = exc.kind if exc.kind == "out-of-range-coordinates" else "bad-property"
            notes.append((kind, f"{exc.message}; nucleus ignored"))
        else:
            if nucleus.is_empty:
                nucleus = None

    extra = {k: v for k, v in props.items() if k not in consumed}
    obj = QuPathObject(
        geometry=geometry, object_type=object_type, classification=class_name,
        class_color=class_color, name=name, color=color, measurements=measurements,
        metadata=metadata, id=fid, is_locked=locked, nucleus_geometry=nucleus, extra=extra,
        geometry_extra=geometry_extra,
    )
    if deferred is not None:
        if rings is not None:
            deferred.append((obj, "geometry", rings))
        if nucleus_rings is not None:
            deferred.append((obj, "nucleus_geometry", nucleus_rings))
    return obj


_BUILD_CHUNK = 2048  # polygons per vectorised build: one odd feature only slows its chunk


def _build_polygons(ring_lists: list[list[Any]]) -> list[Any]:
    """Shapely Polygons from GeoJSON ring lists, as :func:`_polygon` would build them, in a
    few vectorised calls; None for each polygon that needs :func:`_polygon` (one by one) to
    say what is wrong with it or to make sense of it (ragged, non-numeric, 3-D mixed with
    2-D, non-finite or too-short rings)."""
    out: list[Any] = []
    for start in range(0, len(ring_lists), _BUILD_CHUNK):
        out.extend(_build_polygon_chunk(ring_lists[start:start + _BUILD_CHUNK]))
    return out


def _build_polygon_chunk(ring_lists: list[list[Any]]) -> list[Any]:
    import numpy as np
    import shapely

    n = len(ring_lists)
    nothing: list[Any] = [None] * n
    rings_per = np.fromiter((len(c) for c in ring_lists), np.int64, n)
    rings = list(chain.from_iterable(ring_lists))
    lens = np.fromiter((len(r) for r in rings), np.int64, len(rings))
    try:
        arr = np.asarray(list(chain.from_iterable(rings)))
    except (ValueError, TypeError, OverflowError):
        return nothing
    if arr.ndim != 2 or arr.shape[1] < 2 or arr.dtype.kind not in "iuf":
        return nothing
    xy = arr[:, :2].astype(np.float64)
    starts = np.zeros(len(lens), np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    ends = starts + lens - 1
    ring_bad = np.add.reduceat(~_in_range(xy), starts) > 0  # _positions says why
    is_open = (xy[starts] != xy[ends]).any(axis=1)
    closed_lens = lens + is_open
    ring_bad |= closed_lens < 4
    ring_owner = np.repeat(np.arange(n), rings_per)
    good = np.bincount(ring_owner, weights=ring_bad, minlength=n) == 0
    if is_open.any():  # GeoJSON requires closed rings; QuPath closes open ones on import
        xy = np.insert(xy, (ends + 1)[is_open], xy[starts[is_open]], axis=0)
    keep_ring = good[ring_owner]
    coords = xy[np.repeat(keep_ring, closed_lens)]
    ring_offsets = np.concatenate([[0], np.cumsum(closed_lens[keep_ring])])
    poly_offsets = np.concatenate([[0], np.cumsum(rings_per[good])])
    polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords,
                                      (ring_offsets, poly_offsets))
    out = nothing
    for i, poly in zip(np.flatnonzero(good).tolist(), polys.tolist(), strict=True):
        out[i] = poly
    return out


def _parse(data: Any, source: str | Path, lean: bool = False
           ) -> tuple[int, list[tuple[int, QuPathObject]], list[FeatureProblem]]:
    """(number of features, [(index, object)], problems) without warning; GeoJSONError for
    whole-file problems. ``lean``: see :func:`read_geojson`."""
    features = _feature_list(data, source)
    objects, problems = _parse_items(features, 0, lean)
    return len(features), objects, problems


def _parse_items(features: list[Any], base: int, lean: bool = False
                 ) -> tuple[list[tuple[int, QuPathObject]], list[FeatureProblem]]:
    """([(index, object)], problems) of consecutive features, the first numbered ``base``."""
    objects: list[tuple[int, QuPathObject]] = []
    problems: list[FeatureProblem] = []
    deferred: list[_Deferred] = []
    deferred_at: list[int] = []   # the feature index of each deferred polygon
    shared: dict[Any, Any] = {}   # one copy of each class colour (and name: interned)
    with _gc_paused():  # many small objects, none cyclic: see _gc_paused
        for index, item in enumerate(features, start=base):
            notes: list[tuple[str, str]] = []
            n_deferred = len(deferred)
            obj = _parse_one(index, item, notes, problems, deferred, lean)
            deferred_at.extend([index] * (len(deferred) - n_deferred))
            if obj is not None:
                if type(obj.classification) is str:
                    obj.classification = sys.intern(obj.classification)
                if obj.class_color is not None:
                    obj.class_color = shared.setdefault(obj.class_color, obj.class_color)
                objects.append((index, obj))
                problems.extend(FeatureProblem(index, kind, msg) for kind, msg in notes)
        built = _build_polygons([rings for _, _, rings in deferred]) if deferred else []
        redo = {at for at, geom in zip(deferred_at, built, strict=True) if geom is None}
        for (obj, attr, _), geom in zip(deferred, built, strict=True):
            if geom is not None:
                setattr(obj, attr, geom)
        if redo:  # the one-by-one path says what is wrong with these (or reads them)
            objects = [(i, o) for i, o in objects if i not in redo]
            problems = [p for p in problems if p.index not in redo]
            for index in sorted(redo):
                notes = []
                obj = _parse_one(index, features[index - base], notes, problems, None, lean)
                if obj is not None:
                    objects.append((index, obj))
                    problems.extend(FeatureProblem(index, kind, msg) for kind, msg in notes)
            objects.sort(key=lambda pair: pair[0])
            problems.sort(key=lambda p: p.index)
    return objects, problems


def _parse_one(index: int, item: Any, notes: list[tuple[str, str]],
               problems: list[FeatureProblem], deferred: list[_Deferred] | None,
               lean: bool = False) -> QuPathObject | None:
    """:func:`_parse_feature`, with a skipped feature recorded in ``problems`` (None)."""
    try:
        return _parse_feature(item, notes, deferred, lean)
    except _Skip as exc:
        problems.append(FeatureProblem(index, exc.kind, f"{exc.message}; skipped"))
    except RecursionError:
        problems.append(FeatureProblem(index, "skipped-feature",
                                       "feature nested too deeply; skipped"))
    return None


def parse_features(data: Any, source: str | Path = "<memory>") -> list[QuPathObject]:
    """QuPath objects from parsed GeoJSON (any dialect QuPath has written).

    ``data`` is a FeatureCollection, a list of Features, a Feature or a bare Geometry (read as
    an unclassified annotation). A feature that cannot be read is skipped with a
    :class:`GeoJSONWarning` naming ``source`` and the feature's index; malformed properties
    are ignored with a warning. Raises :class:`GeoJSONError` when ``data`` has none of these
    shapes.
    """
    _, objects, problems = _parse(data, source)
    for problem in problems:
        warnings.warn(f"{source}: feature {problem.index}: {problem.message}",
                      GeoJSONWarning, stacklevel=2)
    return [obj for _, obj in objects]
