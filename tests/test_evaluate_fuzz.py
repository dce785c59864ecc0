"""Fuzzing the evaluate/evaluate-edits readers: any input ends in a result or a QpsegError."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import box

from qpseg.edits import compare_edits, evaluate_edits
from qpseg.errors import QpsegError
from qpseg.evaluate import Evaluation, evaluate, load_input, match_inputs, read_label_mask
from qpseg.qupath.geojson import QuPathObject, write_geojson
from qpseg.testing.projects import SyntheticProject, make_project

FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

numbers = st.one_of(
    st.integers(-2000, 2000), st.floats(-2000, 2000, allow_nan=False),
    st.sampled_from([0, 1e12, -1e12, 1e308, float("nan"), float("inf"), 2**70]),
)
position = st.lists(numbers, min_size=0, max_size=3)
ring = st.lists(position, max_size=7)
geometry = st.fixed_dictionaries({
    "type": st.sampled_from(["Polygon", "MultiPolygon", "Point", "LineString",
                             "GeometryCollection", "Nope"]),
    "coordinates": st.one_of(position, ring, st.lists(ring, max_size=3),
                             st.lists(st.lists(ring, max_size=2), max_size=2)),
})
classification = st.one_of(
    st.none(), st.sampled_from(["Tumor", "Stroma", "Region*", "Ignore*", "", "Tumour"]),
    st.fixed_dictionaries({"name": st.sampled_from(["Tumor", "Stroma", 5, None])}),
    st.integers(),
)
properties = st.fixed_dictionaries({}, optional={
    "objectType": st.sampled_from(["annotation", "detection", "cell", "tile", "weird", 3]),
    "classification": classification,
    "metadata": st.one_of(st.dictionaries(st.sampled_from(["qpseg_model", "x"]),
                                          st.sampled_from(["m", 1, None])), st.integers()),
})
feature = st.fixed_dictionaries(
    {"type": st.just("Feature"), "geometry": st.one_of(geometry, st.none()),
     "properties": st.one_of(properties, st.none(), st.integers())},
    optional={"id": st.one_of(st.text(max_size=6), st.integers(), st.just("same")),
              "nucleusGeometry": geometry},
)
# mostly well-formed polygons (often self-intersecting), so the scoring paths are reached
ring_points = st.lists(st.tuples(st.integers(-50, 450), st.integers(-50, 450)).map(list),
                       min_size=3, max_size=8)
valid_feature = st.fixed_dictionaries({
    "type": st.just("Feature"),
    "geometry": st.fixed_dictionaries({
        "type": st.just("Polygon"),
        "coordinates": ring_points.map(lambda pts: [[*pts, pts[0]]])}),
    "properties": st.fixed_dictionaries({
        "objectType": st.sampled_from(["annotation", "annotation", "detection", "cell"]),
        "classification": st.sampled_from([{"name": "Tumor", "color": [200, 0, 0]},
                                           {"name": "Stroma"}, None, "Region*", "Ignore*",
                                           "Tumor"]),
        "metadata": st.sampled_from([{}, {"qpseg_model": "m"}])}),
}, optional={"id": st.sampled_from(["0a6e86e8-8f2f-4a43-9f47-3b3a6f7e3d55", "x"])})
collection = st.fixed_dictionaries({
    "type": st.just("FeatureCollection"),
    "features": st.lists(st.one_of(valid_feature, valid_feature, feature), min_size=1,
                         max_size=8)})
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)
documents = st.one_of(collection, collection, collection, st.lists(feature, max_size=4), feature,
                      geometry, json_values)


def _dump(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


def _scored(ev: Evaluation) -> None:
    # whatever was scored is internally consistent
    for s, m in zip(ev.pixel_slides, ev.pixel.per_slide, strict=True):
        assert m.confusion.sum() >= 0 and s.confusion is not None
    ev.summary_rows()
    ev.per_slide_rows()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "t").mkdir()
    (root / "p").mkdir()
    write_geojson(root / "t" / "a.geojson", [
        QuPathObject(geometry=box(0, 0, 400, 400), classification="Region*"),
        QuPathObject(geometry=box(0, 0, 200, 200), classification="Tumor"),
        QuPathObject(geometry=box(10, 10, 20, 20), object_type="cell"),
    ])
    return root


def _evaluate(truth: Path, pred: Path, **kw: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ev = evaluate(truth, pred, mpp=1.0, eval_mpp=8.0, **kw)
        except QpsegError:
            return
    _scored(ev)


@FUZZ
@given(doc=documents)
def test_fuzz_prediction_geojson(folders: Path, doc: Any) -> None:
    (folders / "p" / "a.geojson").write_text(_dump(doc), encoding="utf-8")
    _evaluate(folders / "t", folders / "p")
    _evaluate(folders / "t", folders / "p", classes=["Tumor", "Stroma"], lesion_class="Tumor")


@FUZZ
@given(doc=documents)
def test_fuzz_truth_geojson(folders: Path, doc: Any) -> None:
    (folders / "t2").mkdir(exist_ok=True)
    (folders / "t2" / "a.geojson").write_text(_dump(doc), encoding="utf-8")
    _evaluate(folders / "t2", folders / "t", classes=["Tumor"])
    _evaluate(folders / "t2", folders / "t")


@FUZZ
@given(data=st.binary(max_size=300), gz=st.booleans())
def test_fuzz_random_bytes(folders: Path, data: bytes, gz: bool) -> None:
    (folders / "b").mkdir(exist_ok=True)
    for f in (folders / "b").iterdir():
        f.unlink()
    name = "a.geojson.gz" if gz else "a.geojson"
    (folders / "b" / name).write_bytes((b"\x1f\x8b" if gz else b"") + data)
    _evaluate(folders / "t", folders / "b")
    _evaluate(folders / "b", folders / "t")
    # the same bytes as a QuPath project
    (folders / "q").mkdir(exist_ok=True)
    (folders / "q" / "project.qpproj").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            inp = load_input(folders / "q", "pred")
        except QpsegError:
            return
    assert inp.kind == "project"
    _evaluate(folders / "t", folders / "q")


@FUZZ
@given(data=st.binary(max_size=200), kind=st.sampled_from([b"\x89PNG\r\n\x1a\n", b"II*\x00",
                                                            b"MM\x00*", b""]),
       suffix=st.sampled_from([".png", ".tif"]))
def test_fuzz_mask_bytes(folders: Path, data: bytes, kind: bytes, suffix: str) -> None:
    f = folders / f"mask{suffix}"
    f.write_bytes(kind + data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on corrupt EXIF data
            arr = read_label_mask(f)
    except QpsegError:
        return
    assert arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer)


@FUZZ
@given(dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.bool_, np.float32]),
       shape=st.tuples(st.integers(1, 12), st.integers(1, 12)),
       shape2=st.tuples(st.integers(1, 12), st.integers(1, 12)),
       seed=st.integers(0, 2**16), instance=st.booleans(), top=st.integers(1, 300))
def test_fuzz_mask_folders(folders: Path, dtype: Any, shape: tuple[int, int],
                           shape2: tuple[int, int], seed: int, instance: bool, top: int) -> None:
    rng = np.random.default_rng(seed)
    for side, shp in (("mt", shape), ("mp", shape if seed % 3 else shape2)):
        d = folders / side
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        arr = rng.integers(0, top, size=shp).astype(dtype)
        name = "s_instances.tif" if instance else "s.tif"
        tifffile.imwrite(d / name, arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in ({}, {"classes": ["A", "B"]}, {"mask_mpp": 0.5}):
            try:
                ev = evaluate(folders / "mt", folders / "mp", **kw)  # type: ignore[arg-type]
            except QpsegError:
                continue
            _scored(ev)


@FUZZ
@given(names=st.lists(st.text(st.characters(whitelist_categories=("L", "N"),
                                            whitelist_characters="._- "),
                                  min_size=1, max_size=12), max_size=6),
       names2=st.lists(st.sampled_from(["1", "a", "a.svs", "A.SVS", "b_labels", "2.tif"]),
                       max_size=4),
       ext=st.sampled_from([".geojson", ".json", ".geojson.gz", ".png", ".tif"]))
def test_fuzz_folder_names(folders: Path, names: list[str], names2: list[str],
                           ext: str) -> None:
    d = folders / "names"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    for n in [*names, *names2]:
        try:
            (d / f"{n}{ext}").write_text("{}")
        except OSError:
            return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a second mask for one slide is a warning
            inp = load_input(d, "pred")
    except QpsegError:
        return
    pairs, unmatched = match_inputs(load_input(folders / "t", "truth"), inp)
    assert len(pairs) <= 1
    assert len({id(p) for _, p in pairs}) == len(pairs)
    assert all(u.side in ("truth", "pred") for u in unmatched)


@pytest.fixture(scope="module")
def edit_project(tmp_path_factory: pytest.TempPathFactory) -> SyntheticProject:
    proj = make_project(tmp_path_factory.mktemp("edits"), n_slides=1, width=128, height=128,
                        annotations=False)
    pdir = proj.folder / "qpseg" / "predictions"
    write_geojson(pdir / f"{proj.entry_ids[0]}.geojson", [QuPathObject(
        geometry=box(0, 0, 50, 50), classification="Tumor",
        id="0a6e86e8-8f2f-4a43-9f47-3b3a6f7e3d55", metadata={"qpseg_model": "m"})])
    (proj.folder / "qpseg" / "annotations").mkdir(parents=True)
    return proj


@FUZZ
@given(doc=documents, tol=st.sampled_from([0.0, 1.0, 1e9]))
def test_fuzz_edits_export(edit_project: SyntheticProject, doc: Any, tol: float) -> None:
    f = edit_project.folder / "qpseg" / "annotations" / f"{edit_project.entry_ids[0]}.geojson"
    f.write_text(_dump(doc), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = evaluate_edits(edit_project.path, tolerance_px=tol)
        except QpsegError:
            return
    row = res.rows()[0]
    assert row["n_ai"] == 1
    assert row["n_kept"] + row["n_changed"] + row["n_deleted"] == 1
    res.summary_rows()


@FUZZ
@given(doc=documents)
def test_fuzz_compare_edits_both_sides(doc: Any) -> None:
    from qpseg.qupath.geojson import parse_features

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            objs = parse_features(doc)
        except QpsegError:
            return
        res = compare_edits(objs, list(reversed(objs)))
    assert res.row()["n_deleted"] + res.row()["n_kept"] + res.row()["n_changed"] == len(objs)
