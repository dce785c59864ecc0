"""qpseg.qupath.geojson: QuPath GeoJSON read (lenient), write (strict) and validate."""

from __future__ import annotations

import gzip
import json
import math
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
    assert severities["invalid-geometry"] == "warning"
    assert severities["missing-colour"] == "warning"
    assert not report.ok and report.n_errors == 4
    assert "'A'" in report.problems[2].message
    assert report.kinds()["invalid-geometry"] == 2


def test_validator_ok_with_warnings_only(tmp_path: Path) -> None:
    path = tmp_path / "warn.geojson"
    path.write_text(json.dumps([_poly_feature(BOWTIE, classification={"name": "X"})]))
    report = validate_geojson(path)
    assert report.ok and report.n_errors == 0
    assert [p.kind for p in report.problems] == ["invalid-geometry", "missing-colour"]
    assert FeatureProblem(0, "made-up", "?").severity == "warning"


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
