"""QuPath GeoJSON objects <-> shapely: a lenient reader, a strict writer and a validator.

Reading accepts every dialect QuPath has written (0.2 - 0.7) and what other tools make of it:
a FeatureCollection, a bare list of Features, a single Feature or a bare Geometry; ``objectType``
(0.4+), ``object_type`` (0.3) or the legacy ``id`` type names (0.2); classifications as
``{name|names, color:[r,g,b(,a)]}`` (0.4+), ``{name, colorRGB, parentClass}`` (0.3) or a plain
string; measurements as an object (0.4+) or a list of ``{name, value}`` (0.3); ``.geojson.gz``
files. A feature that cannot be read is skipped with a :class:`GeoJSONWarning` naming the file
and the feature's index; so is one with a coordinate no QuPath image can have (NaN, infinity or
beyond ``±MAX_COORDINATE``), the one rule for out-of-range numbers every command reads through.
Geometry is never changed while reading (invalid polygons are kept as they are and flagged by
:func:`validate_geojson`).

Writing produces the 0.4+ dialect QuPath 0.4 - 0.7 imports: a FeatureCollection of Features with
a UUID ``id``, ``objectType``, a ``classification`` that always carries a colour (QuPath refuses
a classification without one), finite measurements as an object, and geometry that is valid
(repaired with ``make_valid``), oriented (exteriors counter-clockwise) and of a kind QuPath can
turn into a ROI. Coordinates are level-0 pixels and are written exactly as held (no rounding).
"""

from __future__ import annotations

import gc
import gzip
import json
import math
import numbers
import os
import re
import sys
import uuid
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg._io import atomic_write
from qpseg.errors import GeoJSONError, GeoJSONWarning
from qpseg.qupath.classes import argb_to_rgb, default_color

try:  # orjson parses big files ~1.6x faster than the stdlib; optional (stdlib fallback)
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency, but PYTHONPATH=src runs lack it
    _orjson = None  # type: ignore[assignment]

if TYPE_CHECKING:  # shapely and numpy are imported lazily: the CLI must start fast
    import numpy as np
    from shapely.geometry.base import BaseGeometry

__all__ = [
    "GEOMETRY_TYPES",
    "MAX_COORDINATE",
    "OBJECT_TYPES",
    "PROBLEM_SEVERITY",
    "FeatureProblem",
    "GeoJSONReport",
    "QuPathObject",
    "canonical_object_type",
    "parse_features",
    "read_geojson",
    "repair_polygonal",
    "to_feature",
    "to_feature_collection",
    "validate_geojson",
    "write_geojson",
]

RGB = tuple[int, int, int]

OBJECT_TYPES: tuple[str, ...] = ("annotation", "detection", "cell", "tile", "tmaCore")
GEOMETRY_TYPES: frozenset[str] = frozenset({
    "Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon",
    "GeometryCollection",
})

# Canonical spellings map to themselves: the writer looks them up without a regex.
_CANONICAL_TYPES: dict[str, str] = {t: t for t in OBJECT_TYPES}
# Objects that QuPath can only hold as areas; annotations and detections may be points/lines.
_AREA_ONLY_TYPES = frozenset({"cell", "tile", "tmaCore"})

_NOT_ALNUM = re.compile(r"[^a-z0-9]")
# Spellings of object types seen in QuPath files, keyed by lower case without separators:
# 0.4+ "tmaCore", 0.3 "tma_core", 0.2 class names stored in the feature's "id".
_OBJECT_TYPE_KEYS: dict[str, str] = {
    "annotation": "annotation", "pathannotationobject": "annotation",
    "detection": "detection", "pathdetectionobject": "detection",
    "cell": "cell", "pathcellobject": "cell",
    "tile": "tile", "pathtileobject": "tile",
    "tmacore": "tmaCore", "tmacoreobject": "tmaCore",
}
_LEGACY_TYPE_IDS = frozenset({
    "PathAnnotationObject", "PathDetectionObject", "PathCellObject", "PathTileObject",
    "TMACoreObject", "PathRootObject",
})

# Property keys the reader interprets; everything else is kept in QuPathObject.extra.
_KNOWN_PROPERTIES = frozenset({
    "objectType", "object_type", "classification", "name", "color", "isLocked", "metadata",
    "measurements", "nucleusGeometry",
})
# Keys the writer owns; an ``extra`` entry never overrides them.
_RESERVED_PROPERTIES = _KNOWN_PROPERTIES
_GEOMETRY_MEMBERS = frozenset({"type", "coordinates", "geometries", "bbox"})

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                      r"[0-9a-fA-F]{12}$")
_MAX_GEOMETRY_DEPTH = 16   # nested GeometryCollections; deeper is not a QuPath file
#: The largest coordinate magnitude (px) read or written; anything beyond it, NaN or infinity
#: makes a feature unreadable. QuPath image sizes are Java ints (qupath-core
#: ImageServerMetadata.java, v0.5.1 lines 117-118), so no pixel lies at or past 2^31, and ROI
#: vertices are float32 (qupath-core roi/DefaultVertices.java, v0.5.1 lines 53-54), in which
#: 2^31 is exact. Within ±2^31 a product of two coordinates stays below 2^64, so areas,
#: lengths and rasterisation never overflow a double (1e200 is finite, its square is not).
MAX_COORDINATE = 2.0**31
_MAX_JSON_DEPTH = 64       # nesting allowed in ``extra`` values written back

# Problem kinds reported by validate_geojson. "error": the object is lost, or what it is would
# be qpseg's guess (a self-intersecting outline, a hole outside its shell, a value dropped, an
# id that no longer names one object); ``qpseg validate`` exits 1. "warning": the object is
# read as QuPath itself reads it and nothing the labels or metrics use changes; listed, exit 0.
PROBLEM_SEVERITY: dict[str, str] = {
    "skipped-feature": "error",          # the feature cannot be read at all
    "out-of-range-coordinates": "error",  # NaN, infinity or beyond MAX_COORDINATE: skipped
    "empty-geometry": "error",           # nothing left to draw (as read, or after repair)
    "wrong-geometry-type": "error",      # e.g. a cell that is a line: cannot be written
    "unrepairable-geometry": "error",    # make_valid failed
    "invalid-geometry": "error",         # self-intersections, holes outside the shell etc.:
                                         # make_valid repairs them, but the area it keeps is a
                                         # guess at what was meant; fix the outline in QuPath
    "non-numeric-measurement": "error",  # a value that is not a number: dropped while reading
    "duplicate-id": "error",             # two objects share one UUID: matching by id (review
                                         # round trip, re-import) cannot tell them apart
    "non-finite-measurement": "warning",  # NaN is QuPath's own "no value" (GsonTools writes
                                          # NaN/Infinity: serializeSpecialFloatingPointValues,
                                          # qupath-core GsonTools.java v0.5.1 line 82); dropped
                                          # on write, as QuPath shows an empty cell
    "missing-colour": "warning",         # classified without a colour; default used on write
    "unknown-object-type": "warning",    # read as an annotation (as QuPath does)
    "bad-property": "warning",           # a malformed property that was ignored
}


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass
class QuPathObject:
    """One QuPath object: its geometry (level-0 pixels) and the properties QuPath keeps."""

    geometry: BaseGeometry
    object_type: str = "annotation"
    classification: str | None = None   # class name ("Tumor", "Tumor: Positive"); None = none
    class_color: RGB | None = None
    name: str | None = None
    color: RGB | None = None            # the object's own colour (properties.color)
    measurements: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    id: str | None = None
    is_locked: bool = False
    nucleus_geometry: BaseGeometry | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # other properties, e.g. isMissing
    # Foreign members of the geometry object QuPath uses ("plane", "isEllipse").
    geometry_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_area(self) -> bool:
        """True when the geometry has a polygonal part (an area ROI in QuPath)."""
        return _has_polygonal_part(self.geometry)

    @property
    def area(self) -> float:
        """Area in level-0 px² as stored (an invalid polygon may report an odd area)."""
        return float(self.geometry.area)


@dataclass(frozen=True)
class FeatureProblem:
    """A problem with one feature of a GeoJSON file (``index`` counts features from 0)."""

    index: int
    kind: str
    message: str

    @property
    def severity(self) -> str:
        """``"error"`` (the feature is lost) or ``"warning"`` (it is read or repaired)."""
        return PROBLEM_SEVERITY.get(self.kind, "warning")


@dataclass
class GeoJSONReport:
    """What :func:`validate_geojson` found in one file."""

    path: Path
    n_features: int                    # features in the file, readable or not
    n_objects: int                     # features read as objects
    counts: dict[tuple[str, str | None], int]   # (objectType, class name or None) -> count
    problems: list[FeatureProblem]

    @property
    def ok(self) -> bool:
        """True when no problem is an error (warnings are allowed)."""
        return not any(p.severity == "error" for p in self.problems)

    @property
    def n_errors(self) -> int:
        """Number of problems of severity error."""
        return sum(p.severity == "error" for p in self.problems)

    def kinds(self) -> Counter[str]:
        """How many problems of each kind."""
        return Counter(p.kind for p in self.problems)


class _Skip(Exception):
    """A feature cannot be read (internal; becomes a warning and a FeatureProblem)."""

    def __init__(self, message: str, kind: str = "skipped-feature") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def canonical_object_type(value: Any) -> str | None:
    """QuPath's 0.4+ spelling of an object type (``"tma_core"`` -> ``"tmaCore"``), or None."""
    if not isinstance(value, str):
        return None
    known = _CANONICAL_TYPES.get(value)  # the common case, without the regex
    if known is not None:
        return known
    return _OBJECT_TYPE_KEYS.get(_NOT_ALNUM.sub("", value.lower()))


def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about arbitrary input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_geometry_type(value: Any) -> bool:
    return isinstance(value, str) and value in GEOMETRY_TYPES


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    kind = type(value)
    if kind is float or kind is int:  # the common case, without the slow ABC check
        return True
    return isinstance(value, numbers.Real) and kind is not bool


def _finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None (NaN, infinity, too large, not a number)."""
    if type(value) is float:
        return value if math.isfinite(value) else None
    if not _is_number(value):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _parse_rgb(value: Any) -> RGB | None:
    """A colour as QuPath writes it: ``[r, g, b]``, ``[r, g, b, a]``, ``[argb]`` or an ARGB int."""
    if type(value) is list and len(value) == 3:  # the common case, without generators
        r, g, b = value
        if (type(r) is int and type(g) is int and type(b) is int
                and 0 <= r <= 255 and 0 <= g <= 255 and 0 <= b <= 255):
            return (r, g, b)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return argb_to_rgb(value)
    if isinstance(value, list) and len(value) in (1, 3, 4):
        if not all(_is_number(c) and float(c).is_integer() for c in value):
            return None
        ints = [int(c) for c in value]
        if len(ints) == 1:
            return argb_to_rgb(ints[0])
        if all(0 <= c <= 255 for c in ints):
            return (ints[0], ints[1], ints[2])
    return None


def _valid_rgb(value: Any) -> RGB | None:
    if type(value) is tuple and len(value) == 3:  # the common case, without generators
        r, g, b = value
        if (type(r) is int and type(g) is int and type(b) is int
                and 0 <= r <= 255 and 0 <= g <= 255 and 0 <= b <= 255):
            return (r, g, b)
    if (isinstance(value, tuple | list) and len(value) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255
                    for c in value)):
        return (int(value[0]), int(value[1]), int(value[2]))
    return None


def _has_polygonal_part(geom: Any) -> bool:
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.geometry.base import BaseMultipartGeometry

    if isinstance(geom, Polygon | MultiPolygon):
        return not geom.is_empty
    if isinstance(geom, BaseMultipartGeometry):
        return any(_has_polygonal_part(g) for g in geom.geoms)
    return False


def _flatten(geom: Any) -> list[Any]:
    """Single-part, non-empty geometries inside ``geom``."""
    from shapely.geometry.base import BaseMultipartGeometry

    if geom.is_empty:
        return []
    if isinstance(geom, BaseMultipartGeometry):
        return [part for g in geom.geoms for part in _flatten(g)]
    return [geom]


def _describe(obj: QuPathObject) -> str:
    what = obj.object_type if isinstance(obj.object_type, str) else "object"
    if obj.name:
        return f"{what} {obj.name!r}"
    if obj.id:
        return f"{what} {obj.id}"
    if obj.classification:
        return f"{what} of class {obj.classification!r}"
    return what


# --------------------------------------------------------------------------------------------
# Reading: whole file
# --------------------------------------------------------------------------------------------


def _load_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in ``path`` (gzip-compressed or not); GeoJSONError for whole-file problems."""
    path = Path(path)
    if not path.exists():
        raise GeoJSONError("file not found", path)
    if path.is_dir():
        raise GeoJSONError("is a directory, not a GeoJSON file", path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GeoJSONError(f"cannot read file ({exc.strerror or exc})", path) from exc
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the extension says
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise GeoJSONError(f"corrupt gzip data ({exc})", path) from exc
    if not raw.strip():
        raise GeoJSONError("file is empty", path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GeoJSONError(f"not UTF-8 text (byte {exc.start})", path) from exc
    with _gc_paused():
        if _orjson is not None:
            try:
                return _orjson.loads(text)
            except _orjson.JSONDecodeError:
                pass  # NaN literals, huge integers, deep nesting: the stdlib says what and where
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise GeoJSONError(f"not valid JSON ({exc.msg} at line {exc.lineno} column "
                               f"{exc.colno})", path) from exc
        except RecursionError as exc:
            raise GeoJSONError("JSON nested too deeply", path) from exc
        except ValueError as exc:  # e.g. an integer with more digits than Python converts
            raise GeoJSONError(f"not valid JSON ({exc})", path) from exc


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


# Streaming: a large file's features are parsed a few MB at a time, so the parsed JSON of all
# of them never exists at once (at 10^6 features it took several GB). The file is mapped, not
# read; structural characters (brackets, commas outside strings) are found with numpy block by
# block, and each run of whole features goes to orjson on its own. Anything unexpected (a
# top-level shape other than an array or an object with a "features" array, text orjson
# refuses and the stdlib does not read either) falls back to parsing the whole file, so the
# result (objects, problems, errors) is always the whole-file parse's.
_STREAM_MIN_BYTES = 16 * 2**20   # smaller files are parsed whole
_STREAM_BLOCK = 4 * 2**20        # bytes scanned at a time (its numpy work takes ~10x that)
_STREAM_CHUNK = 2 * 2**20        # about this many bytes of features parsed at a time
_STREAM_SENTINEL = "\x00qpseg-features"   # stands in for the features in the skeleton
_STREAM_SENTINEL_JSON = b'"\\u0000qpseg-features"'
_KEY_BEFORE_VALUE = re.compile(rb'\s*"((?:[^"\\]|\\.)*)"\s*:\s*\Z', re.DOTALL)
_JSON_SPACE = b" \t\r\n"


_MALLOC_TRIM: list[Any] = []


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    The parsed JSON and numpy temporaries of each chunk are freed among the geometries that
    stay, and glibc keeps such holes: without this a 10^5-feature read kept ~40 % more.
    """
    if not _MALLOC_TRIM:
        trim = None
        try:
            import ctypes

            trim = ctypes.CDLL(None).malloc_trim
            trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError, ImportError):
            trim = None
        _MALLOC_TRIM.append(trim)
    if _MALLOC_TRIM[0] is not None:
        _MALLOC_TRIM[0](0)


class _NotStreamable(Exception):
    """The file is not read in chunks (internal): the whole-file parse reads it."""


def _json_loads_chunk(text: bytes) -> Any:
    """``text`` parsed as orjson does, else as the stdlib does (NaN literals, big ints, as the
    whole-file parse falls back); _NotStreamable when neither reads it."""
    if _orjson is not None:
        try:
            return _orjson.loads(text)
        except _orjson.JSONDecodeError:
            pass
    try:
        return json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise _NotStreamable(str(exc)) from exc


def _scan_codes() -> np.ndarray:
    import numpy as np

    codes = np.zeros(256, dtype=np.uint8)
    codes[[ord("{"), ord("[")]] = 1
    codes[[ord("}"), ord("]")]] = 2
    codes[ord(",")] = 3
    codes[ord('"')] = 4
    codes[ord("\\")] = 5
    return codes


class _Scanner:
    """Structural characters of JSON text, block by block: ``(positions, codes, depth
    before)`` of the brackets (code 1 open, 2 close) and commas (3) outside strings."""

    def __init__(self, buf: Any) -> None:
        self.buf = buf
        self.codes = _scan_codes()
        self.in_string = 0
        self.backslashes = 0   # length of the backslash run that ended the last block
        self.depth = 0

    def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import numpy as np

        data = np.frombuffer(self.buf, dtype=np.uint8, count=stop - start, offset=start)
        codes = self.codes[data]
        del data
        pos = np.flatnonzero(codes)
        code = codes[pos]
        del codes
        quotes = pos[code == 4]
        slashes = pos[code == 5]
        carried = self.backslashes
        self.backslashes = 0
        if len(slashes):
            new_run = np.ones(len(slashes), dtype=bool)
            new_run[1:] = np.diff(slashes) != 1
            run_id = np.cumsum(new_run) - 1
            run_start = slashes[new_run]
            k = np.searchsorted(slashes, quotes)
            after = (k > 0) & (slashes[np.maximum(k - 1, 0)] == quotes - 1)
            first = run_start[run_id[np.maximum(k - 1, 0)]]
            run = quotes - first + np.where(first == 0, carried, 0)
            escaped = after & (run % 2 == 1)
            escaped |= (quotes == 0) & (carried % 2 == 1)
            quotes = quotes[~escaped]
            if slashes[-1] == stop - start - 1:
                last = int(run_start[-1])
                self.backslashes = stop - start - last + (carried if last == 0 else 0)
        elif len(quotes) and carried % 2 == 1 and quotes[0] == 0:
            quotes = quotes[1:]   # escaped by the backslash that ended the last block
        struct = code <= 3
        spos = pos[struct]
        scode = code[struct]
        outside = (np.searchsorted(quotes, spos) + self.in_string) % 2 == 0
        spos, scode = spos[outside], scode[outside]
        self.in_string = (self.in_string + len(quotes)) % 2
        delta = np.where(scode == 1, 1, np.where(scode == 2, -1, 0))
        after_depth = self.depth + np.cumsum(delta)
        before = after_depth - delta
        if len(after_depth):
            self.depth = int(after_depth[-1])
        return spos + start, scode, before


def _stream_file(path: Path, lean: bool
                 ) -> tuple[int, list[tuple[int, QuPathObject]], list[FeatureProblem]] | None:
    """:func:`_parse` of the file's JSON, parsed a chunk of features at a time; None when the
    file is small, compressed or _NotStreamable (the caller parses it whole)."""
    import mmap

    try:
        if not path.is_file() or path.stat().st_size < _STREAM_MIN_BYTES:
            return None
        with open(path, "rb") as fh:
            if fh.read(2) == b"\x1f\x8b":
                return None
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    try:
        with _gc_paused():
            return _stream_features(mm, path, lean)
    except _NotStreamable:
        return None
    finally:
        mm.close()


def _stream_features(mm: Any, path: Path, lean: bool
                     ) -> tuple[int, list[tuple[int, QuPathObject]], list[FeatureProblem]]:
    import mmap

    import numpy as np

    size = len(mm)
    top = 3 if mm[:3] == b"\xef\xbb\xbf" else 0
    while top < size and mm[top] in _JSON_SPACE:
        top += 1
    if top >= size or mm[top] not in b"[{":
        raise _NotStreamable("not an array or object")
    scanner = _Scanner(mm)
    array_depth = 0        # depth inside the features array (0: not found yet)
    opened = closed = -1   # positions of the features array's brackets
    last_struct = top      # the latest comma at depth 1 (a key follows it)
    chunk_start = -1       # where the features not parsed yet begin
    pending = np.empty(0, dtype=np.int64)   # commas between those features
    n_features = 0
    objects: list[tuple[int, QuPathObject]] = []
    problems: list[FeatureProblem] = []
    released = 0           # the file's pages before this are dropped from memory
    page = mmap.PAGESIZE

    def parse(stop: int, n_separators: int, final: bool) -> None:
        nonlocal n_features
        items = _json_loads_chunk(b"[" + mm[chunk_start:stop] + b"]")
        empty_array = final and n_features == 0 and n_separators == 0 and items == []
        if type(items) is not list or (len(items) != n_separators + 1 and not empty_array):
            raise _NotStreamable("features do not parse one by one")
        found, notes = _parse_items(items, n_features, lean)
        n_features += len(items)
        del items
        objects.extend(found)
        problems.extend(notes)
        _trim_heap()

    for start in range(top, size, _STREAM_BLOCK):
        stop = min(start + _STREAM_BLOCK, size)
        spos, scode, before = scanner.block(start, stop)
        if array_depth == 0:
            for j in np.flatnonzero(before <= 1).tolist():
                p, c, d = int(spos[j]), int(scode[j]), int(before[j])
                if p == top:
                    if mm[top] == ord("["):
                        array_depth, opened = 1, p
                        break
                    continue
                if d == 0 or (d == 1 and c == 2):  # the top-level value ended: no features
                    raise _NotStreamable("no features array")
                if c == 1 and mm[p] == ord("["):
                    key = _KEY_BEFORE_VALUE.match(mm[last_struct + 1:p])
                    if key is not None and _json_loads_chunk(
                            b'"' + key.group(1) + b'"') == "features":
                        array_depth, opened = 2, p
                        break
                if c == 3:
                    last_struct = p
            if array_depth == 0:
                continue
            chunk_start = opened + 1
        inside = (spos > opened) & (before == array_depth)
        ends = spos[inside & (scode == 2)]
        pending = np.concatenate([pending, spos[inside & (scode == 3)]])
        if len(ends):
            closed = int(ends[0])
            pending = pending[pending < closed]
        while True:
            cut = int(np.searchsorted(pending, chunk_start + _STREAM_CHUNK))
            if cut >= len(pending):
                break
            parse(int(pending[cut]), cut, False)
            chunk_start = int(pending[cut]) + 1
            pending = pending[cut + 1:]
        if closed >= 0:
            parse(closed, len(pending), True)
            break
        drop = (chunk_start // page) * page
        if drop > released:
            with suppress(OSError, ValueError, AttributeError):  # madvise: Unix, Python 3.8+
                mm.madvise(mmap.MADV_DONTNEED, released, drop - released)
            released = drop
    if closed < 0:
        raise _NotStreamable("features array not closed")
    if array_depth == 1:
        if mm[closed + 1:].strip(_JSON_SPACE):
            raise _NotStreamable("text after the top-level array")
    else:
        skeleton = _json_loads_chunk(mm[top:opened + 1] + _STREAM_SENTINEL_JSON + mm[closed:])
        try:
            listed = _feature_list(skeleton, path)
        except GeoJSONError as exc:
            raise _NotStreamable("not a FeatureCollection") from exc
        if not (type(skeleton) is dict and listed is skeleton.get("features")
                and listed == [_STREAM_SENTINEL]):
            raise _NotStreamable("not a FeatureCollection")
    return n_features, objects, problems


def _parse_file(path: Path, lean: bool = False
                ) -> tuple[int, list[tuple[int, QuPathObject]], list[FeatureProblem]]:
    """:func:`_parse` of the JSON in ``path`` (large files in chunks; same result)."""
    streamed = _stream_file(path, lean)
    if streamed is not None:
        return streamed
    return _parse(_load_json(path), path, lean)


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


def read_geojson(path: str | os.PathLike[str], *, lean: bool = False) -> list[QuPathObject]:
    """Read the QuPath objects of a ``.geojson`` (or gzip-compressed ``.geojson.gz``) file.

    Raises :class:`GeoJSONError` for whole-file problems (missing, empty, not JSON, wrong
    top-level type); bad features are skipped with a warning (see :func:`parse_features`).
    ``lean``: the objects carry no measurements (checked as usual, same warnings, but not
    kept), for commands that need only outlines, classes and review state (a cell export
    holds dozens of measurements per object). Large files are parsed a few MB at a time.
    """
    path = Path(path)
    _, objects, problems = _parse_file(path, lean)
    for problem in problems:
        warnings.warn(f"{path}: feature {problem.index}: {problem.message}",
                      GeoJSONWarning, stacklevel=2)
    return [obj for _, obj in objects]


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


_UUID_HEX_COLUMNS = [*range(0, 8), *range(9, 13), *range(14, 18), *range(19, 23),
                     *range(24, 36)]


def _uuid4_strings(n: int) -> list[str]:
    """``n`` new ``str(uuid.uuid4())`` values, made in bulk (one ``os.urandom`` call)."""
    import numpy as np

    if n <= 0:
        return []
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40   # version 4, as uuid.UUID(..., version=4) sets it
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80   # RFC 4122 variant
    nibbles = np.empty((n, 32), dtype=np.uint8)
    nibbles[:, 0::2] = raw >> 4
    nibbles[:, 1::2] = raw & 0x0F
    chars = np.full((n, 36), ord("-"), dtype=np.uint8)
    chars[:, _UUID_HEX_COLUMNS] = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles]
    text = chars.tobytes().decode("ascii")
    return [text[k:k + 36] for k in range(0, 36 * n, 36)]


def _polygonal_json_batch(geoms: list[Any], as_text: bool = False
                          ) -> list[dict[str, Any] | str | None]:
    """For each geometry, what ``_geometry_json(_prepare_geometry(g, ...).geometry)`` gives,
    worked out for all of them at once with vectorised shapely; None where the per-object path
    must decide.

    Only the common case is done here: an exact shapely Polygon or MultiPolygon that is valid,
    not empty, without empty parts and with finite coordinates. :func:`_prepare_geometry` writes
    such a geometry unchanged and without a warning, only oriented (exteriors counter-clockwise,
    holes clockwise, per part) and with a one-part MultiPolygon written as a Polygon; rings
    whose values are all integral are written with ints (see :func:`_xy`). Everything else
    (repairs, points, lines, collections, warnings) is left to the per-object path.

    With ``as_text``, a geometry without whole rings (so all its numbers are floats) is given
    as compact JSON text printed by GEOS, which is much faster than Python printing floats
    (see ``_GEOS_TEXT_HIGH``); the others are still dicts.
    """
    import numpy as np
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    out: list[dict[str, Any] | str | None] = [None] * len(geoms)
    take = [i for i, g in enumerate(geoms) if type(g) is Polygon or type(g) is MultiPolygon]
    if not take:
        return out
    arr = np.empty(len(take), dtype=object)
    arr[:] = [geoms[i] for i in take]
    try:
        keep = np.flatnonzero(shapely.is_valid(arr) & ~shapely.is_empty(arr))
        polys, owner = shapely.get_parts(arr[keep], return_index=True)
        orient_polygons = getattr(shapely, "orient_polygons", None)
        if orient_polygons is not None:  # shapely >= 2.1; orient() calls the same GEOS code
            polys = orient_polygons(polys, exterior_cw=False)
        else:  # pragma: no cover - shapely 2.0
            from shapely.geometry.polygon import orient

            polys = np.array([orient(p, 1.0) for p in polys], dtype=object)
        rings, ring_poly = shapely.get_rings(polys, return_index=True)
        coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    except (ValueError, TypeError, shapely.errors.GEOSException):
        return out  # the per-object path reports what is wrong, object by object

    n_geoms, n_polys, n_rings = len(keep), len(polys), len(rings)
    finite = np.isfinite(coords).all(axis=1)
    skip = np.zeros(n_geoms, dtype=bool)
    skip[owner[ring_poly[ring_of[~finite]]]] = True  # GEOS calls these invalid; be sure
    skip[owner[shapely.is_empty(polys)]] = True

    # A ring is written with ints when all its values are whole (and exactly representable).
    magnitude = np.abs(coords)
    whole = (coords == np.floor(coords)).all(axis=1) & (magnitude < 2**53).all(axis=1)
    ring_whole = np.bincount(ring_of[~whole], minlength=n_rings) == 0
    ring_len = np.bincount(ring_of, minlength=n_rings)
    ring_start = np.cumsum(ring_len) - ring_len
    poly_rings = np.bincount(ring_poly, minlength=n_polys)

    geom_text = np.zeros(n_geoms, dtype=bool)
    if as_text and _geos_text_agrees():
        # parts without whole rings, 2-D, every value below _GEOS_TEXT_HIGH
        part_ok = np.bincount(ring_poly[ring_whole], minlength=n_polys) == 0
        big = ring_of[~(magnitude < _GEOS_TEXT_HIGH).all(axis=1)]
        part_ok[ring_poly[big]] = False
        part_ok &= ~shapely.has_z(polys)
        has_m = getattr(shapely, "has_m", None)
        if has_m is not None:
            part_ok &= ~has_m(polys)
        geom_text = np.bincount(owner[~part_ok], minlength=n_geoms) == 0
    part_text = geom_text[owner]

    poly_json: list[Any] = [None] * n_polys
    list_parts = np.flatnonzero(~part_text)
    if len(list_parts):
        ring_json = _ring_coordinate_lists(coords, ring_whole, ring_len, ring_start,
                                           np.flatnonzero(~part_text[ring_poly]))
        counts = poly_rings[list_parts]
        for k, s, c in zip(list_parts.tolist(), (np.cumsum(counts) - counts).tolist(),
                           counts.tolist(), strict=True):
            poly_json[k] = ring_json[s:s + c]
    text_parts = np.flatnonzero(part_text)
    if len(text_parts):  # '{"type":"Polygon","coordinates":[...]}' for each part
        for k, text in zip(text_parts.tolist(), shapely.to_geojson(polys[text_parts]).tolist(),
                           strict=True):
            poly_json[k] = text

    geom_parts = np.bincount(owner, minlength=n_geoms)
    geom_start = np.cumsum(geom_parts) - geom_parts
    for j, s, c, bad, is_text in zip(keep.tolist(), geom_start.tolist(), geom_parts.tolist(),
                                     skip.tolist(), geom_text.tolist(), strict=True):
        if bad or c == 0:
            continue
        if is_text:
            cut = len(_GEOS_POLYGON_PREFIX)
            out[take[j]] = poly_json[s] if c == 1 else (
                '{"type":"MultiPolygon","coordinates":['
                + ",".join(t[cut:-1] for t in poly_json[s:s + c]) + "]}")
        else:
            out[take[j]] = ({"type": "Polygon", "coordinates": poly_json[s]} if c == 1
                            else {"type": "MultiPolygon", "coordinates": poly_json[s:s + c]})
    return out


def _ring_coordinate_lists(coords: np.ndarray, ring_whole: np.ndarray, ring_len: np.ndarray,
                           ring_start: np.ndarray, which: np.ndarray) -> list[list[list[Any]]]:
    """The ``[[x, y], ...]`` lists of the rings ``which`` (ints for whole rings, as ``_xy``)."""
    import numpy as np

    lens = ring_len[which]
    first = np.cumsum(lens) - lens
    rows = np.repeat(ring_start[which] - first, lens) + np.arange(int(lens.sum()))
    is_whole = ring_whole[which]
    row_whole = np.repeat(is_whole, lens)
    ints = coords[rows[row_whole]].astype(np.int64).tolist()
    floats = coords[rows[~row_whole]].tolist()
    len_int = np.where(is_whole, lens, 0)
    len_float = lens - len_int
    start = np.where(is_whole, np.cumsum(len_int) - len_int, np.cumsum(len_float) - len_float)
    return [(ints if w else floats)[s:s + c] for w, s, c in
            zip(is_whole.tolist(), start.tolist(), lens.tolist(), strict=True)]


# GEOS's GeoJSON writer (nlohmann json) prints doubles in Python repr's notation below 1e15
# (fixed point from 1e-4, e-notation under it; from 1e15 it uses e-notation where Python waits
# until 1e16) and whole values as "12.0", as Python prints a float. Its digits (Grisu2) always
# read back as the same double and are Python's own shortest digits in all but about 1 value
# in 1000, which get one digit more.
_GEOS_TEXT_HIGH = 1e15
_GEOS_POLYGON_PREFIX = '{"type":"Polygon","coordinates":'
_GEOS_TEXT_CHECK: list[bool] = []


def _geos_text_agrees() -> bool:
    """Whether this GEOS prints polygons as ``_GEOS_TEXT_HIGH`` describes (checked once per
    process, on values of every notation that matters)."""
    if not _GEOS_TEXT_CHECK:
        ok = False
        try:
            import shapely
            from shapely.geometry import Polygon

            xy = [(0.0, -0.0), (0.1, 1 / 3), (123456.789, 1e-4), (99999999999999.5, -2.5e-4),
                  (-7.0, 3.0)]
            text = str(shapely.to_geojson(Polygon(xy)))
            expected = [[x, y] for x, y in (*xy, xy[0])]
            ok = (text.startswith(_GEOS_POLYGON_PREFIX + "[[[0.0,-0.0],[0.1,0.3333")
                  and "[-7.0,3.0]" in text and "e" not in text[len(_GEOS_POLYGON_PREFIX):]
                  and json.loads(text)["coordinates"] == [expected])
        except Exception:  # any failure (old GEOS without GeoJSON) means: do not use it
            ok = False
        _GEOS_TEXT_CHECK.append(ok)
    return _GEOS_TEXT_CHECK[0]


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
        color = _valid_rgb(obj.color)
        if color is None:
            _warn(label, f"object colour {_short(obj.color)} is not three ints 0..255; "
                         "not written")
        else:
            props["color"] = list(color)
    if obj.classification is not None:
        class_name = str(obj.classification)
        if class_name:
            class_color = _valid_rgb(obj.class_color)
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


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause automatic garbage collection (if it is on) for the duration of the block.

    The writer makes millions of small lists and dicts that all live until the text is
    written; each few hundred allocations would trigger a collection, and the full ones walk
    every object made so far, which took more time than the work itself. Pausing only
    delays collection: anything cyclic is collected once it is back on.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
