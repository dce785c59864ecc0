"""qpseg.qupath.geojson: QuPath GeoJSON read (lenient), write (strict) and validate."""

from __future__ import annotations

import gzip
import json
import math
import re
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import shapely
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box, shape

from qpseg.errors import GeoJSONError, GeoJSONWarning
from qpseg.qupath.classes import default_color
from qpseg.qupath.geojson import (
    OBJECT_TYPES,
    FeatureProblem,
    QuPathObject,
    canonical_object_type,
    parse_features,
    read_geojson,
    repair_polygonal,
    to_feature,
    to_feature_collection,
    validate_geojson,
    write_geojson,
)
from qpseg.qupath.geojson_model import _describe

# --------------------------------------------------------------------------------------------
# Known answers for every GeoJSON fixture (computed once from the JSON, then pinned).
# geoms: geometry type, with "+holes" when a polygon (or a part of a multipolygon) has holes.
# --------------------------------------------------------------------------------------------

FIXTURES: dict[str, dict[str, Any]] = {
    "annotated_regions_Qupath.geojson": dict(
        n=5, types={"annotation": 5}, classes={None: 5}, geoms={"Polygon": 2, "Point": 3},
        names=["region2", "Region1", "calib1", "calib3", "calib2"]),
    "polygons.geojson": dict(
        n=3, types={"annotation": 3}, classes={None: 3}, geoms={"Polygon": 3},
        names=[None, None, None]),
    "qupath05.geojson": dict(
        n=3, types={"annotation": 3}, classes={None: 3}, geoms={"Polygon": 3},
        names=["UT", "I", "I"]),
    "annotations-0001879__Replicate 1__demo.geojson": dict(
        n=4, types={"annotation": 4}, classes={"Positive": 2, "Negative": 2},
        geoms={"Polygon": 3, "Polygon+holes": 1}),
    "annotations-0001879__Replicate 1__demo2.geojson": dict(
        n=5, types={"annotation": 5}, classes={"Negative": 2, "Positive": 1, "Other": 2},
        geoms={"Polygon": 3, "MultiPolygon+holes": 1, "Polygon+holes": 1}),
    "annotations-mixed_types.geojson": dict(
        n=7, types={"annotation": 7},
        classes={"Stroma": 3, "Necrosis": 1, "Immune cells": 1, None: 1, "Tumor": 1},
        geoms={"Polygon": 2, "LineString": 2, "Point": 1, "MultiPoint": 2}),
    "demo_annotations.geojson": dict(
        n=28, types={"annotation": 28}, classes={"Tumor cells": 22, "Stroma": 6},
        geoms={"Polygon": 18, "Polygon+holes": 10}),
    "demo_points.geojson": dict(
        n=1, types={"annotation": 1}, classes={"Tumor center": 1}, geoms={"MultiPoint": 1}),
    "demo_points_without_names.geojson": dict(
        n=1, types={"annotation": 1}, classes={None: 1}, geoms={"MultiPoint": 1}),
    "demo_regions.geojson": dict(
        n=3, types={"annotation": 3}, classes={None: 3}, geoms={"Polygon": 3},
        names=["Region 1", "Region 3", "Region 2"]),
    "regions-0001879__Replicate 1__TMA.geojson": dict(
        n=6, types={"tmaCore": 6}, classes={None: 6}, geoms={"Polygon": 6},
        names=["B-2", "A-3", "B-1", "B-3", "A-1", "A-2"]),
    "regions-0001879__Replicate 1__demo_regions.geojson": dict(
        n=3, types={"annotation": 3}, classes={None: 3}, geoms={"Polygon": 3},
        names=["Region1", "Region2", "Region3"]),
    "test_regions.geojson": dict(
        n=3, types={"annotation": 3}, classes={None: 3},
        geoms={"MultiPoint": 1, "Polygon+holes": 1, "Polygon": 1}, names=["A-3", "A-1", "A-2"]),
    "Exemplar001_subset.geojson": dict(
        n=7, types={"annotation": 7},
        classes={"Immune_Cluster": 3, "Epithelial_Cluster": 3, "Ignore_from_analysis": 1},
        geoms={"Polygon": 7}),
    "qp_all_shapes.geojson": dict(
        n=7, types={"annotation": 7}, classes={None: 7},
        geoms={"Polygon": 3, "MultiPoint": 1, "Point": 1, "LineString": 2}),
}


def _fixture_files(root: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(root.rglob("*.geojson"))}


def _geom_kind(g: Any) -> str:
    if g.geom_type == "Polygon" and len(g.interiors):
        return "Polygon+holes"
    if g.geom_type == "MultiPolygon" and any(len(p.interiors) for p in g.geoms):
        return "MultiPolygon+holes"
    return str(g.geom_type)


def _same_geometry(a: Any, b: Any) -> bool:
    return bool(shapely.equals_exact(shapely.normalize(a), shapely.normalize(b), 1e-6))


def _poly_feature(coords: Any, **props: Any) -> dict[str, Any]:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": props}


SQUARE = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
BOWTIE = [[[0, 0], [2, 2], [2, 0], [0, 2], [0, 0]]]


def test_every_fixture_is_pinned(qupath_fixtures: Path) -> None:
    assert set(_fixture_files(qupath_fixtures)) == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_read_fixture(qupath_fixtures: Path, name: str) -> None:
    path = _fixture_files(qupath_fixtures)[name]
    expected = FIXTURES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real QuPath files read without a single warning
        objs = read_geojson(path)
    assert len(objs) == expected["n"]
    assert Counter(o.object_type for o in objs) == expected["types"]
    assert Counter(o.classification for o in objs) == expected["classes"]
    assert Counter(_geom_kind(o.geometry) for o in objs) == expected["geoms"]
    if "names" in expected:
        assert [o.name for o in objs] == expected["names"]
    for o in objs:  # every classified object in these files carries its class colour
        assert (o.class_color is None) == (o.classification is None)
        assert o.measurements == {} and o.metadata == {}


def test_fixture_details(qupath_fixtures: Path) -> None:
    files = _fixture_files(qupath_fixtures)
    holes = read_geojson(files["demo_annotations.geojson"])
    assert sum(len(o.geometry.interiors) > 0 for o in holes) == 10
    assert holes[0].id == "62fe25ef-caa9-413f-9f2c-339e933a401e"
    assert holes[0].class_color == (255, 0, 0) and holes[4].class_color == (0, 0, 255)

    # wsireg: 0.3 bare list, object_type, isLocked false, no ids, integer coordinates
    bare = read_geojson(files["polygons.geojson"])
    assert [o.id for o in bare] == [None] * 3 and not any(o.is_locked for o in bare)
    assert bare[0].geometry.exterior.coords[0] == (856.0, 137.0)
    assert bare[0].area == pytest.approx(106363.0)

    # dlup: three named, coloured, unclassified objects
    dlup = read_geojson(files["qupath05.geojson"])
    assert [(o.name, o.color, o.classification) for o in dlup] == [
        ("UT", (255, 0, 0), None), ("I", (255, 0, 0), None), ("I", (255, 0, 0), None)]
    assert dlup[0].id == "6423a977-ffff-48db-affc-cd11632010f0"

    # napari all-shapes: one of each ROI kind
    shapes = read_geojson(files["qp_all_shapes.geojson"])
    assert {o.geometry.geom_type for o in shapes} == {
        "Point", "MultiPoint", "LineString", "Polygon"}
    assert [o.is_area for o in shapes] == [True, True, True, False, False, False, False]

    # TMA dearrayer export: tmaCore objects with isMissing
    tma = read_geojson(files["regions-0001879__Replicate 1__TMA.geojson"])
    assert all(o.object_type == "tmaCore" and o.extra == {"isMissing": False} for o in tma)

    # MultiPolygon with holes: parts have 2 and 0 holes
    multi = read_geojson(files["annotations-0001879__Replicate 1__demo2.geojson"])[2]
    assert multi.geometry.geom_type == "MultiPolygon"
    assert [len(p.interiors) for p in multi.geometry.geoms] == [2, 0]
    assert multi.classification == "Other" and multi.class_color == (255, 200, 0)

    # py-lmd: named calibration points with their own colour
    lmd = read_geojson(files["annotated_regions_Qupath.geojson"])
    assert [o.color for o in lmd] == [None, None, (0, 255, 0), (0, 255, 0), (0, 255, 0)]
    assert lmd[2].geometry.geom_type == "Point" and not lmd[2].is_area

    exemplar = read_geojson(files["Exemplar001_subset.geojson"])
    assert {o.classification: o.class_color for o in exemplar} == {
        "Immune_Cluster": (55, 46, 21), "Epithelial_Cluster": (42, 219, 35),
        "Ignore_from_analysis": (18, 236, 18)}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_round_trip(qupath_fixtures: Path, tmp_path: Path, name: str) -> None:
    objs = read_geojson(_fixture_files(qupath_fixtures)[name])
    out = tmp_path / "out.geojson"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # valid input: nothing to repair or drop
        assert write_geojson(out, objs) == len(objs)
    back = read_geojson(out)
    assert len(back) == len(objs)
    for a, b in zip(objs, back, strict=True):
        assert _same_geometry(a.geometry, b.geometry)
        assert (a.object_type, a.classification, a.class_color, a.name, a.color) == (
            b.object_type, b.classification, b.class_color, b.name, b.color)
        assert (a.measurements, a.metadata, a.is_locked, a.extra) == (
            b.measurements, b.metadata, b.is_locked, b.extra)
        if a.id is not None:
            assert b.id == a.id
        else:  # objects without an id get a fresh UUID
            assert b.id is not None and uuid.UUID(b.id).version == 4
    features = json.loads(out.read_text())["features"]
    for f in features:
        g = shape(f["geometry"])
        assert g.is_valid
        for p in getattr(g, "geoms", [g]):
            if p.geom_type == "Polygon":
                assert p.exterior.is_ccw and not any(r.is_ccw for r in p.interiors)


# --------------------------------------------------------------------------------------------
# Hand-made reading cases
# --------------------------------------------------------------------------------------------


def test_qupath03_colorrgb_and_measurement_list() -> None:
    feature = _poly_feature(
        SQUARE, object_type="detection", isLocked=True,
        classification={"name": "Positive", "colorRGB": -377282,
                        "parentClass": {"name": "Tumor", "colorRGB": -3670016}},
        measurements=[{"name": "Area", "value": 100}, {"name": "Mean", "value": 0.25},
                      {"name": "Missing", "value": "NaN"}])
    [obj] = parse_features([feature])
    assert obj.object_type == "detection" and obj.is_locked
    assert obj.classification == "Tumor: Positive" and obj.class_color == (250, 62, 62)
    assert obj.measurements["Area"] == 100.0 and obj.measurements["Mean"] == 0.25
    assert math.isnan(obj.measurements["Missing"])
    [plain] = parse_features([_poly_feature(
        SQUARE, classification={"name": "Tumor", "colorRGB": -3670016})])
    assert plain.class_color == (200, 0, 0)


def test_qupath04_classification_variants() -> None:
    objs = parse_features({"type": "FeatureCollection", "features": [
        _poly_feature(SQUARE, classification={"names": ["Tumor", "Positive"],
                                              "color": [200, 50, 50]}),
        _poly_feature(SQUARE, classification={"name": "Stroma", "color": [150, 200, 150, 128]}),
        _poly_feature(SQUARE, classification="Necrosis"),
        _poly_feature(SQUARE, classification={}),
        _poly_feature(SQUARE, objectType="cell", color=-16711936,
                      measurements={"Area": 5, "Ratio": 0.5}, metadata={"k": "v", "n": 3}),
    ]})
    assert [(o.classification, o.class_color) for o in objs] == [
        ("Tumor: Positive", (200, 50, 50)), ("Stroma", (150, 200, 150)), ("Necrosis", None),
        (None, None), (None, None)]
    assert objs[4].color == (0, 255, 0)
    assert objs[4].measurements == {"Area": 5.0, "Ratio": 0.5}
    assert objs[4].metadata == {"k": "v", "n": "3"}


@pytest.mark.parametrize(("spelling", "expected"), [
    ("annotation", "annotation"), ("Annotation", "annotation"), ("detection", "detection"),
    ("cell", "cell"), ("tile", "tile"), ("tmaCore", "tmaCore"), ("tma_core", "tmaCore"),
    ("TMA_CORE", "tmaCore"), ("TMACoreObject", "tmaCore"), ("PathCellObject", "cell"),
    ("root", None), ("", None), (3, None),
])
def test_canonical_object_type(spelling: Any, expected: str | None) -> None:
    assert canonical_object_type(spelling) == expected


def test_object_type_sources() -> None:
    objs = parse_features([
        _poly_feature(SQUARE, object_type="tma_core", isMissing=True),
        _poly_feature(SQUARE, type="tile"),  # QuPath's alias
        {"type": "Feature", "id": "PathCellObject",  # 0.2 stored the type as the id
         "geometry": {"type": "Polygon", "coordinates": SQUARE}, "properties": {}},
        _poly_feature(SQUARE),
    ])
    assert [o.object_type for o in objs] == ["tmaCore", "tile", "cell", "annotation"]
    assert objs[0].extra == {"isMissing": True} and objs[2].id is None
    with pytest.warns(GeoJSONWarning, match=r"feature 0: unknown object type 'spaceship'"):
        [odd] = parse_features([_poly_feature(SQUARE, objectType="spaceship")])
    assert odd.object_type == "annotation"


def test_top_level_shapes() -> None:
    feature = _poly_feature(SQUARE, objectType="annotation", name="one")
    assert [o.name for o in parse_features(feature)] == ["one"]
    assert [o.name for o in parse_features([feature, feature])] == ["one", "one"]
    [geom_only] = parse_features({"type": "Polygon", "coordinates": SQUARE})
    assert geom_only.object_type == "annotation" and geom_only.classification is None
    assert geom_only.area == 100.0
    assert parse_features({"type": "FeatureCollection", "features": []}) == []
    [gc] = parse_features({"type": "GeometryCollection", "geometries": [
        {"type": "Point", "coordinates": [1, 2]},
        {"type": "Polygon", "coordinates": SQUARE}]})
    assert gc.geometry.geom_type == "GeometryCollection" and gc.is_area


def test_geometry_kept_as_read() -> None:
    objs = parse_features([
        _poly_feature(BOWTIE),                                  # invalid: kept as is
        _poly_feature([[[0, 0], [4, 0], [4, 4], [0, 4]]]),      # unclosed ring: closed
        {"type": "Feature", "geometry": {"type": "LineString",
                                         "coordinates": [[0.125, 1e-7], [3, 4, 5]]}},
        {"type": "Feature", "geometry": {"type": "MultiLineString",
                                         "coordinates": [[[0, 0], [1, 1]], [[2, 2], [3, 3]]]}},
    ])
    assert not objs[0].geometry.is_valid
    assert list(objs[0].geometry.exterior.coords) == [(0, 0), (2, 2), (2, 0), (0, 2), (0, 0)]
    assert objs[1].geometry.area == 16.0
    assert list(objs[2].geometry.coords) == [(0.125, 1e-7), (3.0, 4.0)]
    assert objs[3].geometry.geom_type == "MultiLineString"


BAD_FEATURES: list[tuple[Any, str]] = [
    (42, "not an object"),
    ({"type": "Feature", "properties": {}}, "no geometry"),
    ({"type": "Feature", "geometry": None}, "missing"),
    ({"type": "Feature", "geometry": {"type": "Circle", "coordinates": [0, 0]}}, "unknown type"),
    (_poly_feature([[["a", 0], [1, 0], [1, 1], [0, 0]]]), "non-numeric"),
    (_poly_feature([[[0, 0], [1, None], [1, 1], [0, 0]]]), "non-numeric"),
    (_poly_feature([[[0, 0], [1, math.nan], [1, 1], [0, 0]]]), "non-finite"),
    (_poly_feature([[[0, 0], [1, math.inf], [1, 1], [0, 0]]]), "non-finite"),
    (_poly_feature([[[0, 0], [1, 1]]]), "fewer than 3"),
    (_poly_feature("nope"), "not an array"),
    ({"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0]]}},
     "single position"),
    ({"type": "Feature", "geometry": {"type": "Point", "coordinates": [1]}}, "not an [x, y]"),
    ({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": []}}, "empty"),
    ({"type": "Topology"}, "not 'Feature'"),
]


@pytest.mark.parametrize(("bad", "why"), BAD_FEATURES)
def test_bad_feature_is_skipped_with_its_index(tmp_path: Path, bad: Any, why: str) -> None:
    path = tmp_path / "some file.geojson"
    good = _poly_feature(SQUARE, name="good")
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [good, bad, good]}))
    with pytest.warns(GeoJSONWarning) as record:
        objs = read_geojson(path)
    assert [o.name for o in objs] == ["good", "good"]
    [message] = [str(w.message) for w in record]
    assert "some file.geojson" in message and "feature 1:" in message and why in message


def test_bad_properties_are_ignored_with_a_warning() -> None:
    with pytest.warns(GeoJSONWarning) as record:
        [obj] = parse_features([_poly_feature(
            SQUARE, name={"x": 1}, color="red", isLocked="maybe", metadata=[1],
            measurements={"ok": 1.5, "text": "abc", "flag": True},
            classification={"color": [1, 2, 3]})])
    assert obj.name is None and obj.color is None and not obj.is_locked
    assert obj.measurements == {"ok": 1.5} and obj.metadata == {}
    assert obj.classification is None
    text = " | ".join(str(w.message) for w in record)
    for word in ("name", "color", "isLocked", "metadata", "'text'", "'flag'", "no name"):
        assert word in text


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def test_bowtie_is_written_as_two_valid_triangles() -> None:
    obj = QuPathObject(Polygon([(0, 0), (2, 2), (2, 0), (0, 2)]), classification="Tumor")
    assert not obj.geometry.is_valid
    with pytest.warns(GeoJSONWarning, match="repaired"):
        feature = to_feature(obj)
    assert feature is not None
    g = shape(feature["geometry"])
    assert g.is_valid and g.geom_type == "MultiPolygon" and len(g.geoms) == 2
    assert g.area == pytest.approx(2.0)  # two triangles of area 1
    assert sorted(p.area for p in g.geoms) == [1.0, 1.0]


def test_overlapping_parts_are_unioned() -> None:
    g = MultiPolygon([box(0, 0, 2, 2), box(1, 1, 3, 3)])
    repaired = repair_polygonal(g)
    assert repaired.is_valid and repaired.area == pytest.approx(7.0)


def test_nan_measurement_dropped_with_warning() -> None:
    obj = QuPathObject(box(0, 0, 1, 1), measurements={"Area": 1.0, "Bad": math.nan,
                                                      "Inf": math.inf, "Huge": 10**400})
    with pytest.warns(GeoJSONWarning, match=r"'Bad', 'Inf', 'Huge'"):
        feature = to_feature(obj)
    assert feature is not None
    assert feature["properties"]["measurements"] == {"Area": 1.0}
    json.dumps(feature, allow_nan=False)


def test_cell_with_nucleus_round_trips(tmp_path: Path) -> None:
    cell = QuPathObject(box(0, 0, 10, 10), object_type="cell", classification="Tumor",
                        class_color=(200, 0, 0), nucleus_geometry=box(3, 3, 6, 6),
                        measurements={"Nucleus: Area": 9.0})
    path = tmp_path / "cells.geojson"
    assert write_geojson(path, [cell]) == 1
    raw = json.loads(path.read_text())["features"][0]
    assert "nucleusGeometry" in raw  # beside "geometry", where QuPath reads it
    [back] = read_geojson(path)
    assert back.object_type == "cell" and back.nucleus_geometry is not None
    assert _same_geometry(back.nucleus_geometry, box(3, 3, 6, 6))
    assert back.measurements == {"Nucleus: Area": 9.0}
    # a nucleus inside the properties (some tools write it there) is read too
    moved = dict(raw, properties=dict(raw["properties"], nucleusGeometry=raw["nucleusGeometry"]))
    del moved["nucleusGeometry"]
    [again] = parse_features([moved])
    assert again.nucleus_geometry is not None and again.nucleus_geometry.area == 9.0


def test_multipolygon_with_holes_round_trips(tmp_path: Path) -> None:
    outer = Polygon(box(0, 0, 10, 10).exterior.coords,
                    [box(2, 2, 4, 4).exterior.coords, box(6, 6, 8, 8).exterior.coords])
    geom = MultiPolygon([outer, box(20.5, 0.25, 30.125, 10)])
    path = tmp_path / "multi.geojson"
    write_geojson(path, [QuPathObject(geom, name="m", id=str(uuid.UUID(int=7)))])
    [back] = read_geojson(path)
    assert _same_geometry(back.geometry, geom) and back.id == str(uuid.UUID(int=7))
    assert [len(p.interiors) for p in back.geometry.geoms] == [2, 0]


def test_classification_and_colour_rules() -> None:
    plain = to_feature(QuPathObject(box(0, 0, 1, 1)))
    assert plain is not None and "classification" not in plain["properties"]
    default = to_feature(QuPathObject(box(0, 0, 1, 1), classification="Tumor"))
    assert default is not None
    assert default["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    custom = to_feature(QuPathObject(box(0, 0, 1, 1), classification="My class"))
    assert custom is not None
    assert custom["properties"]["classification"]["color"] == list(default_color("My class"))
    kept = to_feature(QuPathObject(box(0, 0, 1, 1), classification="Tumor",
                                   class_color=(1, 2, 3), color=(4, 5, 6)))
    assert kept is not None
    assert kept["properties"]["classification"]["color"] == [1, 2, 3]
    assert kept["properties"]["color"] == [4, 5, 6]
    with pytest.warns(GeoJSONWarning, match="class colour"):
        bad = to_feature(QuPathObject(box(0, 0, 1, 1), classification="Tumor",
                                      class_color=(300, 0, 0)))
    assert bad is not None and bad["properties"]["classification"]["color"] == [200, 0, 0]


def test_feature_layout_and_ids() -> None:
    good_id = "6423a977-ffff-48db-affc-cd11632010f0"
    ccw = Polygon([(0, 0), (1.5, 0), (1.5, 1), (0, 1)])
    f = to_feature(QuPathObject(ccw, id=good_id, name="n", is_locked=True,
                                metadata={"a": "b"}, extra={"isMissing": False, "x": [1, "y"]}))
    assert f is not None
    assert list(f) == ["type", "id", "geometry", "properties"]
    assert f["id"] == good_id and f["type"] == "Feature"
    assert f["geometry"] == {"type": "Polygon", "coordinates": [
        [[0, 0], [1.5, 0], [1.5, 1], [0, 1], [0, 0]]]}  # integral values written as ints
    assert f["properties"] == {"objectType": "annotation", "name": "n", "isLocked": True,
                               "metadata": {"a": "b"}, "isMissing": False, "x": [1, "y"]}
    braces = to_feature(QuPathObject(box(0, 0, 1, 1), id="{" + good_id.upper() + "}"))
    assert braces is not None and braces["id"] == good_id
    fresh = to_feature(QuPathObject(box(0, 0, 1, 1), id="not-a-uuid"))
    assert fresh is not None and uuid.UUID(fresh["id"]).version == 4
    unlocked = to_feature(QuPathObject(Point(1, 2)))
    assert unlocked is not None and unlocked["properties"] == {"objectType": "annotation"}
    assert unlocked["geometry"] == {"type": "Point", "coordinates": [1, 2]}


def test_objects_that_cannot_be_written(tmp_path: Path) -> None:
    cases = [
        QuPathObject(Polygon([(0, 0), (1, 1), (2, 2)])),             # no area
        QuPathObject(Polygon()),                                     # empty
        QuPathObject(LineString([(0, 0), (5, 5)]), object_type="cell"),
        QuPathObject(Point(math.nan, 1)),
        QuPathObject(box(0, 0, 1, 1), object_type="spaceship"),
    ]
    for obj in cases:
        with pytest.warns(GeoJSONWarning, match="not written"):
            assert to_feature(obj) is None
    ok = QuPathObject(box(0, 0, 1, 1))
    path = tmp_path / "few.geojson"
    with pytest.warns(GeoJSONWarning) as record:
        assert write_geojson(path, [*cases, ok]) == 1
    messages = [str(w.message) for w in record]
    assert len(messages) == len(cases) and all("not written" in m for m in messages)
    assert all(f"few.geojson: object {i} " in m for i, m in enumerate(messages))
    assert len(read_geojson(path)) == 1


def test_points_and_lines_for_annotations_only_areas_for_the_rest() -> None:
    line = to_feature(QuPathObject(LineString([(0, 0), (1, 1)])))
    assert line is not None and line["geometry"]["type"] == "LineString"
    points = to_feature(QuPathObject(shapely.MultiPoint([(0, 0), (1, 1)]),
                                     object_type="detection"))
    assert points is not None and points["geometry"]["type"] == "MultiPoint"
    with pytest.warns(GeoJSONWarning, match="dropped"):
        mixed = to_feature(QuPathObject(shapely.GeometryCollection(
            [box(0, 0, 1, 1), Point(5, 5)]), object_type="tile"))
    assert mixed is not None and mixed["geometry"]["type"] == "Polygon"
    with pytest.warns(GeoJSONWarning, match="must be a polygon"):
        assert to_feature(QuPathObject(Point(0, 0), object_type="tmaCore")) is None


def test_extra_and_geometry_members() -> None:
    obj = QuPathObject(box(0, 0, 2, 1), geometry_extra={"isEllipse": True,
                                                        "plane": {"c": -1, "z": 2, "t": 0}},
                       extra={"nan": math.nan, "objectType": "cell", "ok": 1})
    with pytest.warns(GeoJSONWarning, match="'nan'"):
        f = to_feature(obj)
    assert f is not None
    assert f["geometry"]["isEllipse"] is True and f["geometry"]["plane"]["z"] == 2
    assert f["properties"] == {"objectType": "annotation", "ok": 1}
    [back] = parse_features([f])
    assert back.geometry_extra == {"isEllipse": True, "plane": {"c": -1, "z": 2, "t": 0}}


def test_write_file_options(tmp_path: Path) -> None:
    objs = [QuPathObject(box(0, 0, 1, 1), name="a"), QuPathObject(box(2, 2, 3, 3), name="b")]
    path = tmp_path / "out.geojson"
    assert write_geojson(path, objs) == 2
    text = path.read_text()
    assert "\n" not in text.rstrip("\n") and ", " not in text  # compact
    assert json.loads(text)["type"] == "FeatureCollection"
    assert write_geojson(path, objs[:1], indent=2) == 1
    assert "\n  " in path.read_text()
    assert len(read_geojson(path.with_name("out.geojson.bak"))) == 2  # previous version kept
    write_geojson(path, objs, backup=False)
    assert len(read_geojson(path.with_name("out.geojson.bak"))) == 2
    gz = tmp_path / "out.geojson.gz"
    assert write_geojson(gz, objs) == 2
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    assert [o.name for o in read_geojson(gz)] == ["a", "b"]
    assert to_feature_collection(objs)["features"][1]["properties"]["name"] == "b"


def test_gzip_fixture_reads_transparently(qupath_fixtures: Path, tmp_path: Path) -> None:
    src = _fixture_files(qupath_fixtures)["demo_annotations.geojson"]
    gz = tmp_path / "demo.geojson.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    plain, packed = read_geojson(src), read_geojson(gz)
    assert len(packed) == 28
    assert all(_same_geometry(a.geometry, b.geometry) for a, b in zip(plain, packed, strict=True))


# --------------------------------------------------------------------------------------------
# Whole-file errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "why"), [
    (b'{"type": "FeatureCollection", "features": [', "not valid JSON"),
    (b"", "empty"),
    (b"  \n", "empty"),
    (b"42", "is a number"),
    (b'"FeatureCollection"', "is a string"),
    (b"null", "is a null"),
    (b'{"type": "FeatureCollection", "features": {}}', "not an array"),
    (b'{"type": "Topology"}', "'Topology'"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"\x1f\x8b\x08\x00broken", "gzip"),
])
def test_whole_file_errors(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "broken.geojson"
    path.write_bytes(content)
    with pytest.raises(GeoJSONError) as info:
        read_geojson(path)
    assert "broken.geojson" in str(info.value) and why in str(info.value)
    with pytest.raises(GeoJSONError):
        validate_geojson(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GeoJSONError, match=r"nowhere\.geojson: file not found"):
        read_geojson(tmp_path / "nowhere.geojson")
    with pytest.raises(GeoJSONError, match="directory"):
        read_geojson(tmp_path)


def test_parse_features_errors_name_the_source() -> None:
    with pytest.raises(GeoJSONError, match=r"^mine\.json: top-level JSON value is a number"):
        parse_features(3.5, "mine.json")


# --------------------------------------------------------------------------------------------
# Validator
# --------------------------------------------------------------------------------------------


def test_validator_reports_each_problem(tmp_path: Path) -> None:
    uid = "0cba7e43-108b-41bb-9a8e-25991e4ca592"
    tumor = {"name": "Tumor", "color": [200, 0, 0]}
    features: list[Any] = [
        dict(_poly_feature(SQUARE, objectType="annotation", classification=tumor), id=uid),
        _poly_feature(BOWTIE, objectType="annotation", classification=tumor),
        _poly_feature(SQUARE, objectType="detection", classification={"name": "Stroma"}),
        _poly_feature(SQUARE, objectType="detection", measurements={"A": math.nan, "B": 1}),
        _poly_feature([[["x", 0], [1, 0], [1, 1], [0, 0]]]),
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": []}},
        _poly_feature(SQUARE, objectType="spaceship"),
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]},
         "properties": {"objectType": "cell"}},
        dict(_poly_feature(SQUARE, objectType="annotation", measurements={"M": "abc"}), id=uid),
        _poly_feature([[[0, 0], [1, 1], [2, 2], [0, 0]]], objectType="annotation"),
    ]
    path = tmp_path / "crafted.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the validator reports, it does not warn
        report = validate_geojson(path)
    assert report.path == path and report.n_features == 10 and report.n_objects == 8
    assert report.counts == {
        ("annotation", "Tumor"): 2, ("detection", "Stroma"): 1, ("detection", None): 1,
        ("annotation", None): 3, ("cell", None): 1}
    got = [(p.index, p.kind) for p in report.problems]
    assert got == [
        (1, "invalid-geometry"), (2, "missing-colour"), (3, "non-finite-measurement"),
        (4, "skipped-feature"), (5, "empty-geometry"), (6, "unknown-object-type"),
        (7, "wrong-geometry-type"), (8, "non-numeric-measurement"), (8, "duplicate-id"),
        (9, "invalid-geometry"), (9, "empty-geometry")]
    severities = {p.kind: p.severity for p in report.problems}
    assert severities["skipped-feature"] == "error" and severities["empty-geometry"] == "error"
    assert severities["invalid-geometry"] == "error"  # a repair would guess what was drawn
    assert severities["duplicate-id"] == severities["non-numeric-measurement"] == "error"
    assert severities["missing-colour"] == "warning"
    assert severities["non-finite-measurement"] == "warning"  # QuPath's own "no value"
    assert severities["unknown-object-type"] == "warning"
    assert not report.ok and report.n_errors == 8
    assert "'A'" in report.problems[2].message
    assert report.kinds()["invalid-geometry"] == 2


def test_validator_ok_with_warnings_only(tmp_path: Path) -> None:
    path = tmp_path / "warn.geojson"
    path.write_text(json.dumps([
        _poly_feature(SQUARE, classification={"name": "X"}, measurements={"A": math.nan}),
        _poly_feature(SQUARE, objectType="spaceship")]))
    report = validate_geojson(path)
    assert report.ok and report.n_errors == 0
    assert [p.kind for p in report.problems] == ["missing-colour", "non-finite-measurement",
                                                 "unknown-object-type"]
    assert FeatureProblem(0, "made-up", "?").severity == "warning"


# an outline crossing itself, and a hole drawn outside its shell
HOLE_OUTSIDE = [SQUARE[0], [[20, 20], [21, 20], [21, 21], [20, 20]]]


@pytest.mark.parametrize("coords", [BOWTIE, HOLE_OUTSIDE], ids=["bowtie", "hole-outside"])
def test_validator_invalid_outline_is_an_error(tmp_path: Path, coords: Any) -> None:
    path = tmp_path / "invalid.geojson"
    path.write_text(json.dumps([_poly_feature(coords, classification={
        "name": "Tumor", "color": [200, 0, 0]})]))
    report = validate_geojson(path)
    assert [(p.index, p.kind, p.severity) for p in report.problems] == [
        (0, "invalid-geometry", "error")]
    assert not report.ok and report.n_errors == 1


def test_validator_on_fixtures(qupath_fixtures: Path) -> None:
    for name, path in _fixture_files(qupath_fixtures).items():
        report = validate_geojson(path)
        assert report.ok and report.problems == [], name
        assert report.n_features == report.n_objects == FIXTURES[name]["n"]
        assert sum(report.counts.values()) == FIXTURES[name]["n"]
    report = validate_geojson(_fixture_files(qupath_fixtures)["demo_annotations.geojson"])
    assert report.counts == {("annotation", "Tumor cells"): 22, ("annotation", "Stroma"): 6}


def test_object_types_constant() -> None:
    assert OBJECT_TYPES == ("annotation", "detection", "cell", "tile", "tmaCore")


# --------------------------------------------------------------------------------------------
# The collection writer's fast path (vectorised geometry, bulk ids) against to_feature
# --------------------------------------------------------------------------------------------


def _ngon(rng: Any, cx: float, cy: float, r: float, n: int, whole: bool,
          cw: bool) -> list[tuple[float, float]]:
    import numpy as np

    a = np.sort(rng.uniform(0, 2 * np.pi, n))
    xy = np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)
    if whole:
        xy = np.round(xy)
    pts = [(float(x), float(y)) for x, y in xy]
    return pts[::-1] if cw else pts


def _random_geometry(rng: Any, kind: str, whole: bool) -> Any:
    cx, cy = rng.uniform(-500, 5000, 2)
    cw = bool(rng.random() < 0.5)
    if kind == "polygon":
        return Polygon(_ngon(rng, cx, cy, rng.uniform(3, 40), int(rng.integers(3, 20)), whole, cw))
    if kind == "holes":
        outer = _ngon(rng, cx, cy, 60, 16, whole, cw)
        holes = [_ngon(rng, cx - 25, cy, 8, 6, whole, not cw),
                 _ngon(rng, cx + 25, cy, 8, 5, whole, cw)][: int(rng.integers(1, 3))]
        return Polygon(outer, holes)
    if kind == "multi":
        return MultiPolygon([Polygon(_ngon(rng, cx, cy, 10, 8, whole, cw)),
                             Polygon(_ngon(rng, cx + 50, cy, 10, 7, whole, not cw),
                                     [_ngon(rng, cx + 50, cy, 3, 4, whole, cw)])])
    if kind == "multi1":
        return MultiPolygon([Polygon(_ngon(rng, cx, cy, 10, 9, whole, cw))])
    if kind == "bowtie":
        return Polygon([(cx, cy), (cx + 9, cy + 9), (cx + 9, cy), (cx, cy + 9)])
    if kind == "overlap":
        return MultiPolygon([box(cx, cy, cx + 4, cy + 4), box(cx + 2, cy + 2, cx + 6, cy + 6)])
    if kind == "sliver":
        return Polygon([(cx, cy), (cx + 1, cy + 1), (cx + 2, cy + 2)])
    if kind in ("nan", "inf"):
        with warnings.catch_warnings():  # shapely warns about the value it is given
            warnings.simplefilter("ignore", RuntimeWarning)
            return Polygon([(cx, cy), (getattr(math, kind), cy), (cx, cy + 3)])
    if kind == "empty":
        return Polygon()
    if kind == "z":
        return Polygon([(cx, cy, 1.0), (cx + 3, cy, 2.0), (cx, cy + 3, math.nan)])
    if kind == "big":  # integral but beyond 2**53: written as floats
        return box(2.0**54, 0, 2.0**54 + 4096, 3)
    if kind == "negzero":
        top = 2.0 if whole else 2.5
        return Polygon([(-0.0, -0.0), (3.0, -0.0), (3.0, top), (-0.0, top)])
    if kind == "point":
        return Point(cx, cy)
    if kind == "multipoint":
        return shapely.MultiPoint([(cx, cy), (cx + 1.5, cy)])
    if kind == "line":
        return LineString([(cx, cy), (cx + 3, cy + 0.25)])
    if kind == "collection":
        return shapely.GeometryCollection([box(cx, cy, cx + 2, cy + 2), Point(cx, cy)])
    raise AssertionError(kind)


_GEOMETRY_KINDS = ["polygon"] * 8 + ["holes", "multi", "multi1", "bowtie", "overlap", "sliver",
                                     "nan", "inf", "empty", "z", "big", "negzero", "point",
                                     "multipoint", "line", "collection"]


def _random_objects(n: int, seed: int, whole: bool | None = None) -> list[QuPathObject]:
    """Objects of every kind the writer meets, valid or not, ids given for most; coordinates
    pixel-aligned (``whole``), not, or either at random (None)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    objs = []
    for i in range(n):
        kind = _GEOMETRY_KINDS[int(rng.integers(len(_GEOMETRY_KINDS)))]
        is_whole = bool(rng.random() < 0.5) if whole is None else whole
        object_type = ["annotation", "detection", "cell", "cell", "tile", "tma_core",
                       "Detection", "spaceship"][int(rng.integers(8))]
        nucleus = None
        if object_type == "cell" and rng.random() < 0.8:
            nucleus = _random_geometry(rng, ["polygon", "polygon", "holes", "bowtie", "point",
                                             "multi1"][int(rng.integers(6))], is_whole)
        elif rng.random() < 0.03:
            nucleus = box(0, 0, 1, 1)  # on a non-cell: not written, with a warning
        measurements: dict[Any, Any] = {"Area µm^2": float(rng.uniform(0, 100)),
                                        "Perimeter µm": float(rng.uniform(0, 10))}
        extra_m = int(rng.integers(8))
        if extra_m == 0:
            measurements["Bad"] = math.nan
        elif extra_m == 1:
            measurements["Inf"] = -math.inf
        elif extra_m == 2:
            measurements.update({"Int": 3, "Np": np.float64(0.5), 7: 1.0})
        elif extra_m == 3:
            measurements["Huge"] = 10**400
        metadata: dict[Any, Any] = {"qpseg_run": "r1", "qpseg_mpp": "0.5"}
        if rng.random() < 0.1:
            metadata.update({"flag": True, "n": 3, "x": None})
        choices: list[tuple[str | None, Any]] = [
            (None, None), ("Tumor", (200, 0, 0)), ("Tumor", None), ("Stroma", [150, 200, 150]),
            ("My class", None), ("Bad colour", (300, 0, 0)), ("", None)]
        classification, class_color = choices[int(rng.integers(len(choices)))]
        object_id: str | None = None
        if rng.random() < 0.7:
            object_id = str(uuid.UUID(int=int(rng.integers(2**62)) * 7 + i))
            if rng.random() < 0.1:
                object_id = "{" + object_id.upper() + "}"
        objs.append(QuPathObject(
            _random_geometry(rng, kind, is_whole), object_type=object_type,
            classification=classification, class_color=class_color,
            name=f"obj {i}" if rng.random() < 0.3 else None,
            color=(1, 2, 3) if rng.random() < 0.1 else None, measurements=measurements,
            metadata=metadata, id=object_id, is_locked=bool(rng.random() < 0.1),
            nucleus_geometry=nucleus,
            extra={"isMissing": False, "nan": math.nan} if rng.random() < 0.1 else {},
            geometry_extra={"isEllipse": True} if rng.random() < 0.1 else {}))
    return objs


def _one_by_one(objs: list[QuPathObject]) -> tuple[list[dict[str, Any]], list[str]]:
    """to_feature of each object, and its warnings as the collection writer words them."""
    features, messages = [], []
    for i, obj in enumerate(objs):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            feature = to_feature(obj)
        d = _describe(obj)
        for w in record:
            text = str(w.message)
            assert w.category is GeoJSONWarning and text.startswith(d + ": ")
            messages.append(f"object {i} ({d}): {text[len(d) + 2:]}")
        if feature is not None:
            features.append(feature)
    return features, messages


def _drop_fresh_ids(features: list[dict[str, Any]], objs: list[QuPathObject]) -> None:
    """Remove the ids made up for objects without a usable one (checking they are UUID 4)."""
    given = {o.id for o in objs if o.id is not None}
    given |= {str(uuid.UUID(o.id)) for o in objs if o.id is not None}
    for f in features:
        if f["id"] not in given:
            assert uuid.UUID(f["id"]).version == 4 and str(uuid.UUID(f["id"])) == f["id"]
            del f["id"]


def test_collection_matches_to_feature_on_random_objects(tmp_path: Path) -> None:
    objs = _random_objects(400, seed=1)
    expected, expected_warnings = _one_by_one(objs)
    # every path of the writer is exercised
    kinds = Counter(f["geometry"]["type"] for f in expected)
    assert {"Polygon", "MultiPolygon", "Point", "MultiPoint", "LineString"} <= set(kinds)
    assert sum("nucleusGeometry" in f for f in expected) > 20
    assert any("repaired" in m for m in expected_warnings)
    assert any("not written" in m for m in expected_warnings)
    assert any("measurements that are not finite" in m for m in expected_warnings)
    assert 40 < len(objs) - len(expected) < 200

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        collection = to_feature_collection(objs)
    assert [str(w.message) for w in record] == expected_warnings
    got = collection["features"]
    assert len(got) == len(expected)
    _drop_fresh_ids(got, objs)
    _drop_fresh_ids(expected, objs)
    assert sum("id" in f for f in got) > 150  # ids given are kept
    assert got == expected
    assert json.loads(json.dumps(got)) == json.loads(json.dumps(expected))

    path = tmp_path / "random.geojson"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert write_geojson(path, objs) == len(expected)
    assert [str(w.message) for w in record] == [f"{path}: {m}" for m in expected_warnings]
    written = json.loads(path.read_text(encoding="utf-8"))["features"]
    _drop_fresh_ids(written, objs)
    assert written == expected
    # ints stay ints: a pixel-aligned ring is written without ".0"
    assert any(type(f["geometry"]["coordinates"][0][0][0]) is int
               for f in written if f["geometry"]["type"] == "Polygon")


def test_written_text_is_the_per_object_text(tmp_path: Path) -> None:
    # Pixel-aligned shapes (what polygonise makes): the very same text as to_feature + dumps.
    # With fractional coordinates GEOS prints the numbers; about 1 in 1000 then gets one more
    # digit than Python's repr, for the same double (the random-objects test compares values).
    objs = [o for o in _random_objects(300, seed=2, whole=True) if o.id is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeoJSONWarning)
        features = [f for f in map(to_feature, objs) if f is not None]
        path = tmp_path / "same.geojson"
        write_geojson(path, objs)
    text = json.dumps({"type": "FeatureCollection", "features": features},
                      ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
    assert path.read_text(encoding="utf-8") == text
    assert text.count('"nucleusGeometry"') > 10 and "µm" in text
    assert ".0," not in text.split('"properties"')[0]  # whole rings as ints


def test_geos_printed_coordinates_are_the_same_doubles(tmp_path: Path) -> None:
    import numpy as np

    from qpseg.qupath.geojson_write_bulk import _geos_text_agrees

    assert _geos_text_agrees()  # shapely 2.2 / GEOS 3.14: the fast text path is in use
    rng = np.random.default_rng(3)
    tricky = [1e-4, 0.00010000000000000002, 9.999999999999998e-05, 5e-5, 999999999999999.9,
              1e15, 1e15 + 2, 123456.789, 1 / 3, 0.1, 2.5, -0.0]
    shapes = []
    for v in tricky:  # one value at every corner of an otherwise ordinary square
        shapes.append(Polygon([(v, v), (v + 10.5, v), (v + 10.5, v + 10.5), (v, v + 10.5)]))
        shapes.append(Polygon([(0.5, 0.5), (v, 0.5), (v, 20.5), (0.5, 20.5)]))
    for _ in range(300):  # random shapes over many magnitudes
        scale = 10.0 ** rng.integers(-5, 18)
        xy = rng.uniform(-1, 1, (int(rng.integers(3, 9)), 2)) * scale
        shapes.append(shapely.convex_hull(shapely.multipoints(xy)))
    mixed = Polygon(box(0, 0, 10, 10).exterior.coords, [[(1.5, 1), (2, 1), (2, 2), (1, 2)]])
    shapes += [mixed, Polygon([(0, 0, 1.5), (3, 0, 2), (0, 3, 2)]),  # whole + fractional, z
               box(1e15, 0, 1e15 + 4, 3), box(-(2.0**52), -1, 0, 2),  # whole, beyond 1e15
               MultiPolygon([box(0, 0, 1, 1), box(2.5, 0, 3, 1)])]   # whole + fractional parts
    shapes = [g for g in shapes[:-1] if g.geom_type == "Polygon" and g.is_valid
              and not g.is_empty] + shapes[-1:]
    objs = [QuPathObject(g, id=str(uuid.UUID(int=i + 1))) for i, g in enumerate(shapes)]
    assert len(objs) > 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here needs repair
        expected = [f for f in map(to_feature, objs) if f is not None]
        write_geojson(tmp_path / "doubles.geojson", objs)
    text = (tmp_path / "doubles.geojson").read_text()
    written = json.loads(text)["features"]
    assert len(expected) == len(objs) and written == expected
    # and in the same notation: each number has a point / an exponent where Python puts one
    number = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]\d+)?")
    expected_text = json.dumps({"type": "FeatureCollection", "features": expected},
                               separators=(",", ":"))
    assert [("." in t, "e" in t) for t in number.findall(text)] == [
        ("." in t, "e" in t) for t in number.findall(expected_text)]
    assert "e-05" in text and "e+16" in text and "1000000000000000.0" in text

    def types(value: Any) -> Any:  # the structure with each number replaced by its type
        return [types(v) for v in value] if isinstance(value, list) else type(value)

    for w, e in zip(written, expected, strict=True):  # ints stay ints, floats floats
        assert types(w["geometry"]["coordinates"]) == types(e["geometry"]["coordinates"])


def test_fast_path_geometry_known_answers() -> None:
    cw = Polygon([(0, 0), (0, 2), (3, 2), (3, 0)], [[(1, 1), (2, 1), (2, 1.5), (1, 1.5)]])
    feats = to_feature_collection([
        QuPathObject(cw, id=str(uuid.UUID(int=1))),
        QuPathObject(MultiPolygon([box(0, 0, 1, 1)]), object_type="detection"),
        QuPathObject(MultiPolygon([box(0, 0, 1, 1), box(2, 0, 3.5, 1)]), object_type="tile"),
        QuPathObject(box(0, 0, 2.0**53, 1)),
    ])["features"]
    assert feats[0]["id"] == str(uuid.UUID(int=1))
    assert feats[0]["geometry"] == {"type": "Polygon", "coordinates": [
        [[0, 0], [3, 0], [3, 2], [0, 2], [0, 0]],              # exterior turned CCW, ints
        [[1.0, 1.0], [1.0, 1.5], [2.0, 1.5], [2.0, 1.0], [1.0, 1.0]]]}  # hole CW, floats
    assert feats[1]["geometry"]["type"] == "Polygon"  # a one-part MultiPolygon
    assert feats[1]["geometry"]["coordinates"] == [[[1, 0], [1, 1], [0, 1], [0, 0], [1, 0]]]
    assert feats[2]["geometry"]["coordinates"][1] == [
        [[3.5, 0.0], [3.5, 1.0], [2.0, 1.0], [2.0, 0.0], [3.5, 0.0]]]
    big = feats[3]["geometry"]["coordinates"][0]
    assert all(type(v) is float for xy in big for v in xy)  # 2**53 is not written as an int
    for f in feats:
        assert uuid.UUID(f["id"]).version == 4 or f is feats[0]


def test_fast_path_edge_inputs(tmp_path: Path) -> None:
    # nothing valid at all, no objects at all, and a non-object among objects
    with pytest.warns(GeoJSONWarning, match="not written"):
        assert to_feature_collection([QuPathObject(Polygon())])["features"] == []
    assert to_feature_collection([])["features"] == []
    assert write_geojson(tmp_path / "none.geojson", iter([])) == 0
    assert json.loads((tmp_path / "none.geojson").read_text())["features"] == []
    with pytest.raises(TypeError, match="QuPathObject"):
        to_feature_collection([QuPathObject(box(0, 0, 1, 1)), "not an object"])  # type: ignore[list-item]
    # a generator is read once
    feats = to_feature_collection(QuPathObject(box(i, 0, i + 1, 1)) for i in range(3))
    assert [f["geometry"]["coordinates"][0][2] for f in feats["features"]] == [
        [0, 1], [1, 1], [2, 1]]


def test_bulk_uuids_are_uuid4() -> None:
    from qpseg.qupath.geojson_write_bulk import _uuid4_strings

    ids = _uuid4_strings(2000)
    assert len(set(ids)) == 2000 and _uuid4_strings(0) == []
    for s in ids[:200]:
        u = uuid.UUID(s)
        assert str(u) == s and u.version == 4 and u.variant == uuid.RFC_4122
    # every hex digit position varies (no column stuck), version/variant columns fixed
    columns = list(zip(*ids, strict=True))
    assert set(columns[14]) == {"4"} and set(columns[19]) == set("89ab")
    assert all(len(set(columns[k])) == 16 for k in range(36)
               if k not in (8, 13, 14, 18, 19, 23))


def test_measurement_and_metadata_cleaning_known_answers() -> None:
    import numpy as np

    from qpseg.qupath.geojson_write import _clean_measurements, _clean_metadata

    assert _clean_measurements({"a": 1.5, "b": -0.0}) == ({"a": 1.5, "b": -0.0}, [])
    assert _clean_measurements({"a": 1e308, "b": 1e308}) == ({"a": 1e308, "b": 1e308}, [])
    m, dropped = _clean_measurements({"a": np.float64(2.5), 3: 4, "n": math.nan, "t": True,
                                      "s": "1", "i": math.inf})
    assert m == {"a": 2.5, "3": 4.0} and type(m["3"]) is float
    assert dropped == ["n", "t", "s", "i"]
    assert _clean_metadata({"a": "x"}) == ({"a": "x"}, [])
    assert _clean_metadata({"a": True, "b": 2, 3: "c", "d": None, "e": math.nan}) == (
        {"a": "true", "b": "2", "3": "c"}, ["d", "e"])


def test_stdlib_json_and_orjson_write_the_same_values(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """orjson is an optional speed-up of reading and writing: without it (the stdlib path)
    every written value and every object read back is the same."""
    from qpseg.qupath import geojson_model, geojson_read, geojson_stream, geojson_write

    if geojson_model._orjson is None:
        pytest.skip("orjson is not installed")
    objs = [o for o in _random_objects(300, seed=5) if o.id is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeoJSONWarning)
        write_geojson(tmp_path / "fast.geojson", objs)
        fast = read_geojson(tmp_path / "fast.geojson")
        for module in (geojson_read, geojson_stream, geojson_write):  # where it is looked up
            monkeypatch.setattr(module, "_orjson", None)
        write_geojson(tmp_path / "slow.geojson", objs)
        slow = read_geojson(tmp_path / "slow.geojson")
    assert json.loads((tmp_path / "fast.geojson").read_text(encoding="utf-8")) == json.loads(
        (tmp_path / "slow.geojson").read_text(encoding="utf-8"))
    assert len(fast) == len(slow) > 100
    for a, b in zip(fast, slow, strict=True):
        assert a.geometry.equals_exact(b.geometry, 0) and a.measurements == b.measurements
        assert (a.id, a.classification, a.metadata, a.extra) == (b.id, b.classification,
                                                                 b.metadata, b.extra)


# --------------------------------------------------------------------------------------------
# Out-of-range numbers: one rule for every reader (and the writer)
# --------------------------------------------------------------------------------------------

# Features whose geometry holds a number no QuPath image can have, each with the index it has
# in OUT_OF_RANGE_FILE below. 1e200 is finite but its square overflows a double.
_HUGE_FEATURES: list[tuple[str, dict[str, Any]]] = [
    ("1e308 polygon", _poly_feature([[[0, 0], [1e308, 0], [1e308, 10], [0, 10], [0, 0]]])),
    ("square overflows", _poly_feature([[[0, 0], [1e200, 0], [0, 1e200], [0, 0]]])),
    ("-1e308 point", {"type": "Feature", "geometry": {"type": "Point",
                                                      "coordinates": [-1e308, 5]}}),
    ("NaN line", {"type": "Feature", "geometry": {"type": "LineString",
                                                  "coordinates": [[0, 0], [math.nan, 1]]}}),
    ("Infinity in a multipolygon", {"type": "Feature", "geometry": {
        "type": "MultiPolygon", "coordinates": [SQUARE, [[[0, 0], [math.inf, 0], [5, 5]]]]}}),
    ("integer of 70 bits", _poly_feature([[[0, 0], [2**70, 0], [5, 5], [0, 0]]])),
    ("just past 2^31", _poly_feature([[[0, 0], [2.0**31 + 1, 0], [5, 5], [0, 0]]])),
    ("in a hole", _poly_feature([SQUARE[0], [[1, 1], [2, 1], [2, -3e9], [1, 1]]])),
]
_ALL_FEATURES = [_poly_feature(SQUARE)] + [f for _, f in _HUGE_FEATURES] + [
    _poly_feature([[[0, 0], [2.0**31, 0], [2.0**31, 2.0**31], [0, 0]]])]  # the bound itself


def test_out_of_range_coordinates_skip_the_feature_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "huge.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": _ALL_FEATURES}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        objs = read_geojson(path)
    # the good square and the polygon reaching exactly 2^31 are read; nothing else
    assert [o.geometry.bounds for o in objs] == [(0, 0, 10, 10), (0, 0, 2.0**31, 2.0**31)]
    assert all(math.isfinite(o.area) for o in objs)
    messages = [str(w.message) for w in caught if issubclass(w.category, GeoJSONWarning)]
    assert len(messages) == len(_HUGE_FEATURES)
    for i, ((what, _), msg) in enumerate(zip(_HUGE_FEATURES, messages, strict=True), start=1):
        assert msg.startswith(f"{path}: feature {i}: "), what
        assert "out of range" in msg or "non-finite" in msg, (what, msg)
        assert msg.endswith("skipped"), (what, msg)


def test_out_of_range_coordinates_are_validation_errors(tmp_path: Path) -> None:
    path = tmp_path / "huge.geojson"
    path.write_text(json.dumps(_ALL_FEATURES))
    report = validate_geojson(path)
    assert report.n_features == len(_ALL_FEATURES) and report.n_objects == 2
    bad = [(p.index, p.kind, p.severity) for p in report.problems]
    assert bad == [(i, "out-of-range-coordinates", "error")
                   for i in range(1, len(_HUGE_FEATURES) + 1)]
    assert not report.ok


def test_out_of_range_nucleus_is_dropped_and_reported() -> None:
    cell = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": SQUARE},
            "nucleusGeometry": {"type": "Polygon",
                                "coordinates": [[[1, 1], [1e300, 1], [2, 2], [1, 1]]]},
            "properties": {"objectType": "cell"}}
    with pytest.warns(GeoJSONWarning, match=r"feature 0: .*out of range.*nucleus ignored"):
        (obj,) = parse_features([cell])
    assert obj.object_type == "cell" and obj.nucleus_geometry is None

