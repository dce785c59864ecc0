"""One reader for whole-slide images and plain images: :func:`open_slide` returns a :class:`Slide`.

The interface mirrors OpenSlide's (``dimensions``, ``level_count``, ``level_dimensions``,
``level_downsamples``, ``properties``, ``read_region``, ``get_best_level_for_downsample``,
``get_thumbnail``) and adds what segmentation needs: the pixel size (:attr:`Slide.mpp`), QuPath's
coordinate frame (:meth:`Slide.qupath_to_level0`) and resampled reads at a target pixel size
(:meth:`Slide.read_region_mpp`).

Backends, chosen by :func:`open_slide` in this order:

* ``openslide``: everything ``openslide.OpenSlide.detect_format`` accepts (Aperio SVS, Hamamatsu
  NDPI, MIRAX, DICOM, generic tiled TIFF, ...).
* ``tifffile``: other TIFFs (stripped, or tiled ones OpenSlide refuses). Uncompressed data is
  memory-mapped and compressed data is decoded strip by strip / tile by tile, so a region read
  never decodes the whole image. Compressions that need ``imagecodecs`` (LZW, JPEG) go to Pillow.
* ``pillow``: PNG, JPEG, BMP, ... (decoded whole, once, on the first read).

Plain images (``tifffile`` and ``pillow``) have one level. Their pixels become RGB uint8:
grayscale is replicated to three channels, palette images are expanded, alpha is composited onto
white, and images with more than 8 bits per sample (16-bit, 32-bit, float) are scaled by the
image's own maximum (``value * 255 / max``; a float image whose maximum is <= 1 is taken as 0..1),
so a 12-bit camera image in a 16-bit container is not left nearly black (tiled TIFFs with more
than 8 bits per sample therefore go to tifffile, not OpenSlide, whose libtiff conversion keeps only
the high byte). ICC profiles are ignored. Only the first page of a plain TIFF is read; the
sub-resolution SubIFDs of OME-TIFF pyramids are not used (OpenSlide reads their top level).
Pillow refuses images above its decompression-bomb limit (~179 Mpx): convert such images to a
tiled pyramidal TIFF.

Pixel size: from the slide (``openslide.mpp-x/y``; for TIFFs, the resolution tags when the unit is
centimeter or inch, or an ImageJ ``unit=micron``), replaced by the ``mpp=`` argument of
:func:`open_slide` when that is given. PNG ``pHYs`` / JPEG dpi values are screen resolutions and are
never used. Nothing is guessed: a slide without a pixel size opens fine, and only reading
:attr:`Slide.mpp` raises :class:`~qpseg.errors.SlideError`; so does a value that
:func:`mpp_problem` refuses (not finite, below 0.01 or above 100 µm/px, e.g. 352.8 from a
72-dpi default tag). :func:`mpp_problem` is the one plausibility rule for every pixel size,
whether read from a slide, a QuPath project or an option.

Which pixel size a command uses for a slide is decided by :func:`choose_pixel_size` (on an open
slide: :meth:`Slide.choose_mpp`), the one rule for every command: the slide's own value, else
the QuPath project's calibration, else the value the user gave (``--mpp``); the user's value
replaces a known one only when asked to (``--mpp-override``), and the result records what it
replaced.

Coordinates: ``read_region`` takes level-0 coordinates of the file, as OpenSlide does.
QuPath's coordinates for OpenSlide images with ``openslide.bounds-x/y`` are offset by the bounds
(QuPath (0, 0) is level-0 (bounds-x, bounds-y), and QuPath's image size is the bounds size);
:meth:`Slide.qupath_to_level0`, :meth:`Slide.level0_to_qupath` and :attr:`Slide.qupath_dimensions`
are the one place that conversion lives. :meth:`Slide.read_region_mpp` takes QuPath coordinates.

Errors: every failure (missing file, unknown format, unopenable file, corrupt tile data, closed
slide) is a :class:`~qpseg.errors.SlideError` with a one-line message; exceptions of OpenSlide,
Pillow and tifffile never escape. OpenSlide errors are sticky: after a corrupt tile every later
read of the same handle fails too; the metadata read at open time stays available.

Threads and processes: one OpenSlide handle may be used from several threads (OpenSlide is
thread-safe), and the tifffile/Pillow backends lock their file reads. Handles must not be shared
across processes: in PyTorch ``DataLoader`` workers open the slide in each worker (e.g. lazily on
the first ``__getitem__`` of the worker), never in the parent before forking.
"""

from __future__ import annotations

import math
import operator
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from qpseg.errors import QpsegError, SlideError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "LEVEL_TOLERANCE",
    "MAX_MPP",
    "MAX_OUTPUT_PIXELS",
    "MIN_MPP",
    "ImageSlide",
    "OpenSlideSlide",
    "PixelSize",
    "Slide",
    "check_mpp",
    "choose_pixel_size",
    "mpp_problem",
    "open_slide",
]

#: Largest plausible pixel size in µm/px; anything bigger is a screen/default resolution tag.
MAX_MPP = 100.0
#: Smallest plausible pixel size in µm/px. Light microscopes resolve ~0.2 µm and the finest
#: slide scans (100x oil) are ~0.05-0.1 µm/px; anything smaller is a unit mistake (nm, m).
MIN_MPP = 0.01
#: Two pixel sizes closer than this (relative) are the same value written with other rounding.
_MPP_SAME = 0.01
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

PathArg = str | bytes | os.PathLike[str]


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


def mpp_problem(value: object) -> str | None:
    """Why ``value`` is not a plausible pixel size in µm/px, or None when it is one.

    The one plausibility rule for pixel sizes (a slide's own, a QuPath project's calibration,
    ``--mpp`` and the like): a finite number from :data:`MIN_MPP` to :data:`MAX_MPP`.
    """
    if isinstance(value, bool):
        return f"{value!r} is not a number"
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return f"{value!r} is not a number"
    if not (math.isfinite(f) and MIN_MPP <= f <= MAX_MPP):
        return (f"{value!r} µm/px is not a plausible pixel size (it must be from {MIN_MPP:g} "
                f"to {MAX_MPP:g} µm/px)")
    return None


def check_mpp(value: object, what: str, path: str | os.PathLike[str] | None = None, *,
              error: type[QpsegError] = SlideError) -> float:
    """``value`` as a float when :func:`mpp_problem` accepts it; else ``error`` naming ``what``.

    Commands check their pixel-size options with ``error=ConfigError`` before any work starts.
    """
    problem = mpp_problem(value)
    if problem is not None:
        raise error(f"{what}: {problem}", path)
    return float(value)  # type: ignore[arg-type]


def _fmt_mpp(xy: tuple[float, float]) -> str:
    x, y = xy
    return f"{x:g}" if x == y else f"{x:g} x {y:g}"


def _same_mpp(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(abs(p - q) <= _MPP_SAME * max(p, q) for p, q in zip(a, b, strict=True))


@dataclass(frozen=True)
class PixelSize:
    """The pixel size a command uses for one slide, where it came from and what it replaced.

    ``source`` is ``"slide"`` (the slide's own metadata), ``"project"`` (the calibration QuPath
    stores for the entry), ``"option"`` (the user's value, for a slide that has none) or
    ``"override"`` (the user's value replacing a known one, which ``replaced`` keeps).
    ``given_unused`` is True when the user gave a different value that was not used because
    the slide or project has one (callers say so once for all slides). ``notes`` are what
    else the user should hear (an implausible stored value skipped, slide and project that
    disagree); the caller warns with them.
    """

    mpp_x: float
    mpp_y: float
    source: str
    replaced: float | None = None
    notes: tuple[str, ...] = ()
    given_unused: bool = False

    @property
    def mpp(self) -> float:
        """Mean of the horizontal and vertical pixel size in µm/px."""
        return (self.mpp_x + self.mpp_y) / 2


def _pair(value: float | tuple[float, float] | None) -> tuple[object, object] | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        return value[0], value[1]
    return value, value


def choose_pixel_size(
    native: float | tuple[float, float] | None,
    project: float | tuple[float, float] | None = None,
    given: float | None = None,
    *,
    override: bool = False,
    path: str | os.PathLike[str] | None = None,
) -> PixelSize:
    """The pixel size to use for a slide: the one rule every command follows.

    ``native`` is the slide's own value (:attr:`Slide.native_mpp`), ``project`` the QuPath
    entry's ``pixelCalibration`` (:attr:`~qpseg.qupath.project.ProjectEntry.mpp_xy`), ``given``
    the user's ``--mpp``. The first plausible one of slide, project, given is used; an
    implausible stored value is skipped with a note. ``override`` makes ``given`` replace a
    known value (``replaced`` records the old one). Nothing is guessed: with no value at all,
    or an implausible ``given``, :class:`SlideError` names ``path``.
    """
    if given is not None:
        check_mpp(given, "--mpp", path)
    if override and given is None:
        raise SlideError("replacing the pixel size (--mpp-override) needs --mpp", path)
    notes: list[str] = []
    known: tuple[float, float] | None = None
    known_source = ""
    for source, value in (("slide", _pair(native)), ("project", _pair(project))):
        if value is None:
            continue
        where = ("the slide's own pixel size" if source == "slide"
                 else "the pixel size set in the QuPath project")
        bad = [p for p in (mpp_problem(v) for v in value) if p is not None]
        if bad:
            notes.append(f"{where} is ignored: {bad[0]}")
            continue
        xy = (float(value[0]), float(value[1]))  # type: ignore[arg-type]
        if known is None:
            known, known_source = xy, source
        elif not _same_mpp(known, xy) and not override:
            notes.append(f"{where} ({_fmt_mpp(xy)} µm/px) differs from the slide's "
                         f"({_fmt_mpp(known)} µm/px); the slide's is used (pass --mpp "
                         f"{(xy[0] + xy[1]) / 2:g} --mpp-override to use the project's)")
    if given is not None:
        g = float(given)
        if override and known is not None:
            return PixelSize(g, g, "override", (known[0] + known[1]) / 2, tuple(notes))
        if known is None:
            return PixelSize(g, g, "option", None, tuple(notes))
    if known is not None:
        unused = given is not None and known != (float(given), float(given))
        return PixelSize(known[0], known[1], known_source, None, tuple(notes), unused)
    reason = "; ".join(notes) if notes else "neither the slide nor the QuPath project gives one"
    raise SlideError(f"pixel size unknown ({reason}): pass --mpp (µm per pixel at full "
                     "resolution)", path)


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
    several threads; for DataLoader worker processes open one slide per worker (see the module
    docstring).
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


# ======================================================================================= OpenSlide
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


# ==================================================================================== plain images
class _Source(Protocol):
    width: int
    height: int

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray: ...

    def close(self) -> None: ...


class _Converter:
    """Raw samples ``(h, w, S)`` -> RGB uint8, with one scale for the whole image."""

    def __init__(
        self,
        *,
        dtype: np.dtype[Any],
        colour_channels: int,
        alpha: str | None = None,
        invert: bool = False,
        colormap: np.ndarray | None = None,
        max_value: Callable[[], float] | None = None,
    ) -> None:
        self.dtype = dtype
        self.colour_channels = colour_channels  # 1 (gray / palette) or 3
        self.alpha = alpha  # None, "assoc" (premultiplied) or "unassoc"
        self.invert = invert
        self.colormap = colormap  # (N, 3) uint8 for palette images
        self._max_value = max_value
        self._scale: float | None = None

    def scale(self) -> float:
        """Factor that maps raw colour samples to 0..255 (1 for uint8)."""
        if self._scale is None:
            if self.dtype == np.uint8 or self.colormap is not None:
                self._scale = 1.0
            elif self.dtype == np.bool_:
                self._scale = 255.0
            else:
                mx = float(self._max_value()) if self._max_value is not None else 0.0
                if self.dtype.kind == "f" and 0 < mx <= 1:
                    mx = 1.0
                self._scale = 255.0 / mx if mx > 0 and math.isfinite(mx) else 0.0
        return self._scale

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        if raw.ndim == 2:
            raw = raw[..., None]
        c = self.colour_channels
        colour = raw[..., :c]
        if self.colormap is not None:
            idx = np.clip(colour[..., 0].astype(np.int64), 0, len(self.colormap) - 1)
            rgb = self.colormap[idx]
        else:
            if colour.dtype == np.uint8:
                vals = colour
            else:
                f = np.nan_to_num(colour.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
                vals = np.clip(np.rint(np.maximum(f, 0) * self.scale()), 0, 255).astype(np.uint8)
            if self.invert:
                vals = 255 - vals
            rgb = np.repeat(vals, 3, axis=-1) if c == 1 else vals
        if self.alpha is not None and raw.shape[-1] > c:
            a = raw[..., c:c + 1]
            if a.dtype.kind == "f":
                af = np.clip(np.nan_to_num(a.astype(np.float64)), 0, 1)
            elif a.dtype == np.bool_:
                af = a.astype(np.float64)
            else:
                af = a.astype(np.float64) / float(np.iinfo(a.dtype).max)
            base = rgb.astype(np.float64)
            if self.alpha == "unassoc":
                base = base * af
            rgb = np.clip(np.rint(base + 255.0 * (1.0 - af)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(rgb, dtype=np.uint8)


class _ArraySource:
    """Pixels in a (possibly memory-mapped) array of shape (H, W, S) or planar (S, H, W)."""

    def __init__(self, array: np.ndarray, converter: _Converter, *, planar: bool = False) -> None:
        self._array = array
        self._planar = planar
        self._conv = converter
        self.height, self.width = (array.shape[1:3] if planar else array.shape[:2])
        converter._max_value = self._max_value
        self._lock = threading.Lock()

    def _raw(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._planar:
            return np.moveaxis(np.asarray(self._array[:, y0:y1, x0:x1]), 0, -1)
        return np.asarray(self._array[y0:y1, x0:x1])

    def _max_value(self) -> float:
        c = self._conv.colour_channels
        mx = 0.0
        rows = max(1, (1 << 24) // max(1, self.width))
        for r in range(0, self.height, rows):
            raw = self._raw(0, r, self.width, min(self.height, r + rows))
            if raw.ndim == 2:
                raw = raw[..., None]
            chunk = raw[..., :c]
            if chunk.dtype.kind == "f":
                chunk = np.nan_to_num(chunk, nan=0.0, posinf=0.0, neginf=0.0)
            if chunk.size:
                mx = max(mx, float(chunk.max()))
        return mx

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        with self._lock:  # memmap reads and the one-time scale computation
            self._conv.scale()
            raw = self._raw(x0, y0, x1, y1)
        return self._conv(raw)

    def close(self) -> None:
        self._array = np.zeros((0, 0, 1), dtype=np.uint8)


class _TiffSegmentSource:
    """Compressed (or scattered) TIFF data decoded one strip/tile at a time."""

    def __init__(self, tif: Any, page: Any, converter: _Converter) -> None:
        self._tif = tif
        self._page = page
        self._conv = converter
        converter._max_value = self._max_value
        shaped = page.shaped  # (separate samples, depth, length, width, contig samples)
        self._planes = int(shaped[0])
        self.height, self.width = int(shaped[2]), int(shaped[3])
        self._samples = int(shaped[0]) * int(shaped[4])
        if page.is_tiled:
            self._seg_h, self._seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self._seg_h = min(int(page.rowsperstrip or self.height), self.height)
            self._seg_w = self.width
        self._across = math.ceil(self.width / self._seg_w)
        self._down = math.ceil(self.height / self._seg_h)
        self._decode = page.decode
        self._lock = threading.Lock()

    def _segment(self, index: int) -> tuple[np.ndarray | None, int, int]:
        page = self._page
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        data = None
        if offset and count:
            fh = self._tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
        seg, pos, _shape = self._decode(data, index)
        return seg, int(pos[2]), int(pos[3])

    def _raw(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        contig = self._samples // self._planes
        out = np.zeros((y1 - y0, x1 - x0, self._samples), dtype=self._page.dtype)
        per_plane = self._across * self._down
        for p in range(self._planes):
            for r in range(y0 // self._seg_h, (y1 - 1) // self._seg_h + 1):
                for c in range(x0 // self._seg_w, (x1 - 1) // self._seg_w + 1):
                    seg, sy, sx = self._segment(p * per_plane + r * self._across + c)
                    if seg is None:
                        continue
                    seg = seg[0]  # (length, width, contig samples)
                    ya, yb = max(y0, sy), min(y1, sy + seg.shape[0])
                    xa, xb = max(x0, sx), min(x1, sx + seg.shape[1])
                    if ya >= yb or xa >= xb:
                        continue
                    block = seg[ya - sy:yb - sy, xa - sx:xb - sx]
                    if self._planes > 1:
                        out[ya - y0:yb - y0, xa - x0:xb - x0, p] = block[..., 0]
                    else:
                        out[ya - y0:yb - y0, xa - x0:xb - x0, :contig] = block
        return out

    def _max_value(self) -> float:
        c = self._conv.colour_channels
        mx = 0.0
        for r in range(0, self.height, self._seg_h):
            raw = self._raw(0, r, self.width, min(self.height, r + self._seg_h))[..., :c]
            if raw.dtype.kind == "f":
                raw = np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
            if raw.size:
                mx = max(mx, float(raw.max()))
        return mx

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        with self._lock:  # one file position, and the one-time scale computation
            self._conv.scale()
            raw = self._raw(x0, y0, x1, y1)
        return self._conv(raw)

    def close(self) -> None:
        self._tif.close()


class _PillowSource:
    """An image decoded whole by Pillow on the first read."""

    def __init__(self, path: Path, image: Any) -> None:
        self._path = path
        self._image = image
        self.width, self.height = (int(v) for v in image.size)
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()

    def _load(self) -> np.ndarray:
        im = self._image
        try:
            im.load()
        except Exception as exc:
            raise SlideError(f"cannot decode image: {_one_line(exc)}", self._path) from exc
        mode = im.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            raw = np.asarray(im)
            conv = _Converter(dtype=raw.dtype, colour_channels=1)
            src = _ArraySource(raw[..., None], conv)
            return src.read(0, 0, src.width, src.height)
        has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
        if has_alpha:
            rgba = im.convert("RGBA")
            return _composite_on_white(np.asarray(rgba))
        rgb = im if mode == "RGB" else im.convert("RGB")
        arr = np.array(rgb, dtype=np.uint8)
        if rgb is not im:
            rgb.close()
        return arr

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        with self._lock:
            if self._array is None:
                try:
                    self._array = self._load()
                finally:
                    self._image.close()
        return self._array[y0:y1, x0:x1]

    def close(self) -> None:
        self._image.close()
        self._array = None


class ImageSlide(Slide):
    """A plain image (TIFF via tifffile, others via Pillow) as a one-level slide."""

    def __init__(
        self,
        path: Path,
        source: _Source,
        *,
        backend: str,
        vendor: str | None,
        properties: Mapping[str, str] | None = None,
        native_mpp: tuple[float, float] | None = None,
        mpp: float | None = None,
    ) -> None:
        self._source = source
        self.backend = backend
        super().__init__(
            path,
            level_dimensions=[(source.width, source.height)],
            properties=properties,
            vendor=vendor,
            native_mpp=native_mpp,
            mpp=mpp,
        )

    def _read_clipped(self, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, int, int, int,
                                                                         int]:
        lw, lh = self.dimensions
        cx0, cy0, cx1, cy1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if cx0 >= cx1 or cy0 >= cy1:
            return np.zeros((0, 0, 3), np.uint8), 0, 0, 0, 0
        try:
            rgb = self._source.read(cx0, cy0, cx1, cy1)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(f"cannot read pixels: {_one_line(exc)}", self.path) from exc
        return rgb, cx0 - x, cy0 - y, cx1 - x, cy1 - y

    def _read_level(
        self, level: int, x: int, y: int, w: int, h: int
    ) -> tuple[np.ndarray, float, float]:
        self._check_open()
        canvas = np.full((h, w, 3), 255, dtype=np.uint8)
        rgb, a, b, c, d = self._read_clipped(x, y, w, h)
        if rgb.size:
            canvas[b:d, a:c] = rgb
        return canvas, 0.0, 0.0

    def _read_region_rgba(self, x: int, y: int, level: int, w: int, h: int) -> Image.Image:
        from PIL import Image

        self._check_open()
        out = np.zeros((h, w, 4), dtype=np.uint8)
        rgb, a, b, c, d = self._read_clipped(x, y, w, h)
        if rgb.size:
            out[b:d, a:c, :3] = rgb
            out[b:d, a:c, 3] = 255
        return Image.fromarray(out, "RGBA")

    def _close(self) -> None:
        self._source.close()


# ============================================================================ plain-image readers
_TIFF_UNITS = {2: ("inch", 25400.0), 3: ("centimeter", 1e4)}
_IMAGEJ_UNITS = {"micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "\\u00b5m": 1.0,
                 "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4,
                 "centimeter": 1e4}


def _rational(value: Any) -> float | None:
    try:
        if isinstance(value, tuple):
            num, den = value[:2]
            v = float(num) / float(den)
        else:
            v = float(value)
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _tiff_resolution(
    xres: Any, yres: Any, unit: Any, imagej_unit: str | None
) -> tuple[tuple[float, float] | None, dict[str, str]]:
    """Pixel size from TIFF resolution tags (centimeter/inch, or an ImageJ length unit)."""
    props: dict[str, str] = {}
    fx, fy = _rational(xres), _rational(yres)
    try:
        unit_code = int(unit) if unit is not None else 2  # the TIFF default is inch
    except (TypeError, ValueError):
        unit_code = 0
    name, um = _TIFF_UNITS.get(unit_code, ("none", 0.0))
    if fx is not None:
        props["tiff.XResolution"] = repr(fx)
    if fy is not None:
        props["tiff.YResolution"] = repr(fy)
    if fx is not None or fy is not None:
        props["tiff.ResolutionUnit"] = name
    if fx is None or fy is None:
        return None, props
    if um:
        return (um / fx, um / fy), props
    if unit_code == 1 and imagej_unit:
        factor = _IMAGEJ_UNITS.get(imagej_unit.strip().lower())
        if factor is not None:
            return (factor / fx, factor / fy), props
    return None, props


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _more_than_8_bits(path: Path) -> bool:
    """True when the first page of a TIFF has more than 8 bits per sample (False if unsure)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return int(tif.pages.first.bitspersample) > 8
    except Exception:
        return False


def _open_tifffile(path: Path, mpp: float | None) -> ImageSlide | None:
    """Open a TIFF with tifffile, or None when tifffile cannot decode it (Pillow may)."""
    import tifffile

    tif = tifffile.TiffFile(path)
    try:
        page = tif.pages.first
        shaped = page.shaped
        if page.dtype is None or int(shaped[1]) != 1 or 0 in shaped:
            tif.close()
            return None
        photometric = int(page.photometric)
        if photometric not in (0, 1, 2, 3) or page.is_subsampled:
            tif.close()
            return None
        if page.compression != 1:
            tifffile.TIFF.DECOMPRESSORS[page.compression]  # KeyError: needs imagecodecs
        if page.predictor != 1:
            tifffile.TIFF.UNPREDICTORS[page.predictor]
        samples = int(shaped[0]) * int(shaped[4])
        colour = 3 if photometric == 2 else 1
        if samples < colour:
            tif.close()
            return None
        extras = tuple(int(e) for e in (page.extrasamples or ()))
        alpha = None
        if samples > colour and extras and extras[0] in (1, 2):
            alpha = "assoc" if extras[0] == 1 else "unassoc"
        colormap = None
        if photometric == 3:
            cmap = page.colormap
            if cmap is None:
                tif.close()
                return None
            cmap = np.asarray(cmap)
            if cmap.dtype != np.uint8:
                cmap = (cmap.astype(np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
            colormap = np.ascontiguousarray(cmap.T)
        conv = _Converter(dtype=page.dtype, colour_channels=colour, alpha=alpha,
                          invert=photometric == 0, colormap=colormap)
        source: _Source
        if page.is_memmappable:
            dtype = np.dtype(page.dtype).newbyteorder(tif.byteorder)
            mm = np.memmap(path, dtype=dtype, mode="r", offset=int(page.dataoffsets[0]),
                           shape=tuple(int(s) for s in shaped))
            planar = int(shaped[0]) > 1
            arr = mm[:, 0, :, :, 0] if planar else mm[0, 0]
            source = _ArraySource(arr, conv, planar=planar)
            tif.close()
        else:
            source = _TiffSegmentSource(tif, page, conv)
        tags = page.tags
        ij = tif.imagej_metadata or {}
        native, props = _tiff_resolution(
            tags.valueof(282), tags.valueof(283), tags.valueof(296),
            str(ij.get("unit")) if ij.get("unit") is not None else None)
        for code, name in ((270, "ImageDescription"), (271, "Make"), (272, "Model"),
                           (305, "Software"), (306, "DateTime")):
            v = tags.valueof(code)
            if isinstance(v, str) and v:
                props[f"tiff.{name}"] = v
    except KeyError:
        tif.close()
        return None
    except Exception:
        tif.close()
        raise
    return ImageSlide(path, source, backend="tifffile", vendor="tiff", properties=props,
                      native_mpp=native, mpp=mpp)


def _open_pillow(path: Path, mpp: float | None) -> ImageSlide:
    from PIL import Image

    im = Image.open(path)
    try:
        fmt = (im.format or "image").lower()
        native = None
        props: dict[str, str] = {}
        if fmt == "tiff":
            tags = getattr(im, "tag_v2", {})
            native, props = _tiff_resolution(tags.get(282), tags.get(283), tags.get(296), None)
        source = _PillowSource(path, im)
    except Exception:
        im.close()
        raise
    return ImageSlide(path, source, backend="pillow", vendor=fmt, properties=props,
                      native_mpp=native, mpp=mpp)


def _open_plain(path: Path, mpp: float | None) -> ImageSlide:
    errors: list[str] = []
    if _is_tiff(path):
        try:
            slide = _open_tifffile(path, mpp)
        except SlideError:
            raise
        except Exception as exc:
            errors.append(f"tifffile: {_one_line(exc)}")
        else:
            if slide is not None:
                return slide
    try:
        return _open_pillow(path, mpp)
    except SlideError:
        raise
    except Exception as exc:
        errors.append(f"Pillow: {_one_line(exc)}")
    raise SlideError("not a slide or image format qpseg can read (" + "; ".join(errors) + ")",
                     path)


# ===================================================================================== open_slide
def open_slide(path: PathArg, mpp: float | None = None) -> Slide:
    """Open a whole-slide image or plain image.

    ``mpp`` (µm/px at level 0), when given, replaces the slide's own pixel size (it is checked,
    like the slide's, when :attr:`Slide.mpp` is read). Raises SlideError when the file is
    missing, not a format OpenSlide, tifffile or Pillow can read, or cannot be opened.
    """
    try:
        p = Path(os.fsdecode(path))
    except (TypeError, ValueError) as exc:
        raise SlideError(f"invalid path: {_one_line(exc)}", None) from exc
    if not p.exists():
        raise SlideError("file not found", p)
    if p.is_dir():
        raise SlideError("is a directory, not a slide file", p)
    try:
        if p.stat().st_size == 0:
            raise SlideError("file is empty", p)
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise SlideError(f"cannot read file: {_one_line(exc)}", p) from exc

    try:
        import openslide
    except (ImportError, OSError):  # OpenSlide's C library missing: plain images still work
        return _open_plain(p, mpp)
    try:
        fmt = openslide.OpenSlide.detect_format(str(p))
    except Exception:
        fmt = None
    if fmt == "generic-tiff" and _more_than_8_bits(p):
        # libtiff's RGBA conversion keeps only the high byte of 16-bit samples (a 12-bit image
        # turns black); tifffile scales by the image maximum instead (see module docstring).
        try:
            return _open_plain(p, mpp)
        except SlideError:
            pass
    if fmt is not None:
        try:
            handle = openslide.OpenSlide(str(p))
        except Exception as exc:
            msg = _one_line(exc)
            if fmt == "generic-tiff":
                # A tiled TIFF OpenSlide cannot handle may still be a plain image tifffile reads.
                try:
                    return _open_plain(p, mpp)
                except SlideError:
                    pass
            hint = ""
            if fmt == "dicom":
                hint = " (a DICOM slide needs all instances of its series in the same folder)"
            raise SlideError(f"cannot open {fmt} slide: {msg}{hint}", p) from exc
        try:
            return OpenSlideSlide(p, handle, mpp=mpp, vendor=fmt)
        except SlideError:
            handle.close()
            raise
    return _open_plain(p, mpp)
