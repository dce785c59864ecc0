"""The tifffile backend for TIFFs OpenSlide does not take (stripped, more than 8 bits per sample,
tiled ones it refuses): uncompressed data is memory-mapped, compressed data is decoded strip by
strip / tile by tile. Also the TIFF resolution-tag rule (:func:`_tiff_resolution`), which the
Pillow backend uses too.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from qpseg.slides.plain import ImageSlide, _ArraySource, _Converter, _Source


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
