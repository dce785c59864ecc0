"""On-disk maps, band-wise stitching, the OME-TIFF heatmap and the PNG overlay."""

from __future__ import annotations

import contextlib
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qpseg.engine.stitch import MapSet, Stitcher
from qpseg.engine.tiling import plan_tiles
from qpseg.engine.writers import (
    OVERLAY_GAP,
    MapFile,
    atomic_path,
    write_heatmap_ome_tiff,
    write_overlay_png,
)
from qpseg.errors import QpsegError
from qpseg.models.contract import InputSpec, ModelContract


def test_mapfile_roundtrip_and_numpy_compatibility(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 255, (3, 37, 53), dtype=np.uint8)
    with MapFile.create(tmp_path / "m.npy", ref.shape, np.uint8) as m:
        assert (np.asarray(m) == 0).all()  # a new map is zeros
        for c in range(3):
            for r0 in range(0, 37, 10):
                m.write_rows(r0, ref[c, r0:r0 + 10], channel=c)
    assert np.array_equal(np.load(tmp_path / "m.npy"), ref)  # a real .npy file
    with MapFile.open(tmp_path / "m.npy") as m:
        assert m.shape == (3, 37, 53) and m.dtype == np.uint8
        assert np.array_equal(m[1, 5:20, 7:30], ref[1, 5:20, 7:30])
        assert np.array_equal(m[2, 30:99, :], ref[2, 30:])  # slices clip like numpy
        assert np.array_equal(m[:, 3:4, 0:2], ref[:, 3:4, 0:2])
        assert np.array_equal(m.channel(0)[10:12, 50:53], ref[0, 10:12, 50:53])
        assert np.array_equal(np.asarray(m), ref)
        with pytest.raises(QpsegError, match="read-only"):
            m.write_rows(0, ref[0, :1], channel=0)
        with pytest.raises(IndexError):
            _ = m[0, ::2, :]
    i32 = np.arange(12 * 7, dtype=np.int32).reshape(12, 7)
    with MapFile.create(tmp_path / "i.npy", i32.shape, np.int32) as m:
        m.write_rows(3, i32[3:9])
        assert np.array_equal(m[3:9, 2:5], i32[3:9, 2:5])
        assert (m[0:3, :] == 0).all()
        with pytest.raises(ValueError, match="do not fit"):
            m.write_rows(10, i32[:5])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_mapfile_open_fuzz(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.npy"
    path.write_bytes(data)
    try:
        m = MapFile.open(path)
    except QpsegError:
        return
    with m, contextlib.suppress(QpsegError):
        np.asarray(m)


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "a.png"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


# --------------------------------------------------------------------------- stitching

def _field(c: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A 'model' whose output depends only on the map position: exact stitching known."""
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    v = (np.sin(0.05 * xx + 0.3 * c) * np.cos(0.04 * yy) + 1) / 2
    return v if c == 0 else 1 - v


def _tile_probs(plan: object, i: int, j: int) -> np.ndarray:
    p = plan  # type: ignore[assignment]
    ox, oy = p.origin(i, j)  # type: ignore[attr-defined]
    ys = np.arange(oy, oy + p.tile_out)  # type: ignore[attr-defined]
    xs = np.arange(ox, ox + p.tile_out)  # type: ignore[attr-defined]
    probs = np.stack([_field(c, ys, xs) for c in range(2)]).astype(np.float32)
    # margins hold garbage the stitcher must never use
    m = p.margin  # type: ignore[attr-defined]
    if m:
        probs[:, :m] = probs[:, -m:] = probs[:, :, :m] = probs[:, :, -m:] = 0.5
    return probs


@pytest.mark.parametrize("mode", ["center", "blend"])
def test_stitching_reproduces_a_position_field(tmp_path: Path, mode: str) -> None:
    c = ModelContract("t", 2, (InputSpec("image", 48, 1.0),), "pixel", 48, 48, margin_px=5)
    plan = plan_tiles(c, slide_size=(203, 131), slide_mpp=1.0, base_mpp=1.0, mode=mode)
    maps = MapSet.create(tmp_path / mode, (plan.map_height, plan.map_width), 2, "pixel")
    st_ = Stitcher(plan, maps, 2)
    assert st_.cap <= plan.tile_out  # the band never holds more than one tile's height
    for i, j in plan.tiles:
        probs = _tile_probs(plan, int(i), int(j))
        if mode == "center":
            q = np.floor(probs * 255 + 0.5).astype(np.uint8)
            st_.add(int(i), int(j), q, probs.argmax(0).astype(np.uint8))
        else:
            st_.add(int(i), int(j), probs)
    st_.finish()
    maps.close()
    got = np.load(tmp_path / mode / "probs.npy").astype(float) / 255
    ys, xs = np.arange(plan.map_height), np.arange(plan.map_width)
    want = np.stack([_field(k, ys, xs) for k in range(2)])
    assert np.abs(got - want).max() <= 0.5 / 255 + 1e-6
    cls = np.load(tmp_path / mode / "classes.npy")
    sure = np.abs(want[1] - want[0]) > 1e-3
    assert np.array_equal(cls[sure], want.argmax(0)[sure])


def test_stitcher_refuses_out_of_order_tiles(tmp_path: Path) -> None:
    c = ModelContract("t", 2, (InputSpec("image", 16, 1.0),), "pixel", 16, 16)
    plan = plan_tiles(c, slide_size=(64, 64), slide_mpp=1.0, base_mpp=1.0)
    maps = MapSet.create(tmp_path, (64, 64), 2, "pixel")
    st_ = Stitcher(plan, maps, 2)
    z = np.zeros((2, 16, 16), np.uint8)
    st_.add(0, 1, z)
    with pytest.raises(ValueError, match="raster order"):
        st_.add(0, 0, z)
    maps.close()


def test_instances_on_tile_borders_are_kept_once(tmp_path: Path) -> None:
    c = ModelContract("n", 2, (InputSpec("image", 32, 1.0),), "instance", 32, 32, margin_px=6)
    plan = plan_tiles(c, slide_size=(80, 40), slide_mpp=1.0, base_mpp=1.0)
    assert (plan.margin, plan.valid) == (6, 20)
    # Round objects (radius 4) at known map positions, some across valid-part borders.
    centres = [(10, 10), (20, 9), (39, 21), (40, 30), (59, 19), (75, 35)]
    yy, xx = np.mgrid[0:40, 0:80]
    maps = MapSet.create(tmp_path, (40, 80), 2, "instance")
    st_ = Stitcher(plan, maps, 2)
    for i, j in plan.tiles:
        ox, oy = plan.origin(int(i), int(j))
        masks, labels = [], []
        for cx, cy in centres:  # every tile sees every object inside its output window
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= 16
            win = np.zeros((32, 32), bool)
            y0, x0 = max(oy, 0), max(ox, 0)
            y1, x1 = min(oy + 32, 40), min(ox + 32, 80)
            win[y0 - oy:y1 - oy, x0 - ox:x1 - ox] = disc[y0:y1, x0:x1]
            if win.any():
                masks.append(win)
                labels.append(1)
        if masks:
            st_.add_instances(int(i), int(j), np.stack(masks), np.array(labels),
                              np.full(len(masks), 0.9))
    st_.finish()
    maps.close()
    inst = np.load(tmp_path / "instances.npy")
    ids = [i for i in np.unique(inst) if i]
    assert len(ids) == len(centres)  # each object once, whatever the tiles that saw it
    for cx, cy in centres:
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= 16
        assert len(np.unique(inst[disc])) == 1 and inst[disc][0] > 0
    assert (np.load(tmp_path / "scores.npy")[inst > 0] == 230).all()


# ------------------------------------------------------------------------ image outputs

def test_heatmap_is_a_pyramidal_ome_tiff(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, (700, 530), dtype=np.uint8)
    with MapFile.create(tmp_path / "p.npy", ref.shape, np.uint8) as m:
        m.write_rows(0, ref)
        out = write_heatmap_ome_tiff(tmp_path / "h.ome.tif", m, mpp=2.5, tile=128)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(700, 530), (350, 265), (175, 133), (88, 67)]
        assert np.array_equal(levels[0].asarray(), ref)
        lvl1 = levels[1].asarray().astype(float)
        want = ref.astype(float).reshape(350, 2, 265, 2).mean(axis=(1, 3))
        assert np.abs(lvl1 - want).max() <= 0.5
        assert 'PhysicalSizeX="2.5"' in (tif.ome_metadata or "")
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.ome.tif", "p.npy"]


def test_overlay_paints_classes_on_a_thumbnail(tmp_path: Path) -> None:
    from qpseg.testing.synthetic import make_slide

    s = make_slide(tmp_path / "s.tif", width=600, height=300, mpp=0.5)
    cls = np.zeros((150, 300), np.uint8)
    cls[:, 150:] = 1  # right half
    with s.open() as slide:
        out = write_overlay_png(tmp_path / "o.png", slide, cls, 2.0, [(0, 0, 0), (0, 0, 255)],
                                max_size=200)
        plain = slide.read_region_mpp(0, 0, 200, 100, 1.5)
    full = np.asarray(Image.open(out))
    assert full.shape[1] == 2 * 200 + OVERLAY_GAP and full.shape[0] > 100  # + the legend
    assert np.array_equal(full[:100, :200], plain)  # the raw thumbnail on the left
    img = full[:100, 200 + OVERLAY_GAP:]  # the painted one on the right
    assert np.array_equal(img[:, :99], plain[:, :99])  # left half untouched
    blue = img[:, 101:, 2].astype(int) - plain[:, 101:, 2].astype(int)
    assert (blue >= 0).all() and blue.mean() > 5
    assert math.isclose(img[:, 101:, 0].mean(), 0.55 * plain[:, 101:, 0].mean(), rel_tol=0.02)
    legend = full[100:]
    assert np.all(legend == (0, 0, 255), axis=-1).sum() >= 100  # class 1's swatch


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_state_file_fuzz(tmp_path_factory: pytest.TempPathFactory, data: bytes,
                         output: bool) -> None:
    """Whatever a state file holds, a slide's status is one of three answers."""
    from qpseg.engine import SlideJob, slide_status
    from qpseg.engine.run import STATE_DIR

    out = tmp_path_factory.mktemp("state")
    (out / STATE_DIR).mkdir()
    (out / STATE_DIR / "k.json").write_bytes(data)
    job = SlideJob("k", out / "k.tif", "k.tif", out / "k.geojson")
    if output:
        job.output.write_text("{}")
    status = slide_status(job, out)
    assert status in ("finished", "interrupted", "todo")
    if not output:
        assert status != "finished"


def _stitch(plan: object, maps: MapSet, mode: str, rows: tuple[int, int] | None) -> None:
    st_ = Stitcher(plan, maps, 2, rows=rows)  # type: ignore[arg-type]
    sub = plan if rows is None else plan.for_rows(*rows)  # type: ignore[attr-defined]
    for i, j in sub.tiles:
        probs = _tile_probs(plan, int(i), int(j))
        if mode == "center":
            st_.add(int(i), int(j), np.floor(probs * 255 + 0.5).astype(np.uint8))
        else:
            st_.add(int(i), int(j), probs)
    st_.finish()


@pytest.mark.parametrize("mode", ["center", "blend"])
@pytest.mark.parametrize("bands", [2, 3, 7, 40])
def test_row_bands_stitch_what_the_whole_slide_stitches(tmp_path: Path, mode: str,
                                                         bands: int) -> None:
    """Ranks sharing one slide: each stitches its band of rows from its share of tiles into
    the same files (here in reverse order); the maps equal one stitcher's, byte for byte."""
    c = ModelContract("t", 2, (InputSpec("image", 48, 1.0),), "pixel", 48, 48, margin_px=5)
    plan = plan_tiles(c, slide_size=(203, 331), slide_mpp=1.0, base_mpp=1.0, mode=mode)
    shape = (plan.map_height, plan.map_width)
    whole = MapSet.create(tmp_path / "whole", shape, 2, "pixel")
    _stitch(plan, whole, mode, None)
    whole.close()
    parts = plan.row_bands(bands)
    assert parts[0][0] == 0 and parts[-1][1] == plan.map_height
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    split = MapSet.create(tmp_path / "split", shape, 2, "pixel")
    split.close()
    for rows in reversed(parts):
        band = MapSet.open(tmp_path / "split", writable=True)
        _stitch(plan, band, mode, rows)
        band.close()
    for name in ("classes.npy", "probs.npy"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "split" / name).read_bytes()
    n = [plan.for_rows(*r).n_tiles for r in parts]
    if mode == "center":  # every tile in exactly one band, bands about equal
        assert sum(n) == plan.n_tiles
        if bands == 2:
            assert abs(n[0] - n[1]) <= plan.nx
    else:  # a tile row across an edge is run by both bands
        assert plan.n_tiles <= sum(n) <= plan.n_tiles + (bands - 1) * plan.nx
