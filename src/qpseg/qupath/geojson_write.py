""":class:`QuPathObject` -> strict QuPath 0.4+ GeoJSON: :func:`write_geojson` and its parts.

Geometry is made valid (:func:`repair_polygonal`, the one polygon-repair rule, shared with the
labels), oriented and of a kind QuPath can turn into a ROI; properties are written as QuPath
0.4 - 0.7 import them (see :mod:`qpseg.qupath.geojson`). Valid polygons and new ids are made in
bulk by :mod:`qpseg.qupath.geojson_write_bulk`, everything else object by object, with the same
features and warnings either way.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg._io import atomic_write
from qpseg.errors import GeoJSONWarning
from qpseg.qupath.classes import default_color, valid_rgb
from qpseg.qupath.geojson_model import (
    _AREA_ONLY_TYPES,
    _CANONICAL_TYPES,
    _GEOMETRY_MEMBERS,
    _MAX_JSON_DEPTH,
    _RESERVED_PROPERTIES,
    _UUID_RE,
    RGB,
    QuPathObject,
    _describe,
    _finite_float,
    _flatten,
    _gc_paused,
    _has_polygonal_part,
    _orjson,
    _short,
    canonical_object_type,
)
from qpseg.qupath.geojson_write_bulk import _polygonal_json_batch, _uuid4_strings

if TYPE_CHECKING:  # shapely is imported lazily: the CLI must start fast
    from shapely.geometry.base import BaseGeometry

__all__ = ["repair_polygonal", "to_feature", "to_feature_collection", "write_geojson"]


# --------------------------------------------------------------------------------------------
# Writing: geometry
# --------------------------------------------------------------------------------------------


def repair_polygonal(geom: BaseGeometry) -> BaseGeometry:
    """The valid polygonal part of ``geom``: a Polygon or MultiPolygon, possibly empty.

    Invalid input is repaired with GEOS ``make_valid`` (``structure`` method: overlapping parts
    are unioned, a bow-tie becomes its two triangles, collapsed slivers are dropped); points
    and lines are dropped. Labels and the writer share this so they agree on what an invalid
    annotation covers.
    """
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    polys = [p for p in _flatten(geom) if isinstance(p, Polygon)]
    g: Any = polys[0] if len(polys) == 1 else MultiPolygon(polys)
    if not g.is_valid:
        try:
            g = shapely.make_valid(g, method="structure", keep_collapsed=False)
        except (ValueError, shapely.errors.GEOSException):  # pragma: no cover - old GEOS
            g = shapely.make_valid(g)
        polys = [p for p in _flatten(g) if isinstance(p, Polygon) and p.area > 0]
        g = polys[0] if len(polys) == 1 else MultiPolygon(polys)
        if not g.is_valid:  # adjacent pieces sharing an edge: merge them
            g = shapely.unary_union(polys)
            polys = [p for p in _flatten(g) if isinstance(p, Polygon) and p.area > 0]
            g = polys[0] if len(polys) == 1 else MultiPolygon(polys)
    return g


@dataclass
class _Prepared:
    geometry: Any | None         # what is written, or None
    kind: str = ""               # problem kind when geometry is None
    reason: str = ""             # why None, or what was repaired
    changed: bool = False        # geometry differs from the input (not only orientation)


def _prepare_geometry(geom: Any, object_type: str) -> _Prepared:
    """The geometry the writer emits for an object of ``object_type``, or why there is none."""
    import numpy as np
    import shapely
    from shapely.geometry import (
        LineString,
        MultiLineString,
        MultiPoint,
        MultiPolygon,
        Point,
        Polygon,
    )
    from shapely.geometry.base import BaseGeometry
    from shapely.geometry.polygon import orient

    if not isinstance(geom, BaseGeometry):
        return _Prepared(None, "wrong-geometry-type",
                         f"geometry is a {type(geom).__name__}, not a shapely geometry")
    if geom.is_empty:
        return _Prepared(None, "empty-geometry", "geometry is empty")
    try:
        if not np.isfinite(shapely.get_coordinates(geom)).all():
            return _Prepared(None, "unrepairable-geometry",
                             "geometry has non-finite coordinates")
        notes = []
        changed = False    # the written shape differs from the input (beyond orientation)
        repaired = False   # make_valid ran: its output is checked again below
        parts = _flatten(geom)
        if _has_polygonal_part(geom):
            polys = [p for p in parts if isinstance(p, Polygon)]
            if len(polys) < len(parts):
                notes.append("points/lines mixed with polygons dropped")
                changed = True
            assembled = polys[0] if len(polys) == 1 else MultiPolygon(polys)
            g = assembled
            if not assembled.is_valid:
                notes.append(f"invalid polygon repaired ({shapely.is_valid_reason(assembled)})")
                changed = repaired = True
                g = repair_polygonal(assembled)
                if g.is_empty:
                    return _Prepared(None, "empty-geometry", "no area left after repair")
            if g.geom_type == "Polygon":
                g = orient(g, 1.0)
            else:
                g = MultiPolygon([orient(p, 1.0) for p in g.geoms])
        elif object_type in _AREA_ONLY_TYPES:
            return _Prepared(None, "wrong-geometry-type",
                             f"a {object_type} must be a polygon, not a {geom.geom_type}")
        else:
            # a LinearRing is a closed LineString to shapely but has no GeoJSON type
            lines = [LineString(p.coords) if p.geom_type == "LinearRing" else p
                     for p in parts if isinstance(p, LineString)]
            points = [p for p in parts if isinstance(p, Point)]
            if lines and points:
                notes.append("points mixed with lines dropped")
                changed = True
            if lines:
                g = geom if geom.geom_type in ("LineString", "MultiLineString") else (
                    lines[0] if len(lines) == 1 else MultiLineString(lines))
                if not g.is_valid:  # e.g. all positions equal: keep what make_valid leaves
                    notes.append(f"invalid line repaired ({shapely.is_valid_reason(g)})")
                    changed = repaired = True
                    fixed = _flatten(shapely.make_valid(g))
                    lines = [p for p in fixed if isinstance(p, LineString)]
                    points = [p for p in fixed if isinstance(p, Point)]
                    g = (lines[0] if len(lines) == 1 else MultiLineString(lines)) if lines \
                        else (points[0] if len(points) == 1 else MultiPoint(points))
            else:
                g = geom if geom.geom_type in ("Point", "MultiPoint") else (
                    points[0] if len(points) == 1 else MultiPoint(points))
            if g.is_empty:
                return _Prepared(None, "empty-geometry", "nothing left after repair")
        if repaired and (not g.is_valid
                         or not np.isfinite(shapely.get_coordinates(g)).all()):
            return _Prepared(None, "unrepairable-geometry", "geometry could not be repaired")
        return _Prepared(g, reason="; ".join(notes), changed=changed)
    except (ValueError, TypeError, shapely.errors.GEOSException) as exc:
        return _Prepared(None, "unrepairable-geometry", f"geometry could not be repaired ({exc})")


def _xy(geom: Any) -> list[list[float | int]]:
    """The [x, y] positions of a point, line or ring (z dropped: QuPath is 2-D per plane).

    Values are written exactly as held (no rounding); a ring whose values are all integral is
    written with ints, as QuPath writes pixel-aligned shapes.
    """
    import numpy as np
    import shapely

    xy = shapely.get_coordinates(geom)
    if (xy == np.floor(xy)).all() and (np.abs(xy) < 2**53).all():
        return xy.astype(np.int64).tolist()
    return xy.tolist()


def _geometry_json(g: Any) -> dict[str, Any]:
    kind = g.geom_type
    if kind == "Point":
        return {"type": kind, "coordinates": _xy(g)[0]}
    if kind == "MultiPoint":
        return {"type": kind, "coordinates": _xy(g)}
    if kind == "LineString":
        return {"type": kind, "coordinates": _xy(g)}
    if kind == "MultiLineString":
        return {"type": kind, "coordinates": [_xy(line) for line in g.geoms]}
    if kind == "Polygon":
        return {"type": kind, "coordinates": _polygon_json(g)}
    if kind == "MultiPolygon":
        return {"type": kind, "coordinates": [_polygon_json(p) for p in g.geoms]}
    raise ValueError(f"cannot write a {kind}")  # _prepare_geometry never returns one


def _polygon_json(p: Any) -> list[list[list[float | int]]]:
    return [_xy(p.exterior)] + [_xy(r) for r in p.interiors]


# --------------------------------------------------------------------------------------------
# Writing: features
# --------------------------------------------------------------------------------------------


def _json_safe(value: Any, depth: int = 0) -> bool:
    """True when ``value`` serialises as strict JSON (no NaN/inf, string keys)."""
    if depth > _MAX_JSON_DEPTH:
        return False
    if value is None or isinstance(value, bool | str | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_json_safe(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_safe(v, depth + 1) for k, v in value.items())
    return False


def _feature_id(value: Any, fresh: str | None = None) -> str:
    """``value`` as a UUID string, or a new random one (``fresh`` when given)."""
    if isinstance(value, str):
        if _UUID_RE.match(value):
            return value
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    return fresh if fresh is not None else str(uuid.uuid4())


class _Label:
    """The ``where``/index/description prefix of a writer warning, made only when needed."""

    __slots__ = ("index", "obj", "where")

    def __init__(self, where: str, index: int, obj: Any) -> None:
        self.where = where
        self.index = index
        self.obj = obj

    def __str__(self) -> str:
        label = f"{self.where}object {self.index}"
        if isinstance(self.obj, QuPathObject):
            label += f" ({_describe(self.obj)})"
        return label


def _warn(label: str | _Label, message: str) -> None:
    warnings.warn(f"{label}: {message}", GeoJSONWarning, stacklevel=4)


_FLOAT_ONLY = frozenset({float})
_STR_ONLY = frozenset({str})


def _clean_measurements(values: Any) -> tuple[dict[str, float], list[str]]:
    """The finite measurements (str keys, float values) and the keys of those dropped."""
    # Fast path: plain str -> float, all finite (a finite sum means no NaN and no infinity).
    if (type(values) is dict and _FLOAT_ONLY.issuperset(map(type, values.values()))
            and _STR_ONLY.issuperset(map(type, values)) and math.isfinite(sum(values.values()))):
        return dict(values), []
    measurements: dict[str, float] = {}
    dropped = []
    for key, value in values.items():
        number = _finite_float(value)
        if number is not None:
            measurements[str(key)] = number
        else:
            dropped.append(str(key))
    return measurements, dropped


def _clean_metadata(values: Any) -> tuple[dict[str, str], list[str]]:
    """Metadata as str -> str (booleans and finite numbers as text) and the keys dropped."""
    if (type(values) is dict and _STR_ONLY.issuperset(map(type, values.values()))
            and _STR_ONLY.issuperset(map(type, values))):
        return dict(values), []
    metadata: dict[str, str] = {}
    bad: list[str] = []
    for key, value in values.items():
        if isinstance(value, str):
            metadata[str(key)] = value
        elif isinstance(value, bool):
            metadata[str(key)] = "true" if value else "false"
        elif _finite_float(value) is not None:
            metadata[str(key)] = str(value)
        else:
            bad.append(str(key))
    return metadata, bad


def _to_feature(obj: QuPathObject, label: str | _Label,
                geometry: dict[str, Any] | str | None = None,
                nucleus: dict[str, Any] | str | None = None, fresh_id: str | None = None,
                class_colors: dict[str, RGB] | None = None) -> dict[str, Any] | None:
    """The feature for ``obj`` (see :func:`to_feature`).

    ``geometry`` / ``nucleus``: the JSON of the geometry / nucleus geometry when
    :func:`_polygonal_json_batch` already made it (the input is written unchanged), or a
    placeholder string for its text (only for objects without ``geometry_extra``); None makes
    it here. ``fresh_id``: the id used when ``obj`` has none. ``class_colors``: a cache of
    default class colours shared by the objects of one collection.
    """
    if not isinstance(obj, QuPathObject):
        raise TypeError(f"expected a QuPathObject, not {type(obj).__name__}")
    kind = obj.object_type
    object_type = (_CANONICAL_TYPES.get(kind) if type(kind) is str else None) \
        or canonical_object_type(kind)
    if object_type is None:
        _warn(label, f"unknown object type {_short(obj.object_type)}; not written")
        return None
    changed = False
    if geometry is None:
        prepared = _prepare_geometry(obj.geometry, object_type)
        if prepared.geometry is None:
            _warn(label, f"{prepared.reason}; not written")
            return None
        if prepared.reason:
            _warn(label, prepared.reason)
        geometry = _geometry_json(prepared.geometry)
        changed = prepared.changed

    for key, value in obj.geometry_extra.items():
        if key in _GEOMETRY_MEMBERS or not _json_safe(value) or isinstance(geometry, str):
            continue
        if key == "isEllipse" and (changed or geometry["type"] != "Polygon"):
            continue  # QuPath would rebuild an ellipse from the bounds of a changed shape
        geometry[key] = value

    feature: dict[str, Any] = {"type": "Feature", "id": _feature_id(obj.id, fresh_id),
                               "geometry": geometry}
    if obj.nucleus_geometry is not None:
        if object_type != "cell":
            _warn(label, f"a {object_type} has no nucleus; nucleus geometry not written")
        elif nucleus is not None:
            feature["nucleusGeometry"] = nucleus
        else:
            prepared = _prepare_geometry(obj.nucleus_geometry, "cell")
            if prepared.geometry is None:
                _warn(label, f"nucleus geometry: {prepared.reason}; not written")
            else:
                if prepared.reason:
                    _warn(label, f"nucleus geometry: {prepared.reason}")
                feature["nucleusGeometry"] = _geometry_json(prepared.geometry)

    props: dict[str, Any] = {"objectType": object_type}
    if obj.name is not None:
        props["name"] = obj.name if isinstance(obj.name, str) else str(obj.name)
    if obj.color is not None:
        color = valid_rgb(obj.color)
        if color is None:
            _warn(label, f"object colour {_short(obj.color)} is not three ints 0..255; "
                         "not written")
        else:
            props["color"] = list(color)
    if obj.classification is not None:
        class_name = str(obj.classification)
        if class_name:
            class_color = valid_rgb(obj.class_color)
            if class_color is None:
                if obj.class_color is not None:
                    _warn(label, f"class colour {_short(obj.class_color)} is not three ints "
                                 "0..255; default colour written")
                if class_colors is None:
                    class_color = default_color(class_name)
                else:
                    class_color = class_colors.get(class_name)
                    if class_color is None:
                        class_color = class_colors[class_name] = default_color(class_name)
            props["classification"] = {"name": class_name, "color": list(class_color)}
    if obj.is_locked:
        props["isLocked"] = True

    measurements, dropped = _clean_measurements(obj.measurements)
    if dropped:
        _warn(label, "measurements that are not finite numbers dropped: "
                     + ", ".join(map(repr, dropped)))
    if measurements:
        props["measurements"] = measurements

    metadata, bad = _clean_metadata(obj.metadata)
    if bad:
        _warn(label, "metadata values that are not text dropped: " + ", ".join(map(repr, bad)))
    if metadata:
        props["metadata"] = metadata

    for key, value in obj.extra.items():
        if not isinstance(key, str) or key in _RESERVED_PROPERTIES:
            continue
        if not _json_safe(value):
            _warn(label, f"property {key!r} is not plain JSON (NaN, infinity or an object); "
                         "not written")
            continue
        props[key] = value
    feature["properties"] = props
    return feature


def to_feature(obj: QuPathObject) -> dict[str, Any] | None:
    """The strict 0.4+ GeoJSON Feature for ``obj``, or None (with a warning) if it cannot be
    written validly (empty after repair, non-finite coordinates, a line where an area is
    needed, unknown object type)."""
    return _to_feature(obj, _describe(obj))


def _features(objs: Iterable[QuPathObject], where: str, texts: list[str] | None = None,
              slot: str = "") -> list[dict[str, Any]]:
    """:func:`to_feature` of each object, with the common work done for all at once.

    Valid polygons (and cell nuclei) are oriented and turned into coordinates with vectorised
    shapely (:func:`_polygonal_json_batch`), new UUIDs are made in bulk and default class
    colours are looked up once per class; everything else goes through the same per-object
    code as :func:`to_feature`, so the features are the same (the tests compare them) and
    warnings come in the same order.

    With ``texts``, geometries of float coordinates are made as JSON text (see
    :func:`_polygonal_json_batch`): the feature holds the placeholder ``slot`` and the text is
    appended to ``texts``, in the order the placeholders appear when the features are
    serialised (geometry, then nucleus, feature by feature).
    """
    as_text = texts is not None
    with _gc_paused():
        objs = list(objs)
        geoms: list[Any] = []
        owners: list[int] = []   # index into objs, or -1 - index for a nucleus
        n_fresh = 0
        for i, obj in enumerate(objs):
            if not isinstance(obj, QuPathObject):
                continue  # _to_feature raises when the loop below gets there
            if not (as_text and obj.geometry_extra):  # text has no room for extra members
                geoms.append(obj.geometry)
                owners.append(i)
            if obj.nucleus_geometry is not None:
                geoms.append(obj.nucleus_geometry)
                owners.append(-1 - i)
            if obj.id is None:
                n_fresh += 1
        geometry: list[dict[str, Any] | str | None] = [None] * len(objs)
        nucleus: list[dict[str, Any] | str | None] = [None] * len(objs)
        for owner, g in zip(owners, _polygonal_json_batch(geoms, as_text), strict=True):
            if owner >= 0:
                geometry[owner] = g
            else:
                nucleus[-1 - owner] = g
        fresh = iter(_uuid4_strings(n_fresh))
        class_colors: dict[str, RGB] = {}
        out = []
        for i, obj in enumerate(objs):
            fresh_id = next(fresh) if isinstance(obj, QuPathObject) and obj.id is None else None
            g, n = geometry[i], nucleus[i]
            feature = _to_feature(obj, _Label(where, i, obj),
                                  slot if isinstance(g, str) else g,
                                  slot if isinstance(n, str) else n, fresh_id, class_colors)
            if feature is not None:
                if isinstance(g, str) and texts is not None:
                    texts.append(g)
                if isinstance(n, str) and texts is not None and "nucleusGeometry" in feature:
                    texts.append(n)
                out.append(feature)
        return out


def to_feature_collection(objs: Iterable[QuPathObject]) -> dict[str, Any]:
    """A FeatureCollection of :func:`to_feature` results (objects that cannot be written are
    left out with a warning)."""
    return {"type": "FeatureCollection", "features": _features(objs, "")}


def _dumps(value: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``value`` (a feature or collection this module made).

    No circular-reference check: features are built here from fresh lists and dicts plus
    ``extra`` values that passed :func:`_json_safe` (depth-limited, so never cyclic), and the
    check costs a fifth of the time for coordinate-heavy collections.
    """
    if indent is None:
        if _orjson is not None:
            # 4x faster; the same JSON values (floats in shortest round-trip form). Every
            # number here is finite (measurements, coordinates and extras are checked
            # first), so orjson's NaN -> null can never happen.
            try:
                return _orjson.dumps(value).decode("utf-8")
            except TypeError:  # e.g. an int beyond 64 bits in ``extra``: the stdlib copes
                pass
        return json.dumps(value, ensure_ascii=False, allow_nan=False, check_circular=False,
                          separators=(",", ":"))
    return json.dumps(value, ensure_ascii=False, allow_nan=False, check_circular=False,
                      indent=indent)


def write_geojson(path: str | os.PathLike[str], objs: Iterable[QuPathObject], *,
                  backup: bool = True, indent: int | None = None) -> int:
    """Write ``objs`` as a QuPath 0.4+ FeatureCollection; returns how many were written.

    The file is replaced atomically (the previous one kept as ``<name>.bak`` when ``backup``);
    a name ending in ``.gz`` is gzip-compressed. JSON is compact unless ``indent`` is given.
    The features are those of :func:`to_feature_collection`; in compact files, polygons whose
    numbers are all floats are printed by GEOS (the same doubles; see ``_GEOS_TEXT_HIGH``).
    About 3 s for 10⁵ detections of a dozen vertices on one core.
    """
    path = Path(path)
    with _gc_paused():
        # GEOS's text is spliced in for a placeholder string that nothing else can contain (a
        # random token between NULs, which JSON writes as \u0000).
        texts: list[str] | None = [] if indent is None else None
        slot = f"\x00{uuid.uuid4().hex}\x00"
        features = _features(objs, f"{path}: ", texts, slot)
        n_written = len(features)
        text = _dumps({"type": "FeatureCollection", "features": features}, indent)
        del features
        if texts:
            pieces = text.split(_dumps(slot))
            del text
            if len(pieces) != len(texts) + 1:  # pragma: no cover - cannot happen
                raise RuntimeError("geometry placeholders do not match the geometries")
            texts.append("")
            text = "".join([p for pair in zip(pieces, texts, strict=True) for p in pair])
            del pieces, texts
        data = text.encode("utf-8")
        del text
    tail = b"\n"
    if path.name.endswith(".gz"):
        data, tail = gzip.compress(data + tail, mtime=0), b""
    with atomic_write(path, "wb", backup=backup) as fh:
        fh.write(data)
        fh.write(tail)
    return n_written
