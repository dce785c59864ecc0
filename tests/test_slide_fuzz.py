"""Fuzzing qpseg.slide: any file or request ends in a result or a SlideError, nothing else."""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpseg.errors import SlideError
from qpseg.slide import Slide, open_slide
from qpseg.testing.synthetic import SyntheticSlide, make_plain_image, make_slide

SUFFIXES = (".svs", ".tiff", ".tif", ".png", ".jpg", ".dcm", ".ndpi", ".mrxs")
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _exercise(path: Path) -> None:
    """Open and read a little; only SlideError may come out."""
    try:
        s = open_slide(path)
    except SlideError as exc:
        assert "\n" not in str(exc)
        return
    with s:
        for call in (lambda: s.read_region_mpp(0, 0, 8, 8),
                     lambda: s.read_region((0, 0), s.level_count - 1, (4, 4)),
                     lambda: s.get_thumbnail((16, 16)),
                     lambda: s.mpp):
            with contextlib.suppress(SlideError):
                call()


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qpseg-fuzz-") as d:
        yield Path(d)


@FUZZ
@given(data=st.binary(min_size=0, max_size=2048), suffix=st.sampled_from(SUFFIXES),
       magic=st.sampled_from([b"", b"II*\x00", b"MM\x00*", b"II+\x00", b"\x89PNG\r\n\x1a\n",
                              b"\xff\xd8\xff\xe0", b"DICM"]))
def test_random_bytes_never_crash(scratch: Path, data: bytes, suffix: str, magic: bytes) -> None:
    path = scratch / f"random{suffix}"
    path.write_bytes(magic + data)
    _exercise(path)


@pytest.fixture(scope="module")
def seed_files(image_fixtures: Path) -> list[bytes]:
    names = ["openslide/small.svs", "openslide/boxes.tiff", "openslide/boxes.png",
             "openslide/boxes_0.dcm", "stardist/histo.jpg"]
    return [(image_fixtures / n).read_bytes() for n in names]


@FUZZ
@given(which=st.integers(0, 4), suffix=st.sampled_from(SUFFIXES),
       edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 1 << 16)))
def test_mutated_real_files_never_crash(
    scratch: Path, seed_files: list[bytes], which: int, suffix: str,
    edits: list[tuple[int, int]], cut: int | None,
) -> None:
    data = bytearray(seed_files[which])
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    path = scratch / f"mutated{suffix}"
    path.write_bytes(bytes(data))
    _exercise(path)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSlide, Slide]:
    path = tmp_path_factory.mktemp("fuzz") / "gen.tiff"
    syn = make_slide(path, width=500, height=400, levels=[1, 2.5, 7], tile=64, seed=9)
    return syn, open_slide(path)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Slide:
    path = tmp_path_factory.mktemp("fuzz") / "plain.png"
    make_plain_image(path, width=120, height=90, seed=2)
    return open_slide(path, mpp=0.5)


coord = st.one_of(st.floats(-3000, 3000, allow_nan=False), st.integers(-10**12, 10**12),
                  st.sampled_from([math.nan, math.inf, -math.inf, 1e300]))
mpp = st.one_of(st.none(), st.floats(1e-7, 1e7), st.sampled_from([0.0, -1.0, math.nan, 0.5]))


@FUZZ
@given(x=coord, y=coord, w=st.integers(-2, 300), h=st.integers(-2, 300), target=mpp,
       use_plain=st.booleans())
def test_random_region_requests(
    generated: tuple[SyntheticSlide, Slide], plain: Slide, x: float, y: float, w: int, h: int,
    target: float | None, use_plain: bool,
) -> None:
    slide = plain if use_plain else generated[1]
    try:
        out = slide.read_region_mpp(x, y, w, h, mpp=target)
    except SlideError as exc:
        assert "\n" not in str(exc)
        return
    assert out.shape == (h, w, 3) and out.dtype == np.uint8


@FUZZ
@given(x=st.integers(-600, 600), y=st.integers(-600, 600), w=st.integers(1, 64),
       h=st.integers(1, 64), level=st.integers(-1, 3))
def test_random_read_region_matches_level0(
    generated: tuple[SyntheticSlide, Slide], x: int, y: int, w: int, h: int, level: int
) -> None:
    syn, slide = generated
    try:
        img = slide.read_region((x, y), level, (w, h))
    except SlideError:
        assert level not in range(slide.level_count)
        return
    assert img.mode == "RGBA" and img.size == (w, h)
    if level == 0:
        rgba = np.asarray(img)
        xa, ya = max(x, 0), max(y, 0)
        xb, yb = min(x + w, syn.width), min(y + h, syn.height)
        if xa < xb and ya < yb:
            inside = rgba[ya - y:yb - y, xa - x:xb - x]
            assert (inside[..., 3] == 255).all()
            assert np.array_equal(inside[..., :3], syn.render(xa, ya, xb - xa, yb - ya))
        assert int((rgba[..., 3] == 255).sum()) == max(0, xb - xa) * max(0, yb - ya)

