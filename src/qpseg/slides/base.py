"""The :class:`Slide` interface every backend shares: OpenSlide-like metadata and reads, the
pixel size in use, QuPath <-> level-0 coordinates (the bounds offset) and resampled reads at a
target pixel size (:meth:`Slide.read_region_mpp`), plus the small helpers the backends share.

Backends subclass :class:`Slide` and implement only ``_read_level`` and ``_read_region_rgba``.
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from qpseg.errors import SlideError
from qpseg.slides.pixel_size import PixelSize, choose_pixel_size, mpp_problem

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["LEVEL_TOLERANCE", "MAX_OUTPUT_PIXELS", "MAX_READ_PIXELS", "Slide"]

#: read_region_mpp() refuses outputs larger than this many pixels (memory safety).
MAX_OUTPUT_PIXELS = 10_000 * 10_000
#: Largest source window (pixels) read and resampled at once; bigger requests are done in bands.
MAX_READ_PIXELS = 1 << 26
#: A pyramid level whose downsample exceeds the target by at most this fraction may be used.
LEVEL_TOLERANCE = 1e-3
# Target downsamples outside this range are nonsense (1000x upsampling, or 1e6x downsampling).
_MIN_DOWNSAMPLE = 1e-3
_MAX_DOWNSAMPLE = 1e6
# Source pixels read around a resampling box, so interpolation at its edges sees real neighbours.
_MARGIN = 2


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _check_size(w: int, h: int, what: str, path: Path, limit: int) -> tuple[int, int]:
    try:
        w, h = operator.index(w), operator.index(h)
    except TypeError as exc:
        raise SlideError(f"{what} size must be integers, got {w!r}x{h!r}", path) from exc
    if w <= 0 or h <= 0:
        raise SlideError(f"{what} size must be positive, got {w}x{h}", path)
    if w * h > limit:
        raise SlideError(
            f"{what} of {w}x{h} pixels is larger than the limit of {limit} pixels; "
            "read it in tiles", path)
    return w, h


def _finite(value: float, what: str, path: Path) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SlideError(f"{what} must be a number, got {value!r}", path) from exc
    if not math.isfinite(v):
        raise SlideError(f"{what} must be finite, got {value!r}", path)
    return v



def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) uint8 RGBA (not premultiplied) -> (h, w, 3) uint8 RGB over white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if bool((alpha == 255).all()):
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class Slide(ABC):
    """A whole-slide image or plain image behind an OpenSlide-like interface.

    Create slides with :func:`open_slide`. Subclasses implement ``_read_level`` and
    ``_read_region_rgba``; everything else (pixel size, bounds, QuPath coordinates, resampled
    reads, thumbnails) lives here so every backend behaves the same. A slide may be read from
    several threads; for DataLoader worker processes open one slide per worker (see
    :mod:`qpseg.slide`).
    """

    #: ``"openslide"``, ``"tifffile"`` or ``"pillow"``.
    backend: str = ""

    def __init__(
        self,
        path: Path,
        *,
        level_dimensions: Sequence[tuple[int, int]],
        level_downsamples: Sequence[float] | None = None,
        properties: Mapping[str, str] | None = None,
        vendor: str | None = None,
        native_mpp: tuple[float, float] | None = None,
        magnification: float | None = None,
        mpp: float | None = None,
    ) -> None:
        self.path = path
        dims = [(int(w), int(h)) for w, h in level_dimensions]
        if not dims or any(w <= 0 or h <= 0 for w, h in dims):
            raise SlideError(f"image has no pixels (level sizes {dims})", path)
        self._level_dimensions = tuple(dims)
        w0, h0 = dims[0]
        if level_downsamples is None:
            # OpenSlide's definition: the mean of the width and height ratios.
            level_downsamples = [(w0 / w + h0 / h) / 2 for w, h in dims]
        self._level_downsamples = tuple(float(d) for d in level_downsamples)
        self._properties = dict(properties or {})
        self._vendor = vendor
        self._native_mpp = native_mpp
        self._magnification = magnification
        self._mpp_override = mpp
        self._chosen_mpp: PixelSize | None = None
        self._closed = False
        self._bounds = self._parse_bounds()

    # ----------------------------------------------------------------------------- metadata
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size ``(width, height)`` in pixels of the file (not bounds-cropped)."""
        return self._level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels (1 for plain images)."""
        return len(self._level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every level, level 0 first."""
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of every level relative to level 0 (as OpenSlide reports it)."""
        return self._level_downsamples

    @property
    def properties(self) -> dict[str, str]:
        """A copy of the slide's metadata (OpenSlide property names; ``tiff.*`` for TIFFs)."""
        return dict(self._properties)

    @property
    def vendor(self) -> str | None:
        """OpenSlide's vendor (``aperio``, ``generic-tiff``, ``dicom``, ...) or the image format
        (``tiff``, ``png``, ``jpeg``, ...) for plain images."""
        return self._vendor

    @property
    def magnification(self) -> float | None:
        """Objective power (``openslide.objective-power``), or None when the slide has none."""
        return self._magnification

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """``(x, y, width, height)`` of the non-empty area in level-0 pixels
        (``openslide.bounds-*``; the whole image when the slide has no bounds)."""
        return self._bounds

    def _parse_bounds(self) -> tuple[int, int, int, int]:
        w, h = self.dimensions

        def prop(name: str, default: int) -> int:
            raw = self._properties.get(f"openslide.bounds-{name}")
            if raw is None:
                return default
            try:
                return int(raw)
            except ValueError as exc:
                raise SlideError(f"invalid openslide.bounds-{name} {raw!r}", self.path) from exc

        bx, by = prop("x", 0), prop("y", 0)
        return bx, by, prop("width", w - bx), prop("height", h - by)

    # -------------------------------------------------------------------- QuPath coordinates
    @property
    def qupath_dimensions(self) -> tuple[int, int]:
        """Image ``(width, height)`` as QuPath reports it: the bounds size."""
        return self._bounds[2], self._bounds[3]

    def qupath_to_level0(self, x: float, y: float) -> tuple[float, float]:
        """QuPath pixel coordinates -> level-0 coordinates of the file (adds the bounds offset)."""
        return x + self._bounds[0], y + self._bounds[1]

    def level0_to_qupath(self, x: float, y: float) -> tuple[float, float]:
        """Level-0 coordinates of the file -> QuPath pixel coordinates (removes the offset)."""
        return x - self._bounds[0], y - self._bounds[1]

    # ------------------------------------------------------------------------------ pixel size
    @property
    def native_mpp(self) -> tuple[float, float] | None:
        """``(mpp_x, mpp_y)`` as stored in the file, unchecked (None when the file has none)."""
        return self._native_mpp

    def choose_mpp(
        self,
        project: float | tuple[float, float] | None = None,
        given: float | None = None,
        *,
        override: bool = False,
    ) -> PixelSize:
        """Decide this slide's pixel size by :func:`choose_pixel_size` and use it from now on.

        ``project`` is the QuPath entry's calibration, ``given`` the user's ``--mpp``. The
        result says where the value came from and what an override replaced.
        """
        chosen = choose_pixel_size(self._native_mpp, project, given, override=override,
                                   path=self.path)
        self._chosen_mpp = chosen
        return chosen

    def _checked_mpp(self) -> tuple[float, float]:
        if self._chosen_mpp is not None:
            return self._chosen_mpp.mpp_x, self._chosen_mpp.mpp_y
        if self._mpp_override is not None:
            values, source = (self._mpp_override, self._mpp_override), "given"
        elif self._native_mpp is not None:
            values, source = self._native_mpp, "slide"
        else:
            raise SlideError(
                "pixel size unknown: pass --mpp (µm per pixel at full resolution)", self.path)
        out: list[float] = []
        for v in values:
            problem = mpp_problem(v)
            if problem is not None:
                where = "in the slide's metadata" if source == "slide" else "given"
                raise SlideError(f"pixel size {where}: {problem}; pass --mpp with the real "
                                 "value", self.path)
            out.append(float(v))
        return out[0], out[1]

    @property
    def has_mpp(self) -> bool:
        """True when :attr:`mpp` can be read (a plausible pixel size is known)."""
        try:
            self._checked_mpp()
        except SlideError:
            return False
        return True

    @property
    def mpp_x(self) -> float:
        """Horizontal pixel size at level 0 in µm/px; raises SlideError when unknown/implausible."""
        return self._checked_mpp()[0]

    @property
    def mpp_y(self) -> float:
        """Vertical pixel size at level 0 in µm/px; raises SlideError when unknown/implausible."""
        return self._checked_mpp()[1]

    @property
    def mpp(self) -> float:
        """Pixel size at level 0 in µm/px (mean of x and y); raises SlideError when unknown."""
        mx, my = self._checked_mpp()
        return (mx + my) / 2

    # ----------------------------------------------------------------------------------- reads
    def _check_open(self) -> None:
        if self._closed:
            raise SlideError("slide is closed", self.path)

    def _check_level(self, level: int) -> int:
        try:
            level = operator.index(level)
        except TypeError as exc:
            raise SlideError(f"level must be an integer, got {level!r}", self.path) from exc
        if not 0 <= level < self.level_count:
            raise SlideError(
                f"level {level} does not exist (the slide has {self.level_count})", self.path)
        return level

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The level with the largest downsample <= ``downsample`` (within LEVEL_TOLERANCE
        relative), like OpenSlide; 0 when the target is finer than every level."""
        ds = _finite(downsample, "downsample", self.path)
        best = 0
        for i, d in enumerate(self._level_downsamples):
            if d <= ds * (1 + LEVEL_TOLERANCE) and d > self._level_downsamples[best]:
                best = i
        return best

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        """RGBA region like OpenSlide: ``location`` is the top-left in level-0 coordinates of the
        file (not QuPath's), ``size`` is in pixels of ``level``; outside the image is transparent.
        """
        self._check_open()
        level = self._check_level(level)
        try:
            x, y = (operator.index(v) for v in location)
        except (TypeError, ValueError) as exc:
            raise SlideError(f"location must be two integers, got {location!r}", self.path) \
                from exc
        w, h = _check_size(*size, what="region", path=self.path, limit=MAX_OUTPUT_PIXELS)
        return self._read_region_rgba(x, y, level, w, h)

    def get_thumbnail(self, size: tuple[int, int]) -> Image.Image:
        """RGB image of the whole slide that fits in ``size`` (aspect ratio kept), over white."""
        from PIL import Image

        self._check_open()
        tw, th = _check_size(*size, what="thumbnail", path=self.path, limit=MAX_OUTPUT_PIXELS)
        w0, h0 = self.dimensions
        scale = max(w0 / tw, h0 / th, 1.0)  # like PIL's thumbnail(): never enlarge
        out_w = max(1, min(tw, round(w0 / scale)))
        out_h = max(1, min(th, round(h0 / scale)))
        level = self.get_best_level_for_downsample(scale)
        lw, lh = self._level_dimensions[level]
        arr = self._resample(level, 0.0, 0.0, lw / out_w, lh / out_h, out_w, out_h)
        return Image.fromarray(arr, "RGB")

    def read_region_mpp(
        self, x: float, y: float, width: int, height: int, mpp: float | None = None
    ) -> np.ndarray:
        """Pixels of a region at a target pixel size as a ``(height, width, 3)`` uint8 RGB array.

        ``x, y``: top-left corner in QuPath coordinates (level-0 pixels, bounds-adjusted; may be
        fractional). ``width, height``: output size in pixels at ``mpp`` µm/px (``None``: level-0
        resolution, no pixel size needed). The region is read from the coarsest pyramid level
        that is not coarser than the target (within LEVEL_TOLERANCE) and resampled with an exact
        fractional source box (area average when shrinking, bilinear when enlarging), so
        non-integer downsamples (e.g. 0.2527 -> 0.5 µm/px) are exact. Parts outside the image
        (and transparent pixels) are white (255).
        """
        self._check_open()
        width, height = _check_size(width, height, "output", self.path, MAX_OUTPUT_PIXELS)
        x = _finite(x, "x", self.path)
        y = _finite(y, "y", self.path)
        if mpp is None:
            ds_x = ds_y = 1.0
        else:
            target = _finite(mpp, "target mpp", self.path)
            if target <= 0:
                raise SlideError(f"target mpp must be > 0, got {mpp!r}", self.path)
            mx, my = self._checked_mpp()
            ds_x, ds_y = target / mx, target / my
            if not (min(ds_x, ds_y) >= _MIN_DOWNSAMPLE and max(ds_x, ds_y) <= _MAX_DOWNSAMPLE):
                raise SlideError(
                    f"target mpp {target:g} is out of range for a slide of {mx:g} µm/px", self.path)
        x0, y0 = self.qupath_to_level0(x, y)
        level = self.get_best_level_for_downsample(min(ds_x, ds_y))
        w0, h0 = self.dimensions
        lw, lh = self._level_dimensions[level]
        # True per-axis scale of the level (OpenSlide's downsample is the mean of both axes).
        lds_x, lds_y = w0 / lw, h0 / lh
        return self._resample(level, x0 / lds_x, y0 / lds_y, ds_x / lds_x, ds_y / lds_y,
                              width, height)

    def _resample(
        self, level: int, sx0: float, sy0: float, scale_x: float, scale_y: float, out_w: int,
        out_h: int,
    ) -> np.ndarray:
        """out_w x out_h RGB pixels; output pixel (i, j) covers level pixels
        [sx0 + i * scale_x, sx0 + (i + 1) * scale_x) x [sy0 + j * scale_y, ...)."""
        from PIL import Image

        out = np.full((out_h, out_w, 3), 255, dtype=np.uint8)
        lw, lh = self._level_dimensions[level]
        m = _MARGIN
        # Only output pixels whose footprint (plus margin) touches the image need reading.
        ox0 = int(min(max(math.floor((-m - sx0) / scale_x), 0), out_w))
        ox1 = int(min(max(math.ceil((lw + m - sx0) / scale_x), 0), out_w))
        oy0 = int(min(max(math.floor((-m - sy0) / scale_y), 0), out_h))
        oy1 = int(min(max(math.ceil((lh + m - sy0) / scale_y), 0), out_h))
        if ox0 >= ox1 or oy0 >= oy1:
            return out
        bx0, bx1 = sx0 + ox0 * scale_x, sx0 + ox1 * scale_x
        ix0 = math.floor(bx0) - m
        cw = math.ceil(bx1) + m - ix0
        rows_per_out = scale_y
        band = int((MAX_READ_PIXELS / cw - 2 * m - 2) / rows_per_out) if cw > 0 else 0
        if band < 1:
            raise SlideError(
                "region too large to read at this pixel size (no pyramid level close to it); "
                "read smaller regions", self.path)
        resample = (Image.Resampling.BOX if min(scale_x, scale_y) >= 1 - 1e-9
                    else Image.Resampling.BILINEAR)
        for r0 in range(oy0, oy1, band):
            r1 = min(oy1, r0 + band)
            by0, by1 = sy0 + r0 * scale_y, sy0 + r1 * scale_y
            iy0 = math.floor(by0) - m
            ch = math.ceil(by1) + m - iy0
            canvas, dx, dy = self._read_level(level, ix0, iy0, cw, ch)
            ox, oy = ix0 + dx, iy0 + dy
            box = (min(max(bx0 - ox, 0.0), cw), min(max(by0 - oy, 0.0), ch),
                   min(max(bx1 - ox, 0.0), cw), min(max(by1 - oy, 0.0), ch))
            try:
                img = Image.fromarray(canvas, "RGB").resize(
                    (ox1 - ox0, r1 - r0), resample, box=box, reducing_gap=None)
            except (ValueError, MemoryError) as exc:
                raise SlideError(f"cannot resample region: {_one_line(exc)}", self.path) from exc
            out[r0:r1, ox0:ox1] = np.asarray(img)
        return out

    # ------------------------------------------------------------------------- backend hooks
    @abstractmethod
    def _read_level(
        self, level: int, x: int, y: int, w: int, h: int
    ) -> tuple[np.ndarray, float, float]:
        """RGB uint8 ``(h, w, 3)`` of level pixels starting at ``(x, y)`` (level coordinates,
        may lie outside the image: white there), and the sub-pixel offset ``(dx, dy)`` at which
        the returned pixel (0, 0) really starts (non-zero only where OpenSlide interpolates)."""

    @abstractmethod
    def _read_region_rgba(self, x: int, y: int, level: int, w: int, h: int) -> Image.Image:
        """RGBA level pixels as OpenSlide's ``read_region`` returns them (x, y in level 0)."""

    def _close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to free
        """Release backend resources (called once by :meth:`close`)."""

    # --------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release the file; later reads raise SlideError. Closing twice is harmless."""
        if not self._closed:
            self._closed = True
            try:
                self._close()
            except Exception as exc:
                raise SlideError(f"cannot close slide: {_one_line(exc)}", self.path) from exc

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (f"{type(self).__name__}({str(self.path)!r}, {w}x{h}, levels={self.level_count}, "
                f"vendor={self._vendor!r})")
