"""Tissue detection on a slide thumbnail: Otsu (khalil2022, ho2021) or HSV (pedersen2022).

Methods, selected by name (:data:`TISSUE_METHODS`):

* ``"otsu"``: Otsu's threshold on the grey-level thumbnail; tissue is darker than the threshold.
  khalil2022 §3.3 ("Otsu's approach will be utilized to filter the WSI to exclude all background
  noise") and ho2021 §2.6 (Otsu before extracting patches, optional).
* ``"otsu_od"`` (default): Otsu's threshold on the logarithm of the optical density
  ``-log10((I + 1) / 256)`` summed over the three channels; tissue has the higher density.
  Grey-level Otsu splits a slide whose tissue is itself bimodal (dark tumour, pale stroma)
  *inside* the tissue and loses the pale part; on a log-density scale the glass mode is far
  from every stained tissue, so the cut falls between glass and tissue (measured on generated
  slides: grey Otsu IoU 0.82-0.99, log-density Otsu 0.98-0.99 against the known tissue).
* ``"hsv"``: pedersen2022 §2.2: take the x1.25 image, convert to HSV, threshold the saturation
  channel (0..255) at a fixed 20, then two morphological closings with 5x5 and 3x3 kernels.

:func:`detect_tissue` reads a thumbnail at :data:`DEFAULT_THUMBNAIL_MPP` (about x1.25, the
pedersen2022 level) and returns a :class:`TissueMask`: the boolean mask plus the downsample and
origin that map mask pixels to QuPath level-0 coordinates, so callers can find the tissue in any
tile. Only the thumbnail is ever in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from qpseg.errors import ConfigError, SlideError

if TYPE_CHECKING:
    from qpseg.slide import Slide

__all__ = [
    "DEFAULT_THUMBNAIL_MPP",
    "HSV_CLOSING_KERNELS",
    "HSV_SATURATION_THRESHOLD",
    "TISSUE_METHODS",
    "TissueMask",
    "binary_closing",
    "detect_tissue",
    "enough_tissue",
    "otsu_threshold",
    "tissue_fraction",
    "tissue_mask_from_rgb",
]

TISSUE_METHODS: tuple[str, ...] = ("otsu", "otsu_od", "hsv")
#: pedersen2022 §2.2 reads the x1.25 image: 8 µm/px for a 0.5 µm/px (x20) or 0.25 µm/px scan.
DEFAULT_THUMBNAIL_MPP = 8.0
#: pedersen2022 §2.2: "threshold the saturation channel image using a fixed threshold of 20".
HSV_SATURATION_THRESHOLD = 20
#: pedersen2022 §2.2: "two consecutive applications of morphological closing using kernel sizes
#: 5x5 and 3x3".
HSV_CLOSING_KERNELS: tuple[int, ...] = (5, 3)
# A thumbnail never exceeds this many pixels on its longer side (memory bound for huge slides).
_MAX_THUMBNAIL_SIDE = 4096
# A grey-level spread below this is a flat image: Otsu would split noise.
_FLAT_SPREAD = 8.0
# "Tissue" whose mean grey level is brighter than this is glass (a blank slide with dust).
_GLASS_GREY = 230.0
# Added to the optical density before the log, so pure white (OD 0) stays finite.
_OD_FLOOR = 1e-3


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (1979) of ``values``: the cut that maximises the between-class variance.

    Returns a value ``t`` such that the two classes are ``values <= t`` and ``values > t``.
    Raises ValueError for an empty or non-finite input.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("otsu_threshold needs at least one value")
    if not np.isfinite(v).all():
        raise ValueError("otsu_threshold needs finite values")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    k = int(np.argmax(between[:-1]))  # the cut lies after bin k
    return float(edges[k + 1])


def binary_closing(mask: np.ndarray, size: int) -> np.ndarray:
    """Morphological closing (dilation then erosion) with a ``size`` x ``size`` square.

    The mask is padded by the kernel radius first so tissue touching the border is not eroded
    away (scipy's erosion treats outside as background).
    """
    from scipy import ndimage

    if size <= 1:
        return mask.astype(bool, copy=True)
    pad = size
    padded = np.pad(mask.astype(bool), pad, mode="edge")
    closed = ndimage.binary_closing(padded, structure=np.ones((size, size), dtype=bool))
    return np.asarray(closed[pad:-pad, pad:-pad], dtype=bool)


_ROWS = 256  # rows per chunk: a float64 copy of a big thumbnail would be hundreds of MB


def _grey(rgb: np.ndarray) -> np.ndarray:
    weights = np.array([0.299, 0.587, 0.114])
    out = np.empty(rgb.shape[:2], dtype=np.float64)
    for r in range(0, rgb.shape[0], _ROWS):
        out[r:r + _ROWS] = rgb[r:r + _ROWS].astype(np.float64) @ weights
    return out


# -log10((v + 1) / 256) for every uint8 value: summed over the channels, the optical density.
_OD_LUT = -np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """Summed optical density per pixel (the channel sum in the same order as ``sum``)."""
    return (_OD_LUT[rgb[..., 0]] + _OD_LUT[rgb[..., 1]]) + _OD_LUT[rgb[..., 2]]


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation on 0..255 as PIL/OpenCV compute it: 255 * (max - min) / max."""
    # max/min on the uint8 channels first: the same values without a float copy of the image
    mx, mn = rgb.max(axis=-1).astype(np.float64), rgb.min(axis=-1).astype(np.float64)
    return np.divide(255.0 * (mx - mn), mx, out=np.zeros_like(mx), where=mx > 0)


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    method: str = "otsu_od",
    *,
    saturation_threshold: float = HSV_SATURATION_THRESHOLD,
    closing: Sequence[int] | None = None,
) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB uint8 image ``(h, w, 3)``; returns ``(mask, threshold)``.

    ``closing``: kernel sizes (thumbnail pixels) of successive closings (default: (5, 3) for
    ``"hsv"`` as in pedersen2022 §2.2, where they apply to the x1.25 image; none for the Otsu
    methods, which the papers describe without one).
    A flat image (grey spread below 8 levels) has no threshold: it is all tissue when dark,
    none when bright (mean grey > 200), and the returned threshold is NaN. When the Otsu
    methods' tissue class is as bright as glass (mean grey > 230) the mask is empty.
    """
    if method not in TISSUE_METHODS:
        raise ConfigError(f"unknown tissue method {method!r} (choose from "
                          f"{', '.join(TISSUE_METHODS)})")
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"expected an RGB image (h, w, 3), got shape {arr.shape}")
    if closing is None:
        closing = HSV_CLOSING_KERNELS if method == "hsv" else ()
    grey = _grey(arr)
    threshold = math.nan
    if method == "hsv":
        threshold = float(saturation_threshold)
        mask = _saturation(arr) > threshold
    elif float(grey.max() - grey.min()) < _FLAT_SPREAD:
        mask = np.full(grey.shape, float(grey.mean()) <= 200.0)
    elif method == "otsu":
        threshold = otsu_threshold(grey)
        mask = grey <= threshold
    else:  # otsu_od: Otsu on log10 of the summed optical density
        od = _optical_density(arr)
        log_od = np.log10(od + _OD_FLOOR)
        threshold = otsu_threshold(log_od)
        mask = log_od > threshold
    if method != "hsv" and mask.any() and float(grey[mask].mean()) > _GLASS_GREY:
        # What Otsu called tissue is as bright as glass: a blank slide with noise or dust.
        mask = np.zeros_like(mask)
    for k in closing:
        mask = binary_closing(mask, int(k))
    return mask, threshold


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A tissue mask on a thumbnail and its place in QuPath level-0 coordinates.

    Mask pixel ``(r, c)`` covers QuPath x in ``[origin_x + c * downsample_x, origin_x + (c + 1)
    * downsample_x)`` and likewise for y (``origin`` is the QuPath position of the file's
    level-0 (0, 0): minus the OpenSlide bounds offset, usually (0, 0)).
    """

    mask: np.ndarray
    downsample_x: float
    downsample_y: float
    origin_x: float = 0.0
    origin_y: float = 0.0
    method: str = "otsu_od"
    threshold: float = math.nan
    _sat: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def downsample(self) -> float:
        """Mean of the x and y downsample (level-0 pixels per mask pixel)."""
        return (self.downsample_x + self.downsample_y) / 2

    @property
    def fraction(self) -> float:
        """Fraction of the thumbnail that is tissue."""
        return tissue_fraction(self.mask)

    def _table(self) -> np.ndarray:
        # Summed-area table, built once (the dataclass is frozen, so cache via object.__setattr__).
        if self._sat is None:
            sat = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.int64)
            sat[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
            object.__setattr__(self, "_sat", sat)
        assert self._sat is not None
        return self._sat

    def region_fraction(self, x: float, y: float, width: float, height: float) -> float:
        """Tissue fraction of a box given in QuPath level-0 coordinates (``width``/``height`` in
        level-0 pixels), from the mask pixels whose centres fall in the box (at least the one
        under the box centre). Parts outside the slide count as no tissue."""
        h, w = self.mask.shape
        c0 = (x - self.origin_x) / self.downsample_x
        r0 = (y - self.origin_y) / self.downsample_y
        c1 = c0 + width / self.downsample_x
        r1 = r0 + height / self.downsample_y
        # Mask pixel k has its centre at k + 0.5: pixels with centre in [c0, c1).
        ci0, ci1 = math.ceil(c0 - 0.5), math.ceil(c1 - 0.5)
        ri0, ri1 = math.ceil(r0 - 0.5), math.ceil(r1 - 0.5)
        if ci1 <= ci0:
            ci0 = math.floor((c0 + c1) / 2)
            ci1 = ci0 + 1
        if ri1 <= ri0:
            ri0 = math.floor((r0 + r1) / 2)
            ri1 = ri0 + 1
        total = (ri1 - ri0) * (ci1 - ci0)
        a0, a1 = min(max(ri0, 0), h), min(max(ri1, 0), h)
        b0, b1 = min(max(ci0, 0), w), min(max(ci1, 0), w)
        if a1 <= a0 or b1 <= b0:
            return 0.0
        s = self._table()
        inside = s[a1, b1] - s[a0, b1] - s[a1, b0] + s[a0, b0]
        return float(inside) / float(total)

    def to_json(self) -> dict[str, Any]:
        """Summary (no pixels): method, threshold, thumbnail size, downsample, tissue fraction."""
        return {
            "method": self.method,
            "threshold": None if math.isnan(self.threshold) else self.threshold,
            "thumbnail_size": [int(self.mask.shape[1]), int(self.mask.shape[0])],
            "downsample": [self.downsample_x, self.downsample_y],
            "origin": [self.origin_x, self.origin_y],
            "fraction": self.fraction,
        }


def tissue_fraction(mask: np.ndarray | TissueMask) -> float:
    """Fraction of ``True`` pixels in a tissue mask (0.0 for an empty mask)."""
    m = mask.mask if isinstance(mask, TissueMask) else np.asarray(mask)
    return float(m.mean()) if m.size else 0.0


def enough_tissue(fraction: float, min_tissue: float) -> bool:
    """The one tissue-fraction rule of tiles, in training and at inference: a tile is used
    when its tissue fraction is *above* ``min_tissue``. pedersen2022 §2.2: "Only patches
    containing more than 25% tissue were included"; with ``min_tissue`` 0 every tile with any
    tissue is used."""
    return fraction > min_tissue


def detect_tissue(
    slide: Slide,
    method: str = "otsu_od",
    *,
    thumbnail_mpp: float = DEFAULT_THUMBNAIL_MPP,
    max_size: int = _MAX_THUMBNAIL_SIDE,
    saturation_threshold: float = HSV_SATURATION_THRESHOLD,
    closing: Sequence[int] | None = None,
) -> TissueMask:
    """Detect tissue on a thumbnail of an open :class:`~qpseg.slide.Slide`.

    The thumbnail has ``thumbnail_mpp`` µm/px (default about x1.25, pedersen2022 §2.2), or, for a
    slide without a known pixel size, ``max_size`` pixels on its longer side; never more than
    ``max_size``. Raises :class:`~qpseg.errors.SlideError` when the slide cannot be read and
    :class:`~qpseg.errors.ConfigError` for an unknown method.
    """
    if method not in TISSUE_METHODS:
        raise ConfigError(f"unknown tissue method {method!r} (choose from "
                          f"{', '.join(TISSUE_METHODS)})")
    if not (math.isfinite(thumbnail_mpp) and thumbnail_mpp > 0):
        raise ConfigError(f"thumbnail_mpp must be > 0, got {thumbnail_mpp!r}")
    if max_size < 1:
        raise ConfigError(f"max_size must be >= 1, got {max_size!r}")
    w0, h0 = slide.dimensions
    ds = max(w0, h0) / max_size
    if slide.has_mpp:
        ds = max(ds, thumbnail_mpp / slide.mpp)
    ds = max(ds, 1.0)
    size = (max(1, min(max_size, math.ceil(w0 / ds))), max(1, min(max_size, math.ceil(h0 / ds))))
    try:
        rgb = np.asarray(slide.get_thumbnail(size).convert("RGB"))
    except SlideError:
        raise
    except Exception as exc:  # PIL conversion problems: report against the slide
        raise SlideError(f"cannot read thumbnail: {exc}", slide.path) from exc
    mask, threshold = tissue_mask_from_rgb(
        rgb, method, saturation_threshold=saturation_threshold, closing=closing)
    th, tw = mask.shape
    ox, oy = slide.level0_to_qupath(0.0, 0.0)
    return TissueMask(mask=mask, downsample_x=w0 / tw, downsample_y=h0 / th, origin_x=ox,
                      origin_y=oy, method=method, threshold=threshold)
