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

The code lives beside this module, one job per module: ``geojson_model`` (:class:`QuPathObject`,
:class:`FeatureProblem`, :class:`GeoJSONReport`, the dialect's constants and the helpers reader
and writer share), ``geojson_parse`` (parsed JSON -> objects, feature by feature, polygons built
in bulk; :func:`parse_features`), ``geojson_stream`` (large files parsed a few MB at a time),
``geojson_read`` (:func:`read_geojson`: files, gzip, whole or streamed), ``geojson_write``
(:func:`repair_polygonal`, :func:`to_feature`, :func:`to_feature_collection`,
:func:`write_geojson`), ``geojson_write_bulk`` (the writer's vectorised path for valid polygons
and new ids) and ``geojson_validate`` (:func:`validate_geojson`). This module is the entry point:
import from here.
"""

from __future__ import annotations

from qpseg.errors import GeoJSONError as GeoJSONError
from qpseg.errors import GeoJSONWarning as GeoJSONWarning
from qpseg.qupath.geojson_model import (
    GEOMETRY_TYPES,
    MAX_COORDINATE,
    OBJECT_TYPES,
    PROBLEM_SEVERITY,
    FeatureProblem,
    GeoJSONReport,
    QuPathObject,
    canonical_object_type,
)
from qpseg.qupath.geojson_parse import parse_features
from qpseg.qupath.geojson_read import read_geojson
from qpseg.qupath.geojson_validate import validate_geojson
from qpseg.qupath.geojson_write import (
    repair_polygonal,
    to_feature,
    to_feature_collection,
    write_geojson,
)

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
