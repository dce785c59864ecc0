"""The data model of QuPath GeoJSON and what its reader and writer share.

:class:`QuPathObject` (one object as QuPath keeps it), :class:`FeatureProblem` and
:class:`GeoJSONReport` (what ``validate_geojson`` finds); the dialect's constants (object and
geometry types, the property keys QuPath uses, ``MAX_COORDINATE``, ``PROBLEM_SEVERITY``); small
helpers both sides use (object types, colours, geometry parts, the garbage-collection pause);
and the optional orjson module. The dialects themselves are described in
:mod:`qpseg.qupath.geojson`, the entry point: import from there.
"""

from __future__ import annotations

import gc
import math
import numbers
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.qupath.classes import argb_to_rgb

try:  # orjson parses big files ~1.6x faster than the stdlib; optional (stdlib fallback)
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency, but PYTHONPATH=src runs lack it
    _orjson = None  # type: ignore[assignment]

if TYPE_CHECKING:  # shapely is imported lazily: the CLI must start fast
    from shapely.geometry.base import BaseGeometry

__all__ = [
    "GEOMETRY_TYPES",
    "MAX_COORDINATE",
    "OBJECT_TYPES",
    "PROBLEM_SEVERITY",
    "RGB",
    "FeatureProblem",
    "GeoJSONReport",
    "QuPathObject",
    "canonical_object_type",
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
