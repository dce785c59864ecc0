"""The Pillow backend for PNG, JPEG, BMP, ... and TIFFs tifffile cannot decode: the image is
decoded whole, once, on the first read.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from qpseg.errors import SlideError
from qpseg.slides.base import _composite_on_white, _one_line
from qpseg.slides.plain import ImageSlide, _ArraySource, _Converter
from qpseg.slides.tifffile_backend import _tiff_resolution


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
