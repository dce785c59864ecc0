"""Fuzzing qpseg.qupath.geojson: any input ends in objects or a GeoJSONError, and anything
the writer emits is valid GeoJSON with valid geometry."""

from __future__ import annotations

import gzip
import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.errors import GEOSException
from shapely.geometry import MultiPolygon, Polygon, shape

from qpseg.errors import GeoJSONError
from qpseg.qupath.geojson import (
    MAX_COORDINATE,
    OBJECT_TYPES,
    QuPathObject,
    parse_features,
    read_geojson,
    to_feature,
    validate_geojson,
)

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Arbitrary JSON values (including what Python's json module accepts: NaN, Infinity).
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
           | st.text(max_size=8))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=30)

# Values that look like QuPath GeoJSON, so that the fuzzer gets past the first checks.
KEYS = st.sampled_from([
    "type", "features", "geometry", "geometries", "coordinates", "properties", "id",
    "objectType", "object_type", "classification", "name", "names", "color", "colorRGB",
    "parentClass", "measurements", "metadata", "isLocked", "isMissing", "nucleusGeometry",
    "value", "plane", "isEllipse",
])
WORDS = st.sampled_from([
    "Feature", "FeatureCollection", "Polygon", "MultiPolygon", "Point", "MultiPoint",
    "LineString", "MultiLineString", "GeometryCollection", "annotation", "detection", "cell",
    "tile", "tmaCore", "tma_core", "PathCellObject", "Tumor", "NaN", "",
])
NUMBERS = (st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.floats(-1e4, 1e4) | st.sampled_from([0, 1, 2]))
POSITION = st.lists(NUMBERS, min_size=0, max_size=3)
RING = st.lists(POSITION, max_size=6)
QUPATHISH = st.recursive(
    st.none() | st.booleans() | NUMBERS | WORDS | POSITION | RING | st.lists(RING, max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=6),
    max_leaves=40)


def _feature(geometry: Any, props: Any) -> dict[str, Any]:
    return {"type": "Feature", "geometry": geometry, "properties": props}


GEOMETRY = st.builds(lambda kind, coords: {"type": kind, "coordinates": coords},
                     WORDS, st.one_of(POSITION, RING, st.lists(RING, max_size=3),
                                      st.lists(st.lists(RING, max_size=2), max_size=2)))
FEATURES = st.lists(st.builds(_feature, GEOMETRY | QUPATHISH,
                              st.dictionaries(KEYS, QUPATHISH, max_size=6) | QUPATHISH),
                    max_size=4)

# Mostly well-formed features with odd values in them, to reach the property readers.
GOOD_NUMBER = st.floats(-1e4, 1e4) | st.integers(-100, 100)
GOOD_POSITION = st.lists(GOOD_NUMBER, min_size=2, max_size=3)
GOOD_RING = st.lists(GOOD_POSITION, min_size=3, max_size=6)


def _geom(kind: str) -> Any:
    return lambda coords: {"type": kind, "coordinates": coords}


GOOD_GEOMETRY = st.recursive(
    st.one_of(
        GOOD_POSITION.map(_geom("Point")),
        st.lists(GOOD_POSITION, min_size=1, max_size=4).map(_geom("MultiPoint")),
        st.lists(GOOD_POSITION, min_size=2, max_size=4).map(_geom("LineString")),
        st.lists(st.lists(GOOD_POSITION, min_size=2, max_size=3), max_size=2)
        .map(_geom("MultiLineString")),
        st.lists(GOOD_RING, min_size=1, max_size=3).map(_geom("Polygon")),
        st.lists(st.lists(GOOD_RING, min_size=1, max_size=2), min_size=1, max_size=2)
        .map(_geom("MultiPolygon")),
    ),
    lambda inner: st.lists(inner, max_size=3).map(
        lambda gs: {"type": "GeometryCollection", "geometries": gs}),
    max_leaves=4)
COLOR = st.lists(st.integers(-10, 300), max_size=4) | st.integers(-(2**40), 2**40) | QUPATHISH
CLASSIFICATION = st.none() | WORDS | QUPATHISH | st.fixed_dictionaries({}, optional={
    "name": WORDS | QUPATHISH, "names": st.lists(WORDS, max_size=3), "color": COLOR,
    "colorRGB": COLOR, "parentClass": st.fixed_dictionaries({}, optional={
        "name": WORDS, "colorRGB": COLOR})})
MEASUREMENTS = (st.dictionaries(st.text(max_size=4), NUMBERS | SCALARS, max_size=4)
                | st.lists(st.fixed_dictionaries({}, optional={
                    "name": st.text(max_size=4) | NUMBERS, "value": NUMBERS | SCALARS}),
                    max_size=3)
                | QUPATHISH)
PROPERTIES = st.fixed_dictionaries({}, optional={
    "objectType": WORDS | QUPATHISH, "object_type": WORDS, "type": WORDS,
    "classification": CLASSIFICATION, "name": SCALARS | QUPATHISH, "color": COLOR,
    "isLocked": SCALARS, "isMissing": SCALARS, "measurements": MEASUREMENTS,
    "metadata": st.dictionaries(st.text(max_size=4), SCALARS | QUPATHISH, max_size=3) | SCALARS,
    "nucleusGeometry": GOOD_GEOMETRY | QUPATHISH, "custom": JSON,
})
GOOD_FEATURE = st.builds(
    lambda g, p, fid, nucleus: {"type": "Feature", "id": fid, "geometry": g,
                                "nucleusGeometry": nucleus, "properties": p},
    GOOD_GEOMETRY, PROPERTIES | QUPATHISH,
    st.none() | st.uuids().map(str) | WORDS | NUMBERS | st.sampled_from(["PathCellObject"]),
    st.none() | GOOD_GEOMETRY)
FEATURES = st.lists(GOOD_FEATURE | GOOD_GEOMETRY, max_size=4) | FEATURES
COLLECTION = FEATURES.map(lambda fs: {"type": "FeatureCollection", "features": fs})


def _assert_in_range(geom: Any) -> None:
    """Every coordinate of ``geom`` is a number QuPath can hold (see MAX_COORDINATE)."""
    xy = shapely.get_coordinates(geom)
    assert (np.abs(xy) <= MAX_COORDINATE).all(), xy
    assert math.isfinite(geom.area) and math.isfinite(geom.length)


def _parse_or_error(data: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            objs = parse_features(data, "fuzz.geojson")
        except GeoJSONError as exc:
            assert "fuzz.geojson" in str(exc)
            return
    assert isinstance(objs, list)
    for obj in objs:
        assert isinstance(obj, QuPathObject) and not obj.geometry.is_empty
        assert obj.object_type in OBJECT_TYPES
        _assert_in_range(obj.geometry)
        if obj.nucleus_geometry is not None:
            _assert_in_range(obj.nucleus_geometry)
        # whatever was read can be written, or is refused with a warning; never a crash
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            feature = to_feature(obj)
        if feature is not None:
            text = json.dumps(feature, allow_nan=False)
            assert shape(json.loads(text)["geometry"]).is_valid


@FUZZ
@given(JSON)
def test_parse_arbitrary_json(data: Any) -> None:
    _parse_or_error(data)


@FUZZ
@given(COLLECTION | FEATURES | QUPATHISH)
def test_parse_qupath_like_json(data: Any) -> None:
    _parse_or_error(data)


@FUZZ
@given(st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(gzip.compress),
    JSON.map(lambda v: json.dumps(v).encode()),
    COLLECTION.map(lambda v: json.dumps(v).encode()),
    COLLECTION.map(lambda v: json.dumps(v).encode()).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),   # truncated files
))
def test_read_random_bytes(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.geojson"
        path.write_bytes(content)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                objs = read_geojson(path)
            except GeoJSONError as exc:
                assert "fuzz.geojson" in str(exc)
                objs = None
            try:
                report = validate_geojson(path)
            except GeoJSONError:
                assert objs is None  # the reader and the validator agree on whole-file errors
            else:
                assert objs is not None and report.n_objects == len(objs)


COORD = (st.floats(allow_nan=True, allow_infinity=True) | st.floats(-100, 100)
         | st.integers(-3, 3) | st.floats(-1e300, 1e300))
POINTS = st.lists(st.tuples(COORD, COORD), min_size=3, max_size=10)


def _polygon(points: list[tuple[float, float]], holes: list[list[tuple[float, float]]]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shapely's RuntimeWarning for NaN coordinates
        for args in ((points, holes), (points,)):
            try:
                return Polygon(*args)
            except (ValueError, GEOSException):  # NaN positions make rings that never close
                pass
    return Polygon()


POLYGONS = st.builds(_polygon, POINTS, st.lists(POINTS, max_size=2))
GEOMETRIES = POLYGONS | st.lists(POLYGONS, min_size=1, max_size=3).map(MultiPolygon)


@FUZZ
@given(GEOMETRIES, st.sampled_from(OBJECT_TYPES), st.none() | GEOMETRIES)
def test_written_polygons_are_valid(geometry: Any, object_type: str, nucleus: Any) -> None:
    obj = QuPathObject(geometry, object_type=object_type, classification="Tumor",
                       nucleus_geometry=nucleus, measurements={"x": math.nan, "y": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feature = to_feature(obj)
    if feature is None:
        return
    back = json.loads(json.dumps(feature, allow_nan=False))
    written = shape(back["geometry"])
    assert written.is_valid and not written.is_empty
    assert written.geom_type in ("Polygon", "MultiPolygon")
    assert back["properties"]["measurements"] == {"y": 1.0}
    assert back["properties"]["classification"]["color"] == [200, 0, 0]
    if "nucleusGeometry" in back:
        assert object_type == "cell" and shape(back["nucleusGeometry"]).is_valid


# Plain Polygon features are built in bulk (geojson_parse._build_polygons); anything it cannot
# make sense of goes back to the one-by-one reader. Both must give the same objects and
# the same problems. (JSON booleans among numbers are left out: numpy reads them as 1/0
# where the one-by-one reader may refuse them; either is a fine reading of nonsense.)
# Out-of-range numbers (beyond ±2^31, a square that overflows, NaN, infinity, 70-bit
# integers) must be refused alike by both paths; 2^31 itself is the largest accepted.
OUT_OF_RANGE = st.sampled_from([math.nan, math.inf, -math.inf, 2**70, -(2**70), 1e308, -1e308,
                                1e200, 2.0**31 + 1, -(2**31) - 1, 3e9, 2**63])
EDGE = st.sampled_from([2.0**31, -(2**31), 2**31, 2147483647.5])
BULK_NUMBER = (st.floats(-1e4, 1e4) | st.integers(-50, 50) | OUT_OF_RANGE | EDGE
               | st.sampled_from(["1", None]))
BULK_POSITION = (st.lists(st.floats(-1e4, 1e4) | st.integers(-50, 50), min_size=2, max_size=2)
                 | st.lists(BULK_NUMBER, min_size=0, max_size=3)
                 | st.lists(st.integers(0, 20) | OUT_OF_RANGE | EDGE, min_size=2, max_size=2))
BULK_RING = (st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)).map(list),
                      min_size=3, max_size=6)
             .flatmap(lambda r: st.sampled_from([r, [*r, r[0]]]))   # open or closed
             | st.lists(BULK_POSITION, max_size=5))
BULK_POLYGON = st.lists(BULK_RING, min_size=0, max_size=3).map(_geom("Polygon"))
BULK_FEATURE = st.builds(
    lambda g, nucleus, kind: {"type": "Feature", "geometry": g, "nucleusGeometry": nucleus,
                              "properties": {"objectType": kind}},
    BULK_POLYGON, st.none() | BULK_POLYGON, st.sampled_from(["cell", "detection", "x"]))


@FUZZ
@given(st.lists(BULK_FEATURE, max_size=12))
def test_bulk_polygons_equal_one_by_one_reading(features: list[Any]) -> None:
    import shapely

    from qpseg.qupath import geojson_parse as gj

    n, bulk, problems = gj._parse(features, "fuzz.geojson")
    single: list[tuple[int, QuPathObject]] = []
    expected: list[Any] = []
    for index, item in enumerate(features):
        notes: list[tuple[str, str]] = []
        obj = gj._parse_one(index, item, notes, expected, None)
        if obj is not None:
            single.append((index, obj))
            expected.extend(gj.FeatureProblem(index, k, m) for k, m in notes)
    assert n == len(features)
    assert [i for i, _ in bulk] == [i for i, _ in single]
    assert problems == sorted(expected, key=lambda p: p.index)
    for (_, a), (_, b) in zip(bulk, single, strict=True):
        assert shapely.to_wkb(a.geometry) == shapely.to_wkb(b.geometry)
        if b.nucleus_geometry is None:
            assert a.nucleus_geometry is None
        else:
            assert shapely.to_wkb(a.nucleus_geometry) == shapely.to_wkb(b.nucleus_geometry)
        assert (a.object_type, a.extra, a.geometry_extra) == (b.object_type, b.extra,
                                                              b.geometry_extra)


def test_bulk_polygons_known_answers() -> None:
    """Open rings are closed, holes kept, 3-D positions cut to x, y; one bad feature does not
    spoil its neighbours, and the bad one is reported as the one-by-one reader reports it."""
    from qpseg.qupath.geojson_parse import _parse

    square = [[0, 0], [4, 0], [4, 4], [0, 4]]            # open
    hole = [[1, 1, 7], [1, 2, 7], [2, 2, 7], [1, 1, 7]]  # 3-D, closed
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square, hole]}},
        {"type": "Feature", "geometry": {"type": "Polygon",
                                         "coordinates": [[[0, 0], [1, 1], [0, 0]]]}},
        {"type": "Feature", "geometry": {"type": "Polygon",
                                         "coordinates": [[[0, 0], [math.nan, 1], [1, 0]]]}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
         "properties": {"objectType": "cell"},
         "nucleusGeometry": {"type": "Polygon", "coordinates": [[[1, 1], [2, 1], [2, 2]]]}},
    ]
    n, objects, problems = _parse(features, "x.geojson")
    assert n == 4 and [i for i, _ in objects] == [0, 3]
    first = objects[0][1].geometry
    assert first.area == 16 - 0.5 and len(first.interiors) == 1
    assert list(first.exterior.coords)[-1] == (0.0, 0.0) and not first.has_z
    assert objects[1][1].nucleus_geometry.area == 0.5
    assert [(p.index, p.kind) for p in problems] == [(1, "skipped-feature"),
                                                     (2, "out-of-range-coordinates")]
    assert "fewer than 3 distinct positions" in problems[0].message
    assert "non-finite" in problems[1].message


#: Rings a reader keeps (at least 4 positions once closed): a degenerate ring is refused for
#: its shape before its numbers are looked at, which is a different, also correct, answer.
KEPT_RING = GOOD_RING.filter(lambda r: len(r) >= 4 or r[0][:2] != r[-1][:2])


@FUZZ
@given(st.lists(KEPT_RING, min_size=1, max_size=3), st.data(), st.sampled_from(
    ["geometry", "nucleusGeometry"]))
def test_out_of_range_numbers_are_refused_by_both_readers(rings: list[Any], data: Any,
                                                          where: str) -> None:
    """One bad number anywhere in a polygon: the bulk and the one-by-one reader both refuse
    the geometry (the feature, or the cell's nucleus) and say it is out of range."""
    from qpseg.qupath import geojson_parse as gj

    ring = data.draw(st.integers(0, len(rings) - 1))
    pos = data.draw(st.integers(0, len(rings[ring]) - 1))
    axis = data.draw(st.integers(0, 1))
    bad = [[list(p) for p in r] for r in rings]
    bad[ring][pos][axis] = data.draw(OUT_OF_RANGE)
    square = [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]
    if where == "geometry":
        feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": bad}}
    else:
        feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
                   "nucleusGeometry": {"type": "Polygon", "coordinates": bad},
                   "properties": {"objectType": "cell"}}
    features = [feature, {"type": "Feature",
                          "geometry": {"type": "Polygon", "coordinates": square}}]
    for bulk in (True, False):
        if bulk:
            _, objects, problems = gj._parse(features, "fuzz.geojson")
        else:
            objects, problems = [], []
            for index, item in enumerate(features):
                notes: list[tuple[str, str]] = []
                obj = gj._parse_one(index, item, notes, problems, None)
                if obj is not None:
                    objects.append((index, obj))
                    problems.extend(gj.FeatureProblem(index, k, m) for k, m in notes)
        assert [(p.index, p.kind) for p in problems] == [(0, "out-of-range-coordinates")]
        if where == "geometry":
            assert [i for i, _ in objects] == [1]
        else:
            assert [i for i, _ in objects] == [0, 1]
            assert objects[0][1].nucleus_geometry is None
