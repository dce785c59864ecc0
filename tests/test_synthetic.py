"""qpseg.testing.synthetic: generated slides open in OpenSlide and match their ground truth."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from shapely.geometry import Polygon, box

from qpseg.errors import SlideError
from qpseg.slide import open_slide
from qpseg.testing.synthetic import (
    SyntheticRegion,
    SyntheticSlide,
    make_plain_image,
    make_slide,
    random_layout,
    random_regions,
    resolve_overlaps,
)

# Mean colour ranges (inclusive) of a 32x32 level-0 patch inside each class.
COLOUR_RANGES = {
    "Tumor": ((110, 160), (55, 100), (130, 175)),
    "Stroma": ((220, 250), (160, 195), (190, 218)),
    "Necrosis": ((180, 212), (165, 195), (175, 202)),
}


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[0] // f, a.shape[1] // f
    m = a[:h * f, :w * f].astype(np.float64).reshape(h, f, w, f, 3).mean(axis=(1, 3))
    return np.floor(m + 0.5)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    path = tmp_path_factory.mktemp("syn") / "pyramid.tiff"
    return make_slide(path, width=1000, height=700, levels=[1, 2, 4], seed=1, tile=128)


@pytest.fixture(scope="module")
def odd_levels(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    path = tmp_path_factory.mktemp("syn") / "odd.tiff"
    return make_slide(path, width=900, height=700, levels=[1, 3.3, 10.7], seed=4, tile=128)


@pytest.mark.parametrize(
    ("width", "height", "levels", "tile", "dims"),
    [
        (300, 200, [1], 256, [(300, 200)]),
        (600, 400, [1, 2, 4], 128, [(600, 400), (300, 200), (150, 100)]),
        (601, 451, [1, 3.3, 10.7], 64, [(601, 451), (182, 137), (56, 42)]),
        (520, 300, None, 128, [(520, 300), (130, 75)]),
    ],
)
def test_openslide_opens_generated_pyramid(
    tmp_path: Path, width: int, height: int, levels: list[float] | None, tile: int,
    dims: list[tuple[int, int]],
) -> None:
    path = tmp_path / "s.tiff"
    syn = make_slide(path, width=width, height=height, levels=levels, tile=tile, mpp=0.25,
                     seed=7)
    assert list(syn.level_dimensions) == dims
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    osr = openslide.OpenSlide(str(path))
    try:
        assert list(osr.level_dimensions) == dims
        assert osr.level_downsamples == pytest.approx(syn.level_downsamples)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.25)
        assert int(osr.properties["openslide.level[0].tile-width"]) == tile
        # Deflate is lossless: level 0 is exactly the renderer's output.
        level0 = np.asarray(osr.read_region((0, 0), 0, (width, height)))
        assert (level0[..., 3] == 255).all()
        assert np.array_equal(level0[..., :3], syn.render())
    finally:
        osr.close()
    with open_slide(path) as s:
        assert s.vendor == "generic-tiff" and s.mpp == pytest.approx(0.25)
        assert s.level_count == len(dims)


def test_class_regions_have_their_colours(pyramid: SyntheticSlide) -> None:
    seen = set()
    with pyramid.open() as s:
        for reg in pyramid.regions:
            inner = reg.geometry.buffer(-20)
            if inner.is_empty:
                continue
            p = inner.representative_point()
            x, y = int(p.x) - 16, int(p.y) - 16
            assert (pyramid.label_map(x, y, 32, 32)
                    == pyramid.class_names.index(reg.class_name) + 1).all()
            mean = s.read_region_mpp(x, y, 32, 32).reshape(-1, 3).mean(axis=0)
            for value, (lo, hi) in zip(mean, COLOUR_RANGES[reg.class_name], strict=True):
                assert lo <= value <= hi, (reg.class_name, mean)
            seen.add(reg.class_name)
        assert seen == {"Tumor", "Stroma", "Necrosis"}
        corner = s.read_region_mpp(0, 0, 16, 16)  # outside the tissue blob
        assert np.abs(corner.astype(int) - 240).max() <= 2


def test_twice_the_pixel_size_is_a_block_mean(pyramid: SyntheticSlide, tmp_path: Path) -> None:
    flat = make_slide(tmp_path / "flat.tiff", width=1000, height=700, levels=[1], seed=1,
                      tile=128)
    with pyramid.open() as s, flat.open() as f:
        level0 = s.read_region_mpp(200, 100, 400, 300)
        expected = _block_mean(level0, 2)
        from_level1 = s.read_region_mpp(200, 100, 200, 150, mpp=1.0)
        from_level0 = f.read_region_mpp(200, 100, 200, 150, mpp=1.0)
        assert np.abs(from_level1.astype(int) - expected).max() <= 1
        assert np.abs(from_level0.astype(int) - expected).max() <= 1
        # 4x: level 2 is the 4x4 mean of level 0 as well.
        quarter = s.read_region_mpp(200, 100, 100, 75, mpp=2.0)
        assert np.abs(quarter.astype(int) - _block_mean(level0, 4)).max() <= 1


def test_non_integer_levels_agree_with_level0(odd_levels: SyntheticSlide) -> None:
    with odd_levels.open() as s:
        assert s.level_dimensions == ((900, 700), (273, 212), (84, 65))
        assert s.level_downsamples == pytest.approx((1.0, (900 / 273 + 700 / 212) / 2,
                                                     (900 / 84 + 700 / 65) / 2))
        for level in (1, 2):
            ds = s.level_downsamples[level]
            target = 0.5 * ds
            assert s.get_best_level_for_downsample(ds) == level
            w, h = 60, 50
            from_level = s.read_region_mpp(200, 150, w, h, mpp=target)
            level0 = s.read_region_mpp(200, 150, round(w * ds) + 2, round(h * ds) + 2)
            ref = np.asarray(Image.fromarray(level0).resize(
                (w, h), Image.Resampling.BOX, box=(0, 0, w * ds, h * ds)))
            diff = np.abs(from_level.astype(int) - ref.astype(int))
            assert diff.mean() < 8, (level, diff.mean())
            assert np.abs(from_level.mean(axis=(0, 1)) - ref.mean(axis=(0, 1))).max() < 3


def test_class_areas_match_pixel_counts(odd_levels: SyntheticSlide, pyramid: SyntheticSlide
                                        ) -> None:
    for syn in (odd_levels, pyramid):
        labels = syn.label_map()
        assert labels.shape == (syn.height, syn.width)
        areas = syn.class_areas_px()
        assert set(areas) == {"Tumor", "Stroma", "Necrosis"}
        for i, name in enumerate(syn.class_names):
            count = int((labels == i + 1).sum())
            assert count == pytest.approx(areas[name], rel=0.01), name
            assert areas[name] > 0.01 * syn.width * syn.height
        # Tissue mask: every class pixel is non-background.
        tissue = syn.tissue_mask()
        assert tissue[labels > 0].all()
        assert 0.2 < tissue.mean() < 0.8


def test_random_layout_properties() -> None:
    holes = 0
    for seed in range(4):
        tissue, regions = random_layout(2000, 1500, seed=seed)
        assert tissue.is_valid and tissue.area > 0.2 * 2000 * 1500
        assert box(0, 0, 2000, 1500).contains(tissue)
        assert {r.class_name for r in regions} == {"Tumor", "Stroma", "Necrosis"}
        for i, a in enumerate(regions):
            assert a.geometry.is_valid and a.geometry.geom_type in ("Polygon", "MultiPolygon")
            assert a.geometry.difference(tissue).area < 1e-6
            for b in regions[i + 1:]:
                assert a.geometry.intersection(b.geometry).area < 1e-6
            parts = getattr(a.geometry, "geoms", [a.geometry])
            holes += sum(len(p.interiors) for p in parts)
    assert holes > 0
    # Deterministic from the seed, different between seeds.
    r1 = random_regions(800, 600, seed=3)
    r2 = random_regions(800, 600, seed=3)
    r3 = random_regions(800, 600, seed=4)
    assert [r.geometry.wkt for r in r1] == [r.geometry.wkt for r in r2]
    assert [r.geometry.wkt for r in r1] != [r.geometry.wkt for r in r3]
    custom = random_regions(800, 600, seed=1, classes=("Immune cells", "Other"), n=4)
    assert {r.class_name for r in custom} == {"Immune cells", "Other"}


def test_explicit_regions_later_drawn_on_top(tmp_path: Path) -> None:
    a = SyntheticRegion("Stroma", box(10, 10, 110, 60))
    b = SyntheticRegion("Tumor", box(60, 20, 150, 50))
    hole = SyntheticRegion("Necrosis", Polygon([(200, 10), (290, 10), (290, 90), (200, 90)],
                                               [[(230, 30), (260, 30), (260, 60), (230, 60)]]))
    outside = SyntheticRegion("Tumor", box(280, 80, 400, 200))  # clipped to the image
    syn = make_slide(tmp_path / "e.tiff", width=300, height=100, levels=[1], tile=64,
                     regions=[a, b, hole, outside], seed=2)
    areas = syn.class_areas_px()
    assert areas["Stroma"] == pytest.approx(100 * 50 - 50 * 30)
    assert areas["Tumor"] == pytest.approx(90 * 30 + 20 * 20)
    assert areas["Necrosis"] == pytest.approx(90 * 80 - 30 * 30 - 10 * 10)
    labels = syn.label_map()
    names = syn.class_names
    assert labels[35, 80] == names.index("Tumor") + 1  # b over a
    assert labels[35, 30] == names.index("Stroma") + 1
    assert labels[45, 245] == 0  # inside the hole
    assert labels[85, 290] == names.index("Tumor") + 1
    for i, name in enumerate(names):
        assert int((labels == i + 1).sum()) == pytest.approx(areas[name], rel=0.01)
    # Without a tissue argument the tissue is the union of the regions: the hole is background.
    with syn.open() as s:
        assert np.abs(s.read_region_mpp(240, 40, 10, 10).astype(int) - 240).max() <= 2


def test_resolve_overlaps_drops_empty_regions() -> None:
    big = SyntheticRegion("Tumor", box(0, 0, 50, 50))
    covered = SyntheticRegion("Stroma", box(10, 10, 20, 20))
    out = resolve_overlaps([covered, big], 100, 100)
    assert [r.class_name for r in out] == ["Tumor"]
    assert resolve_overlaps([SyntheticRegion("X", box(200, 200, 300, 300))], 100, 100) == []


def test_deterministic_file_and_seed_changes_pixels(tmp_path: Path) -> None:
    kw = {"width": 300, "height": 200, "levels": [1, 2], "tile": 64}
    s1 = make_slide(tmp_path / "a.tiff", seed=5, **kw)
    s2 = make_slide(tmp_path / "b.tiff", seed=5, **kw)
    s3 = make_slide(tmp_path / "c.tiff", seed=6, **kw)
    digest = [hashlib.sha256(s.path.read_bytes()).hexdigest() for s in (s1, s2, s3)]
    assert digest[0] == digest[1] != digest[2]
    assert not np.array_equal(s1.render(), s3.render())


def test_writing_uses_bounded_memory(tmp_path: Path) -> None:
    make_slide(tmp_path / "warm.tiff", width=64, height=64, levels=[1], tile=64)  # imports
    peaks = []
    for width, height in ((300, 200), (1600, 1000)):
        tracemalloc.start()
        try:
            make_slide(tmp_path / "m.tiff", width=width, height=height, levels=[1], tile=64)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    # 27x more pixels, (almost) the same peak, far below the 4.8 MB of raw level-0 pixels.
    assert peaks[1] < 1.5 * peaks[0] + 500_000, peaks
    assert peaks[1] < 1600 * 1000 * 3 / 3, peaks


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        make_slide(tmp_path / "x.tiff", width=100, height=100, tile=100)
    with pytest.raises(ValueError, match="first level"):
        make_slide(tmp_path / "x.tiff", width=100, height=100, levels=[2, 4])
    with pytest.raises(ValueError, match="must shrink"):
        make_slide(tmp_path / "x.tiff", width=100, height=100, levels=[1, 1.001])
    with pytest.raises(ValueError, match="mpp"):
        make_slide(tmp_path / "x.tiff", width=100, height=100, mpp=0)
    with pytest.raises(ValueError, match="suffix"):
        make_plain_image(tmp_path / "x.gif", width=10, height=10)


@pytest.mark.parametrize(("name", "mode"), [("p.png", "RGB"), ("p.jpg", "RGB"),
                                            ("p.tif", "RGB"), ("g.png", "L"),
                                            ("g16.tif", "I;16"), ("g16.png", "I;16")])
def test_plain_images_have_no_mpp(tmp_path: Path, name: str, mode: str) -> None:
    syn = make_plain_image(tmp_path / name, width=320, height=200, seed=3, mode=mode)
    assert syn.mpp is None and syn.level_dimensions == ((320, 200),)
    with open_slide(syn.path) as s:
        assert s.backend in ("pillow", "tifffile")
        assert s.dimensions == (320, 200)
        assert not s.has_mpp
        with pytest.raises(SlideError, match="--mpp"):
            _ = s.mpp
        rgb = s.read_region_mpp(0, 0, 320, 200)
    ref = syn.render()
    if mode == "RGB" and not name.endswith(".jpg"):
        assert np.array_equal(rgb, ref)
    elif mode == "RGB":
        assert np.abs(rgb.astype(int) - ref).mean() < 6
    else:
        gray = np.rint(ref.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
        if mode == "I;16":  # 16-bit is scaled by the image maximum
            gray = np.rint(gray * 257 * 255 / (gray.max() * 257))
        assert np.abs(rgb[..., 0].astype(int) - gray).max() <= 1
        assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_empty_and_custom_class_layouts(tmp_path: Path) -> None:
    blank = make_slide(tmp_path / "blank.tiff", width=200, height=100, levels=[1], tile=64,
                       regions=[])
    assert blank.regions == () and blank.class_areas_px() == {}
    assert blank.tissue.is_empty
    with blank.open() as s:
        assert np.abs(s.read_region_mpp(0, 0, 200, 100).astype(int) - 240).max() <= 2
    # Unknown class names get distinct fallback colours.
    regions = [SyntheticRegion("Immune cells", box(0, 0, 100, 100)),
               SyntheticRegion("Other", box(100, 0, 200, 100))]
    syn = make_slide(tmp_path / "custom.tiff", width=200, height=100, levels=[1], tile=64,
                     regions=regions)
    assert syn.class_names == ("Immune cells", "Other")
    img = syn.render()
    left, right = img[10:90, 10:90].mean(axis=(0, 1)), img[10:90, 110:190].mean(axis=(0, 1))
    assert np.abs(left - right).max() > 40
