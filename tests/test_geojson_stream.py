"""Large GeoJSON files are parsed a chunk of features at a time; the result (objects, problems,
errors) must be exactly the whole-file parse's, and the lean reader of import-project must
report the same as the full one."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qpseg.qupath.geojson as geojson
from qpseg.errors import GeoJSONError
from qpseg.qupath import geojson_parse, geojson_read, geojson_stream
from qpseg.qupath.geojson import read_geojson, validate_geojson

FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# Names with the characters that confuse a naive scanner: quotes, backslashes, brackets.
TRICKY = st.text(alphabet='ab"\\[]{},: \u00e9', max_size=6)
COORD = st.floats(-100, 100, allow_nan=False) | st.integers(-100, 100)


@st.composite
def features(draw: Any) -> Any:
    """A QuPath feature, often a plain polygon, sometimes broken in one of many ways."""
    kind = draw(st.sampled_from(["polygon", "polygon", "holed", "point", "bad", "junk"]))
    if kind == "junk":
        return draw(st.none() | st.integers() | TRICKY | st.lists(st.integers(), max_size=3))
    if kind == "point":
        geometry: Any = {"type": "Point", "coordinates": [draw(COORD), draw(COORD)]}
    elif kind == "bad":
        geometry = draw(st.sampled_from([
            None, {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]},
            {"type": "Polygon", "coordinates": [[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]},
            {"type": "Polygon", "coordinates": [[[0, 0], ["x", 1], [1, 0], [0, 0]]]},
            {"type": "Polygon", "coordinates": [[[0, 0], [1e300, 1], [1, 0], [0, 0]]]},
            {"type": "Blob"}]))
    else:
        x, y, r = draw(COORD), draw(COORD), draw(st.floats(1, 20))
        ring = [[x, y], [x + r, y], [x + r, y + r], [x, y + r]]
        if draw(st.booleans()):
            ring.append(ring[0])
        rings = [ring]
        if kind == "holed":
            rings.append([[x + r / 4, y + r / 4], [x + r / 2, y + r / 4], [x + r / 4, y + r / 2]])
        geometry = {"type": "Polygon", "coordinates": rings}
    props: dict[str, Any] = {"objectType": draw(st.sampled_from(["annotation", "detection",
                                                                  "cell", "odd"]))}
    if draw(st.booleans()):
        props["classification"] = {"name": draw(TRICKY),
                                   "color": draw(st.sampled_from([[255, 0, 0], [1, 2], 7]))}
    if draw(st.booleans()):
        props["measurements"] = draw(st.dictionaries(
            TRICKY, st.floats(allow_nan=True) | TRICKY | st.none(), max_size=3))
    if draw(st.booleans()):
        props["name"] = draw(TRICKY)
    feature = {"type": "Feature", "geometry": geometry, "properties": props}
    if draw(st.booleans()):
        feature["id"] = draw(st.sampled_from(["a", "a", "b", "PathCellObject"]))
    return feature


def _text(draw: Any, items: list[Any]) -> str:
    indent = draw(st.sampled_from([None, 1]))
    if draw(st.booleans()):
        return json.dumps(items, indent=indent)   # NaN literals: orjson refuses, stdlib reads
    before = draw(st.dictionaries(st.sampled_from(["type", "name", "bbox"]), TRICKY,
                                  max_size=2))
    doc = {**before, "type": "FeatureCollection", "features": items,
           "tail": draw(st.lists(TRICKY, max_size=2))}
    return json.dumps(doc, indent=indent)


def _same(a: Any, b: Any) -> None:
    assert a[0] == b[0]
    assert a[2] == b[2]
    assert [i for i, _ in a[1]] == [i for i, _ in b[1]]
    for (_, x), (_, y) in zip(a[1], b[1], strict=True):
        assert x.geometry.equals_exact(y.geometry, 0.0) and x.geometry.geom_type == \
            y.geometry.geom_type
        assert (x.object_type, x.classification, x.class_color, x.name, x.id) == \
            (y.object_type, y.classification, y.class_color, y.name, y.id)
        assert x.measurements.keys() == y.measurements.keys()
        assert all(v == y.measurements[k] or (math.isnan(v) and math.isnan(y.measurements[k]))
                   for k, v in x.measurements.items())


@pytest.fixture
def streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stream every file, in tiny blocks and chunks (so every boundary case happens)."""
    monkeypatch.setattr(geojson_stream, "_STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(geojson_stream, "_STREAM_BLOCK", 7)
    monkeypatch.setattr(geojson_stream, "_STREAM_CHUNK", 40)


@FUZZ
@given(data=st.data())
def test_streamed_parse_equals_whole_file_parse(tmp_path: Path, streamed: None,
                                                data: Any) -> None:
    items = data.draw(st.lists(features(), max_size=12))
    path = tmp_path / "x.geojson"
    path.write_text(_text(data.draw, items), encoding="utf-8")
    whole = geojson_parse._parse(geojson_read._load_json(path), path)
    streamed_result = geojson_stream._stream_file(path, False)
    assert streamed_result is not None  # every file here is streamable
    _same(whole, streamed_result)


@FUZZ
@given(data=st.data())
def test_lean_reader_reports_what_the_full_reader_does(tmp_path: Path, data: Any) -> None:
    items = data.draw(st.lists(features(), max_size=12))
    path = tmp_path / "x.geojson"
    path.write_text(_text(data.draw, items), encoding="utf-8")
    with warnings.catch_warnings(record=True) as full_w:
        warnings.simplefilter("always")
        full = read_geojson(path)
    with warnings.catch_warnings(record=True) as lean_w:
        warnings.simplefilter("always")
        lean = read_geojson(path, lean=True)
    assert [str(w.message) for w in full_w] == [str(w.message) for w in lean_w]
    assert len(full) == len(lean)
    for x, y in zip(full, lean, strict=True):
        assert x.geometry.equals_exact(y.geometry, 0.0)
        assert (x.object_type, x.classification, x.class_color, x.id, x.is_locked,
                x.metadata) == (y.object_type, y.classification, y.class_color, y.id,
                                y.is_locked, y.metadata)
        assert y.measurements == {}


def test_lean_reader_keeps_no_measurements(tmp_path: Path) -> None:
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps([{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]},
        "properties": {"objectType": "cell", "measurements": {"Area": 8.0, "Bad": "x"}}}]))
    with pytest.warns(geojson.GeoJSONWarning, match="non-numeric measurements dropped: 'Bad'"):
        (full,) = read_geojson(path)
    with pytest.warns(geojson.GeoJSONWarning, match="non-numeric measurements dropped: 'Bad'"):
        (lean,) = read_geojson(path, lean=True)
    assert full.measurements == {"Area": 8.0} and lean.measurements == {}


@pytest.mark.parametrize("text", [
    '{"type": "Feature", "features": [], "geometry": {"type": "Point", "coordinates": [1, 2]}}',
    '{"type": "FeatureCollection", "features": [{"type": "Feature"}], "features": []}',
    '{"type": "FeatureCollection", "features": [{"a": "\\\\"}, ]}',
    '[{"type": "Feature", "geometry": null}] x',
    '{"type": "FeatureCollection", "features": [NaN, {"x": [1, 2]}]}',
    '{"type": "FeatureCollection", "other": [1, 2]}',
    '[]',
    '  \ufeff[ ]',
])
def test_odd_files_give_the_whole_file_answer(tmp_path: Path, streamed: None,
                                              text: str) -> None:
    path = tmp_path / "odd.geojson"
    path.write_text(text, encoding="utf-8")
    try:
        expected: Any = geojson_parse._parse(geojson_read._load_json(path), path)
    except GeoJSONError as exc:
        expected = exc.one_line()
    try:
        got: Any = geojson_read._parse_file(path)
    except GeoJSONError as exc:
        got = exc.one_line()
    if isinstance(expected, str):
        assert got == expected
    else:
        _same(expected, got)


def test_large_file_is_streamed_and_reads_as_before(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A file over the threshold goes through the chunked parser (which never sees the whole
    parsed JSON), with the whole-file answer."""
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[0.5, 0.25], [10.5, 0.25], [10.5, 9.75], [0.5, 0.25]]]},
        "properties": {"objectType": "detection", "name": 'a "quoted" \\ name [',
                       "classification": {"name": "Tumor", "color": [200, 0, 0]}}}
    path = tmp_path / "big.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature] * 3000}))
    monkeypatch.setattr(geojson_stream, "_STREAM_MIN_BYTES", path.stat().st_size - 1)
    monkeypatch.setattr(geojson_stream, "_STREAM_BLOCK", 50_000)
    monkeypatch.setattr(geojson_stream, "_STREAM_CHUNK", 10_000)
    calls: list[int] = []
    real = geojson_stream._parse_items

    def counting(items: list[Any], base: int, lean: bool = False) -> Any:
        calls.append(len(items))
        return real(items, base, lean)

    monkeypatch.setattr(geojson_stream, "_parse_items", counting)
    objs = read_geojson(path)
    assert len(objs) == 3000 and len(calls) > 10 and max(calls) < 3000
    assert objs[-1].name == 'a "quoted" \\ name [' and objs[-1].classification == "Tumor"
    assert objs[0].classification is objs[-1].classification   # one shared string
    report = validate_geojson(path)
    assert report.n_features == 3000 and report.ok
