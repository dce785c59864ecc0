"""Tile grids: labelled fractions and class histograms with exact answers, selection modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import Polygon, box

import qpseg.data.grid as grid_mod
from qpseg.data import DataWarning
from qpseg.data.grid import (
    FOCUS_GAMMA,
    SlideRecord,
    Tile,
    build_tiles,
    slides_from_manifest,
    tile_grid,
    tiles_from_json,
    tiles_to_json,
)
from qpseg.errors import ConfigError, LabelError, QpsegError
from qpseg.labels import IGNORE_INDEX, ClassMap, rasterize_labels
from qpseg.manifest import Manifest, ManifestEntry, import_project
from qpseg.qupath.geojson import QuPathObject
from qpseg.testing.projects import make_project
from qpseg.tissue import TissueMask

CM = ClassMap.from_names(["Tumor", "Stroma"])


def ann(geom: Polygon, cls: str | None) -> QuPathObject:
    return QuPathObject(geometry=geom, object_type="annotation", classification=cls)


def grid(objs: list[QuPathObject], **kw: object) -> list[Tile]:
    args: dict[str, object] = {"image_size": (512, 512), "base_mpp": 0.5, "tile_px": 64,
                               "mpp": 1.0}
    args.update(kw)
    return tile_grid(objs, CM, **args)  # type: ignore[arg-type]


def by_xy(tiles: list[Tile]) -> dict[tuple[float, float], Tile]:
    return {(t.x, t.y): t for t in tiles}


def test_labelled_fraction_and_histogram_exact() -> None:
    # Tiles are 64 px at 1 µm/px = 128 level-0 px (base 0.5 µm/px): a 4 x 4 grid.
    tiles = grid([ann(box(0, 0, 192, 128), "Tumor"), ann(box(0, 384, 128, 512), "Stroma")])
    t = by_xy(tiles)
    assert set(t) == {(0.0, 0.0), (128.0, 0.0), (0.0, 384.0)}
    assert t[0.0, 0.0].labelled_fraction == 1.0 and t[0.0, 0.0].class_hist == (0, 4096, 0)
    assert t[128.0, 0.0].labelled_fraction == 0.5 and t[128.0, 0.0].class_hist == (0, 2048, 0)
    assert t[0.0, 384.0].class_hist == (0, 0, 4096)
    assert t[0.0, 0.0].classes == (1,) and t[0.0, 0.0].tissue_fraction is None
    assert all(x.slide == 0 for x in tiles)
    # Row-major order.
    assert [(x.y, x.x) for x in tiles] == sorted((x.y, x.x) for x in tiles)


def test_region_is_background_and_ignore_is_not_labelled() -> None:
    objs = [ann(box(0, 0, 128, 128), "Region*"), ann(box(0, 0, 64, 128), "Tumor"),
            ann(box(0, 0, 64, 64), "Ignore*")]
    t = by_xy(grid(objs))[0.0, 0.0]
    # Quarter ignored, quarter tumour, half background (Region* rule).
    assert t.labelled_fraction == 0.75
    assert t.class_hist == (2048, 1024, 0)


def test_gamma_threshold_khalil() -> None:
    # Coarse cells are 8 level-0 px (16 per 128 px tile). An 8 x 64 strip is 1/32 = 0.03125 of
    # a tile (< γ = 0.05), an 8 x 128 strip 1/16 = 0.0625 (>= γ).
    thin = [ann(box(0, 0, 8, 64), "Tumor"), ann(box(128, 0, 136, 128), "Tumor")]
    kept = by_xy(grid(thin))
    assert FOCUS_GAMMA == 0.05
    assert set(kept) == {(128.0, 0.0)}
    assert kept[128.0, 0.0].labelled_fraction == pytest.approx(0.0625)
    low = by_xy(grid(thin, min_labelled=0.03))
    assert low[0.0, 0.0].labelled_fraction == pytest.approx(0.03125)
    assert len(grid(thin, min_labelled=0.0)) == 2  # never a tile with nothing labelled


def test_stride_and_edges() -> None:
    objs = [ann(box(0, 0, 512, 512), "Tumor")]
    # Stride 32 px = 64 level-0 px: ceil((512 - 128) / 64) + 1 = 7 positions per axis.
    tiles = grid(objs, stride_px=32, select="all")
    assert len(tiles) == 49
    assert sorted({t.x for t in tiles}) == [64.0 * i for i in range(7)]
    assert all(t.labelled_fraction == 1.0 for t in tiles)
    # An image that is not a multiple of the tile: the last tile reaches past the edge.
    tiles = grid([ann(box(0, 0, 300, 100), "Tumor")], image_size=(300, 100), select="all")
    t = by_xy(tiles)
    assert set(t) == {(0.0, 0.0), (128.0, 0.0), (256.0, 0.0)}
    # Exact: 44 x 100 of 128 x 128; the coarse 8 px cells quantise the edges.
    assert t[256.0, 0.0].labelled_fraction == pytest.approx(44 / 128 * 100 / 128, abs=0.05)


def test_odd_stride_uses_common_cells() -> None:
    objs = [ann(box(0, 0, 150, 512), "Tumor")]
    tiles = grid(objs, stride_px=48, select="all")  # gcd(64, 48) = 16 px cells, split further
    for t in tiles:
        exact = max(0.0, min(150.0, t.x + 128) - t.x) / 128
        assert t.labelled_fraction == pytest.approx(exact, abs=1 / 32)


def test_coarse_fractions_match_full_resolution(tmp_path: Path) -> None:
    proj = make_project(tmp_path, n_slides=1, width=768, height=768, seed=4)
    m = import_project(proj.path, use_paquo=False)
    rec = slides_from_manifest(m)[0]
    tiles = build_tiles([rec], m.class_map, tile_px=96, mpp=1.0, select="all")
    assert len(tiles) == 16  # 768 / 192
    for t in tiles:
        lab = rasterize_labels(rec.annotations, (t.x, t.y, 96, 96), 1.0, m.class_map,
                               base_mpp=rec.mpp)
        assert t.labelled_fraction == pytest.approx((lab != IGNORE_INDEX).mean(), abs=0.04)
        for c in range(len(m.class_map)):
            assert abs(t.class_hist[c] - (lab == c).sum()) <= 0.04 * 96 * 96


def test_bands_give_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    objs = [ann(box(10, 20, 400, 330), "Tumor"), ann(box(200, 300, 500, 500), "Stroma")]
    one = grid(objs, select="all")
    monkeypatch.setattr(grid_mod, "_BAND_CELLS", 1)  # one tile row per band
    assert grid(objs, select="all") == one


def test_selection_modes_with_tissue() -> None:
    mask = np.zeros((16, 16), bool)
    mask[:, 8:] = True  # right half of the 512 px image (32 px mask pixels)
    tissue = TissueMask(mask, 32.0, 32.0)
    objs = [ann(box(0, 0, 128, 128), "Tumor")]
    counts = {s: len(grid(objs, select=s, tissue=tissue))
              for s in ("labelled", "tissue", "either", "both", "all")}
    assert counts == {"labelled": 1, "tissue": 8, "either": 9, "both": 0, "all": 16}
    t = grid(objs, select="tissue", tissue=tissue)
    assert all(x.tissue_fraction == 1.0 and x.x >= 256 for x in t)
    assert len(grid(objs, select="tissue", tissue=tissue, min_tissue=1.01)) == 0
    with pytest.raises(ConfigError):
        grid(objs, select="tissue")
    with pytest.raises(ConfigError):
        grid(objs, select="everything")
    with pytest.raises(ConfigError):
        grid(objs, tile_px=0)


def test_no_labels_gives_no_tiles() -> None:
    assert grid([ann(box(0, 0, 100, 100), None), ann(box(0, 0, 50, 50), "Ignore*")]) == []
    assert len(grid([], select="all")) == 16


def test_tile_json_round_trip() -> None:
    tiles = [Tile(1, 128.0, 256.0, 0.5, (1, 2, 3), 0.25), Tile(0, 0.0, 0.0, 1.0, (0,), None)]
    assert tiles_from_json(tiles_to_json(tiles)) == tiles
    with pytest.raises(ConfigError):
        tiles_from_json([[1, 2]])
    with pytest.raises(ConfigError):
        tiles_from_json({"a": 1})


def _entry(i: int, **kw: object) -> ManifestEntry:
    base: dict[str, object] = dict(entry_id=i, image_name=f"img{i}.tif",
                                   slide_path=f"/x/img{i}.tif", image_found=True, mpp=0.5,
                                   width=100, height=100, annotation_file=None, status="ok")
    base.update(kw)
    return ManifestEntry(**base)  # type: ignore[arg-type]


def test_slides_from_manifest_skips_and_groups() -> None:
    m = Manifest("p", CM, [
        _entry(0, metadata={"Grade": "2"}),
        _entry(1, tags=["grade:3"]),
        _entry(2, status="no-labels", problem="no labelled annotations"),
        _entry(3, tags=["other"]),
    ])
    with pytest.warns(DataWarning, match="entry 2"):
        recs = slides_from_manifest(m, group_by="grade")
    assert [r.entry_id for r in recs] == [0, 1, 3]
    assert [r.group for r in recs] == ["2", "3", None]
    assert recs[0].key == "img0.tif"
    bad = Manifest("p", CM, [_entry(0, status="failed", problem="x")])
    with pytest.warns(DataWarning), pytest.raises(LabelError):
        slides_from_manifest(bad)


def test_slide_record_validation() -> None:
    with pytest.raises(ConfigError):
        SlideRecord("/x.tif", mpp=0.0, width=10, height=10)
    with pytest.raises(ConfigError):
        SlideRecord("/x.tif", mpp=0.5, width=0, height=10)


def test_build_tiles_with_tissue_detection_and_empty_slide(tmp_path: Path) -> None:
    proj = make_project(tmp_path, n_slides=1, width=512, height=512, seed=1)
    m = import_project(proj.path, use_paquo=False)
    rec = slides_from_manifest(m)[0]
    empty = SlideRecord(rec.path, rec.mpp, rec.width, rec.height, annotations=[])
    tiles = build_tiles([rec, empty], m.class_map, tile_px=64, mpp=1.0,
                        tissue_method="hsv", select="either")
    assert {t.slide for t in tiles} == {0, 1}  # the empty slide still has tissue tiles
    assert all(t.tissue_fraction is not None for t in tiles)
    labelled = [t for t in tiles if t.slide == 0 and t.labelled_fraction >= FOCUS_GAMMA]
    assert labelled == build_tiles([rec], m.class_map, tile_px=64, mpp=1.0,
                                   tissue_method="hsv", select="labelled")
    with pytest.warns(DataWarning, match="no tile"):
        assert build_tiles([rec, empty], m.class_map, tile_px=64, mpp=1.0)[-1].slide == 0


_json_atoms = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                        st.text(max_size=3))
_json = st.recursive(_json_atoms, lambda inner: st.lists(inner, max_size=7), max_leaves=20)


@given(_json)
@settings(max_examples=200, deadline=None)
def test_fuzz_tile_reader(data: object) -> None:
    try:
        tiles = tiles_from_json(data)
    except QpsegError:
        return
    assert all(isinstance(t, Tile) for t in tiles)


@pytest.mark.parametrize("mpp", [0.0, 0.001, 352.8, float("nan"), float("inf")])
def test_pixel_sizes_are_checked_by_the_one_rule(mpp: float) -> None:
    """A slide record, a tile grid and a tile dataset refuse what slide.mpp_problem refuses:
    352.8 (a 72-dpi tag) and 0.001 (nm taken for µm) passed the old "> 0" checks."""
    from qpseg.data.dataset import TileDataset

    cm = ClassMap.from_names(["Tumor"])
    with pytest.raises(ConfigError, match="plausible pixel size"):
        SlideRecord("/x.tif", mpp=mpp, width=10, height=10)
    for base_mpp, tile_mpp in ((mpp, 0.5), (0.5, mpp)):
        with pytest.raises(ConfigError, match="plausible pixel size"):
            tile_grid([], cm, image_size=(100, 100), base_mpp=base_mpp, tile_px=8,
                      mpp=tile_mpp, select="all")
    with pytest.raises(ConfigError, match="plausible pixel size"):
        TileDataset([], [], cm, tile_px=8, mpp=mpp)
