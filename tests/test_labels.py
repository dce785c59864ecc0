"""rasterize_labels / class_geometries: known answers for the partial-annotation rules."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from qpseg.errors import LabelError
from qpseg.labels import IGNORE_INDEX, ClassMap, class_geometries, label_role, rasterize_labels
from qpseg.qupath.geojson import QuPathObject

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
