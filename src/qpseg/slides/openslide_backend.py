"""The OpenSlide backend: :class:`OpenSlideSlide` wraps an ``openslide.OpenSlide`` handle (or any
object with its interface, :class:`OpenSlideLike`) and reads the pixel size from OpenSlide's
properties (``openslide.mpp-x/y``, else the ``tiff.*`` resolution tags).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from qpseg.errors import SlideError
from qpseg.slides.base import Slide, _composite_on_white, _one_line

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["OpenSlideLike", "OpenSlideSlide"]


class OpenSlideLike(Protocol):
    """The part of ``openslide.OpenSlide`` that :class:`OpenSlideSlide` uses (for test stubs)."""

    @property
    def properties(self) -> Mapping[str, str]: ...

    @property
    def level_dimensions(self) -> Sequence[tuple[int, int]]: ...

    @property
    def level_downsamples(self) -> Sequence[float]: ...

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image: ...

    def close(self) -> None: ...


def _float_prop(props: Mapping[str, str], key: str) -> float | None:
    raw = props.get(key)
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _mpp_from_tiff_props(props: Mapping[str, str]) -> tuple[float, float] | None:
    """Pixel size from OpenSlide's ``tiff.*`` properties (used when OpenSlide gave none)."""
    unit = props.get("tiff.ResolutionUnit", "").lower()
    um_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    xres, yres = _float_prop(props, "tiff.XResolution"), _float_prop(props, "tiff.YResolution")
    if um_per_unit is None or not xres or not yres:
        return None
    return um_per_unit / xres, um_per_unit / yres


class OpenSlideSlide(Slide):
    """A slide read by OpenSlide (or by any object with OpenSlide's interface, for tests)."""

    backend = "openslide"

    def __init__(
        self,
        path: Path,
        handle: OpenSlideLike,
        *,
        mpp: float | None = None,
        vendor: str | None = None,
    ) -> None:
        self._handle = handle
        try:
            props = {str(k): str(v) for k, v in handle.properties.items()}
            dims = [(int(w), int(h)) for w, h in handle.level_dimensions]
            downs = [float(d) for d in handle.level_downsamples]
        except Exception as exc:
            raise SlideError(f"cannot read slide metadata: {_one_line(exc)}", path) from exc
        mx, my = _float_prop(props, "openslide.mpp-x"), _float_prop(props, "openslide.mpp-y")
        native: tuple[float, float] | None
        if mx is not None and my is not None:
            native = (mx, my)
        elif mx is not None or my is not None:
            one = mx if mx is not None else my
            assert one is not None
            native = (one, one)  # only one axis given: square pixels
        else:
            native = _mpp_from_tiff_props(props)
        mag = _float_prop(props, "openslide.objective-power")
        super().__init__(
            path,
            level_dimensions=dims,
            level_downsamples=downs,
            properties=props,
            vendor=props.get("openslide.vendor", vendor),
            native_mpp=native,
            magnification=mag if mag is not None and mag > 0 else None,
            mpp=mpp,
        )

    def _handle_read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        self._check_open()
        try:
            return self._handle.read_region(location, level, size)
        except Exception as exc:  # OpenSlideError, or anything a stub/handle raises
            raise SlideError(f"cannot read pixels: {_one_line(exc)}", self.path) from exc

    def _read_region_rgba(self, x: int, y: int, level: int, w: int, h: int) -> Image.Image:
        img = self._handle_read((x, y), level, (w, h))
        return img if img.mode == "RGBA" else img.convert("RGBA")

    def _read_level(
        self, level: int, x: int, y: int, w: int, h: int
    ) -> tuple[np.ndarray, float, float]:
        lw, lh = self._level_dimensions[level]
        canvas = np.full((h, w, 3), 255, dtype=np.uint8)
        cx0, cy0 = max(x, 0), max(y, 0)
        cx1, cy1 = min(x + w, lw), min(y + h, lh)
        if cx0 >= cx1 or cy0 >= cy1:
            return canvas, 0.0, 0.0
        ds = self._level_downsamples[level]
        # OpenSlide maps level-0 location to level coordinates by dividing by its (mean)
        # downsample and interpolates at fractional positions: report the sub-pixel shift.
        loc_x, loc_y = round(cx0 * ds), round(cy0 * ds)
        dx, dy = (loc_x / ds - cx0, loc_y / ds - cy0) if level else (0.0, 0.0)
        img = self._handle_read((loc_x, loc_y), level, (cx1 - cx0, cy1 - cy0))
        try:
            rgba = np.asarray(img.convert("RGBA") if img.mode != "RGBA" else img)
        except Exception as exc:
            raise SlideError(f"cannot read pixels: {_one_line(exc)}", self.path) from exc
        canvas[cy0 - y:cy1 - y, cx0 - x:cx1 - x] = _composite_on_white(rgba)
        return canvas, dx, dy

    def _close(self) -> None:
        self._handle.close()
