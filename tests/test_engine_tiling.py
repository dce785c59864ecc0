"""Tile plans (qpseg.engine.tiling) and slide sharding (qpseg.engine.distributed)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpseg.engine.distributed import DistContext, assign_shares, parse_shard
from qpseg.engine.stitch import hann_window
from qpseg.engine.tiling import check_reachable, inference_contract, plan_tiles
from qpseg.errors import ConfigError, ModelError, QpsegWarning, SlideError
from qpseg.models.contract import InputSpec, ModelContract
from qpseg.tissue import TissueMask


def _pixel(tile: int = 64, margin: int = 8, context: int = 0,
           scales: tuple[float, ...] = (1.0,)) -> ModelContract:
    inputs = tuple(InputSpec(f"in{k}", tile + 2 * context if k == 0 else tile, s)
                   for k, s in enumerate(scales))
    return ModelContract("t", 2, inputs, "pixel", tile, tile, context_px=context,
                         margin_px=margin)


def _coverage(plan: object) -> np.ndarray:
    """How many tiles' valid parts cover each map pixel (full grid)."""
    p = plan  # type: ignore[assignment]
    cov = np.zeros((p.map_height, p.map_width), dtype=int)  # type: ignore[attr-defined]
    for j in range(p.ny):  # type: ignore[attr-defined]
        for i in range(p.nx):  # type: ignore[attr-defined]
            x0, y0 = p.valid_start(i), p.valid_start(j)  # type: ignore[attr-defined]
            cov[max(y0, 0):max(y0 + p.valid, 0),  # type: ignore[attr-defined]
                max(x0, 0):max(x0 + p.valid, 0)] += 1  # type: ignore[attr-defined]
    return cov


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 700), h=st.integers(1, 700), ds=st.floats(0.3, 3.7),
       margin=st.integers(0, 20))
def test_center_valid_parts_partition_the_map(w: int, h: int, ds: float, margin: int) -> None:
    plan = plan_tiles(_pixel(margin=margin), slide_size=(w, h), slide_mpp=0.5,
                      base_mpp=0.5 * ds, max_upsample=10)
    assert plan.map_width == math.ceil(w / ds - 1e-9)
    assert plan.map_height == math.ceil(h / ds - 1e-9)
    # the map covers the image and no more than one pixel beyond it
    assert plan.map_width * ds >= w - 1e-6 and (plan.map_width - 1) * ds < w
    assert (_coverage(plan) == 1).all()
    assert plan.n_tiles == plan.nx * plan.ny
    # margins that would waste more than half a tile make the tile larger (not fixed-size)
    assert plan.tile_out == max(64, 4 * margin)
    assert plan.valid == plan.tile_out - 2 * margin and plan.step == plan.valid
    assert plan.inputs[0].size_px == plan.tile_out


@pytest.mark.parametrize("size", [(1, 1), (37, 201), (300, 300)])
def test_blend_windows_sum_to_one_inside(size: tuple[int, int]) -> None:
    plan = plan_tiles(_pixel(margin=6), slide_size=size, slide_mpp=0.5, base_mpp=0.5,
                      mode="blend")
    assert plan.step == plan.valid // 2 and plan.start == -plan.step
    w1 = hann_window(plan.valid, plan.margin)
    total = np.zeros(plan.map_width)
    for i in range(plan.nx):
        ox = plan.origin(i, 0)[0]
        for u in range(plan.tile_out):
            if 0 <= ox + u < plan.map_width:
                total[ox + u] += w1[u]
    # every map column is covered by two windows summing to 1 (52 is even)
    assert np.allclose(total, 1.0, atol=1e-6)


def test_larger_inference_tiles() -> None:
    c = _pixel(tile=64, margin=8, context=10)
    big = inference_contract(c, 256)
    assert (big.tile_px, big.output_px, big.inputs[0].size_px) == (256, 256, 276)
    plan = plan_tiles(c, slide_size=(1000, 1000), slide_mpp=1, base_mpp=1, tile_px=256)
    assert (plan.valid, plan.nx) == (240, 5)
    assert plan.reads(1, 0)[0] == (240 - 8 - 10, -8 - 10, 276, 1.0)


def test_input_reads_follow_the_contract() -> None:
    # FCN with context: input 0 is tile + 2 * context, starting context px before the tile
    c = _pixel(tile=512, margin=0, context=100)
    plan = plan_tiles(c, slide_size=(5000, 3000), slide_mpp=0.25, base_mpp=0.5)
    x, y, size, mpp = plan.reads(1, 2)[0]
    assert size == 712 and mpp == 0.5
    assert (x, y) == ((512 - 100) * 2.0, (1024 - 100) * 2.0)
    # DMMN: 20x/10x/5x fields of 256, 512 and 1024 base px centred on the tile
    d = ModelContract("d", 2, tuple(InputSpec(f"i{s}", 256, s) for s in (1.0, 2.0, 4.0)),
                      "pixel", 256, 256)
    plan = plan_tiles(d, slide_size=(4000, 4000), slide_mpp=0.5, base_mpp=0.5)
    reads = plan.reads(3, 1)
    centre = (3 * 256 + 128, 256 + 128)
    for (rx, ry, size, mpp), scale in zip(reads, (1.0, 2.0, 4.0), strict=True):
        assert size == 256 and mpp == 0.5 * scale
        assert (rx + 128 * scale, ry + 128 * scale) == centre


def test_patch_contract_gives_a_grid_map() -> None:
    c = ModelContract("p", 3, (InputSpec("image", 64, 1.0),), "patch", 64, 1,
                      output_stride=64)
    plan = plan_tiles(c, slide_size=(1000, 333), slide_mpp=0.5, base_mpp=1.0)
    assert plan.output_stride == 64 and plan.tile_out == 1 and plan.margin == 0
    assert (plan.map_width, plan.map_height) == (math.ceil(500 / 64), math.ceil(166.5 / 64))
    assert plan.map_downsample == 128.0 and plan.map_mpp == 64.0
    assert plan.reads(2, 1)[0] == (2 * 64 * 2.0, 64 * 2.0, 64, 1.0)


def test_instance_plans_keep_a_margin() -> None:
    c = ModelContract("n", 2, (InputSpec("image", 64, 1.0),), "instance", 64, 64)
    plan = plan_tiles(c, slide_size=(300, 200), slide_mpp=0.25, base_mpp=0.25,
                      instance_margin=12)
    assert plan.mode == "instance" and plan.margin == 12 and plan.valid == 40
    assert plan.write_start(1) == 40 - 12 and plan.write_end(1) == 40 - 12 + 64
    assert (_coverage(plan) == 1).all()


def test_tissue_selects_tiles_and_reports_the_fraction() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:, :3] = True  # the left 30 %
    tissue = TissueMask(mask, 10.0, 10.0)  # 100 x 100 level-0 px
    plan = plan_tiles(_pixel(tile=20, margin=0), slide_size=(100, 100), slide_mpp=1.0,
                      base_mpp=1.0, tissue=tissue)
    assert plan.nx == plan.ny == 5
    assert sorted({int(i) for i, _ in plan.tiles}) == [0, 1]  # columns 0-39 px hold tissue
    assert plan.n_tiles == 10 and plan.tissue_fraction == pytest.approx(0.3)
    # raster order: row by row
    assert [tuple(t) for t in plan.tiles[:3]] == [(0, 0), (1, 0), (0, 1)]


def test_reachability_and_bad_contracts() -> None:
    with pytest.raises(SlideError, match=r"finest level is 0\.5"):
        plan_tiles(_pixel(), slide_size=(100, 100), slide_mpp=0.5, base_mpp=0.25)
    check_reachable(0.2631, 0.25)  # 5 % upsampling is fine
    with pytest.raises(SlideError):
        check_reachable(0.5, float("nan"))
    fixed = replace(_pixel(tile=16, margin=8), fixed_size=True)
    with pytest.warns(QpsegWarning, match="does not fit"):
        plan = plan_tiles(fixed, slide_size=(100, 100), slide_mpp=1, base_mpp=1)
    assert (plan.tile_out, plan.margin) == (16, 3)
    with pytest.raises(ModelError, match="--tile-px"):
        inference_contract(fixed, 32)
    with pytest.raises(ModelError, match="multiple of 16"):
        inference_contract(replace(_pixel(), size_multiple=16), 100)
    whole = ModelContract("r", 2, (InputSpec("image", 64, None), InputSpec(
        "heatmap", 64, None, 1, kind="heatmap")), "pixel", 64, 64)
    with pytest.raises(ModelError, match="multi-stage"):
        plan_tiles(whole, slide_size=(100, 100), slide_mpp=1, base_mpp=1)


# ------------------------------------------------------------------------------ sharding

@settings(max_examples=200, deadline=None)
@given(st.text(max_size=12))
def test_parse_shard_fuzz(text: str) -> None:
    try:
        i, n = parse_shard(text)
    except ConfigError:
        return
    assert 0 <= i < n


def test_parse_shard_values() -> None:
    assert parse_shard(None) == (0, 1)
    assert parse_shard(" 2 / 4 ") == (2, 4)
    for bad in ("4/4", "1/0", "-1/2", "a/b", "1"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1e9), max_size=30), st.integers(1, 5), st.integers(1, 3))
def test_shares_cover_every_slide_once(sizes: list[float], n: int, world: int) -> None:
    shares = assign_shares(sizes, n)
    flat = sorted(k for s in shares for k in s)
    assert flat == list(range(len(sizes)))
    # ranks of every shard together run exactly that shard
    for i in range(n):
        ranks = [DistContext(r, world, r, (i, n)).my_indices(sizes) for r in range(world)]
        assert sorted(k for r in ranks for k in r) == shares[i]


def test_shares_balance_by_size() -> None:
    assert assign_shares([10, 1, 1, 1, 9], 2) == [[0, 2], [1, 3, 4]]  # loads 11 and 11
    assert assign_shares([1, 1, 1, 1], 2) == [[0, 2], [1, 3]]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1e9), max_size=30), st.integers(1, 4), st.integers(1, 3))
def test_shared_and_own_slides_cover_every_slide_once(sizes: list[float], n: int,
                                                      world: int) -> None:
    shares = assign_shares(sizes, n)
    for i in range(n):
        plans = [DistContext(r, world, r, (i, n)).plan_work(sizes) for r in range(world)]
        together = plans[0][0]
        assert all(p[0] == together for p in plans)  # every rank agrees on the shared ones
        own = sorted(k for p in plans for k in p[1])
        assert sorted(together + own) == shares[i] and not set(together) & set(own)
        fair = sum(max(sizes[k], 1.0) for k in shares[i]) / world
        assert all(sizes[k] > fair for k in together)


def test_only_a_slide_bigger_than_a_fair_share_is_shared() -> None:
    two = [DistContext(r, 2, r) for r in range(2)]
    assert [d.plan_work([100, 10, 10, 10]) for d in two] == [([0], [1, 3]), ([0], [2])]
    assert [d.plan_work([10, 10]) for d in two] == [([], [0]), ([], [1])]  # equal: whole
    assert two[0].plan_work([100, 1], splittable=False) == ([], [0])  # instance models
    assert DistContext().plan_work([100, 1]) == ([], [0, 1])  # one process
