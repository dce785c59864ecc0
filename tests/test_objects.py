"""qpseg.objects: class/instance maps -> QuPath objects, measurements, provenance, files."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from shapely.geometry import Polygon, box

from qpseg.errors import ConfigError, GeoJSONWarning, LabelError, QpsegError
from qpseg.labels import ClassMap
from qpseg.metrics.lesion import max_feret_diameters
from qpseg.objects import (
    AREA,
    MAX_DIAMETER,
    PERIMETER,
    PROBABILITY,
    REVIEW_DEFAULTS,
    SIZE_CATEGORY,
    MapGeometry,
    PredictionsExistError,
    metadata_path,
    polygonise,
    polygonise_instances,
    predictions_path,
    provenance,
    slide_summary,
    summary_metadata,
    write_predictions,
)
from qpseg.qupath.geojson import read_geojson

CLASSES = ClassMap.from_names(["Tumor", "Stroma"], colors={"Tumor": (200, 0, 0)})
PROV = {"qpseg_model": "tiny_unet", "qpseg_model_sha256": "ab" * 32, "qpseg_run": "r1"}
UNIT = MapGeometry(0.0, 0.0, 1.0, 1.0)  # map pixel == QuPath pixel == 1 µm


def _poly(m: Any, geometry: MapGeometry = UNIT, **kw: Any) -> list:
    """polygonise, keeping every object and hole unless asked (tiny test maps)."""
    kw.setdefault("provenance", PROV)
    kw.setdefault("min_area_um2", 0)
    kw.setdefault("fill_holes_um2", 0)
    return polygonise(m, geometry, CLASSES, **kw)


def _cells(inst: Any, geometry: MapGeometry = UNIT, **kw: Any) -> list:
    """polygonise_instances, keeping every nucleus and hole unless asked."""
    kw.setdefault("provenance", PROV)
    kw.setdefault("min_area_um2", 0)
    kw.setdefault("fill_holes_um2", 0)
    return polygonise_instances(inst, geometry, CLASSES, **kw)


def _coords(g: Any) -> set[tuple[float, float]]:
    return {tuple(c) for c in shapely.get_coordinates(g).tolist()}


# ------------------------------------------------------------------------------- geometry


def test_rectangle_exact_coordinates_with_offset_and_fractional_downsample() -> None:
    ds, slide_mpp = 1.7, 0.2425
    geo = MapGeometry(100.25, -7.5, ds, slide_mpp)
    m = np.zeros((20, 30), np.uint8)
    m[4:10, 5:17] = 1  # 6 rows x 12 cols
    (obj,) = _poly(m, geo)
    x = [100.25 + c * ds for c in (5, 17)]
    y = [-7.5 + r * ds for r in (4, 10)]
    assert _coords(obj.geometry) == {(x[0], y[0]), (x[1], y[0]), (x[1], y[1]), (x[0], y[1])}
    mpp = ds * slide_mpp
    assert obj.measurements[AREA] == pytest.approx(72 * mpp * mpp, rel=1e-12)
    assert obj.measurements[PERIMETER] == pytest.approx(36 * mpp, rel=1e-12)
    assert obj.measurements[MAX_DIAMETER] == pytest.approx(math.hypot(6, 12) * mpp, rel=1e-12)
    assert obj.classification == "Tumor" and obj.class_color == (200, 0, 0)
    assert obj.object_type == "annotation" and obj.name is None
    assert obj.geometry.area == pytest.approx(72 * ds * ds, rel=1e-12)


class _FakeSlide:
    """What MapGeometry.from_slide needs from a Slide (bounds offset 1000, 2000; the QuPath
    image, the bounds, is 500 x 300 px)."""

    mpp = 0.25
    qupath_dimensions = (500, 300)

    def level0_to_qupath(self, x: float, y: float) -> tuple[float, float]:
        return x - 1000, y - 2000


def test_from_slide_removes_bounds_offset_once() -> None:
    geo = MapGeometry.from_slide(_FakeSlide(), 1.0, origin_level0=(1400.0, 2100.0))  # type: ignore[arg-type]
    assert (geo.x0, geo.y0, geo.downsample, geo.slide_mpp) == (400.0, 100.0, 4.0, 0.25)
    assert geo.map_mpp == 1.0
    m = np.zeros((4, 4), np.uint8)
    m[1, 2] = 1
    (obj,) = _poly(m, geo)
    assert obj.geometry.bounds == (408.0, 104.0, 412.0, 108.0)
    assert geo.tile(2, 1).to_qupath(0, 0) == geo.to_qupath(2, 1) == (408.0, 104.0)
    assert geo.image_size == geo.tile(2, 1).image_size == (500.0, 300.0)


# ------------------------------------------------------------------ objects inside the image


def test_coarse_map_is_clipped_to_the_image() -> None:
    # a 10 x 7 px image, a map 4x coarser: 3 x 2 map pixels cover 12 x 8 px, 2 px too wide
    # and 1 px too high. Every object stays inside [0, 10] x [0, 7] and is measured there.
    slide_mpp = 0.5
    geo = MapGeometry(0.0, 0.0, 4.0, slide_mpp).within(10, 7)
    m = np.ones((2, 3), np.uint8)
    (obj,) = _poly(m, geo)
    assert obj.geometry.equals(box(0, 0, 10, 7)) and obj.geometry.bounds == (0, 0, 10, 7)
    assert obj.measurements[AREA] == pytest.approx(70 * slide_mpp**2, rel=1e-12)
    assert obj.measurements[PERIMETER] == pytest.approx(34 * slide_mpp, rel=1e-12)
    assert obj.measurements[MAX_DIAMETER] == pytest.approx(math.hypot(10, 7) * slide_mpp)
    # without a size nothing is clipped (the map's own extent)
    (unclipped,) = _poly(m, MapGeometry(0.0, 0.0, 4.0, slide_mpp))
    assert unclipped.geometry.bounds == (0, 0, 12, 8)
    # an object wholly in the part past the image is dropped; one at the edge is cut
    m = np.zeros((4, 4), np.uint8)
    m[:, 3] = 1   # x 12..16: outside a 12 x 10 image
    m[3, :2] = 2  # y 12..16, x 0..8: cut at y = 13
    objs = _poly(m, MapGeometry(0.0, 0.0, 4.0, 1.0).within(12, 13))
    assert [(o.classification, o.geometry.bounds) for o in objs] == [
        ("Stroma", (0.0, 12.0, 8.0, 13.0))]


def test_real_slide_shape_no_vertex_past_the_edge() -> None:
    # cmu_small_region.svs: 2220 x 2967 px at 0.499 µm/px, a 2 µm/px map: 554 x 741 map
    # pixels reach y = 741 * 2 / 0.499 = 2969.9 (the bug seen in QuPath); offsets at a tile
    # origin and several blocks must not matter.
    w, h, slide_mpp, map_mpp = 2220, 2967, 0.499, 2.0
    geo = MapGeometry.from_mpp(map_mpp, slide_mpp).within(w, h)
    rows, cols = math.ceil(h / geo.downsample), math.ceil(w / geo.downsample)
    assert (rows, cols) == (741, 554) and rows * geo.downsample > h + 2.9
    rng = np.random.default_rng(5)
    m = (ndimage.uniform_filter(rng.random((rows, cols)), 9) > 0.52).astype(np.uint8)
    m[-3:, :] = 1  # a band along the bottom and right edges
    m[:, -3:] = 2
    for simplify in (None, 0.0):
        objs = polygonise(m, geo, CLASSES, provenance=PROV, block_size=200, min_area_um2=0,
                          fill_holes_um2=0, simplify_um=simplify)
        xy = np.concatenate([shapely.get_coordinates(o.geometry) for o in objs])
        assert xy.min() >= 0 and xy[:, 0].max() == w and xy[:, 1].max() == h
        assert all(o.geometry.is_valid for o in objs)
    for o in objs:  # exact outlines: the area measured is the clipped area
        assert o.measurements[AREA] == pytest.approx(o.geometry.area * slide_mpp**2, rel=1e-9)


def test_expanded_cells_are_clipped_to_the_image() -> None:
    inst = np.zeros((12, 12), np.int32)
    inst[5:7, 10:12] = 1  # a nucleus at the right edge of a 12 x 12 px image
    inst[1:3, 1:3] = 2    # and one by the top-left corner
    geo = MapGeometry(0.0, 0.0, 1.0, 1.0).within(12, 12)
    cells = polygonise_instances(inst, geo, CLASSES, provenance=PROV, cell_expansion_um=3,
                                 min_area_um2=0, fill_holes_um2=0)
    assert len(cells) == 2
    for c in cells:
        (x0, y0, x1, y1) = c.geometry.bounds
        assert x0 >= 0 and y0 >= 0 and x1 <= 12 and y1 <= 12
        assert c.measurements["Cell: Area \u00b5m^2"] == pytest.approx(c.geometry.area)
    assert max(c.geometry.bounds[2] for c in cells) == 12


def test_image_size_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="image width"):
        MapGeometry(0.0, 0.0, 1.0, 1.0, image_size=(0, 5))
    with pytest.raises(ConfigError, match="width, height"):
        MapGeometry(0.0, 0.0, 1.0, 1.0, image_size=(5,))  # type: ignore[arg-type]


def test_single_pixel_is_its_square_even_with_simplification() -> None:
    m = np.zeros((5, 5), np.uint8)
    m[2, 3] = 2
    for tol in (None, 0.0, 1.0, 3.0):
        (obj,) = _poly(m, simplify_um=tol)
        assert obj.geometry.equals(box(3, 2, 4, 3)) and len(_coords(obj.geometry)) == 4
        assert obj.classification == "Stroma"
        assert obj.measurements[MAX_DIAMETER] == pytest.approx(math.sqrt(2))


def test_ring_gives_polygon_with_hole() -> None:
    m = np.zeros((12, 12), np.uint8)
    m[2:10, 2:10] = 1
    m[4:7, 5:8] = 0  # 3 x 3 hole
    (obj,) = _poly(m, simplify_um=0)
    g = obj.geometry
    assert g.geom_type == "Polygon" and len(g.interiors) == 1 and g.is_valid
    assert Polygon(g.interiors[0]).equals(box(5, 4, 8, 7))
    assert g.exterior.coords and Polygon(g.exterior).equals(box(2, 2, 10, 10))
    assert obj.measurements[AREA] == 64 - 9
    assert obj.measurements[PERIMETER] == 32 + 12


def test_small_holes_filled_and_islands_inside_absorbed() -> None:
    m = np.zeros((20, 20), np.uint8)
    m[1:19, 1:19] = 1
    m[3:5, 3:5] = 0       # 4 px hole
    m[8:14, 8:14] = 0     # 36 px hole with a 4-separated island of the same class ...
    m[10:12, 10:12] = 1
    m[9, 9] = 2           # ... and a pixel of another class
    probs = np.zeros((3, 20, 20))
    probs[1] = 0.5
    probs[1, 10:12, 10:12] = 1.0
    (big, island), other = _split(_poly(m, fill_holes_um2=5, connectivity=1, simplify_um=0,
                                        probabilities=probs))
    assert len(big.geometry.interiors) == 1  # the 4 px hole is filled, the 36 px one is not
    assert big.measurements[AREA] == 18 * 18 - 36
    assert island.measurements[AREA] == 4 and other[0].classification == "Stroma"
    objs = _poly(m, fill_holes_um2=36.5, connectivity=1, simplify_um=0, probabilities=probs)
    tumour = [o for o in objs if o.classification == "Tumor"]
    assert len(tumour) == 1  # the island became part of its host
    assert len(tumour[0].geometry.interiors) == 0
    assert tumour[0].measurements[AREA] == 18 * 18
    # mean over the host's pixels plus the island's (filled background is not counted)
    n_host = 18 * 18 - 36 - 4 + 4
    expected = ((18 * 18 - 36 - 4) * 0.5 + 4 * 1.0) / n_host
    assert tumour[0].measurements[PROBABILITY] == pytest.approx(expected)
    assert [o.classification for o in objs].count("Stroma") == 1  # other classes stay


def _split(objs: list) -> tuple[list, list]:
    return ([o for o in objs if o.classification == "Tumor"],
            [o for o in objs if o.classification != "Tumor"])


def test_min_area_drops_small_objects() -> None:
    m = np.zeros((10, 10), np.uint8)
    m[0:3, 0:3] = 1   # 9 µm² at mpp 1
    m[6:8, 6:9] = 1   # 6 µm²
    geo = MapGeometry(0, 0, 2.0, 0.5)  # map mpp 1
    assert len(_poly(m, geo, min_area_um2=6)) == 2
    (obj,) = _poly(m, geo, min_area_um2=6.5)
    assert obj.measurements[AREA] == 9
    assert obj.metadata["qpseg_min_area_um2"] == "6.5"


def test_two_classes_ignore_and_background() -> None:
    m = np.full((8, 8), 255, np.uint8)  # ignore everywhere ...
    m[0:4, :] = 0
    m[1:3, 1:3] = 1
    m[5:7, 5:8] = 2
    objs = _poly(m)
    assert [(o.classification, o.measurements[AREA]) for o in objs] == [("Tumor", 4.0),
                                                                        ("Stroma", 6.0)]
    assert objs[1].class_color == CLASSES.classes[2].color


def test_detections_and_annotations() -> None:
    m = np.zeros((4, 4), np.uint8)
    m[1:3, 1:3] = 1
    assert _poly(m)[0].object_type == "annotation"
    assert _poly(m, as_type="detection")[0].object_type == "detection"
    assert _poly(m, as_type="detections")[0].object_type == "detection"
    with pytest.raises(ConfigError):
        _poly(m, as_type="cell")


def test_connectivity_diagonal_pixels() -> None:
    m = np.zeros((4, 4), np.uint8)
    m[1, 1] = m[2, 2] = 1
    (obj,) = _poly(m, connectivity=2)
    assert obj.geometry.geom_type == "MultiPolygon" and obj.geometry.is_valid
    assert obj.measurements[AREA] == 2 and obj.measurements[MAX_DIAMETER] == pytest.approx(
        math.sqrt(8))
    assert len(_poly(m, connectivity=1)) == 2


def test_hole_touching_outside_at_a_corner_is_valid() -> None:
    m = np.ones((3, 3), np.uint8)
    m[1, 1] = 0
    m[2, 2] = 0  # the hole touches the outside diagonally
    for conn in (1, 2):
        (obj,) = _poly(m, connectivity=conn, simplify_um=0)
        assert obj.geometry.is_valid and obj.measurements[AREA] == 7
        assert obj.geometry.equals(shapely.union_all([box(c, r, c + 1, r + 1)
                                                      for r, c in np.argwhere(m)]))


def test_nested_rings_joined_at_corners() -> None:
    m = np.zeros((13, 13), np.uint8)
    m[[0, -1], :] = m[:, [0, -1]] = 1   # outer ring (hole 11 x 11)
    m[1, 1] = m[2, 2] = 1               # a diagonal chain from the ring ...
    m[3:11, 3:11] = 1                   # ... to an island inside its hole
    m[5:8, 5:8] = 0                     # the island's own hole
    objs = _poly(m, simplify_um=0, connectivity=2)
    assert len(objs) == 1
    g = objs[0].geometry
    assert g.geom_type == "MultiPolygon" and len(g.geoms) == 3
    assert sorted(len(p.interiors) for p in g.geoms) == [0, 1, 1]
    _check_exact(m, objs, 2)
    for block in (2, 3, 4, 5):
        assert _signature(objs) == _signature(_poly(m, simplify_um=0, block_size=block))
    assert len(_poly(m, connectivity=1)) == 3  # ring + (1, 1), (2, 2), island


# --------------------------------------------------------------------- exactness (property)


def _check_exact(m: np.ndarray, objs: list, connectivity: int) -> None:
    """Every object covers exactly the pixel squares of one connected component."""
    structure = ndimage.generate_binary_structure(2, connectivity)
    expected = 0
    for c in (1, 2):
        lab, n = ndimage.label(m == c, structure=structure)
        expected += n
        mine = [o for o in objs if o.classification == CLASSES.names[c]]
        assert sum(o.measurements[AREA] for o in mine) == (m == c).sum()
        cover = np.zeros(m.shape, np.int32)
        for o in mine:
            assert o.geometry.is_valid
            x0, y0, x1, y1 = (int(v) for v in o.geometry.bounds)
            yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
            inside = shapely.contains_xy(o.geometry, xx, yy)
            cover[y0:y1, x0:x1] += inside
            ids = np.unique(lab[y0:y1, x0:x1][inside])
            assert len(ids) == 1 and ids[0] > 0
            mask = lab == ids[0]
            assert o.measurements[AREA] == mask.sum() == inside.sum()
            d = max_feret_diameters(mask.astype(np.int32), 1.0)[0]
            assert o.measurements[MAX_DIAMETER] == pytest.approx(d, rel=1e-12)
        assert np.array_equal(cover > 0, m == c) and cover.max(initial=0) <= 1
    assert len(objs) == expected


def _random_map(rng: np.random.Generator, shape: tuple[int, int], p: float = 0.45) -> np.ndarray:
    m = rng.integers(1, 3, shape).astype(np.uint8) * (rng.random(shape) < p)
    m[rng.random(shape) < 0.03] = 255
    return m.astype(np.uint8)


@pytest.mark.parametrize("connectivity", [1, 2])
def test_exact_polygons_cover_exactly_their_pixels(connectivity: int) -> None:
    m = _random_map(np.random.default_rng(connectivity), (60, 70))
    _check_exact(m, _poly(m, simplify_um=0, connectivity=connectivity), connectivity)


def _signature(objs: list) -> list:
    return [(o.classification, shapely.to_wkb(shapely.normalize(o.geometry)),
             tuple(sorted(o.measurements.items())), o.name) for o in objs]


@pytest.mark.parametrize("connectivity", [1, 2])
def test_blockwise_equals_whole_map(connectivity: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(7 + connectivity)
    # blobs of all sizes, crossing 64 px blocks, with holes, on a noisy background
    small = _random_map(rng, (25, 30), p=0.6)
    m = np.kron(small, np.ones((9, 9), np.uint8))[:220, :250]
    noise = _random_map(rng, m.shape, p=0.08)
    m = np.where(noise > 0, noise, m).astype(np.uint8)
    mm = np.lib.format.open_memmap(tmp_path / "map.npy", mode="w+", dtype=np.uint8,
                                   shape=m.shape)
    mm[:] = m
    mm.flush()
    probs = rng.random((3, *m.shape)).astype(np.float32)
    geo = MapGeometry(13.5, 7.25, 1.3, 0.37)
    kw = {"connectivity": connectivity, "probabilities": probs, "fill_holes_um2": 2.0,
          "min_area_um2": 0.5, "lesion_classes": ["Tumor"]}
    whole = _poly(m, geo, block_size=4096, **kw)
    blocks = _poly(mm, geo, block_size=64, **kw)
    odd = _poly(m, geo, block_size=37, **kw)
    assert len(whole) > 100
    assert any(o.geometry.geom_type == "MultiPolygon" for o in whole) == (connectivity == 2)
    assert _signature(whole) == _signature(blocks) == _signature(odd)
    exact_whole = _poly(m, block_size=4096, simplify_um=0, connectivity=connectivity)
    _check_exact(m, exact_whole, connectivity)
    assert _signature(exact_whole) == _signature(
        _poly(m, block_size=64, simplify_um=0, connectivity=connectivity))


@pytest.mark.parametrize("pixels", [((1, 1), (2, 2)), ((1, 2), (2, 1))])
def test_diagonal_neighbours_across_block_corners(pixels: tuple) -> None:
    m = np.zeros((4, 4), np.uint8)
    for r, c in pixels:
        m[r, c] = 1
    for block in (1, 2, 3, 4):
        assert len(_poly(m, block_size=block, connectivity=2)) == 1
        assert len(_poly(m, block_size=block, connectivity=1)) == 2


class _ArrayLike:
    """A 2-D array-like that only supports ``shape`` and slicing (like zarr), logging reads."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data
        self.shape = data.shape
        self.reads: list[tuple[int, int]] = []

    def __getitem__(self, key: Any) -> np.ndarray:
        out = self._data[key]
        self.reads.append(out.shape)
        return out


def test_reads_any_array_like_in_bounded_blocks() -> None:
    m = _random_map(np.random.default_rng(5), (90, 75))
    lazy = _ArrayLike(m)
    probs = _ArrayLike(np.random.default_rng(6).random(m.shape))
    objs = _poly(lazy, block_size=32, probabilities=probs)
    assert lazy.reads and max(r * c for r, c in lazy.reads) <= 32 * 32
    assert max(r * c for r, c in probs.reads) <= 32 * 32
    assert _signature(objs) == _signature(_poly(m, probabilities=probs._data))
    with pytest.raises(LabelError):
        _poly([[0, 1], [1, 0]])  # a list has no shape


@settings(max_examples=120, deadline=None)
@given(m=arrays(np.uint8, st.tuples(st.integers(1, 14), st.integers(1, 14)),
                elements=st.sampled_from([0, 0, 1, 1, 2, 255])),
       block=st.integers(1, 9), conn=st.sampled_from([1, 2]))
def test_fuzz_blockwise_exact(m: np.ndarray, block: int, conn: int) -> None:
    whole = _poly(m, simplify_um=0, connectivity=conn, block_size=64)
    _check_exact(m, whole, conn)
    assert _signature(whole) == _signature(
        _poly(m, simplify_um=0, connectivity=conn, block_size=block))


@settings(max_examples=150, deadline=None)
@given(m=arrays(np.int16, st.tuples(st.integers(0, 6), st.integers(0, 6)),
                elements=st.integers(-2, 300)),
       block=st.integers(1, 8))
def test_fuzz_any_values_result_or_qpseg_error(m: np.ndarray, block: int) -> None:
    try:
        objs = _poly(m, block_size=block, fill_holes_um2=1.5, min_area_um2=1)
    except QpsegError:
        assert ((m < 0) | ((m > 2) & (m != 255))).any()
        return
    for o in objs:
        assert o.geometry.is_valid and all(math.isfinite(v) for v in o.measurements.values())


def test_simplification_stays_within_one_map_pixel() -> None:
    yy, xx = np.mgrid[0:80, 0:80] + 0.5
    m = (((yy - 40) ** 2 + (xx - 38) ** 2) < 30**2).astype(np.uint8)
    geo = MapGeometry(5.0, 5.0, 2.0, 0.5)
    (exact,) = _poly(m, geo, simplify_um=0)
    (simple,) = _poly(m, geo)  # default: one map pixel (1 µm = 2 QuPath px)
    assert len(_coords(simple.geometry)) < len(_coords(exact.geometry)) / 3
    assert shapely.hausdorff_distance(simple.geometry, exact.geometry) <= 2.0 + 1e-9
    assert simple.measurements[AREA] == exact.measurements[AREA] == m.sum()
    # the staircase overestimates the circumference; the simplified outline does not
    assert simple.measurements[PERIMETER] == pytest.approx(2 * math.pi * 30, rel=0.03)
    assert exact.measurements[PERIMETER] > 1.2 * 2 * math.pi * 30


# ----------------------------------------------------------------------- size categories


@pytest.mark.parametrize(("mpp", "rect", "code", "name"), [
    (40.0, (3, 4), 0, "ITC 0.20 mm"),                 # 5 px x 40 µm = 200 µm exactly
    (40.0001, (3, 4), 1, "Micrometastasis 0.20 mm"),
    (40.0, (30, 40), 1, "Micrometastasis 2.00 mm"),   # 50 px -> 2000 µm exactly
    (40.001, (30, 40), 2, "Macrometastasis 2.00 mm"),
    (20.0, (120, 160), 2, "Macrometastasis 4.00 mm"),
    (2.0, (3, 4), 0, "ITC 0.01 mm"),
])
def test_size_category_boundaries(mpp: float, rect: tuple[int, int], code: int,
                                  name: str) -> None:
    m = np.zeros((rect[0] + 2, rect[1] + 2), np.uint8)
    m[1:rect[0] + 1, 1:rect[1] + 1] = 1
    (obj,) = _poly(m, MapGeometry(0, 0, mpp, 1.0), lesion_classes=["tumor"])
    assert obj.measurements[MAX_DIAMETER] == pytest.approx(math.hypot(*rect) * mpp)
    assert obj.measurements[SIZE_CATEGORY] == code
    assert obj.name == name


def test_size_category_only_for_lesion_classes() -> None:
    m = np.zeros((5, 5), np.uint8)
    m[1:3, 1:3] = 1
    m[3:5, 3:5] = 2
    tumour, stroma = _poly(m, lesion_classes=["Tumor"])
    assert SIZE_CATEGORY in tumour.measurements and tumour.name == "ITC 0.00 mm"
    assert SIZE_CATEGORY not in stroma.measurements and stroma.name is None
    assert all(SIZE_CATEGORY not in o.measurements for o in _poly(m))


# --------------------------------------------------------------------------- probabilities


def test_probability_mean_all_forms() -> None:
    m = np.zeros((6, 6), np.uint8)
    m[0:2, 0:3] = 1
    m[4:6, 4:6] = 2
    stack = np.zeros((3, 6, 6), np.float32)
    stack[1, 0, :] = 0.2
    stack[1, 1, :] = 0.8
    stack[2] = 0.25
    stack[2, 5, 5] = np.nan  # ignored
    t, s = _poly(m, probabilities=stack)
    assert t.measurements[PROBABILITY] == pytest.approx(0.5)
    assert s.measurements[PROBABILITY] == pytest.approx(0.25)
    t, s = _poly(m, probabilities={"Tumor": stack[1]})
    assert t.measurements[PROBABILITY] == pytest.approx(0.5) and PROBABILITY not in s.measurements
    t, s = _poly(m, probabilities={2: np.full((6, 6), 63, np.uint8)})
    assert s.measurements[PROBABILITY] == pytest.approx(63 / 255)
    single = np.full((6, 6), 0.9)
    t, s = _poly(m, probabilities=single)
    assert t.measurements[PROBABILITY] == s.measurements[PROBABILITY] == pytest.approx(0.9)
    t, s = _poly(m)
    assert PROBABILITY not in t.measurements
    with pytest.raises(ConfigError):
        _poly(m, probabilities=np.zeros((2, 6, 6)))
    with pytest.raises(ConfigError):
        _poly(m, probabilities=np.zeros((6, 5)))
    with pytest.raises(ConfigError):
        _poly(m, probabilities={"Necrosis": single})


# ---------------------------------------------------------------------------------- cells


def test_instances_to_cells() -> None:
    inst = np.zeros((20, 20), np.uint32)
    inst[2:6, 2:6] = 70000       # large, non-contiguous ids
    inst[2:6, 6:9] = 5           # touches 70000
    inst[12:15, 12:15] = 9
    inst[18, 0] = 9              # the same id elsewhere: one cell, two parts
    cmap = np.zeros((20, 20), np.uint8)
    cmap[2:6, 2:6] = 2
    cmap[2:4, 6:9] = 1
    cmap[4:6, 6:9] = 2           # 6 px class 1, 6 px class 2: tie -> lowest index
    nuc_p = np.full((20, 20), 0.5)
    nuc_p[12:15, 12:15] = 1.0
    cells = _cells(inst, class_map=cmap,
                                 default_class="Tumor", probabilities=nuc_p, simplify_um=0)
    assert len(cells) == 3
    a, b, c = cells  # raster order of the first pixel: 70000, 5, 9
    assert all(x.object_type == "cell" for x in cells)
    assert a.nucleus_geometry.equals(box(2, 2, 6, 6)) and a.geometry.equals(a.nucleus_geometry)
    assert a.classification == "Stroma" and b.classification == "Tumor"
    assert c.classification == "Tumor"  # no class pixels: the default class
    assert c.nucleus_geometry.geom_type == "MultiPolygon"
    assert c.measurements["Nucleus: Area µm^2"] == 10
    assert c.measurements[PROBABILITY] == pytest.approx((9 * 1.0 + 0.5) / 10)
    assert a.measurements["Cell: Area µm^2"] == a.measurements["Nucleus: Area µm^2"] == 16
    assert a.measurements["Nucleus: Max diameter µm"] == pytest.approx(math.sqrt(32))


def test_cell_expansion_stays_off_other_nuclei() -> None:
    inst = np.zeros((30, 30), np.int32)
    inst[5:9, 5:9] = 1
    inst[5:9, 11:15] = 2
    inst[20:23, 20:23] = 3
    cells = _cells(inst, cell_expansion_um=3,
                                 simplify_um=0)
    assert [c.classification for c in cells] == [None, None, None]
    for i, c in enumerate(cells):
        assert c.geometry.is_valid and c.geometry.contains(c.nucleus_geometry)
        assert c.measurements["Cell: Area µm^2"] > c.measurements["Nucleus: Area µm^2"]
        for j, other in enumerate(cells):
            if i != j:
                assert c.geometry.intersection(other.geometry).area < 1e-9
                assert c.geometry.intersection(other.nucleus_geometry).area < 1e-9
    # the lone nucleus grows by 3 px on every side (rounded corners)
    assert cells[2].geometry.bounds == pytest.approx((17, 17, 26, 26))


def test_instances_blockwise_equals_whole() -> None:
    rng = np.random.default_rng(3)
    inst = np.kron(rng.integers(0, 40, (12, 12)), np.ones((7, 7), np.int64))
    whole = _cells(inst, block_size=1000)
    blocks = _cells(inst, block_size=16)
    assert len(whole) == len(np.unique(inst)) - 1
    assert _signature(whole) == _signature(blocks)


def test_instance_holes_filled_without_swallowing_cells() -> None:
    inst = np.zeros((12, 12), np.int32)
    inst[1:10, 1:10] = 4
    inst[4:6, 4:6] = 0       # a 4 px hole ...
    inst[3:7, 7:9] = 0       # ... and a 8 px one holding another nucleus
    inst[4:6, 7:8] = 2
    cells = _cells(inst, fill_holes_um2=5,
                                 simplify_um=0)
    assert len(cells) == 2
    big = next(c for c in cells if c.measurements["Nucleus: Area µm^2"] > 10)
    assert len(big.nucleus_geometry.interiors) == 1
    assert big.measurements["Nucleus: Area µm^2"] == 81 - 8
    assert "qpseg_connectivity" not in big.metadata
    assert big.metadata["qpseg_fill_holes_um2"] == "5.0"


def test_instance_errors() -> None:
    with pytest.raises(LabelError):
        _cells(np.array([[-1, 0]]))
    with pytest.raises(ConfigError):
        _cells(np.ones((2, 2), int),
                             default_class="Necrosis")
    with pytest.raises(LabelError):
        _cells(np.ones((2, 2), int),
                             class_map=np.ones((3, 2), np.uint8))


# ----------------------------------------------------------------------------- provenance


def test_provenance_in_every_object() -> None:
    prov = provenance("fcn32s_vgg16", "cd" * 32, mpp=0.5, run="run-7",
                      thresholds={"threshold": 0.5}, extra={"note": "x"})
    assert prov["qpseg_run"] == "run-7" and prov["qpseg_threshold"] == "0.5"
    assert {"qpseg_model", "qpseg_model_sha256", "qpseg_version", "qpseg_date",
            "qpseg_mpp"} <= prov.keys() and prov["note"] == "x"
    assert provenance("m", "s", mpp=1)["qpseg_run"].endswith("Z")
    m = np.zeros((6, 6), np.uint8)
    m[0:2, 0:2] = 1
    m[3:6, 3:6] = 2
    objs = _poly(m, MapGeometry(0, 0, 4, 0.25), provenance=prov, fill_holes_um2=3)
    for o in objs:
        assert o.metadata["qpseg_model"] == "fcn32s_vgg16"
        assert o.metadata["qpseg_map_mpp"] == "1.0" and o.metadata["qpseg_mpp"] == "0.5"
        assert o.metadata["qpseg_fill_holes_um2"] == "3.0"
        assert o.metadata["qpseg_simplify_um"] == "1.0"
        assert o.metadata["qpseg_connectivity"] == "2"
        assert all(isinstance(v, str) for v in o.metadata.values())
    assert objs[0].metadata is not objs[1].metadata
    with pytest.raises(ConfigError, match="qpseg_model"):
        _poly(m, provenance={"qpseg_run": "x"})
    with pytest.raises(ConfigError):
        _poly(m, provenance={"qpseg_model": "m", "bad": ["list"]})


def test_bad_inputs() -> None:
    with pytest.raises(LabelError):
        _poly(np.array([[0, 3]], np.uint8))            # no class 3
    with pytest.raises(LabelError):
        _poly(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(LabelError):
        _poly(np.zeros((2, 2), np.float32))
    with pytest.raises(ConfigError):
        _poly(np.zeros((2, 2), np.uint8), block_size=0)
    with pytest.raises(ConfigError):
        _poly(np.zeros((2, 2), np.uint8), block_size=20000)
    with pytest.raises(ConfigError):
        _poly(np.zeros((2, 2), np.uint8), connectivity=3)
    with pytest.raises(ConfigError):
        _poly(np.zeros((2, 2), np.uint8), min_area_um2=-1)
    with pytest.raises(ConfigError):
        MapGeometry(0, 0, 0, 1)
    with pytest.raises(ConfigError):
        MapGeometry(float("nan"), 0, 1, 1)
    assert _poly(np.zeros((0, 5), np.uint8)) == []
    assert _poly(np.zeros((3, 3), np.uint8)) == []


# -------------------------------------------------------------------------------- summary


def test_slide_summary() -> None:
    m = np.zeros((60, 60), np.uint8)
    m[0:10, 0:20] = 1    # diameter hypot(10, 20) px
    m[30:33, 30:34] = 1  # 5 px
    m[50:55, 50:55] = 2
    geo = MapGeometry(0, 0, 10.0, 1.0)  # 10 µm map pixels
    objs = _poly(m, geo, lesion_classes=["Tumor"])
    s = slide_summary(objs, lesion_classes=["Tumor"], classes=CLASSES,
                      provenance={"qpseg_model": "m"})
    assert s["qpseg_n_objects"] == 3 and s["qpseg_n_lesions"] == 2
    assert s["qpseg_count_Tumor"] == 2 and s["qpseg_count_Stroma"] == 1
    assert s["qpseg_area_um2_Tumor"] == pytest.approx((200 + 12) * 100)
    assert s["qpseg_lesion_area_um2"] == pytest.approx(21200)
    assert s["qpseg_area_um2_Stroma"] == pytest.approx(2500)
    assert s["qpseg_largest_lesion_um"] == pytest.approx(math.hypot(10, 20) * 10)
    assert s["qpseg_slide_category"] == "micro" and s["qpseg_model"] == "m"
    empty = slide_summary([], lesion_classes=["Tumor"], classes=CLASSES)
    assert empty["qpseg_slide_category"] == "negative" and empty["qpseg_count_Stroma"] == 0
    assert empty["qpseg_largest_lesion_um"] == 0.0
    meta = summary_metadata(s)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["qpseg_n_lesions"] == "2"


# ---------------------------------------------------------------------------------- files


def test_write_predictions_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    m = _random_map(rng, (50, 50))
    geo = MapGeometry(1000.5, 2000.25, 3.3, 0.25)
    objs = _poly(m, geo, lesion_classes=["Tumor"], probabilities=rng.random((3, 50, 50)))
    inst = polygonise_instances(np.kron(rng.integers(0, 5, (5, 5)), np.ones((4, 4), int)), geo,
                                CLASSES, provenance=PROV, cell_expansion_um=1.0)
    out = predictions_path(tmp_path / "project", "17")
    assert out == tmp_path / "project" / "qpseg" / "predictions" / "17.geojson"
    summary = slide_summary(objs, lesion_classes=["Tumor"], classes=CLASSES, provenance=PROV)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeoJSONWarning)  # nothing needs repair on write
        n = write_predictions(out, objs + inst, summary=summary)
    assert n == len(objs) + len(inst)
    back = read_geojson(out)
    assert len(back) == n
    for a, b in zip(objs + inst, back, strict=True):
        assert b.geometry.is_valid and b.geometry.equals(a.geometry)
        assert b.object_type == a.object_type and b.classification == a.classification
        assert b.measurements == pytest.approx(a.measurements)
        assert b.metadata["qpseg_model"] == "tiny_unet" and b.name == a.name
        if a.nucleus_geometry is not None:
            assert b.nucleus_geometry.equals(a.nucleus_geometry)
    meta = json.loads(metadata_path(out).read_text(encoding="utf-8"))
    assert metadata_path(out).name == "17.metadata.json"
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["qpseg_n_objects"] == str(len(objs))

    with pytest.raises(PredictionsExistError, match="overwrite"):
        write_predictions(out, objs[:1])
    assert len(read_geojson(out)) == n  # untouched
    write_predictions(out, objs[:1], overwrite=True)
    assert len(read_geojson(out)) == 1
    assert len(read_geojson(out.with_name("17.geojson.bak"))) == n
    with pytest.raises(QpsegError):
        write_predictions(tmp_path, objs)


def test_metadata_path_names() -> None:
    assert metadata_path("a/12.geojson").as_posix() == "a/12.metadata.json"
    assert metadata_path("12.geojson.gz").name == "12.metadata.json"


# ------------------------------------------------------------------ reviewable defaults


def _square(m: np.ndarray, r: int, c: int, side: int, value: int) -> None:
    m[r:r + side, c:c + side] = value


def test_review_defaults_per_output_type() -> None:
    # 1 µm/px: a square of side s is s² µm². Tumor is a lesion class (50 / 50 µm²), Stroma a
    # tissue class (1000 / 1000 µm²).
    assert REVIEW_DEFAULTS == {"lesion": (50.0, 50.0), "tissue": (1000.0, 1000.0),
                               "nucleus": (10.0, 400.0)}
    m = np.zeros((200, 200), np.uint8)
    _square(m, 0, 0, 7, 1)        # Tumor 49 µm²: dropped
    _square(m, 0, 10, 8, 1)       # Tumor 64 µm²: kept
    _square(m, 0, 30, 20, 1)      # Tumor 400 µm², hole 36 µm² (filled), hole 64 (kept)
    _square(m, 2, 32, 6, 0)
    _square(m, 10, 40, 8, 0)
    _square(m, 60, 0, 31, 2)      # Stroma 961 µm²: dropped
    _square(m, 60, 40, 40, 2)     # Stroma 1600 µm² with a 900 µm² hole: filled
    _square(m, 65, 45, 30, 0)
    _square(m, 120, 0, 60, 2)     # Stroma 3600 µm² with a 1024 µm² hole: kept
    _square(m, 130, 10, 32, 0)
    m[199, 199] = 2               # a 1 µm² speck: dropped
    objs = polygonise(m, UNIT, CLASSES, provenance=PROV, lesion_classes=["Tumor"],
                      simplify_um=0)
    got = sorted((o.classification, o.measurements[AREA], len(o.geometry.interiors))
                 for o in objs)
    assert got == [("Stroma", 1600.0, 0), ("Stroma", 3600.0 - 1024.0, 1),
                   ("Tumor", 64.0, 0), ("Tumor", 400.0 - 64.0, 1)]
    for o in objs:  # each object records the thresholds it was made with
        expected = "50.0" if o.classification == "Tumor" else "1000.0"
        assert o.metadata["qpseg_min_area_um2"] == o.metadata["qpseg_fill_holes_um2"] == expected
    # without lesion classes Tumor is a tissue class too; 0 keeps everything
    assert {o.classification for o in polygonise(m, UNIT, CLASSES, provenance=PROV,
                                                 simplify_um=0)} == {"Stroma"}
    everything = polygonise(m, UNIT, CLASSES, provenance=PROV, min_area_um2=0, fill_holes_um2=0,
                            simplify_um=0)
    assert len(everything) == 7
    assert sum(len(o.geometry.interiors) for o in everything) == 4


def test_review_defaults_for_nuclei() -> None:
    inst = np.zeros((40, 40), np.int32)
    _square(inst, 0, 0, 3, 1)      # 9 µm²: below QuPath's 10 µm² minimum, dropped
    _square(inst, 0, 10, 4, 2)     # 16 µm²: kept
    _square(inst, 10, 10, 20, 3)   # 400 µm² with a 64 µm² hole: filled
    _square(inst, 16, 16, 8, 0)
    cells = polygonise_instances(inst, UNIT, CLASSES, provenance=PROV, simplify_um=0)
    assert sorted(c.measurements["Nucleus: Area \u00b5m^2"] for c in cells) == [16.0, 400.0]
    assert all(len(c.nucleus_geometry.interiors) == 0 for c in cells)
    assert cells[0].metadata["qpseg_min_area_um2"] == "10.0"
    assert cells[0].metadata["qpseg_fill_holes_um2"] == "400.0"
    assert len(_cells(inst, simplify_um=0)) == 3


def test_review_defaults_remove_specks_of_a_noisy_map() -> None:
    # the pattern seen on a real slide with --min-area-um2 0: most objects 1-pixel specks
    rng = np.random.default_rng(7)
    m = np.zeros((300, 300), np.uint8)
    for r, c in rng.integers(10, 250, (6, 2)):
        _square(m, int(r), int(c), 40, 1)
    specks = rng.integers(0, 300, (400, 2))
    m[specks[:, 0], specks[:, 1]] = rng.integers(1, 3, 400).astype(np.uint8)
    geo = MapGeometry(0.0, 0.0, 2.0, 0.5)  # a 1 µm/px map: one map pixel is 1 µm²
    raw = polygonise(m, geo, CLASSES, provenance=PROV, min_area_um2=0, fill_holes_um2=0,
                     lesion_classes=["Tumor"])
    reviewable = polygonise(m, geo, CLASSES, provenance=PROV, lesion_classes=["Tumor"])
    assert sum(o.measurements[AREA] <= 4 for o in raw) > len(raw) // 2
    assert reviewable and all(o.measurements[AREA] >= 50 for o in reviewable)
    assert len(reviewable) <= 6
