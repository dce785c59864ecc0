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

The code lives in :mod:`qpseg.slides`, one job per module: ``pixel_size`` (the check and the
rule), ``base`` (:class:`Slide`: metadata, QuPath coordinates, resampled reads), ``plain``
(:class:`ImageSlide`), ``openslide_backend``, ``tifffile_backend``, ``pillow_backend`` and
``opener`` (:func:`open_slide`). This module is the entry point: import from here.
"""

from __future__ import annotations

from qpseg.slides.base import LEVEL_TOLERANCE, MAX_OUTPUT_PIXELS, Slide
from qpseg.slides.base import MAX_READ_PIXELS as MAX_READ_PIXELS
from qpseg.slides.opener import PathArg as PathArg
from qpseg.slides.opener import open_slide
from qpseg.slides.openslide_backend import OpenSlideLike as OpenSlideLike
from qpseg.slides.openslide_backend import OpenSlideSlide
from qpseg.slides.pixel_size import (
    MAX_MPP,
    MIN_MPP,
    PixelSize,
    check_mpp,
    choose_pixel_size,
    mpp_problem,
)
from qpseg.slides.plain import ImageSlide

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
