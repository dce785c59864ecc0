"""On-disk maps and the optional image outputs of ``qpseg infer``.

:class:`MapFile` is a C-order ``.npy`` file (``numpy.load(path, mmap_mode="r")`` reads it) that
the engine writes row band by row band with ``pwrite`` and reads back block by block with
``pread``. It is never memory-mapped: mapped pages of a multi-gigabyte map would count in the
process's resident memory, and the engine promises memory that does not grow with the slide.
A new file is sparse and reads as zeros (class 0 = background, probability 0) where no tile
wrote.

:func:`write_heatmap_ome_tiff` writes one probability channel as a tiled, zlib-compressed,
pyramidal OME-TIFF (uint8, 255 = probability 1) with the map's physical pixel size and a
channel named after the class, so QuPath (Bio-Formats) opens it as an image aligned with the
slide; pyramid levels are 2x2 means, computed band by band through temporary map files. The
engine hands it the probability channel of the stitched maps (the same stitching as the class
map, so no tile seams) read through :class:`TissueMasked`: exactly 0 wherever the tissue mask
says glass. :func:`write_overlay_png` writes the slide's thumbnail beside the same thumbnail
with the class map painted over it, and a legend of the classes' colours.

Every file is written to a temporary name in the same folder and renamed into place, so a
killed run never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from qpseg._io import replace_file, sha256_file
from qpseg.errors import OutputError, QpsegError

if TYPE_CHECKING:  # pragma: no cover
    from qpseg.slide import Slide
    from qpseg.tissue import TissueMask

__all__ = [
    "MapChannel",
    "MapFile",
    "TissueMasked",
    "atomic_path",
    "sha256_file",
    "write_heatmap_ome_tiff",
    "write_overlay_png",
]

_MAX_IO = 1 << 30  # bytes per pread/pwrite call (Linux caps one call just below 2 GiB)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, backup: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffixes) that is renamed to ``path`` when the
    block finishes without an exception, and removed otherwise.

    The rename follows :func:`qpseg._io.replace_file`: never through a link, and with
    ``backup`` the previous file is kept in a numbered backup. OSErrors name ``path``.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".ome.tif") else path.suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}",
                                    dir=path.parent)
    except OSError as exc:
        raise OutputError.from_os_error(exc, path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            yield tmp
        except OSError as exc:  # the image writer failed (e.g. the disk is full)
            if exc.filename is None or os.fspath(exc.filename) == name:
                raise OutputError.from_os_error(exc, path) from exc
            raise
        try:
            replace_file(tmp, path, backup=backup)
        except OSError as exc:
            raise OutputError.from_os_error(exc, path) from exc
    finally:
        tmp.unlink(missing_ok=True)


class MapFile:
    """A 2-D ``(H, W)`` or 3-D ``(C, H, W)`` C-order ``.npy`` array accessed with pread/pwrite.

    Supports the slicing :mod:`qpseg.objects` needs (``m[r0:r1, c0:c1]`` and
    ``m[c, r0:r1, c0:c1]``) without mapping the file, plus :meth:`write_rows`.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype[Any], offset: int,
                 fd: int, writable: bool) -> None:
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self._offset = offset
        self._fd = fd
        self._writable = writable

    # ------------------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, path: str | os.PathLike[str], shape: Sequence[int],
               dtype: Any) -> MapFile:
        """A new zero-filled (sparse) array file; an existing file is replaced."""
        path = Path(path)
        dt = np.dtype(dtype)
        shp = tuple(int(s) for s in shape)
        if len(shp) not in (2, 3) or any(s < 0 for s in shp):
            raise ValueError(f"a map is (H, W) or (C, H, W), not {shp}")
        header = io.BytesIO()
        meta = {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False,
                "shape": shp}
        np.lib.format.write_array_header_2_0(header, meta)
        head = header.getvalue()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A new file (never through a link planted at its name).
            if os.path.lexists(path):
                path.unlink()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise OutputError.from_os_error(exc, path) from None
        try:
            os.pwrite(fd, head, 0)
            os.ftruncate(fd, len(head) + math.prod(shp) * dt.itemsize)
        except OSError as exc:
            os.close(fd)
            raise OutputError.from_os_error(exc, path) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, shp, dt, len(head), fd, True)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False) -> MapFile:
        """Open an existing ``.npy`` map (read-only unless ``writable``)."""
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dt = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, fortran, dt = np.lib.format.read_array_header_2_0(fh)
                offset = fh.tell()
        except (OSError, ValueError) as exc:
            raise QpsegError(f"cannot read map ({exc})", path) from exc
        if fortran or len(shape) not in (2, 3):
            raise QpsegError(f"not a C-order 2-D/3-D map (shape {shape})", path)
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        return cls(path, tuple(shape), np.dtype(dt), offset, fd, writable)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> MapFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - safety net
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------------------- I/O
    @property
    def ndim(self) -> int:
        """2 or 3."""
        return len(self.shape)

    @property
    def height(self) -> int:
        """Rows of the map."""
        return self.shape[-2]

    @property
    def width(self) -> int:
        """Columns of the map."""
        return self.shape[-1]

    def _plane_offset(self, channel: int | None) -> int:
        if self.ndim == 2:
            return self._offset
        if channel is None or not 0 <= channel < self.shape[0]:
            raise IndexError(f"channel {channel} of a {self.shape[0]}-channel map")
        return self._offset + channel * self.height * self.width * self.dtype.itemsize

    def _pread(self, nbytes: int, offset: int) -> bytes:
        parts = []
        while nbytes > 0:
            chunk = os.pread(self._fd, min(nbytes, _MAX_IO), offset)
            if not chunk:
                raise QpsegError("map file is truncated", self.path)
            parts.append(chunk)
            nbytes -= len(chunk)
            offset += len(chunk)
        return b"".join(parts)

    def _pwrite(self, data: memoryview, offset: int) -> None:
        while len(data):
            try:
                n = os.pwrite(self._fd, data[:_MAX_IO], offset)
            except OSError as exc:  # e.g. the disk filled up under a sparse map
                raise OutputError.from_os_error(exc, self.path) from None
            data = data[n:]
            offset += n

    def write_rows(self, r0: int, block: np.ndarray, channel: int | None = None) -> None:
        """Write full-width rows ``r0 .. r0 + len(block)`` (of one channel of a 3-D map)."""
        if not self._writable:
            raise QpsegError("map is open read-only", self.path)
        arr = np.ascontiguousarray(block, dtype=self.dtype)
        if arr.ndim != 2 or arr.shape[1] != self.width or r0 < 0 or \
                r0 + arr.shape[0] > self.height:
            raise ValueError(f"rows {r0}..{r0 + arr.shape[0]} of width {arr.shape[-1]} do not "
                             f"fit a map of {self.height}x{self.width}")
        if arr.size:
            base = self._plane_offset(channel)
            self._pwrite(memoryview(arr.reshape(-1).view(np.uint8)),  # type: ignore[arg-type]
                         base + r0 * self.width * self.dtype.itemsize)

    def read_block(self, r0: int, r1: int, c0: int, c1: int,
                   channel: int | None = None) -> np.ndarray:
        """``map[(channel,) r0:r1, c0:c1]`` as a new array (bounds clipped like slicing)."""
        h, w = self.height, self.width
        r0, r1 = max(0, min(r0, h)), max(0, min(r1, h))
        c0, c1 = max(0, min(c0, w)), max(0, min(c1, w))
        rows, cols = max(0, r1 - r0), max(0, c1 - c0)
        out = np.empty((rows, cols), dtype=self.dtype)
        if rows == 0 or cols == 0:
            return out
        isz = self.dtype.itemsize
        base = self._plane_offset(channel)
        if c0 == 0 and c1 == w:  # whole rows are one contiguous read
            out[:] = np.frombuffer(self._pread(rows * w * isz, base + r0 * w * isz),
                                   dtype=self.dtype).reshape(rows, w)
            return out
        for k in range(rows):
            raw = self._pread(cols * isz, base + ((r0 + k) * w + c0) * isz)
            out[k] = np.frombuffer(raw, dtype=self.dtype)
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        channel: int | None = None
        if self.ndim == 3:
            first = key[0] if key else slice(None)
            if isinstance(first, slice):
                return np.stack([self[(c, *key[1:])] for c in range(self.shape[0])[first]])
            if not isinstance(first, int | np.integer):
                raise IndexError("index a 3-D map with [channel, rows, cols]")
            channel = int(first) + (self.shape[0] if int(first) < 0 else 0)
            key = key[1:]
        key = tuple(key) + (slice(None),) * (2 - len(key))
        if len(key) != 2 or not all(isinstance(k, slice) and k.step in (None, 1) for k in key):
            raise IndexError(f"unsupported map index {key!r} (use step-1 slices)")
        rs = key[0].indices(self.height)
        cs = key[1].indices(self.width)
        return self.read_block(rs[0], rs[1], cs[0], cs[1], channel)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[(slice(None),) * self.ndim]
        return arr if dtype is None else arr.astype(dtype)

    def channel(self, c: int) -> MapChannel:
        """A 2-D read-only view of channel ``c`` of a 3-D map (read block by block)."""
        if self.ndim != 3 or not 0 <= c < self.shape[0]:
            raise IndexError(f"channel {c} of a map of shape {self.shape}")
        return MapChannel(self, c)

    def __repr__(self) -> str:
        return f"MapFile({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


class MapChannel:
    """One channel of a 3-D :class:`MapFile` as a 2-D array-like (``view[r0:r1, c0:c1]``)."""

    def __init__(self, source: MapFile, channel: int) -> None:
        self.source = source
        self.channel = channel
        self.shape = source.shape[1:]
        self.dtype = source.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        return self.source[(self.channel, *key)]


class TissueMasked:
    """A 2-D map (array-like, read ``m[r0:r1, c0:c1]``) that reads 0 outside the tissue.

    Map pixel ``(c, r)`` covers QuPath ``x ∈ [x0 + c·downsample, x0 + (c+1)·downsample)`` (and
    ``y`` likewise, as :class:`~qpseg.objects.MapGeometry` says); it keeps its value when the
    tissue-mask pixel under its centre is tissue, and reads 0 otherwise (also beyond the mask).
    Tiles are planned over the same mask, so glass that a tile with some tissue also saw, and
    that the model gave a non-zero probability, no longer shows as a grey tile-shaped block.
    """

    def __init__(self, source: Any, tissue: TissueMask, downsample: float,
                 origin: tuple[float, float] = (0.0, 0.0)) -> None:
        self.source = source
        self.shape = (int(source.shape[-2]), int(source.shape[-1]))
        self.dtype = np.dtype(source.dtype)
        mask = np.asarray(tissue.mask, dtype=bool)
        self._mask = mask
        h, w = self.shape
        # mask column / row under each map pixel's centre (-1: outside the mask)
        xs = (origin[0] + (np.arange(w) + 0.5) * downsample - tissue.origin_x) / \
            tissue.downsample_x
        ys = (origin[1] + (np.arange(h) + 0.5) * downsample - tissue.origin_y) / \
            tissue.downsample_y
        self._cols = np.where((xs >= 0) & (xs < mask.shape[1]), np.floor(xs), -1).astype(np.int64)
        self._rows = np.where((ys >= 0) & (ys < mask.shape[0]), np.floor(ys), -1).astype(np.int64)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = tuple(key) + (slice(None),) * (2 - len(key))
        if len(key) != 2 or not all(isinstance(k, slice) and k.step in (None, 1) for k in key):
            raise IndexError(f"unsupported map index {key!r} (use step-1 slices)")
        r0, r1, _ = key[0].indices(self.shape[0])
        c0, c1, _ = key[1].indices(self.shape[1])
        block = np.array(self.source[r0:r1, c0:c1], dtype=self.dtype)
        rows, cols = self._rows[r0:r1], self._cols[c0:c1]
        inside = (rows[:, None] >= 0) & (cols[None, :] >= 0)
        inside &= self._mask[np.maximum(rows, 0)[:, None], np.maximum(cols, 0)[None, :]]
        block[~inside] = 0
        return block


# ------------------------------------------------------------------------- OME-TIFF heatmap

def _downsample2(src: Any, dst: MapFile, band: int = 512) -> None:
    """``dst`` = 2x2 mean (rounded) of ``src`` (edge pixels average what exists)."""
    h, w = src.shape[-2], src.shape[-1]
    dh, dw = dst.height, dst.width
    for r0 in range(0, dh, band):
        r1 = min(dh, r0 + band)
        blk = np.asarray(src[2 * r0:min(h, 2 * r1), 0:w], dtype=np.float64)
        ph, pw = 2 * (r1 - r0), 2 * dw
        padded = np.zeros((ph, pw))
        count = np.zeros((ph, pw))
        padded[:blk.shape[0], :blk.shape[1]] = blk
        count[:blk.shape[0], :blk.shape[1]] = 1
        s = padded.reshape(r1 - r0, 2, dw, 2).sum(axis=(1, 3))
        n = count.reshape(r1 - r0, 2, dw, 2).sum(axis=(1, 3))
        dst.write_rows(r0, np.floor(s / np.maximum(n, 1) + 0.5).astype(np.uint8))


def _tiles(src: Any, tile: int) -> Iterator[np.ndarray]:
    h, w = src.shape[-2], src.shape[-1]
    for r0 in range(0, h, tile):
        band = np.zeros((tile, math.ceil(w / tile) * tile), dtype=np.uint8)
        blk = np.asarray(src[r0:min(h, r0 + tile), 0:w])
        band[:blk.shape[0], :blk.shape[1]] = blk
        for c0 in range(0, w, tile):
            yield band[:, c0:c0 + tile].copy()


def write_heatmap_ome_tiff(path: str | os.PathLike[str], heatmap: Any, *, mpp: float,
                           tile: int = 256, name: str = "probability",
                           channel: str | None = None, backup: bool = False) -> Path:
    """Write a 2-D uint8 map (array-like, read in bands) as a pyramidal OME-TIFF.

    Levels halve until the longer side fits one tile; the physical pixel size of level 0 is
    ``mpp`` µm. ``name`` is the OME image name and ``channel`` the channel's name (QuPath shows
    it in Brightness & Contrast; default ``name``): the class whose probability this is.
    Written atomically (``backup``: the previous file is kept, see :func:`atomic_path`); a
    write failure is an OutputError naming ``path``. Returns ``path``.
    """
    path = Path(path)
    try:
        return _write_heatmap(path, heatmap, mpp, tile, name, channel or name, backup)
    except OutputError as exc:
        if exc.path == path:
            raise
        raise OutputError(exc.message, path) from exc  # not the vanished pyramid scratch file
    except OSError as exc:
        raise OutputError.from_os_error(exc, path) from exc


def _write_heatmap(path: Path, heatmap: Any, mpp: float, tile: int, name: str, channel: str,
                   backup: bool) -> Path:
    import tifffile

    h, w = int(heatmap.shape[-2]), int(heatmap.shape[-1])
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".heatmap.") as tmpdir:
        levels: list[Any] = [heatmap]
        prev: Any = heatmap
        lh, lw = h, w
        k = 0
        while max(lh, lw) > tile:
            lh, lw = math.ceil(lh / 2), math.ceil(lw / 2)
            nxt = MapFile.create(Path(tmpdir) / f"level{k + 1}.npy", (lh, lw), np.uint8)
            _downsample2(prev, nxt)
            levels.append(nxt)
            prev = nxt
            k += 1
        options: dict[str, Any] = {"tile": (tile, tile), "compression": "zlib",
                                   "photometric": "minisblack", "resolutionunit": "CENTIMETER",
                                   "dtype": np.uint8}
        try:
            with atomic_path(path, backup=backup) as tmp, tifffile.TiffWriter(tmp, bigtiff=True,
                                                               ome=True) as tif:
                meta = {"axes": "YX", "Name": name, "Channel": {"Name": [channel]},
                        "PhysicalSizeX": mpp,
                        "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
                        "PhysicalSizeYUnit": "µm"}
                tif.write(_tiles(levels[0], tile), shape=(h, w), subifds=len(levels) - 1,
                          resolution=(1e4 / mpp, 1e4 / mpp), metadata=meta, **options)
                for i, lvl in enumerate(levels[1:], start=1):
                    f = 2 ** i
                    tif.write(_tiles(lvl, tile), shape=lvl.shape, subfiletype=1,
                              resolution=(1e4 / (mpp * f), 1e4 / (mpp * f)), **options)
        finally:
            for lvl in levels[1:]:
                lvl.close()
    return path


# ------------------------------------------------------------------------------ PNG overlay

#: White gap between the two panels of the overlay, and the legend's layout (pixels).
OVERLAY_GAP = 8
_SWATCH = 14
_LEGEND_ROW = 22
_LEGEND_PAD = 8


def write_overlay_png(path: str | os.PathLike[str], slide: Slide, class_map: Any,
                      map_downsample: float, colors: Sequence[Sequence[int]], *,
                      names: Sequence[str] | None = None, max_size: int = 1024,
                      alpha: float = 0.45, backup: bool = False) -> Path:
    """A quick look at a prediction: the slide's thumbnail (QuPath's image region, longer side
    ``max_size``) on the left, the same thumbnail with every non-background class of
    ``class_map`` painted in its colour on the right (``OVERLAY_GAP`` white pixels between
    them), and under both a legend: a swatch of each non-background class's colour and its
    name (``names``; default ``class <i>``). Written atomically (``backup``: the previous file
    is kept, see :func:`atomic_path`)."""
    from PIL import Image

    path = Path(path)
    w_q, h_q = slide.qupath_dimensions
    tds = max(w_q, h_q) / max_size if max(w_q, h_q) > max_size else 1.0
    tw, th = max(1, math.ceil(w_q / tds - 1e-9)), max(1, math.ceil(h_q / tds - 1e-9))
    mpp = slide.mpp * tds if slide.has_mpp else None
    if mpp is None:
        rgb = np.asarray(slide.get_thumbnail((tw, th)).convert("RGB"))
        rgb = np.asarray(Image.fromarray(rgb).resize((tw, th)))
    else:
        rgb = slide.read_region_mpp(0.0, 0.0, tw, th, mpp)
    mh, mw = class_map.shape[-2], class_map.shape[-1]
    cols = np.minimum(((np.arange(tw) + 0.5) * tds / map_downsample).astype(np.int64), mw - 1)
    rows = np.minimum(((np.arange(th) + 0.5) * tds / map_downsample).astype(np.int64), mh - 1)
    labels = np.zeros((th, tw), dtype=np.int64)
    for k, r in enumerate(rows):  # one map row per thumbnail row: bounded memory
        labels[k] = np.asarray(class_map[int(r):int(r) + 1, 0:mw])[0, cols]
    lut = np.zeros((max(256, len(colors)), 3), dtype=np.float64)
    for i, c in enumerate(colors):
        lut[i] = c[:3]
    paint = (labels > 0) & (labels < len(colors))
    out = rgb.astype(np.float64)
    out[paint] = (1 - alpha) * out[paint] + alpha * lut[labels[paint]]
    painted = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    label_names = [names[i] if names is not None and i < len(names) else f"class {i}"
                   for i in range(len(colors))]
    entries = [(label_names[i], tuple(int(v) for v in colors[i][:3]))
               for i in range(1, len(colors))]
    img = _overlay_canvas(np.ascontiguousarray(rgb[..., :3], dtype=np.uint8), painted, entries)
    with atomic_path(path, backup=backup) as tmp:
        img.save(tmp, format="PNG")
    return path


def _overlay_canvas(raw: np.ndarray, painted: np.ndarray,
                    entries: Sequence[tuple[str, tuple[int, ...]]]) -> Any:
    """Raw and painted thumbnails side by side on white, the legend (wrapped rows of swatch +
    name) under them."""
    from PIL import Image, ImageDraw, ImageFont

    th, tw = raw.shape[:2]
    width = 2 * tw + OVERLAY_GAP
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed: list[tuple[int, int, str, tuple[int, ...]]] = []  # (x, row, name, colour)
    x, row = _LEGEND_PAD, 0
    for name, colour in entries:
        w = _SWATCH + 6 + math.ceil(probe.textlength(name, font=font)) + 16
        if x > _LEGEND_PAD and x + w > width - _LEGEND_PAD:
            x, row = _LEGEND_PAD, row + 1
        placed.append((x, row, name, colour))
        x += w
    legend_h = (row + 1) * _LEGEND_ROW + _LEGEND_PAD if entries else 0
    canvas = Image.new("RGB", (width, th + legend_h), (255, 255, 255))
    canvas.paste(Image.fromarray(raw, "RGB"), (0, 0))
    canvas.paste(Image.fromarray(painted, "RGB"), (tw + OVERLAY_GAP, 0))
    draw = ImageDraw.Draw(canvas)
    for x, r, name, colour in placed:
        y = th + _LEGEND_PAD // 2 + r * _LEGEND_ROW + (_LEGEND_ROW - _SWATCH) // 2
        fill = (colour[0], colour[1], colour[2])
        draw.rectangle((x, y, x + _SWATCH - 1, y + _SWATCH - 1), fill=fill, outline=(0, 0, 0))
        draw.text((x + _SWATCH + 6, y + _SWATCH // 2), name, fill=(0, 0, 0), font=font,
                  anchor="lm")
    return canvas
