"""Plain images as one-level slides: :class:`ImageSlide` over a pixel source, and the sample
conversion both plain-image backends (tifffile, Pillow) share: gray, palette, alpha and more than
8 bits per sample -> RGB uint8 (:class:`_Converter`), over an in-memory or memory-mapped array
(:class:`_ArraySource`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from qpseg.errors import SlideError
from qpseg.slides.base import Slide, _one_line

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ImageSlide"]


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
