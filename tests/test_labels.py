"""rasterize_labels / class_geometries: known answers for the partial-annotation rules."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from qpseg.errors import LabelError
from qpseg.labels import IGNORE_INDEX, ClassMap, class_geometries, label_role, rasterize_labels
from qpseg.qupath.geojson import QuPathObject
from qpseg.testing.reference import reference_class_geometries

CM = ClassMap.from_names(["Tumor", "Stroma"])


def ann(geom, cls):
    return QuPathObject(geometry=geom, object_type="annotation", classification=cls)


def test_class_map_background_first_and_lookup() -> None:
    assert CM.names == ["Background", "Tumor", "Stroma"]
    assert CM.index_of("tumor") == 1 and CM.index_of("Necrosis") is None
    assert ClassMap.from_json(CM.to_json()) == CM
    with pytest.raises(LabelError):
        ClassMap.from_names(["Ignore*"])


@pytest.mark.parametrize(
    ("name", "role"),
    [(None, "unclassified"), ("", "unclassified"), ("Ignore*", "ignore"), ("Ignore", "ignore"),
     ("Region*", "region"), ("Tumor", "class")],
)
def test_label_role(name: str | None, role: str) -> None:
    assert label_role(name) == role


def test_square_full_resolution_exact_pixels() -> None:
    lab = rasterize_labels([ann(box(10, 10, 30, 30), "Tumor")], (0, 0, 40, 40), 0.5, CM,
                           base_mpp=0.5)
    assert lab.dtype == np.uint8 and lab.shape == (40, 40)
    assert (lab == 1).sum() == 400
    assert (lab[10:30, 10:30] == 1).all()
    assert (lab == IGNORE_INDEX).sum() == 1600 - 400  # unlabelled is ignore, not background


def test_downsampled_and_offset_region() -> None:
    # ds = 2: pixel (r, c) centre at (100 + 2c + 1, 50 + 2r + 1); the square covers x,y in
    # [110, 130) x [60, 80) -> centres 111..129 (10 columns) and 61..79 (10 rows).
    lab = rasterize_labels([ann(box(110, 60, 130, 80), "Stroma")], (100, 50, 20, 20), 1.0, CM,
                           base_mpp=0.5)
    assert (lab == 2).sum() == 100
    assert (lab[5:15, 5:15] == 2).all()


def test_holes_are_ignore_not_class() -> None:
    poly = Polygon(box(0, 0, 20, 20).exterior.coords, [box(5, 5, 15, 15).exterior.coords])
    lab = rasterize_labels([ann(poly, "Tumor")], (0, 0, 20, 20), 1, CM, base_mpp=1)
    assert (lab == 1).sum() == 400 - 100
    assert (lab[5:15, 5:15] == IGNORE_INDEX).all()


def test_region_gives_background_and_ignore_wins() -> None:
    objs = [
        ann(box(0, 0, 30, 30), "Region*"),
        ann(box(5, 5, 10, 10), "Tumor"),
        ann(box(20, 20, 25, 25), None),  # unclassified: no effect
        ann(box(0, 25, 30, 30), "Ignore*"),
    ]
    lab = rasterize_labels(objs, (0, 0, 40, 40), 1, CM, base_mpp=1)
    assert (lab == 1).sum() == 25
    assert (lab == 0).sum() == 30 * 25 - 25
    assert (lab[25:30, 0:30] == IGNORE_INDEX).all()
    assert (lab[:, 30:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("order", [1, -1])
def test_smaller_annotation_wins_regardless_of_order(order: int) -> None:
    objs = [ann(box(0, 0, 20, 20), "Stroma"), ann(box(5, 5, 10, 10), "Tumor")][::order]
    lab = rasterize_labels(objs, (0, 0, 20, 20), 1, CM, base_mpp=1)
    assert (lab == 1).sum() == 25 and (lab == 2).sum() == 400 - 25


def test_unknown_class_and_non_area_objects_are_skipped() -> None:
    from shapely.geometry import LineString, Point

    objs = [ann(box(0, 0, 5, 5), "Necrosis"), ann(Point(3, 3), "Tumor"),
            ann(LineString([(0, 0), (9, 9)]), "Tumor")]
    lab = rasterize_labels(objs, (0, 0, 10, 10), 1, CM, base_mpp=1)
    assert (lab == IGNORE_INDEX).all()


def test_invalid_bowtie_is_repaired() -> None:
    bowtie = Polygon([(0, 0), (20, 20), (20, 0), (0, 20)])
    lab = rasterize_labels([ann(bowtie, "Tumor")], (0, 0, 20, 20), 1, CM, base_mpp=1)
    # two triangles of area 100 each; centre sampling is close to the area
    assert abs(int((lab == 1).sum()) - 200) <= 20


def test_class_geometries_match_raster_counts() -> None:
    rng = np.random.default_rng(0)
    objs = [ann(box(0, 0, 200, 200), "Region*")]
    for _ in range(12):
        x, y = rng.uniform(0, 160, 2)
        w, h = rng.uniform(10, 60, 2)
        objs.append(ann(box(x, y, x + w, y + h).buffer(3), str(rng.choice(["Tumor", "Stroma"]))))
    objs.append(ann(box(50, 50, 70, 70), "Ignore*"))
    geoms = class_geometries(objs, CM)
    lab = rasterize_labels(objs, (0, 0, 200, 200), 1, CM, base_mpp=1)
    window = box(0, 0, 200, 200)  # annotations stick out of the raster: compare inside it
    assert IGNORE_INDEX in geoms and geoms[IGNORE_INDEX].area == pytest.approx(400)
    for value in (0, 1, 2, IGNORE_INDEX):
        expected = geoms[value].intersection(window).area if value in geoms else 0.0
        assert abs((lab == value).sum() - expected) <= max(0.02 * expected, 60), value


def test_bad_region_raises() -> None:
    with pytest.raises(LabelError):
        rasterize_labels([], (0, 0, 0, 10), 1, CM, base_mpp=1)
    with pytest.raises(LabelError):
        rasterize_labels([], (0, 0, 10, 10), 0, CM, base_mpp=1)


def test_fill_mask_matches_skimage_centre_sampling() -> None:
    from shapely.geometry import Point
    from skimage.draw import polygon as draw_polygon

    from qpseg.labels import fill_mask

    rng = np.random.default_rng(1)
    for i in range(40):
        cx, cy = rng.uniform(-20, 120, 2)
        blob = Point(cx, cy).buffer(rng.uniform(5, 60), quad_segs=int(rng.integers(2, 16)))
        if i % 3 == 0:
            blob = blob.difference(Point(cx, cy).buffer(rng.uniform(1, 5)))
        x0, y0, ds = rng.uniform(-10, 10), rng.uniform(-10, 10), rng.uniform(0.3, 3)
        got = fill_mask((97, 83), blob, x0, y0, ds)
        ref = np.zeros((97, 83), bool)
        for ring, value in [(blob.exterior, True), *[(h, False) for h in blob.interiors]]:
            xy = np.asarray(ring.coords)
            rr, cc = draw_polygon((xy[:, 1] - y0) / ds - 0.5, (xy[:, 0] - x0) / ds - 0.5,
                                  (97, 83))
            ref[rr, cc] = value
        # Only pixels whose centre lies exactly on an edge may differ.
        assert (got != ref).sum() <= 2, i


# ----------------------------------------------------------------- exhaustive truth (unlabelled)
# Two squares on a 10 x 10 raster at 1 px: Tumor covers columns/rows 1-3 (9 pixels), Ignore*
# covers columns 4-6, rows 6-8 (9 pixels). The left half (x < 5) is the tissue in the "within"
# cases: it holds the 9 Tumor pixels and 3 Ignore* pixels (column 4).
TWO = [ann(box(1, 1, 4, 4), "Tumor"), ann(box(4, 6, 7, 9), "Ignore*")]
LEFT_HALF = box(0, 0, 5, 10)


def _counts(lab: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(lab, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def test_unlabelled_ignore_is_the_default() -> None:
    lab = rasterize_labels(TWO, (0, 0, 10, 10), 1, CM, base_mpp=1)
    assert _counts(lab) == {1: 9, IGNORE_INDEX: 91}
    assert (rasterize_labels(TWO, (0, 0, 10, 10), 1, CM, base_mpp=1, unlabelled="ignore")
            == lab).all()


def test_unlabelled_background_everywhere_ignore_still_wins() -> None:
    lab = rasterize_labels(TWO, (0, 0, 10, 10), 1, CM, base_mpp=1, unlabelled="background")
    assert _counts(lab) == {0: 82, 1: 9, IGNORE_INDEX: 9}
    assert (lab[1:4, 1:4] == 1).all() and (lab[6:9, 4:7] == IGNORE_INDEX).all()


def test_unlabelled_background_within_geometry() -> None:
    lab = rasterize_labels(TWO, (0, 0, 10, 10), 1, CM, base_mpp=1, unlabelled="background",
                           within=LEFT_HALF)
    # Left half: 50 - 9 Tumor - 3 Ignore* = 38 Background; right half stays ignore (44 + 6).
    assert _counts(lab) == {0: 38, 1: 9, IGNORE_INDEX: 53}
    assert (lab[:, 5:] == IGNORE_INDEX).all()


def test_unlabelled_background_within_tissue_mask() -> None:
    from qpseg.tissue import TissueMask

    # 2 x 2 mask pixels of 5 x 5 level-0 pixels: the left column is tissue = LEFT_HALF.
    tissue = TissueMask(mask=np.array([[True, False], [True, False]]), downsample_x=5.0,
                        downsample_y=5.0)
    lab = rasterize_labels(TWO, (0, 0, 10, 10), 1, CM, base_mpp=1, unlabelled="background",
                           within=tissue)
    assert _counts(lab) == {0: 38, 1: 9, IGNORE_INDEX: 53}
    # Same answer at half resolution (5 x 5 pixels of 2 level-0 px; centres at odd x, y).
    lab2 = rasterize_labels(TWO, (0, 0, 5, 5), 2, CM, base_mpp=1, unlabelled="background",
                            within=tissue)
    ref2 = rasterize_labels(TWO, (0, 0, 5, 5), 2, CM, base_mpp=1, unlabelled="background",
                            within=LEFT_HALF)
    assert (lab2 == ref2).all()
    areas = class_geometries(TWO, CM, unlabelled="background", within=tissue)
    assert {k: g.area for k, g in areas.items()} == {0: 38.0, 1: 9.0, IGNORE_INDEX: 9.0}


def test_class_geometries_and_areas_exhaustive() -> None:
    from qpseg.labels import class_areas

    whole = box(0, 0, 10, 10)
    got = class_geometries(TWO, CM, unlabelled="background", within=whole)
    assert {k: g.area for k, g in got.items()} == {0: 82.0, 1: 9.0, IGNORE_INDEX: 9.0}
    assert class_areas(TWO, CM, unlabelled="background", within=LEFT_HALF) == {
        0: 38.0, 1: 9.0, IGNORE_INDEX: 9.0}
    assert class_areas(TWO, CM) == {1: 9.0, IGNORE_INDEX: 9.0}
    # A Region* outside the tissue is still Background (it is painted above the tissue).
    objs = [*TWO, ann(box(7, 0, 9, 2), "Region*")]
    assert class_areas(objs, CM, unlabelled="background", within=LEFT_HALF)[0] == 42.0


def test_unlabelled_option_errors() -> None:
    with pytest.raises(LabelError, match="unlabelled"):
        rasterize_labels(TWO, (0, 0, 10, 10), 1, CM, base_mpp=1, unlabelled="bg")  # type: ignore[arg-type]
    with pytest.raises(LabelError, match="within"):
        rasterize_labels(TWO, (0, 0, 10, 10), 1, CM, base_mpp=1, within=LEFT_HALF)
    with pytest.raises(LabelError, match="within"):
        class_geometries(TWO, CM, unlabelled="background")


# ------------------------------------------------ equality with the rule as first written
# (qpseg.testing.reference.reference_class_geometries)
_NAMES = ["Tumor", "Stroma", "Region*", "Ignore*", None, "Necrosis"]


def _random_shape(draw, st):
    from shapely.geometry import Point

    kind = draw(st.sampled_from(["box", "disc", "holed", "bowtie", "same"]))
    x = draw(st.integers(0, 60))
    y = draw(st.integers(0, 60))
    w = draw(st.integers(1, 40))
    h = draw(st.integers(1, 40))
    if kind in ("box", "same"):  # "same": integer boxes make equal areas (file-order ties)
        return box(x, y, x + w, y + h)
    if kind == "disc":
        return Point(x, y).buffer(w / 2, quad_segs=draw(st.integers(1, 6)))
    if kind == "holed":
        return Polygon(box(x, y, x + w + 4, y + h + 4).exterior.coords,
                       [box(x + 1, y + 1, x + 1 + w / 2, y + 1 + h / 2).exterior.coords[::-1]])
    return Polygon([(x, y), (x + w, y + h), (x + w, y), (x, y + h)])  # self-intersecting


def _objects_strategy():
    from hypothesis import strategies as st

    @st.composite
    def objects(draw):
        n = draw(st.integers(0, 25))
        return [ann(_random_shape(draw, st), draw(st.sampled_from(_NAMES))) for _ in range(n)]

    return objects()


def _assert_same_areas(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].area == pytest.approx(ref[k].area, rel=1e-6, abs=1e-6), k
        assert got[k].symmetric_difference(ref[k]).area <= 1e-6 * max(ref[k].area, 1.0), k


def test_fast_class_geometries_equal_the_reference_rule() -> None:
    from hypothesis import given, settings

    from qpseg.labels import class_areas

    @settings(max_examples=300, deadline=None)
    @given(_objects_strategy())
    def check(objs):
        ref = reference_class_geometries(objs, CM)
        _assert_same_areas(class_geometries(objs, CM), ref)
        areas = class_areas(objs, CM)
        assert set(areas) == set(ref)
        for k in ref:
            assert areas[k] == pytest.approx(ref[k].area, rel=1e-6, abs=1e-6), k

    check()


def test_fast_class_geometries_many_covers_per_object() -> None:
    from qpseg.labels import class_areas

    # One big annotation under many small ones (the "union of the covers" branch), plus a
    # chain of overlaps: same areas as the reference rule.
    rng = np.random.default_rng(3)
    objs = [ann(box(0, 0, 500, 500), "Stroma"), ann(box(0, 0, 500, 500), "Region*")]
    for _ in range(300):
        x, y = rng.uniform(0, 480, 2)
        s = rng.uniform(2, 20)
        objs.append(ann(box(x, y, x + s, y + s), str(rng.choice(["Tumor", "Stroma", "Ignore*"]))))
    # A large Stroma under many, itself over the Region*: both take the "many covers" path.
    objs.append(ann(box(100, 100, 400, 400), "Tumor"))
    ref = reference_class_geometries(objs, CM)
    _assert_same_areas(class_geometries(objs, CM), ref)
    areas = class_areas(objs, CM)
    assert set(areas) == set(ref)
    for k in ref:
        assert areas[k] == pytest.approx(ref[k].area, rel=1e-6), k


def test_raster_painted_in_bounding_boxes_equals_full_raster_painting() -> None:
    # Each geometry is filled only inside its bounding box: the raster must equal painting
    # every geometry over the whole raster, as first written.
    from qpseg.labels import _paint_order, fill_mask

    rng = np.random.default_rng(7)
    for trial in range(15):
        objs = [ann(box(0, 0, 120, 120), "Region*")]
        for _ in range(40):
            x, y = rng.uniform(-20, 120, 2)
            s = rng.uniform(1, 40)
            g = box(x, y, x + s, y + s * rng.uniform(0.3, 2))
            if rng.random() < 0.3:
                g = g.buffer(rng.uniform(0.5, 4), quad_segs=3)
            objs.append(ann(g, str(rng.choice(["Tumor", "Stroma", "Ignore*"]))))
        x0, y0 = rng.uniform(-10, 10, 2)
        ds = float(rng.choice([0.5, 1.0, 1.7, 3.0]))
        shape = (int(100 / ds), int(90 / ds))
        got = rasterize_labels(objs, (x0, y0, shape[1], shape[0]), ds, CM, base_mpp=1.0)
        ref = np.full(shape, IGNORE_INDEX, dtype=np.uint8)
        window = box(x0 - ds, y0 - ds, x0 + (shape[1] + 1) * ds, y0 + (shape[0] + 1) * ds)
        for geom, value in _paint_order(objs, CM):
            if geom.intersects(window):
                ref[fill_mask(shape, geom.intersection(window), x0, y0, ds)] = value
        assert (got != ref).sum() <= 2, trial  # centres exactly on an edge may round apart
