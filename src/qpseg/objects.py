"""Class / instance maps -> QuPath objects with measurements and provenance.

Geometry
    A map pixel ``(col, row)`` covers QuPath ``x ∈ [x0 + col·ds, x0 + (col+1)·ds)`` and likewise
    ``y`` (:class:`MapGeometry`; ``ds = map_mpp / slide_mpp``). The caller applies the OpenSlide
    bounds offset once, through :meth:`MapGeometry.from_slide` (``Slide.level0_to_qupath``).
    A map at a coarser pixel size than the image usually has a last row/column that reaches
    past the image; with ``image_size`` (the QuPath image's width and height, which
    ``from_slide`` and :meth:`MapGeometry.within` set) every object is clipped to the image,
    ``0 ≤ x ≤ width``, ``0 ≤ y ≤ height``, before it is measured, so no written vertex lies
    outside the image and areas count only the image's part.

Polygons: pixel-edge (staircase) tracing, then simplification
    Each connected component (``connectivity`` 2 = 8-connected, as the lesion metrics count
    lesions; 1 = 4-connected) of each class (never Background 0 nor the ignore index) is traced
    along pixel edges, so the exact polygon covers exactly the component's pixel squares (one
    pixel -> its square; holes are interior rings). The tracer is vectorised: maximal straight
    edge runs are linked into rings (at a vertex where two pixels of one component touch only
    diagonally it turns around the pixel, and the rare self-touching ring this can give is
    repaired by :func:`qpseg.qupath.geojson.repair_polygonal`); rings are ordered by pointer
    jumping, with no Python loop per object. Then, per object: holes smaller than
    ``fill_holes_um2`` are filled (objects of the same class inside a filled hole become part of
    it; other classes stay, overlapping), objects smaller than ``min_area_um2`` are dropped
    (both default to :data:`REVIEW_DEFAULTS` for the object's output type: lesion, tissue class
    or nucleus, sizes a pathologist can review; 0 keeps every hole / object), and
    the outline is simplified with GEOS Douglas-Peucker at ``simplify_um`` (default one map
    pixel, so the outline stays within one output pixel of the exact one; the topology-preserving
    variant where plain DP gives an invalid polygon). When simplifying would change
    the area by more than :data:`MAX_SIMPLIFY_AREA_CHANGE` (tiny objects: a one-pixel square
    would become a triangle) the exact outline is kept. Simplification is done in map pixels and
    the result is then mapped exactly to QuPath coordinates (a corner ``(col, row)`` becomes
    ``(x0 + col·ds, y0 + row·ds)``) and repaired if rounding made it invalid.

Large maps
    Maps are read in blocks of ``block_size`` pixels through 2-D slicing, so any array-like
    works (numpy memmap, zarr, h5py). Blocks need no overlap: pieces of adjacent blocks share
    their pixel edges exactly, so the pieces of one object (same class, connected across a
    block border by the edge rows/columns of the two blocks, diagonally too when 8-connected)
    are unioned into one polygon. Every exact polygon is brought to a canonical form (no
    collinear vertices, ``shapely.normalize``) before hole filling and simplification, and
    probability sums are kept in exact fixed point (2^-24), so the result is identical to
    polygonising the whole map at once, whatever the block size (1 - 16384 px). Memory: one
    block of the map (and of each probability channel) at a time, plus the objects found.
    Reading and tracing the blocks is most of the time polygonising takes, so ``progress`` (a
    :data:`PolygoniseProgress`) is told after each block.
    A map tile given with :meth:`MapGeometry.tile` is polygonised on its own: objects crossing
    the tile border are not joined, so give the whole on-disk map where that matters.

Measurements (QuPath names; all finite)
    ``Area µm^2`` is the exact pixel area (after hole filling), the area the pixel metrics of
    ``qpseg evaluate`` see; ``Perimeter µm`` is measured on the written (simplified) outline,
    because a staircase is ~27 % longer than the edge it approximates; ``Max diameter µm`` is
    the largest distance between two corners of the object's pixels (the convex hull diameter,
    equal to :func:`qpseg.metrics.lesion.max_feret_diameters`), so the size category agrees with
    the lesion metrics; ``Detection probability`` is the mean probability of the object's class
    over the object's pixels (those of absorbed same-class islands included, filled background
    not; non-finite values ignored), written only when probabilities are given. Objects of a
    ``lesion_classes`` class also get ``Size category`` (0 ITC ≤ 0.2 mm, 1 micrometastasis
    ≤ 2 mm, 2 macrometastasis; khalil2022) and a name such as ``"Macrometastasis 3.20 mm"``.

Cells (:func:`polygonise_instances`)
    One cell per instance id of an instance label map (pieces with the same id are one cell,
    even when they are not connected). ``nucleus_geometry`` is the nucleus outline; the cell
    geometry is the nucleus itself (``cell_expansion_um=0``, the default) or the nucleus grown by
    ``cell_expansion_um`` µm, limited to its Voronoi region (nucleus centroids) and never covering
    another nucleus (as QuPath's cell expansion). Measurements use QuPath's cell names
    (``Nucleus: Area µm^2``, ``Cell: Area µm^2``, ...). The class of a cell is the most frequent
    class of its pixels in an optional class map, else ``default_class``. Holes of a nucleus
    below ``fill_holes_um2`` are filled; a cell never swallows another one.

Provenance
    Every object's ``metadata`` holds the caller's provenance (see :func:`provenance`; it must
    contain ``qpseg_model``, the key ``groovy/import_predictions.groovy`` uses to find qpseg's
    objects) plus the thresholds used here (``qpseg_min_area_um2``, ``qpseg_fill_holes_um2``,
    ``qpseg_simplify_um``, ``qpseg_connectivity``, ``qpseg_map_mpp``).

Files
    :func:`write_predictions` writes ``<entryID>.geojson`` atomically and refuses to replace an
    existing file unless ``overwrite`` (the previous one is then kept as ``.bak``); the per-slide
    summary (:func:`slide_summary`) goes to ``<entryID>.metadata.json`` (flat str -> str), which
    is written *first*, so an existing GeoJSON always means a finished slide.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError, LabelError, QpsegError
from qpseg.labels import ClassMap
from qpseg.qupath.geojson import QuPathObject

if TYPE_CHECKING:  # numpy/shapely/scipy are imported lazily: the CLI must start fast
    import numpy as np

    from qpseg.slide import Slide

__all__ = [
    "AREA",
    "MAX_DIAMETER",
    "MAX_SIMPLIFY_AREA_CHANGE",
    "PERIMETER",
    "PROBABILITY",
    "REVIEW_DEFAULTS",
    "SIZE_CATEGORY",
    "SIZE_CATEGORY_CODES",
    "SIZE_CATEGORY_LABELS",
    "MapGeometry",
    "PolygoniseProgress",
    "PredictionsExistError",
    "metadata_path",
    "polygonise",
    "polygonise_instances",
    "predictions_path",
    "provenance",
    "slide_summary",
    "summary_metadata",
    "write_predictions",
]

AREA = "Area \u00b5m^2"
PERIMETER = "Perimeter \u00b5m"
MAX_DIAMETER = "Max diameter \u00b5m"
PROBABILITY = "Detection probability"
SIZE_CATEGORY = "Size category"
NUCLEUS = "Nucleus: "
CELL = "Cell: "

#: ``Size category`` values (QuPath measurements are numbers) and object-name labels
SIZE_CATEGORY_CODES: dict[str, int] = {"itc": 0, "micro": 1, "macro": 2}
SIZE_CATEGORY_LABELS: dict[str, str] = {
    "itc": "ITC", "micro": "Micrometastasis", "macro": "Macrometastasis",
}
#: simplification is undone for an object whose area it changes by more than this fraction
MAX_SIMPLIFY_AREA_CHANGE = 0.1

#: ``(min_area_um2, fill_holes_um2)`` per output type, used where the caller gives None: the
#: objects a pathologist reviews in QuPath, without specks (a model's 1 µm² pixels) or
#: pinholes. ``lesion``: classes of ``lesion_classes``; ``tissue``: every other class of a
#: class map; ``nucleus``: cells of an instance map and the classes of a nuclei model's class
#: map. ``qpseg infer --help`` repeats these.
REVIEW_DEFAULTS: dict[str, tuple[float, float]] = {
    # 50 µm² is about one tumour cell (a disc 8 µm across): isolated tumour cells, the smallest
    # metastases khalil2022 segments (§1: ITCs, <= 0.2 mm, down to single cells), are kept;
    # a hole smaller than one cell is not another tissue.
    "lesion": (50.0, 50.0),
    # 1,000 µm² is a region about 32 µm across (a few cells, a small gland's cross-section):
    # the smallest tissue region a pathologist outlines when reviewing at 10x (ho2021 tissue
    # subtypes, pedersen2022 tumour region); smaller islands and holes are map noise.
    "tissue": (1000.0, 1000.0),
    # QuPath's cell detection drops nuclei under 10 µm² and over 400 µm² (qupath-core-processing
    # WatershedCellDetection.java, v0.5.1 lines 461-464) and its nuclei are filled outlines
    # (getFilledPolygonROIs, line 798); lagree2021 (Methods) likewise fills missing pixels and
    # removes small artifacts: so holes up to the largest nucleus (400 µm²) are filled.
    "nucleus": (10.0, 400.0),
}
DEFAULT_BLOCK_SIZE = 2048
MARKER_KEY = "qpseg_model"

#: ``progress(blocks_done, blocks_total, objects)`` for progress displays: called with
#: ``(0, n, 0)`` before the first of the map's ``n`` blocks, after each block (row by row)
#: with the pieces found so far (a piece is one connected component within one block, so an
#: object crossing block borders counts once per block until the pieces are joined), and once
#: more, ``(n, n, objects)``, with the number of objects returned. An exception it raises
#: aborts the polygonising.
PolygoniseProgress = Callable[[int, int, int], None]

# direction codes of pixel-edge segments: east, south, west, north (image axes, y down)
_DX = (1, 0, -1, 0)
_DY = (0, 1, 0, -1)


class PredictionsExistError(QpsegError):
    """The predictions file exists and ``overwrite`` was not asked for (the slide is done)."""


# ---------------------------------------------------------------------------------- geometry


def _positive(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, not {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{what} must be a positive finite number, not {value!r}")
    return v


def _non_negative(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, not {value!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise ConfigError(f"{what} must be a finite number >= 0, not {value!r}")
    return v


@dataclass(frozen=True)
class MapGeometry:
    """Where a map lies in QuPath's full-resolution pixel coordinates.

    Map pixel ``(col, row)`` covers ``x ∈ [x0 + col·downsample, x0 + (col+1)·downsample)`` and
    ``y`` likewise; ``slide_mpp`` is the slide's full-resolution pixel size (µm).
    """

    x0: float
    y0: float
    downsample: float
    slide_mpp: float
    #: QuPath image ``(width, height)`` in full-resolution pixels; objects are clipped to
    #: ``[0, width] × [0, height]``. None: not clipped.
    image_size: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for name in ("x0", "y0"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"map origin {name} must be a finite number, not {v!r}")
            object.__setattr__(self, name, float(v))
        object.__setattr__(self, "downsample", _positive(self.downsample, "map downsample"))
        object.__setattr__(self, "slide_mpp", _positive(self.slide_mpp, "slide pixel size (mpp)"))
        if self.image_size is not None:
            try:
                w, h = self.image_size
            except (TypeError, ValueError):
                raise ConfigError(f"image size must be (width, height), not "
                                  f"{self.image_size!r}") from None
            object.__setattr__(self, "image_size", (_positive(w, "image width"),
                                                    _positive(h, "image height")))

    @property
    def map_mpp(self) -> float:
        """Pixel size of the map (µm)."""
        return self.downsample * self.slide_mpp

    @classmethod
    def from_mpp(cls, map_mpp: float, slide_mpp: float, x0: float = 0.0,
                 y0: float = 0.0) -> MapGeometry:
        """The geometry of a map at ``map_mpp`` whose pixel (0, 0) starts at QuPath ``(x0, y0)``."""
        return cls(float(x0), float(y0),
                   _positive(map_mpp, "map pixel size (mpp)") / _positive(slide_mpp, "slide mpp"),
                   float(slide_mpp))

    @classmethod
    def from_slide(cls, slide: Slide, map_mpp: float, *,
                   origin_level0: tuple[float, float] = (0.0, 0.0)) -> MapGeometry:
        """The geometry of a map of ``slide`` at ``map_mpp`` whose pixel (0, 0) starts at level-0
        file coordinates ``origin_level0``; the bounds offset is removed here, once."""
        x0, y0 = slide.level0_to_qupath(float(origin_level0[0]), float(origin_level0[1]))
        return cls.from_mpp(map_mpp, slide.mpp, x0, y0).within(*slide.qupath_dimensions)

    def within(self, width: float, height: float) -> MapGeometry:
        """This geometry, with objects clipped to a QuPath image of ``width`` × ``height``
        full-resolution pixels (``Slide.qupath_dimensions``: bounds-cropped when OpenSlide
        reports bounds)."""
        return replace(self, image_size=(width, height))

    def tile(self, col: int, row: int) -> MapGeometry:
        """The geometry of a tile of this map whose pixel (0, 0) is this map's ``(col, row)``."""
        return MapGeometry(self.x0 + col * self.downsample, self.y0 + row * self.downsample,
                           self.downsample, self.slide_mpp, self.image_size)

    def image_box(self) -> tuple[float, float, float, float] | None:
        """The image as ``(xmin, ymin, xmax, ymax)`` in map pixels (None without a size)."""
        if self.image_size is None:
            return None
        w, h = self.image_size
        ds = self.downsample
        return -self.x0 / ds, -self.y0 / ds, (w - self.x0) / ds, (h - self.y0) / ds

    def to_qupath(self, col: float, row: float) -> tuple[float, float]:
        """QuPath coordinates of the map point ``(col, row)`` (a pixel corner when integral)."""
        return self.x0 + col * self.downsample, self.y0 + row * self.downsample

    def transform(self, geoms: Any) -> Any:
        """Shapely geometry (or array of them) in map pixels -> QuPath coordinates.

        With ``image_size``, coordinates are also limited to the image (geometry clipped in
        map pixels can land a rounding error past the edge when scaled)."""
        import numpy as np
        import shapely

        ds, origin = self.downsample, np.array([self.x0, self.y0])
        if self.image_size is None:
            return shapely.transform(geoms, lambda xy: xy * ds + origin)
        high = np.array(self.image_size)
        return shapely.transform(geoms, lambda xy: np.clip(xy * ds + origin, 0.0, high))


# -------------------------------------------------------------------------------- provenance


def _fmt(value: Any) -> str:
    """A metadata value as text (QuPath metadata are strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def provenance(model: str, model_sha256: str, *, mpp: float, run: str | None = None,
               thresholds: Mapping[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Object metadata that records what made a prediction.

    Keys: ``qpseg_model``, ``qpseg_model_sha256``, ``qpseg_version``, ``qpseg_run`` (default: the
    UTC time, ``20250101T120000Z``), ``qpseg_date`` (ISO 8601 UTC), ``qpseg_mpp``, one
    ``qpseg_<name>`` per threshold, and ``extra`` as given. All values are strings.
    """
    from qpseg import __version__

    now = datetime.now(UTC)
    meta = {
        "qpseg_model": str(model),
        "qpseg_model_sha256": str(model_sha256),
        "qpseg_version": __version__,
        "qpseg_run": run if run is not None else now.strftime("%Y%m%dT%H%M%SZ"),
        "qpseg_date": now.isoformat(timespec="seconds"),
        "qpseg_mpp": _fmt(float(mpp)),
    }
    for key, value in (thresholds or {}).items():
        meta[key if key.startswith("qpseg_") else f"qpseg_{key}"] = _fmt(value)
    for key, value in (extra or {}).items():
        meta[str(key)] = _fmt(value)
    return meta


def _object_metadata(prov: Mapping[str, Any], geometry: MapGeometry,
                     settings: Mapping[str, Any]) -> dict[str, str]:
    if not isinstance(prov, Mapping):
        raise ConfigError(f"provenance must be a mapping of strings, not {type(prov).__name__}")
    meta: dict[str, str] = {}
    for key, value in prov.items():
        if not isinstance(key, str):
            raise ConfigError(f"provenance key {key!r} is not a string")
        if value is None or isinstance(value, dict | list | tuple):
            raise ConfigError(f"provenance value of {key!r} must be text or a number")
        meta[key] = _fmt(value)
    if not meta.get(MARKER_KEY):
        raise ConfigError(f"provenance must name the model under {MARKER_KEY!r} (the QuPath "
                          "import script finds qpseg's objects by that key)")
    meta.setdefault("qpseg_mpp", _fmt(geometry.map_mpp))
    meta["qpseg_map_mpp"] = _fmt(geometry.map_mpp)
    for key, value in settings.items():
        meta[f"qpseg_{key}"] = _fmt(value)
    return meta


# ------------------------------------------------------------------------------- map access


def _shape2d(arr: Any, what: str) -> tuple[int, int]:
    shape = getattr(arr, "shape", None)
    if shape is None or len(shape) != 2:
        raise LabelError(f"{what} must be a 2-D array, not of shape {shape}")
    return int(shape[0]), int(shape[1])


def _read_block(arr: Any, r0: int, r1: int, c0: int, c1: int, what: str) -> np.ndarray:
    import numpy as np

    try:
        blk = np.asarray(arr[r0:r1, c0:c1])
    except Exception as exc:  # any array-like: an I/O error of zarr/h5py is not ours to type
        raise LabelError(f"cannot read {what} block [{r0}:{r1}, {c0}:{c1}] ({exc})") from exc
    if blk.shape != (r1 - r0, c1 - c0):
        raise LabelError(f"{what} block [{r0}:{r1}, {c0}:{c1}] has shape {blk.shape}")
    if blk.dtype.kind not in "biu":
        raise LabelError(f"{what} must hold integers, not {blk.dtype}")
    return blk


class _Probs:
    """Probability maps in any accepted form, read block by block as float64 in [0, 1]."""

    def __init__(self, probs: Any, classes: ClassMap, shape: tuple[int, int]) -> None:
        self.single: Any = None              # one 2-D map used for every class
        self.by_class: dict[int, Any] = {}   # class index -> 2-D map or (stack, index)
        self.stack: Any = None
        if probs is None:
            return
        if isinstance(probs, Mapping):
            for key, value in probs.items():
                idx = classes.index_of(key) if isinstance(key, str) else key
                if not isinstance(idx, int) or not 0 <= idx < len(classes):
                    raise ConfigError(f"probability map for unknown class {key!r}")
                self._check(value, shape, f"probability map of class {key!r}")
                self.by_class[idx] = value
            return
        pshape = getattr(probs, "shape", None)
        if pshape is None:
            raise ConfigError("probabilities must be an array or a mapping class -> array")
        if len(pshape) == 2:
            self._check(probs, shape, "probability map")
            self.single = probs
        elif len(pshape) == 3:
            if tuple(pshape[1:]) != shape or pshape[0] != len(classes):
                raise ConfigError(f"probabilities have shape {tuple(pshape)}; expected "
                                  f"({len(classes)}, {shape[0]}, {shape[1]})")
            self.stack = probs
            self.by_class = {i: None for i in range(len(classes))}
        else:
            raise ConfigError(f"probabilities must be 2-D or 3-D, not of shape {tuple(pshape)}")

    @staticmethod
    def _check(arr: Any, shape: tuple[int, int], what: str) -> None:
        s = getattr(arr, "shape", None)
        if s is None or tuple(s) != shape:
            raise ConfigError(f"{what} has shape {s}; the map has {shape}")

    @property
    def given(self) -> bool:
        return self.single is not None or bool(self.by_class)

    def channels(self) -> list[int]:
        """Class indices with a map (``[-1]`` for a single map used for every class)."""
        return [-1] if self.single is not None else sorted(self.by_class)

    def read(self, cls: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray | None:
        import numpy as np

        if self.single is not None:
            raw = self.single[r0:r1, c0:c1]
        elif cls not in self.by_class:
            return None
        elif self.stack is not None:
            raw = self.stack[cls, r0:r1, c0:c1]
        else:
            raw = self.by_class[cls][r0:r1, c0:c1]
        arr = np.asarray(raw)
        if arr.dtype == np.uint8:  # 8-bit storage of [0, 1]
            return arr.astype(np.float64) / 255.0
        if arr.dtype.kind not in "fiub":
            raise ConfigError(f"probabilities must be numbers, not {arr.dtype}")
        return arr.astype(np.float64, copy=False)


# ------------------------------------------------------------------------- pixel-edge tracer


def _runs(mask: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, ...]:
    """Maximal runs of exposed edges of one label along each line: (line, a0, a1, label)."""
    import numpy as np

    length = mask.shape[1]
    pair = mask[:, :-1] & mask[:, 1:] & (lab[:, :-1] == lab[:, 1:])
    start = mask.copy()
    start[:, 1:] &= ~pair
    end = mask.copy()
    end[:, :-1] &= ~pair
    s = np.flatnonzero(start)
    e = np.flatnonzero(end)
    return s // length, s % length, e % length + 1, lab.ravel()[s]


@dataclass
class _Rings:
    coords: np.ndarray       # (M, 2) int64 ring vertices, rings concatenated
    offsets: np.ndarray      # (R + 1,) ring k is coords[offsets[k]:offsets[k+1]]
    label: np.ndarray        # (R,) label of each ring
    area2: np.ndarray        # (R,) twice the signed area: > 0 exterior, < 0 hole
    inner: np.ndarray        # (R, 2) a pixel centre just left of the ring (inside a hole)
    saddle: np.ndarray       # (n + 1,) bool: the label has a diagonal-only vertex
    first: np.ndarray        # (n + 1,) raster index (row * w + col) of the label's first pixel


def _trace(lab: np.ndarray, n: int) -> _Rings:
    """Pixel-edge rings of every label 1..n of ``lab`` (0 = nothing), vectorised.

    Segments are maximal straight runs of exposed pixel edges, oriented with the label on their
    right (image axes), so exteriors have positive shoelace area and holes negative. A segment
    is followed by the segment of the same label starting where it ends; where there are two
    (pixels of one label touching only at a corner) the right turn is taken (around the pixel).
    """
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    w = lab.shape[1]
    nz = lab != 0
    other = np.zeros_like(lab)
    other[1:] = lab[:-1]
    tr, tc0, tc1, tl = _runs(nz & (lab != other), lab)      # top edges, east
    other[:] = 0
    other[:-1] = lab[1:]
    br, bc0, bc1, bl = _runs(nz & (lab != other), lab)      # bottom edges, west
    labt = np.ascontiguousarray(lab.T)
    nzt = labt != 0
    other = np.zeros_like(labt)
    other[1:] = labt[:-1]
    lc, lr0, lr1, ll = _runs(nzt & (labt != other), labt)   # left edges, north
    other[:] = 0
    other[:-1] = labt[1:]
    rc, rr0, rr1, rl = _runs(nzt & (labt != other), labt)   # right edges, south
    del other, labt, nzt

    first = np.full(n + 1, -1, dtype=np.int64)
    ulab, uidx = np.unique(tl, return_index=True)  # top runs come in raster order
    first[ulab] = tr[uidx] * w + tc0[uidx]

    sx = np.concatenate([tc0, bc1, lc, rc + 1]).astype(np.int64)
    sy = np.concatenate([tr, br + 1, lr1, rr0]).astype(np.int64)
    ex = np.concatenate([tc1, bc0, lc, rc + 1]).astype(np.int64)
    ey = np.concatenate([tr, br + 1, lr0, rr1]).astype(np.int64)
    d = np.concatenate([np.zeros(len(tr), np.int64), np.full(len(br), 2, np.int64),
                        np.full(len(lc), 3, np.int64), np.ones(len(rc), np.int64)])
    lbl = np.concatenate([tl, bl, ll, rl]).astype(np.int64)
    m = len(lbl)
    saddle = np.zeros(n + 1, dtype=bool)
    if m == 0:
        return _Rings(np.empty((0, 2), np.int64), np.zeros(1, np.int64), np.empty(0, np.int64),
                      np.empty(0, np.int64), np.empty((0, 2)), saddle, first)

    # (start vertex, direction) identifies a segment: its label is the pixel on its right
    w1 = w + 1
    key = (sy * w1 + sx) * 4 + d
    order = np.argsort(key)
    skey = key[order]
    vend = (ey * w1 + ex) * 4

    def find(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(skey, k), m - 1)
        cand = order[pos]
        return cand, (skey[pos] == k) & (lbl[cand] == lbl)

    right, ok_right = find(vend + (d + 1) % 4)
    left, ok_left = find(vend + (d + 3) % 4)
    if not (ok_right | ok_left).all():  # pragma: no cover - every ring closes
        raise RuntimeError("pixel-edge tracing failed to close a ring")
    saddle[lbl[ok_right & ok_left]] = True
    succ = np.where(ok_right, right, left)

    # rings are the cycles of succ; order each by pointer jumping from its smallest segment
    graph = csr_matrix((np.ones(m, dtype=np.int8), (np.arange(m), succ)), shape=(m, m))
    n_rings, ring = connected_components(graph, directed=True, connection="weak")
    lengths = np.bincount(ring, minlength=n_rings)
    _, head = np.unique(ring, return_index=True)
    is_head = np.zeros(m, dtype=bool)
    is_head[head] = True
    nxt = succ.copy()
    tail = is_head[succ]
    nxt[tail] = np.flatnonzero(tail)
    dist = (~tail).astype(np.int64)
    for _ in range(max(1, int(lengths.max()) - 1).bit_length()):
        dist = dist + dist[nxt]
        nxt = nxt[nxt]
    seq = np.lexsort((lengths[ring] - 1 - dist, ring))

    xs, ys = sx[seq], sy[seq]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    nx = np.arange(1, m + 1)
    nx[offsets[1:] - 1] = offsets[:-1]
    area2 = np.add.reduceat(xs * ys[nx] - xs[nx] * ys, offsets[:-1])
    h0 = seq[offsets[:-1]]  # first segment of each ring
    dx, dy = np.take(_DX, d[h0]), np.take(_DY, d[h0])
    inner = np.stack([sx[h0] + 0.5 * dx + 0.5 * dy, sy[h0] + 0.5 * dy - 0.5 * dx], axis=1)
    return _Rings(np.stack([xs, ys], axis=1), offsets, lbl[h0], area2, inner, saddle, first)


def _polygons(rings: _Rings, n: int, offset: tuple[int, int]) -> np.ndarray:
    """Exact (valid) geometry of each label 1..n, as an object array indexed label - 1."""
    import numpy as np
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    from qpseg.qupath.geojson import repair_polygonal

    out = np.empty(n, dtype=object)
    n_rings = len(rings.label)
    if n_rings == 0:
        return out
    coords = rings.coords.astype(np.float64) + np.asarray(offset, dtype=np.float64)
    ring_of = np.repeat(np.arange(n_rings), np.diff(rings.offsets))
    lr = shapely.linearrings(coords, indices=ring_of)
    hole = rings.area2 < 0
    n_ext = np.bincount(rings.label[~hole], minlength=n + 1)
    simple = n_ext[rings.label] == 1
    sel = np.flatnonzero(simple)
    sel = sel[np.lexsort((hole[sel], rings.label[sel]))]
    if len(sel):
        labels = rings.label[sel]
        uniq, poly_of = np.unique(labels, return_inverse=True)
        out[uniq - 1] = shapely.polygons(lr[sel], indices=poly_of)
    multi = np.flatnonzero(n_ext > 1)
    if len(multi):  # labels with several exteriors: pixels touching only at corners
        in_multi = np.isin(rings.label, multi)
        shells = np.flatnonzero(in_multi & ~hole)
        holes = np.flatnonzero(in_multi & hole)
        shell_poly = shapely.polygons(lr[shells])
        owner = np.full(len(holes), -1)
        if len(holes):  # the innermost shell of the same label around a point of the hole
            tree = shapely.STRtree(shell_poly)
            pts = shapely.points(rings.inner[holes] + np.asarray(offset, dtype=np.float64))
            hi, si = tree.query(pts, predicate="within")
            ok = rings.label[holes[hi]] == rings.label[shells[si]]
            hi, si = hi[ok], si[ok]
            order = np.lexsort((-shapely.area(shell_poly[si]), hi))  # smallest last per hole
            hi, si = hi[order], si[order]
            last = np.append(hi[1:] != hi[:-1], True)
            owner[hi[last]] = si[last]
        hole_rings: list[list[Any]] = [[] for _ in shells]
        for h_i, s_i in zip(holes.tolist(), owner.tolist(), strict=True):
            if s_i >= 0:
                hole_rings[s_i].append(lr[h_i])
        parts: dict[int, list[Any]] = {}
        for k, s_i in enumerate(shells.tolist()):
            parts.setdefault(int(rings.label[s_i]), []).append(Polygon(lr[s_i], hole_rings[k]))
        for lab_id, polys in parts.items():
            out[lab_id - 1] = MultiPolygon(polys)
    check = np.flatnonzero(rings.saddle[1:])
    if len(check):
        bad = check[~shapely.is_valid(out[check])]
        for i in bad:
            out[i] = shapely.simplify(repair_polygonal(out[i]), 0.0)
    return out


# --------------------------------------------------------------------------------- scanning


@dataclass
class _Pieces:
    """What the block scan found: one entry per piece (a component within one block)."""

    geom: np.ndarray     # object array of exact polygons in map pixels
    key: np.ndarray      # class index (class maps) or instance id (instance maps)
    npix: np.ndarray
    first: np.ndarray    # raster index in the whole map of the first pixel
    psum: np.ndarray     # (n, k) int64 sums of probabilities in units of 2^-24 (exact)
    pcnt: np.ndarray     # (n, k) finite probability values counted
    hist: np.ndarray     # (n, C) class histogram (instance maps; (n, 0) otherwise)
    group: np.ndarray    # object id of each piece


def _blocks(h: int, w: int, size: int) -> list[tuple[int, int, int, int, int, int]]:
    return [(bi, bj, r0, min(r0 + size, h), c0, min(c0 + size, w))
            for bi, r0 in enumerate(range(0, h, size)) for bj, c0 in enumerate(range(0, w, size))]


MAX_BLOCK_SIZE = 16384  # keeps per-block label and fixed-point probability sums exact


def _check_block_size(block_size: int) -> int:
    if (isinstance(block_size, bool) or not isinstance(block_size, int)
            or not 1 <= block_size <= MAX_BLOCK_SIZE):
        raise ConfigError(f"block size must be an integer 1-{MAX_BLOCK_SIZE}, not "
                          f"{block_size!r}")
    return block_size


def _class_labels(blk: np.ndarray, classes: ClassMap, connectivity: int,
                  where: str) -> tuple[np.ndarray, list[int]]:
    """Connected components of every class in a block: (labels int32, class of each label)."""
    import numpy as np
    from scipy import ndimage

    n_classes, ignore = len(classes), classes.ignore_index
    vmin, vmax = int(blk.min()), int(blk.max())
    if vmin < 0 or vmax > max(ignore, n_classes - 1):
        bad = vmin if vmin < 0 else vmax
        raise LabelError(f"{where}: value {bad} is neither a class index (0-{n_classes - 1}) "
                         f"nor the ignore index {ignore}")
    counts = np.bincount(blk.ravel(), minlength=n_classes)
    bad_values = [v for v in np.flatnonzero(counts[n_classes:]) + n_classes if v != ignore]
    if bad_values:
        raise LabelError(f"{where}: value {bad_values[0]} is neither a class index "
                         f"(0-{n_classes - 1}) nor the ignore index {ignore}")
    structure = ndimage.generate_binary_structure(2, connectivity)
    lab = np.zeros(blk.shape, dtype=np.int32)
    keys: list[int] = []
    for c in range(1, n_classes):
        if c == ignore or counts[c] == 0:
            continue
        part, k = ndimage.label(blk == c, structure=structure)
        on = part > 0
        lab[on] = part[on] + len(keys)
        keys.extend([c] * k)
    return lab, keys


def _instance_labels(blk: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Block-local labels 1..n of the instance ids in a block, and the id of each label."""
    import numpy as np

    if blk.size and int(blk.min()) < 0:
        raise LabelError(f"{where}: negative instance id {int(blk.min())}")
    vmax = int(blk.max()) if blk.size else 0
    if vmax <= 4 * blk.size + 65536:  # a lookup table beats sorting every pixel
        present = np.flatnonzero(np.bincount(blk.ravel(), minlength=vmax + 1))
        present = present[present > 0]
        lut = np.zeros(vmax + 1, dtype=np.int32)
        lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
        return lut[blk], present.astype(np.int64)
    ids, inv = np.unique(blk, return_inverse=True)
    lab = inv.reshape(blk.shape).astype(np.int32)
    if ids[0] == 0:
        return lab, ids[1:].astype(np.int64)
    return lab + 1, ids.astype(np.int64)


_PROB_UNIT = float(1 << 24)


def _fixed_sum(lab: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    """Per-label sums of ``p`` in fixed point (2^-24 units) as int64: exact, so the mean does
    not depend on how blocks split an object. Values are clipped to [0, 1] first."""
    import numpy as np

    q = np.rint(np.clip(p, 0.0, 1.0) * _PROB_UNIT)
    # < 2^53 per block (a block has far fewer than 2^29 pixels): float sums are exact integers
    return np.bincount(lab, weights=q, minlength=n + 1)[1:].astype(np.int64)


def _scan(values: Any, *, classes: ClassMap, instances: bool, connectivity: int,
          block_size: int, probs: _Probs, class_map: Any = None,
          progress: PolygoniseProgress | None = None) -> _Pieces:
    """Polygonise every block, then group pieces that form one object across block borders."""
    import numpy as np
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    what = "instance map" if instances else "class map"
    h, w = _shape2d(values, what)
    if class_map is not None and _shape2d(class_map, "class map") != (h, w):
        raise LabelError(f"class map has shape {class_map.shape}; the instance map {(h, w)}")
    chans = probs.channels() if probs.given else []
    n_classes = len(classes)
    geoms: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    npix: list[np.ndarray] = []
    firsts: list[np.ndarray] = []
    psums: list[np.ndarray] = []
    pcnts: list[np.ndarray] = []
    hists: list[np.ndarray] = []
    edges: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
    total = 0
    blocks = _blocks(h, w, block_size)
    if progress is not None:
        progress(0, len(blocks), 0)
    for done, (bi, bj, r0, r1, c0, c1) in enumerate(blocks, 1):
        where = f"{what} block [{r0}:{r1}, {c0}:{c1}]"
        blk = _read_block(values, r0, r1, c0, c1, what)
        if instances:
            lab, key = _instance_labels(blk, where)
        else:
            lab, klist = _class_labels(blk, classes, connectivity, where)
            key = np.asarray(klist, dtype=np.int64)
        n = len(key)
        if n:
            rings = _trace(lab, n)
            geoms.append(_polygons(rings, n, (c0, r0)))
            first = rings.first[1:]
            firsts.append((first // (c1 - c0) + r0) * w + first % (c1 - c0) + c0)
            flat = lab.ravel()
            npix.append(np.bincount(flat, minlength=n + 1)[1:].astype(np.int64))
            keys.append(key)
            ps = np.zeros((n, max(1, len(chans)) if instances else 1), dtype=np.int64)
            pc = np.zeros_like(ps)
            if chans and not instances:
                for c in np.unique(key):
                    p = probs.read(int(c), r0, r1, c0, c1)
                    if p is None:
                        continue
                    on = (blk == c) & np.isfinite(p)
                    ps[:, 0] += _fixed_sum(lab[on], p[on], n)
                    pc[:, 0] += np.bincount(lab[on], minlength=n + 1)[1:]
            elif chans:
                on_obj = lab > 0
                for k, c in enumerate(chans):
                    p = probs.read(c, r0, r1, c0, c1)
                    assert p is not None
                    on = on_obj & np.isfinite(p)
                    ps[:, k] = _fixed_sum(lab[on], p[on], n)
                    pc[:, k] = np.bincount(lab[on], minlength=n + 1)[1:]
            psums.append(ps)
            pcnts.append(pc)
            if instances:
                hist = np.zeros((n, n_classes), dtype=np.int64)
                if class_map is not None:
                    cblk = _read_block(class_map, r0, r1, c0, c1, "class map")
                    on = (lab > 0) & (cblk > 0) & (cblk < n_classes)
                    hist += np.bincount(
                        lab[on].astype(np.int64) * n_classes + cblk[on],
                        minlength=(n + 1) * n_classes,
                    ).reshape(n + 1, n_classes)[1:]
                hists.append(hist)
        if not instances:  # edge rows/columns, as global piece ids (-1: none)
            g = np.where(lab > 0, lab.astype(np.int64) - 1 + total, -1)
            edges[(bi, bj)] = (g[0].copy(), g[-1].copy(), g[:, 0].copy(), g[:, -1].copy())
        total += n
        del lab, blk
        if progress is not None:
            progress(done, len(blocks), total)

    width = max(1, len(chans)) if instances else 1
    if total == 0:
        empty = np.empty(0, dtype=np.int64)
        return _Pieces(np.empty(0, dtype=object), empty, empty, empty, np.zeros((0, width)),
                       np.zeros((0, width)), np.zeros((0, n_classes), np.int64), empty)
    piece_key = np.concatenate(keys)
    group: np.ndarray
    if instances:
        _, group = np.unique(piece_key, return_inverse=True)
    else:
        a_list: list[np.ndarray] = []
        b_list: list[np.ndarray] = []

        def link(a: np.ndarray, b: np.ndarray) -> None:
            ok = (a >= 0) & (b >= 0)
            a, b = a[ok], b[ok]
            same = piece_key[a] == piece_key[b]
            a_list.append(a[same])
            b_list.append(b[same])

        for (bi, bj), (_top, bottom, _left, right) in edges.items():
            for nb, mine, theirs in (((bi, bj + 1), right, 2), ((bi + 1, bj), bottom, 0)):
                if nb not in edges:
                    continue
                other_edge = edges[nb][theirs]
                link(mine, other_edge)
                if connectivity == 2:
                    link(mine[:-1], other_edge[1:])
                    link(mine[1:], other_edge[:-1])
            if connectivity == 2:  # blocks meeting only at a corner
                if (bi + 1, bj + 1) in edges:
                    link(bottom[-1:], edges[(bi + 1, bj + 1)][0][:1])
                if (bi + 1, bj - 1) in edges:
                    link(bottom[:1], edges[(bi + 1, bj - 1)][0][-1:])
        a = np.concatenate(a_list) if a_list else np.empty(0, np.int64)
        b = np.concatenate(b_list) if b_list else np.empty(0, np.int64)
        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(total, total))
        _, group = connected_components(graph, directed=False)
    geom = np.concatenate(geoms)
    # canonical exact form, so the result does not depend on the blocks: merge, drop the
    # collinear vertices merging leaves on block borders, normalise ring order and start
    sizes = np.bincount(group)
    if (sizes > 1).any():
        order = np.argsort(group, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for gid in np.flatnonzero(sizes > 1):
            members = order[starts[gid]:starts[gid + 1]]
            merged = shapely.simplify(shapely.union_all(geom[members]), 0.0)
            geom[members[0]] = merged
            geom[members[1:]] = None
    return _Pieces(geom, piece_key, np.concatenate(npix), np.concatenate(firsts),
                   np.concatenate(psums), np.concatenate(pcnts),
                   np.concatenate(hists) if hists else np.zeros((total, n_classes), np.int64),
                   group)


@dataclass
class _Objects:
    """Merged objects (one per group), in raster order of their first pixel."""

    geom: np.ndarray     # exact canonical geometry in map pixels
    key: np.ndarray
    npix: np.ndarray
    first: np.ndarray
    psum: np.ndarray
    pcnt: np.ndarray
    hist: np.ndarray


def _merge(p: _Pieces) -> _Objects:
    import numpy as np
    import shapely

    n = int(p.group.max()) + 1 if len(p.group) else 0
    geom = np.empty(n, dtype=object)
    keep = np.array([g is not None for g in p.geom], dtype=bool)
    geom[p.group[keep]] = p.geom[keep]
    key = np.zeros(n, dtype=np.int64)
    key[p.group] = p.key
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, p.group, p.first)

    def gsum(a: np.ndarray) -> np.ndarray:
        out = np.zeros((n, *a.shape[1:]), dtype=a.dtype)
        np.add.at(out, p.group, a)
        return out

    order = np.argsort(first)
    geom = shapely.normalize(geom)
    return _Objects(geom[order], key[order], gsum(p.npix)[order], first[order],
                    gsum(p.psum)[order], gsum(p.pcnt)[order], gsum(p.hist)[order])


# ------------------------------------------------------------------------ object finishing


def _fill_holes(obj: _Objects, cls: np.ndarray, max_hole_px: np.ndarray, width: int,
                absorb: bool) -> np.ndarray:
    """Fill holes below ``max_hole_px`` (px², per object); returns a keep mask. With
    ``absorb``, objects of the same class inside a filled hole are merged into its owner (their
    pixels and probabilities); cells never absorb other cells."""
    import numpy as np
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    keep = np.ones(len(obj.geom), dtype=bool)
    if not len(obj.geom) or not (max_hole_px > 0).any():
        return keep
    has_holes = np.flatnonzero(shapely.get_num_interior_rings(obj.geom) > 0)
    # MultiPolygons report 0 interior rings: look at their parts too
    is_multi = np.flatnonzero(shapely.get_type_id(obj.geom) == 6)
    filled: list[Any] = []
    owner: list[int] = []
    for i in np.union1d(has_holes, is_multi):
        g = obj.geom[i]
        parts = list(g.geoms) if g.geom_type == "MultiPolygon" else [g]
        new_parts = []
        changed = False
        for part in parts:
            kept = []
            for ring in part.interiors:
                hole = Polygon(ring)
                if hole.area < max_hole_px[i]:
                    filled.append(hole)
                    owner.append(int(i))
                    changed = True
                else:
                    kept.append(ring)
            new_parts.append(Polygon(part.exterior, kept))
        if changed:
            obj.geom[i] = new_parts[0] if len(new_parts) == 1 else MultiPolygon(new_parts)
    if not filled or not absorb:
        return keep
    owners = np.asarray(owner)
    tree = shapely.STRtree(filled)
    w = width
    pts = shapely.points((obj.first % w) + 0.5, (obj.first // w) + 0.5)
    inside, hole_idx = tree.query(pts, predicate="within")
    hosts = owners[hole_idx]
    same = (cls[inside] == cls[hosts]) & (inside != hosts)
    inside, hosts = inside[same], hosts[same]
    keep[inside] = False
    for i in np.unique(inside):  # the outermost owner (itself not absorbed) takes the pixels
        cand = hosts[inside == i]
        cand = cand[keep[cand]]
        if len(cand):
            h = int(cand[0])
            obj.npix[h] += obj.npix[i]
            obj.psum[h] += obj.psum[i]
            obj.pcnt[h] += obj.pcnt[i]
    return keep


def _hull_diameters(geoms: np.ndarray) -> np.ndarray:
    """Largest distance between two vertices of each geometry (its convex hull's diameter)."""
    import numpy as np
    import shapely

    from qpseg.metrics.lesion import hull_diameter

    n = len(geoms)
    out = np.zeros(n)
    if n == 0:
        return out
    xy, idx = shapely.get_coordinates(shapely.convex_hull(geoms), return_index=True)
    counts = np.bincount(idx, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
    xx, yy = np.ascontiguousarray(xy[:, 0]), np.ascontiguousarray(xy[:, 1])
    lower = 0
    for size in (8, 16, 32, 64, 128):
        sel = np.flatnonzero((counts > lower) & (counts <= size))
        lower = size
        iu, ju = np.triu_indices(size, 1)
        step = max(1, (1 << 21) // len(iu))
        for s in range(0, len(sel), step):
            part = sel[s:s + step]
            pos = starts[part, None] + np.minimum(np.arange(size)[None, :],
                                                  counts[part, None] - 1)
            px, py = xx[pos], yy[pos]  # (k, size), padded by repeating the last vertex
            d2 = (px[:, iu] - px[:, ju]) ** 2 + (py[:, iu] - py[:, ju]) ** 2
            out[part] = np.sqrt(d2.max(axis=1))
    for i in np.flatnonzero(counts > lower):
        out[i] = hull_diameter(xy[starts[i]:starts[i] + counts[i]])
    return out


def _simplify(exact: np.ndarray, tol_px: float) -> np.ndarray:
    """Douglas-Peucker at ``tol_px``. Where plain DP gives an invalid or empty result the
    topology-preserving variant is used; where the result changes the area by more than
    :data:`MAX_SIMPLIFY_AREA_CHANGE` the exact outline is kept."""
    import numpy as np
    import shapely

    if tol_px <= 0 or not len(exact):
        return exact.copy()
    simple = shapely.simplify(exact, tol_px, preserve_topology=False)  # plain DP is ~5x faster
    broken = shapely.is_empty(simple)
    broken[~broken] = ~shapely.is_valid(simple[~broken])
    redo = np.flatnonzero(broken)
    if len(redo):
        simple[redo] = shapely.simplify(exact[redo], tol_px, preserve_topology=True)
    a0 = shapely.area(exact)
    keep_exact = np.abs(shapely.area(simple) - a0) > MAX_SIMPLIFY_AREA_CHANGE * a0
    keep_exact |= shapely.is_empty(simple)
    simple[keep_exact] = exact[keep_exact]
    return simple


def _clip_to_image(geoms: np.ndarray, geometry: MapGeometry) -> np.ndarray:
    """``geoms`` (map pixels) with every part outside the image cut off, in place; a geometry
    wholly outside becomes empty. Only geometries reaching past the image are touched."""
    import numpy as np
    import shapely

    from qpseg.qupath.geojson import repair_polygonal

    bounds_box = geometry.image_box()
    if bounds_box is None or not len(geoms):
        return geoms
    xmin, ymin, xmax, ymax = bounds_box
    b = shapely.bounds(geoms)
    past = (b[:, 0] < xmin) | (b[:, 1] < ymin) | (b[:, 2] > xmax) | (b[:, 3] > ymax)
    idx = np.flatnonzero(past)
    if len(idx):
        clipped = shapely.clip_by_rect(geoms[idx], xmin, ymin, xmax, ymax)
        for i, g in zip(idx.tolist(), clipped.tolist(), strict=True):
            geoms[i] = shapely.normalize(repair_polygonal(g))
    return geoms


def _repair_invalid(geoms: np.ndarray) -> np.ndarray:
    import numpy as np
    import shapely

    from qpseg.qupath.geojson import repair_polygonal

    for i in np.flatnonzero(~shapely.is_valid(geoms)):
        geoms[i] = repair_polygonal(geoms[i])
    return geoms


def _object_type(as_type: str) -> str:
    kind = str(as_type).strip().lower().rstrip("s")
    if kind not in ("annotation", "detection"):
        raise ConfigError(f"objects must be annotations or detections, not {as_type!r}")
    return kind


def _lesion_set(lesion_classes: Iterable[str], classes: ClassMap) -> set[int]:
    out: set[int] = set()
    for name in lesion_classes:
        idx = classes.index_of(name)
        if idx is not None and idx > 0:
            out.add(idx)
    return out


def _category_name(category: str, diameter_um: float) -> str:
    return f"{SIZE_CATEGORY_LABELS[category]} {diameter_um / 1000.0:.2f} mm"


@dataclass(frozen=True)
class _Settings:
    min_area_um2: tuple[float, ...]     # per class index (class maps) or one value (cells)
    fill_holes_um2: tuple[float, ...]   # likewise
    simplify_um: float
    connectivity: int
    instances: bool = False

    def per_object(self, values: tuple[float, ...], cls: np.ndarray) -> np.ndarray:
        """The value of each object (of class ``cls``; cells all share one)."""
        import numpy as np

        if len(values) == 1:
            return np.full(len(cls), values[0])
        return np.asarray(values)[cls]

    def as_metadata(self, cls: int) -> dict[str, Any]:
        """The thresholds an object of class index ``cls`` was made with."""
        k = 0 if len(self.min_area_um2) == 1 else cls
        out: dict[str, Any] = {"min_area_um2": self.min_area_um2[k],
                               "fill_holes_um2": self.fill_holes_um2[k],
                               "simplify_um": self.simplify_um}
        if not self.instances:
            out["connectivity"] = self.connectivity
        return out


def _thresholds(value: float | None, what: str, kinds: Sequence[str],
                which: int) -> tuple[float, ...]:
    """``value`` for each output type in ``kinds``, or :data:`REVIEW_DEFAULTS` when None."""
    if value is None:
        return tuple(REVIEW_DEFAULTS[k][which] for k in kinds)
    v = _non_negative(value, what)
    return tuple(v for _ in kinds)


def _settings(geometry: MapGeometry, min_area_um2: float | None, fill_holes_um2: float | None,
              simplify_um: float | None, connectivity: int, kinds: Sequence[str],
              instances: bool = False) -> _Settings:
    """Checked options; ``kinds``: the output type of each class index (or ``["nucleus"]``)."""
    if not isinstance(geometry, MapGeometry):
        raise ConfigError(f"map geometry must be a MapGeometry, not {type(geometry).__name__}")
    if connectivity not in (1, 2):
        raise ConfigError(f"connectivity must be 1 (4-connected) or 2 (8-connected), not "
                          f"{connectivity!r}")
    simplify = geometry.map_mpp if simplify_um is None else _non_negative(simplify_um,
                                                                          "simplify tolerance")
    return _Settings(_thresholds(min_area_um2, "minimum area", kinds, 0),
                     _thresholds(fill_holes_um2, "hole-filling area", kinds, 1), simplify,
                     connectivity, instances)


def _prepare(values: Any, geometry: MapGeometry, classes: ClassMap, probs: _Probs,
             st: _Settings, *, instances: bool, block_size: int,
             class_map: Any = None, default_class: int | None = None,
             progress: PolygoniseProgress | None = None) -> tuple[Any, ...]:
    """Shared pipeline up to simplification; returns per-object arrays in map pixels."""
    import numpy as np
    import shapely

    pieces = _scan(values, classes=classes, instances=instances, connectivity=st.connectivity,
                   block_size=_check_block_size(block_size), probs=probs, class_map=class_map,
                   progress=progress)
    obj = _merge(pieces)
    _clip_to_image(obj.geom, geometry)  # a coarse map's last row/column reaches past the image
    width = _shape2d(values, "map")[1]
    if instances:
        cls = np.where(obj.hist.sum(axis=1) > 0, obj.hist.argmax(axis=1),
                       -1 if default_class is None else default_class)
    else:
        cls = obj.key.copy()
    mpp = geometry.map_mpp
    keep = _fill_holes(obj, cls, st.per_object(st.fill_holes_um2, cls) / (mpp * mpp), width,
                       not instances)
    area_px = shapely.area(obj.geom)
    keep &= area_px * mpp * mpp >= st.per_object(st.min_area_um2, cls)
    keep &= area_px > 0
    idx = np.flatnonzero(keep)
    exact = obj.geom[idx]
    diam_um = _hull_diameters(exact) * mpp
    simple = _simplify(exact, st.simplify_um / mpp)
    # probability of the object's own class
    if probs.given:
        if instances and probs.single is None:
            chans = probs.channels()
            col = np.array([chans.index(c) if c in chans else -1 for c in cls[idx]], dtype=int)
            psum = np.where(col >= 0, obj.psum[idx, np.maximum(col, 0)], 0.0)
            pcnt = np.where(col >= 0, obj.pcnt[idx, np.maximum(col, 0)], 0.0)
        else:
            psum, pcnt = obj.psum[idx, 0], obj.pcnt[idx, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            prob = np.where(pcnt > 0, psum / (np.maximum(pcnt, 1) * _PROB_UNIT), np.nan)
        prob = np.clip(prob, 0.0, 1.0)
    else:
        prob = np.full(len(idx), np.nan)
    return simple, cls[idx], area_px[idx] * mpp * mpp, diam_um, prob


def polygonise(
    class_map: Any,
    geometry: MapGeometry,
    classes: ClassMap,
    *,
    provenance: Mapping[str, Any],
    probabilities: Any = None,
    min_area_um2: float | None = None,
    fill_holes_um2: float | None = None,
    simplify_um: float | None = None,
    as_type: str = "annotation",
    lesion_classes: Sequence[str] = (),
    connectivity: int = 2,
    block_size: int = DEFAULT_BLOCK_SIZE,
    nuclei: bool = False,
    progress: PolygoniseProgress | None = None,
) -> list[QuPathObject]:
    """QuPath objects (QuPath coordinates) from a 2-D class map, one per connected component.

    ``class_map``: any 2-D integer array-like with 2-D slicing (numpy, memmap, zarr), read in
    blocks of ``block_size`` px; values are class indices of ``classes`` or its ignore index.
    ``probabilities``: None, a ``(C, H, W)`` array (one channel per class), a mapping
    class index or name -> ``(H, W)`` array, or one ``(H, W)`` array (the probability of each
    pixel's predicted class); floats in [0, 1] or uint8 (0-255). ``simplify_um`` None means one
    map pixel. ``as_type``: ``"annotation"`` or ``"detection"``. ``lesion_classes``: class
    names that get the khalil2022 size category. ``min_area_um2`` / ``fill_holes_um2`` None:
    :data:`REVIEW_DEFAULTS` (``lesion`` for ``lesion_classes``, ``tissue`` for the others,
    ``nucleus`` for every class with ``nuclei``: a nuclei model's map, one object per nucleus,
    no lesions); 0 keeps every object / hole. ``progress``: see :data:`PolygoniseProgress`.
    Objects come in raster order of their first pixel; see the module docstring for every
    rule.
    """
    import numpy as np
    import shapely

    lesions = set() if nuclei else _lesion_set(lesion_classes, classes)
    kinds = ["nucleus" if nuclei else "lesion" if i in lesions else "tissue"
             for i in range(len(classes))]
    st = _settings(geometry, min_area_um2, fill_holes_um2, simplify_um, connectivity, kinds)
    kind = _object_type(as_type)
    metas = {c: _object_metadata(provenance, geometry, st.as_metadata(c))
             for c in range(len(classes))}
    shape = _shape2d(class_map, "class map")
    probs = _Probs(probabilities, classes, shape)
    simple, cls, area_um2, diam_um, prob = _prepare(
        class_map, geometry, classes, probs, st, instances=False, block_size=block_size,
        progress=progress)
    mpp = geometry.map_mpp
    perim_um = shapely.length(simple) * mpp
    out_geom = _repair_invalid(geometry.transform(simple))
    infos = classes.classes
    objects: list[QuPathObject] = []
    for i in range(len(out_geom)):
        info = infos[int(cls[i])]
        m = {AREA: float(area_um2[i]), PERIMETER: float(perim_um[i]),
             MAX_DIAMETER: float(diam_um[i])}
        if not np.isnan(prob[i]):
            m[PROBABILITY] = float(prob[i])
        name = None
        if info.index in lesions:
            from qpseg.metrics.lesion import size_category

            cat = size_category(float(diam_um[i]))
            m[SIZE_CATEGORY] = float(SIZE_CATEGORY_CODES[cat])
            name = _category_name(cat, float(diam_um[i]))
        objects.append(QuPathObject(
            geometry=out_geom[i], object_type=kind, classification=info.name,
            class_color=info.color, name=name, measurements=m,
            metadata=dict(metas[info.index])))
    _report_objects(progress, shape, block_size, len(objects))
    return objects


def _report_objects(progress: PolygoniseProgress | None, shape: tuple[int, int],
                    block_size: int, n_objects: int) -> None:
    """The last progress call: every block done, and the number of objects made."""
    if progress is not None:
        n_blocks = math.ceil(shape[0] / block_size) * math.ceil(shape[1] / block_size)
        progress(n_blocks, n_blocks, n_objects)


def _expand_cells(nuclei: np.ndarray, expansion_px: float) -> np.ndarray:
    """Nuclei grown by ``expansion_px``, within their Voronoi regions, not over other nuclei."""
    import numpy as np
    import shapely

    n = len(nuclei)
    if expansion_px <= 0 or n == 0:
        return nuclei.copy()
    grown = shapely.buffer(nuclei, expansion_px, quad_segs=4)
    if n > 1:
        centres = shapely.centroid(nuclei)
        box = shapely.box(*shapely.total_bounds(grown)).buffer(expansion_px)
        try:
            regions = shapely.voronoi_polygons(shapely.multipoints(centres), extend_to=box,
                                               ordered=True)
            parts = shapely.get_parts(regions)
        except Exception:  # pragma: no cover - old GEOS without ordered Voronoi
            parts = np.empty(0, dtype=object)
        if len(parts) == n:  # duplicate centroids collapse regions: skip the limit then
            grown = shapely.intersection(grown, parts)
    cells = shapely.union(grown, nuclei)
    tree = shapely.STRtree(nuclei)
    a, b = tree.query(cells, predicate="intersects")
    other = a != b
    a, b = a[other], b[other]
    for i in np.unique(a):
        cells[i] = shapely.difference(cells[i], shapely.union_all(nuclei[b[a == i]]))
    return _repair_invalid(cells)


def polygonise_instances(
    instances: Any,
    geometry: MapGeometry,
    classes: ClassMap,
    *,
    provenance: Mapping[str, Any],
    class_map: Any = None,
    default_class: str | None = None,
    probabilities: Any = None,
    min_area_um2: float | None = None,
    fill_holes_um2: float | None = None,
    simplify_um: float | None = None,
    cell_expansion_um: float = 0.0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: PolygoniseProgress | None = None,
) -> list[QuPathObject]:
    """QuPath cells from a 2-D instance label map (0 = no nucleus, ids need not be contiguous).

    Each id becomes one cell with ``nucleus_geometry``; the cell geometry is the nucleus, or the
    nucleus grown by ``cell_expansion_um`` (see the module docstring). Class: the most frequent
    class of ``class_map`` (same shape, optional) inside the nucleus, else ``default_class``
    (a class name of ``classes``; None = unclassified). ``probabilities`` as for
    :func:`polygonise`; a single 2-D map gives each nucleus its mean (e.g. nucleus probability).
    ``min_area_um2`` / ``fill_holes_um2`` (of the nucleus) None: ``REVIEW_DEFAULTS["nucleus"]``.
    ``progress``: see :data:`PolygoniseProgress` (a piece: an id's pixels within one block).
    """
    import numpy as np
    import shapely

    st = _settings(geometry, min_area_um2, fill_holes_um2, simplify_um, 1, ["nucleus"],
                   instances=True)
    meta = _object_metadata(provenance, geometry, st.as_metadata(0))
    shape = _shape2d(instances, "instance map")
    default_idx: int | None = None
    if default_class is not None:
        default_idx = classes.index_of(default_class)
        if default_idx is None:
            raise ConfigError(f"default class {default_class!r} is not one of {classes.names}")
    probs = _Probs(probabilities, classes, shape)
    simple, cls, area_um2, diam_um, prob = _prepare(
        instances, geometry, classes, probs, st, instances=True, block_size=block_size,
        class_map=class_map, default_class=default_idx, progress=progress)
    mpp = geometry.map_mpp
    expansion_px = _non_negative(cell_expansion_um, "cell expansion") / mpp
    cells = _clip_to_image(_expand_cells(simple, expansion_px), geometry)
    nuc_perim = shapely.length(simple) * mpp
    cell_area = area_um2 if expansion_px <= 0 else shapely.area(cells) * mpp * mpp
    cell_perim = shapely.length(cells) * mpp
    nuc_out = _repair_invalid(geometry.transform(simple))
    cell_out = nuc_out if expansion_px <= 0 else _repair_invalid(geometry.transform(cells))
    infos = classes.classes
    objects: list[QuPathObject] = []
    for i in range(len(nuc_out)):
        c = int(cls[i])
        info = infos[c] if c >= 0 else None
        m = {NUCLEUS + AREA: float(area_um2[i]), NUCLEUS + PERIMETER: float(nuc_perim[i]),
             NUCLEUS + MAX_DIAMETER: float(diam_um[i]), CELL + AREA: float(cell_area[i]),
             CELL + PERIMETER: float(cell_perim[i])}
        if not np.isnan(prob[i]):
            m[PROBABILITY] = float(prob[i])
        objects.append(QuPathObject(
            geometry=cell_out[i], object_type="cell",
            classification=info.name if info else None, class_color=info.color if info else None,
            measurements=m, metadata=dict(meta), nucleus_geometry=nuc_out[i]))
    _report_objects(progress, shape, block_size, len(objects))
    return objects


# ----------------------------------------------------------------------------------- summary


def _object_area(obj: QuPathObject) -> float:
    for key in (AREA, CELL + AREA):
        v = obj.measurements.get(key)
        if v is not None and math.isfinite(v):
            return float(v)
    return 0.0


def slide_summary(objects: Iterable[QuPathObject], *, lesion_classes: Sequence[str] = (),
                  classes: ClassMap | None = None,
                  provenance: Mapping[str, Any] | None = None) -> dict[str, str | int | float]:
    """Per-slide summary as one flat row (a CSV row, or entry metadata via
    :func:`summary_metadata`).

    Keys: the provenance given; ``qpseg_n_objects``; ``qpseg_count_<class>`` and
    ``qpseg_area_um2_<class>`` per class (every non-background class of ``classes`` when given,
    so rows of different slides share columns; else the classes present; ``Unclassified`` for
    objects without a class); ``qpseg_n_lesions``, ``qpseg_lesion_area_um2``,
    ``qpseg_largest_lesion_um`` (0 without lesions) and ``qpseg_slide_category``
    (``negative``/``itc``/``micro``/``macro``: the largest lesion's) over objects of
    ``lesion_classes`` (left out when there are none). Areas are the objects' ``Area µm^2``
    (cells: ``Cell: Area µm^2``).
    """
    from qpseg.metrics.lesion import NEGATIVE, size_category

    lesion_keys = {n.strip().lower() for n in lesion_classes}
    row: dict[str, str | int | float] = {}
    for key, value in (provenance or {}).items():
        row[str(key)] = _fmt(value)
    counts: dict[str, int] = {}
    areas: dict[str, float] = {}
    if classes is not None:
        for info in classes.classes[1:]:
            counts[info.name] = 0
            areas[info.name] = 0.0
    n_obj = n_les = 0
    les_area = 0.0
    largest = 0.0
    for obj in objects:
        n_obj += 1
        name = obj.classification or "Unclassified"
        area = _object_area(obj)
        counts[name] = counts.get(name, 0) + 1
        areas[name] = areas.get(name, 0.0) + area
        if obj.classification and obj.classification.strip().lower() in lesion_keys:
            n_les += 1
            les_area += area
            d = obj.measurements.get(MAX_DIAMETER, 0.0)
            if math.isfinite(d):
                largest = max(largest, float(d))
    row["qpseg_n_objects"] = n_obj
    for name in counts:
        row[f"qpseg_count_{name}"] = counts[name]
        row[f"qpseg_area_um2_{name}"] = areas[name]
    if lesion_keys:  # a model without lesion classes says nothing about lesions
        row["qpseg_n_lesions"] = n_les
        row["qpseg_lesion_area_um2"] = les_area
        row["qpseg_largest_lesion_um"] = largest
        row["qpseg_slide_category"] = size_category(largest) if n_les else NEGATIVE
    return row


def summary_metadata(summary: Mapping[str, Any]) -> dict[str, str]:
    """A summary row as flat str -> str (QuPath entry metadata holds text only)."""
    out: dict[str, str] = {}
    for key, value in summary.items():
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[str(key)] = _fmt(value)
    return out


# ------------------------------------------------------------------------------------ files


def predictions_path(project_dir: str | os.PathLike[str], entry_id: str | int) -> Path:
    """``<project>/qpseg/predictions/<entryID>.geojson``, where the import script looks."""
    return Path(project_dir) / "qpseg" / "predictions" / f"{entry_id}.geojson"


def metadata_path(geojson_path: str | os.PathLike[str]) -> Path:
    """``<entryID>.metadata.json`` beside ``<entryID>.geojson`` (or ``.geojson.gz``)."""
    path = Path(geojson_path)
    name = path.name
    for suffix in (".gz", ".geojson", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return path.with_name(name + ".metadata.json")


def write_predictions(path: str | os.PathLike[str], objects: Iterable[QuPathObject], *,
                      overwrite: bool = False,
                      summary: Mapping[str, Any] | None = None) -> int:
    """Write ``objects`` as QuPath GeoJSON at ``path`` (atomically); returns how many.

    An existing ``path`` is a finished slide: :class:`PredictionsExistError` unless
    ``overwrite``, in which case the previous file is kept as ``<name>.bak``. ``summary`` (see
    :func:`slide_summary`) is written first, as flat str -> str JSON at :func:`metadata_path`,
    so a GeoJSON never exists without its summary.
    """
    from qpseg._io import write_json_atomic
    from qpseg.qupath.geojson import write_geojson

    path = Path(path)
    if path.is_dir():
        raise QpsegError("is a directory, not a predictions file", path)
    if path.exists() and not overwrite:
        raise PredictionsExistError("predictions exist; pass --overwrite to replace them "
                                    "(the previous file is kept as .bak)", path)
    try:
        if summary is not None:
            write_json_atomic(metadata_path(path), summary_metadata(summary), backup=True)
        return write_geojson(path, objects, backup=True)
    except OSError as exc:
        raise QpsegError(f"cannot write predictions ({exc.strerror or exc})", path) from exc
