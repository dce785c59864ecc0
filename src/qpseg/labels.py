"""Annotations -> label rasters, following the papers' partial-annotation training.

Rules (khalil2022 "focusing sampling" and ho2021 train on partially annotated slides):

* Classes named ``Ignore*`` (QuPath's convention) and unclassified annotations carry no label.
  ``Ignore*`` areas are *forced* to the ignore index, whatever lies beneath them.
* ``Region*`` annotations mark an exhaustively labelled area: inside it, pixels not covered by a
  class annotation are ``Background`` (index 0).
* Every pixel outside all labelled annotations is *ignore* (:data:`IGNORE_INDEX`), not background
  — unless the caller asks for exhaustive truth (``unlabelled="background"``): then unlabelled
  pixels are ``Background``, everywhere or only ``within`` a tissue geometry or
  :class:`~qpseg.tissue.TissueMask` (outside it they stay ignore). This is the same as a
  ``Region*`` annotation covering ``within`` beneath every other annotation, so ``Ignore*``
  still wins and class annotations keep their classes.
* Overlapping class annotations: the smaller annotation wins (it is painted last), so a tumour
  island drawn inside a large stroma annotation keeps its class. Ties keep file order.

A pixel belongs to an annotation when its centre lies inside the (``make_valid``-repaired)
polygon; holes are respected. :func:`class_geometries` applies the same rules to the geometry
itself, so areas reported in manifests agree with what :func:`rasterize_labels` draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from qpseg.errors import LabelError

if TYPE_CHECKING:
    import numpy as np
    from shapely.geometry.base import BaseGeometry

    from qpseg.qupath.geojson import QuPathObject
    from qpseg.tissue import TissueMask

__all__ = [
    "BACKGROUND",
    "IGNORE_INDEX",
    "UNLABELLED_MODES",
    "ClassInfo",
    "ClassMap",
    "Unlabelled",
    "class_areas",
    "class_geometries",
    "fill_mask",
    "label_role",
    "rasterize_labels",
]

IGNORE_INDEX = 255
BACKGROUND = "Background"
BACKGROUND_COLOR = (0, 0, 0)

Role = Literal["class", "region", "ignore", "unclassified"]
#: What pixels no annotation labels become: ``"ignore"`` (partial annotation, the default) or
#: ``"background"`` (exhaustive annotation, optionally only ``within`` a tissue area).
Unlabelled = Literal["ignore", "background"]
UNLABELLED_MODES: tuple[str, ...] = ("ignore", "background")


def label_role(class_name: str | None) -> Role:
    """How an annotation with this classification is used for labels."""
    if not class_name or not class_name.strip():
        return "unclassified"
    name = class_name.strip()
    if name.lower().startswith("ignore"):
        return "ignore"
    if name.lower().startswith("region"):
        return "region"
    return "class"


@dataclass(frozen=True)
class ClassInfo:
    """One label class: its index in label rasters, QuPath name and RGB colour."""

    index: int
    name: str
    color: tuple[int, int, int]

    def to_json(self) -> dict[str, Any]:
        """JSON form used in manifests and model packages."""
        return {"index": self.index, "name": self.name, "color": list(self.color)}


@dataclass(frozen=True)
class ClassMap:
    """Ordered label classes; index 0 is always ``Background``."""

    classes: tuple[ClassInfo, ...]
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if not self.classes or self.classes[0].name != BACKGROUND or self.classes[0].index != 0:
            raise LabelError(f"class map must start with {BACKGROUND!r} at index 0")
        if [c.index for c in self.classes] != list(range(len(self.classes))):
            raise LabelError("class indices must be 0..N-1 in order")
        if len({c.name.lower() for c in self.classes}) != len(self.classes):
            raise LabelError("class names must be unique (case-insensitive)")
        if len(self.classes) >= self.ignore_index:
            raise LabelError(f"at most {self.ignore_index - 1} classes are supported")

    @classmethod
    def from_names(
        cls,
        names: Sequence[str],
        colors: dict[str, tuple[int, int, int]] | None = None,
    ) -> ClassMap:
        """Build a class map from class names (``Background`` is put first if absent).

        Colours come from ``colors`` (case-insensitive name lookup), else QuPath's defaults.
        """
        from qpseg.qupath.classes import default_color

        lookup = {k.lower(): v for k, v in (colors or {}).items()}
        ordered = [BACKGROUND] + [n for n in names if n.lower() != BACKGROUND.lower()]
        infos = []
        for i, name in enumerate(ordered):
            for bad in ("ignore", "region"):
                if name.lower().startswith(bad):
                    raise LabelError(
                        f"{name!r} cannot be a label class ({bad.title()}* is special)")
            color = lookup.get(name.lower())
            if color is None:
                color = BACKGROUND_COLOR if i == 0 else default_color(name)
            infos.append(ClassInfo(i, name, tuple(int(c) for c in color)))  # type: ignore[arg-type]
        return cls(tuple(infos))

    @property
    def names(self) -> list[str]:
        """Class names in index order."""
        return [c.name for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def index_of(self, name: str | None) -> int | None:
        """Index of a class name (case-insensitive), or None when it is not a label class."""
        if name is None:
            return None
        key = name.strip().lower()
        for c in self.classes:
            if c.name.lower() == key:
                return c.index
        return None

    def to_json(self) -> list[dict[str, Any]]:
        """JSON form: a list of ``{index, name, color}``."""
        return [c.to_json() for c in self.classes]

    @classmethod
    def from_json(cls, data: Any, ignore_index: int = IGNORE_INDEX) -> ClassMap:
        """Inverse of :meth:`to_json`; raises :class:`LabelError` on malformed input."""
        try:
            infos = tuple(
                ClassInfo(int(d["index"]), str(d["name"]),
                          tuple(int(c) for c in d["color"]))  # type: ignore[arg-type]
                for d in data
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise LabelError(f"malformed class list: {exc}") from None
        return cls(infos, ignore_index)


def _check_unlabelled(unlabelled: str, within: object) -> None:
    if unlabelled not in UNLABELLED_MODES:
        raise LabelError(f"unlabelled must be one of {', '.join(UNLABELLED_MODES)}, "
                         f"got {unlabelled!r}")
    if within is not None and unlabelled != "background":
        raise LabelError('within limits where unlabelled pixels become Background: it needs '
                         'unlabelled="background"')


def _paint_order(
    objects: Iterable[QuPathObject], class_map: ClassMap
) -> list[tuple[BaseGeometry, int]]:
    """(geometry, value) pairs in painting order, bottom first, per the module rules."""
    geoms, values = _paint_arrays(objects, class_map)
    return [(g, int(v)) for g, v in zip(geoms.tolist(), values.tolist(), strict=True)]


def _paint_arrays(
    objects: Iterable[QuPathObject], class_map: ClassMap
) -> tuple[np.ndarray, np.ndarray]:
    """Geometries and label values in painting order, bottom first, as two arrays.

    Regions first, then class annotations from the largest to the smallest (ties in file
    order), then ``Ignore*``. Geometries are repaired with the one repair rule
    (``repair_polygonal``); valid polygons skip it in one vectorised validity check, which
    leaves them unchanged, as ``repair_polygonal`` would.
    """
    import numpy as np
    import shapely

    # One repair rule for everything qpseg draws or writes: labels cover what the files hold.
    from qpseg.qupath.geojson import repair_polygonal

    role_value = {"region": 0, "ignore": class_map.ignore_index}
    geoms: list[BaseGeometry] = []
    values: list[int] = []
    ranks: list[int] = []  # 0 region, 1 class, 2 ignore
    index_cache: dict[str | None, int | None] = {}
    for obj in objects:
        name = obj.classification
        role = label_role(name)
        if role == "unclassified":
            continue
        if role == "class":
            if name not in index_cache:
                index_cache[name] = class_map.index_of(name)
            idx = index_cache[name]
            if idx is None:
                continue
            values.append(idx)
            ranks.append(1)
        else:
            values.append(role_value[role])
            ranks.append(0 if role == "region" else 2)
        geoms.append(obj.geometry)
    garr = np.empty(len(geoms), dtype=object)
    garr[:] = geoms
    if len(garr):
        types = shapely.get_type_id(garr)
        # 3 Polygon, 6 MultiPolygon: valid ones are what repair_polygonal returns unchanged.
        fine = np.isin(types, (3, 6)) & shapely.is_valid(garr)
        for i in np.flatnonzero(~fine):
            garr[i] = repair_polygonal(garr[i])
        keep = ~shapely.is_empty(garr)
    else:
        keep = np.zeros(0, dtype=bool)
    varr = np.asarray(values, dtype=np.int64)[keep]
    rarr = np.asarray(ranks, dtype=np.int64)[keep]
    garr = garr[keep]
    area = shapely.area(garr)
    # Classes: larger first (smaller painted on top), ties in file order; np.lexsort is stable
    # and sorts by the last key first.
    neg_area = np.where(rarr == 1, -area, 0.0)
    order = np.lexsort((np.arange(len(garr)), neg_area, rarr))
    return garr[order], varr[order]


def _within_geometry(within: BaseGeometry | TissueMask) -> BaseGeometry:
    """``within`` as a geometry in QuPath level-0 pixels: a TissueMask becomes the union of
    its tissue pixels' squares (so a label pixel is inside when its centre falls on tissue)."""
    import numpy as np
    import shapely

    from qpseg.tissue import TissueMask

    if not isinstance(within, TissueMask):
        from qpseg.qupath.geojson import repair_polygonal

        return repair_polygonal(within)
    m = np.asarray(within.mask, dtype=bool)
    if not m.any():
        return shapely.Polygon()
    # Runs of tissue along each row -> one box per run -> union (runs of one row touch none
    # of each other, so the union only merges rows).
    padded = np.zeros((m.shape[0], m.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = m
    step = np.diff(padded, axis=1)
    r_on, c_on = np.nonzero(step == 1)
    r_off, c_off = np.nonzero(step == -1)
    dx, dy = within.downsample_x, within.downsample_y
    boxes = shapely.box(within.origin_x + c_on * dx, within.origin_y + r_on * dy,
                        within.origin_x + c_off * dx, within.origin_y + (r_off + 1) * dy)
    return shapely.union_all(boxes)


def _cover_pairs(geoms: np.ndarray) -> tuple[np.ndarray, ...]:
    """For each geometry cut by later ones: its index, where its covers start in ``above`` and
    how many there are; and ``above``, the later intersecting geometries (one STRtree query)."""
    import numpy as np
    import shapely

    tree = shapely.STRtree(geoms)
    below, above = tree.query(geoms, predicate="intersects")
    later = above > below
    below, above = below[later], above[later]
    order = np.lexsort((above, below))
    below, above = below[order], above[order]
    first, start, count = np.unique(below, return_index=True, return_counts=True)
    return first, start, count, above


def _visible_parts(geoms: np.ndarray, *, areas_only: bool = False) -> np.ndarray:
    """Each geometry minus every geometry after it (later ones are painted on top).

    Only the later geometries that intersect a geometry can cut it, so they are found with one
    bulk STRtree query; a geometry under a few later ones is cut by each in turn (one
    vectorised difference per round for all such geometries), one under many by their union.
    Work grows with the number of overlapping pairs, not with the square of the number of
    annotations.

    ``areas_only``: return the visible areas instead. A geometry under many later ones (a
    ``Region*`` under thousands of cells) then needs no union: the visible parts of the later
    geometries never overlap and together cover what every later geometry covers, so its
    visible area is its area less its overlap with each of those visible parts.
    """
    import numpy as np
    import shapely

    out = geoms.copy()
    n = len(geoms)
    if n >= 2:
        first, start, count, above = _cover_pairs(geoms)
    else:
        first = start = count = above = np.zeros(0, dtype=np.int64)
    few = count <= _FEW_COVERS
    for k in range(int(count[few].max(initial=0))):
        sel = few & (count > k)
        cut = first[sel]
        out[cut] = shapely.difference(out[cut], geoms[above[start[sel] + k]])
    many = [(int(i), int(s), int(c)) for i, s, c in
            zip(first[~few], start[~few], count[~few], strict=True)]
    if not areas_only:
        for i, s, c in many:
            out[i] = shapely.difference(geoms[i], shapely.union_all(geoms[above[s:s + c]]))
        return out
    areas = shapely.area(out)
    done = np.ones(n, dtype=bool)  # out[j] holds j's visible part
    for i, _, _ in many:
        done[i] = False
    starts = {i: (s, c) for i, s, c in many}
    for i, s, c in reversed(many):  # top first: the covers' visible parts are known
        js = above[s:s + c]
        for j in js[~done[js]].tolist():  # a cover that is itself under many: its geometry
            sj, cj = starts[j]
            out[j] = shapely.difference(geoms[j], shapely.union_all(geoms[above[sj:sj + cj]]))
            done[j] = True
        shapely.prepare(geoms[i])
        parts = out[js]
        inside = shapely.contains_properly(geoms[i], parts)
        overlap = shapely.area(parts[inside]).sum()
        edge = parts[~inside]
        if edge.size:
            overlap += shapely.area(shapely.intersection(geoms[i], edge)).sum()
        whole = float(shapely.area(geoms[i]))
        left = whole - float(overlap)
        # Sums of overlaps leave rounding residue where the covers hide it all.
        areas[i] = left if left > _AREA_EPS * whole else 0.0
    return areas


# Relative area below which a visible part computed as a difference of areas is empty.
_AREA_EPS = 1e-9
# A geometry under at most this many later ones is cut by each in turn, else by their union.
_FEW_COVERS = 8


def _labelled_parts(
    objects: Iterable[QuPathObject], class_map: ClassMap, unlabelled: Unlabelled,
    within: BaseGeometry | TissueMask | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The visible part of each labelled geometry and its label value (empty parts dropped)."""
    import shapely

    geoms, values = _labelled_geometries(objects, class_map, unlabelled, within)
    parts = _visible_parts(geoms)
    keep = ~shapely.is_empty(parts)
    return parts[keep], values[keep]


def _labelled_geometries(
    objects: Iterable[QuPathObject], class_map: ClassMap, unlabelled: Unlabelled,
    within: BaseGeometry | TissueMask | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Painting order (:func:`_paint_arrays`), with ``within`` at the bottom as Background when
    unlabelled pixels are Background."""
    import numpy as np

    _check_unlabelled(unlabelled, within)
    if unlabelled == "background" and within is None:
        raise LabelError('unlabelled="background" as geometry needs within= (the tissue or '
                         'slide area where unlabelled pixels are Background)')
    geoms, values = _paint_arrays(objects, class_map)
    if unlabelled == "background":
        assert within is not None
        base = _within_geometry(within)
        if not base.is_empty:
            geoms = np.concatenate([np.asarray([base], dtype=object), geoms])
            values = np.concatenate([np.zeros(1, dtype=np.int64), values])
    return geoms, values


def class_geometries(
    objects: Iterable[QuPathObject], class_map: ClassMap, *,
    unlabelled: Unlabelled = "ignore",
    within: BaseGeometry | TissueMask | None = None,
) -> dict[int, BaseGeometry]:
    """The area each label index effectively covers (ignore index included), in QuPath pixels.

    Same rules as :func:`rasterize_labels`, evaluated on geometry: later-painted annotations
    cut away what they cover from earlier ones. With ``unlabelled="background"`` the
    Background area includes ``within`` (required here: "everywhere" has no geometry) less
    what annotations above it cover; the ignore index holds only ``Ignore*`` areas.
    """
    import numpy as np
    import shapely

    parts, values = _labelled_parts(objects, class_map, unlabelled, within)
    return {int(v): shapely.union_all(parts[values == v]) for v in np.unique(values)}


def class_areas(
    objects: Iterable[QuPathObject], class_map: ClassMap, *,
    unlabelled: Unlabelled = "ignore",
    within: BaseGeometry | TissueMask | None = None,
) -> dict[int, float]:
    """The area of each :func:`class_geometries` value, without building the union.

    The visible parts of different annotations never overlap, so each value's area is the sum
    of its parts' areas: linear work for exports with 10^5-10^6 objects.
    """
    import numpy as np

    geoms, values = _labelled_geometries(objects, class_map, unlabelled, within)
    areas = _visible_parts(geoms, areas_only=True)
    keep = areas > 0
    areas, values = areas[keep], values[keep]
    return {int(v): float(areas[values == v].sum()) for v in np.unique(values)}


def _polygons(geom: BaseGeometry) -> list[BaseGeometry]:
    """The non-empty Polygon parts of any geometry, collections flattened."""
    if geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom]
    return [p for part in getattr(geom, "geoms", []) for p in _polygons(part)]


def fill_mask(mask_shape: tuple[int, int], geom: BaseGeometry, x0: float, y0: float,
              ds: float, *, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Boolean mask of pixels whose centre lies inside ``geom`` (holes respected).

    Pixel ``(r, c)`` has its centre at QuPath ``(x0 + (c + .5) ds, y0 + (r + .5) ds)``; with
    ``offset=(r0, c0)`` the mask is the part of that grid starting at pixel ``(r0, c0)`` (a
    geometry's bounding box, so work follows the geometry's size, not the raster's). A
    vectorised even-odd scanline fill over all rings at once: every edge crossing of a row's
    centre line is computed in one pass, crossings are paired per row, and the spans are painted
    through a cumulative sum. Holes fall out of the even-odd rule, since ``repair_polygonal``
    guarantees valid, non-overlapping parts.
    """
    import numpy as np

    h, w = mask_shape
    rings = [np.asarray(r.coords, dtype=np.float64)
             for poly in _polygons(geom) for r in (poly.exterior, *poly.interiors)]
    if not rings or h <= 0 or w <= 0:
        return np.zeros(mask_shape, dtype=bool)
    # Edges in pixel-centre space: pixel centres sit on integer coordinates.
    a = np.concatenate([r[:-1] for r in rings])
    b = np.concatenate([r[1:] for r in rings])
    r_off, c_off = offset
    ax, ay = (a[:, 0] - x0) / ds - 0.5 - c_off, (a[:, 1] - y0) / ds - 0.5 - r_off
    bx, by = (b[:, 0] - x0) / ds - 0.5 - c_off, (b[:, 1] - y0) / ds - 0.5 - r_off
    lo_y, hi_y = np.minimum(ay, by), np.maximum(ay, by)
    # Half-open rule: an edge crosses the centre line of row r when lo_y <= r < hi_y.
    r0 = np.clip(np.ceil(lo_y), 0, h).astype(np.int64)
    r1 = np.clip(np.ceil(hi_y), 0, h).astype(np.int64)
    keep = r1 > r0
    if not keep.any():
        return np.zeros(mask_shape, dtype=bool)
    ax, ay, bx, by, r0, r1 = ax[keep], ay[keep], bx[keep], by[keep], r0[keep], r1[keep]
    counts = r1 - r0
    edge = np.repeat(np.arange(len(counts)), counts)
    rows = r0[edge] + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    xs = ax[edge] + (rows - ay[edge]) * (bx[edge] - ax[edge]) / (by[edge] - ay[edge])
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    # Rows clipped at the top/bottom keep their full crossing lists, so every row has an even
    # count and consecutive entries pair up.
    start = np.clip(np.ceil(xs[0::2]), 0, w).astype(np.int64)
    stop = np.clip(np.ceil(xs[1::2]), 0, w).astype(np.int64)
    span_rows = rows[0::2]
    diff = np.zeros((h, w + 1), dtype=np.int32)
    np.add.at(diff, (span_rows, start), 1)
    np.add.at(diff, (span_rows, stop), -1)
    return np.cumsum(diff[:, :w], axis=1) > 0


def rasterize_labels(
    annotations: Iterable[QuPathObject],
    region: tuple[float, float, int, int],
    mpp: float,
    class_map: ClassMap,
    *,
    base_mpp: float,
    unlabelled: Unlabelled = "ignore",
    within: BaseGeometry | TissueMask | None = None,
) -> np.ndarray:
    """Draw annotations into a ``uint8`` label raster.

    ``region`` is ``(x, y, width, height)``: ``x, y`` the top-left corner in QuPath level-0
    pixel coordinates, ``width, height`` the output size in pixels at ``mpp`` µm/px — the same
    convention as :meth:`qpseg.slide.Slide.read_region_mpp`, so a tile and its labels align.
    ``base_mpp`` is the slide's level-0 pixel size. Values are class indices of ``class_map``,
    or ``class_map.ignore_index`` for unlabelled/ignored pixels (see the module rules).

    ``unlabelled`` says what pixels no annotation labels become: ``"ignore"`` (partial
    annotation, the default) or ``"background"`` (exhaustive annotation: index 0). ``within``
    (only with ``"background"``) limits where they become Background: a geometry in QuPath
    level-0 pixels or a :class:`~qpseg.tissue.TissueMask` (a pixel is inside when its centre
    lies inside the geometry / on a tissue pixel of the mask); outside it they stay ignore.
    ``Ignore*`` annotations win over both.
    """
    import numpy as np
    import shapely
    from shapely.geometry import box

    from qpseg.tissue import TissueMask

    _check_unlabelled(unlabelled, within)
    x0, y0, width, height = region
    if width <= 0 or height <= 0:
        raise LabelError(f"label region must have a positive size, got {width}x{height}")
    if not (mpp > 0 and base_mpp > 0):
        raise LabelError(f"pixel sizes must be positive (mpp={mpp}, base_mpp={base_mpp})")
    ds = float(mpp) / float(base_mpp)
    shape = (int(height), int(width))
    out = np.full(shape, class_map.ignore_index, dtype=np.uint8)
    window = box(x0 - ds, y0 - ds, x0 + (width + 1) * ds, y0 + (height + 1) * ds)
    if unlabelled == "background":
        if within is None:
            out[:] = 0
        elif isinstance(within, TissueMask):
            out[_mask_lookup(within, shape, x0, y0, ds)] = 0
        else:
            base = _within_geometry(within)
            if base.intersects(window):
                out[fill_mask(shape, base.intersection(window), x0, y0, ds)] = 0
    geoms, values = _paint_arrays(annotations, class_map)
    hit = shapely.intersects(geoms, window)
    clipped = shapely.intersection(geoms[hit], window)
    bounds = shapely.bounds(clipped)
    # Pixel-centre index ranges that can lie inside each geometry's bounding box.
    c0 = np.clip(np.floor((bounds[:, 0] - x0) / ds - 0.5), 0, shape[1]).astype(np.int64)
    c1 = np.clip(np.ceil((bounds[:, 2] - x0) / ds - 0.5) + 1, 0, shape[1]).astype(np.int64)
    r0 = np.clip(np.floor((bounds[:, 1] - y0) / ds - 0.5), 0, shape[0]).astype(np.int64)
    r1 = np.clip(np.ceil((bounds[:, 3] - y0) / ds - 0.5) + 1, 0, shape[0]).astype(np.int64)
    for g, value, a, b, c, d in zip(clipped.tolist(), values[hit].tolist(), r0.tolist(),
                                    r1.tolist(), c0.tolist(), c1.tolist(), strict=True):
        if b <= a or d <= c:
            continue
        m = fill_mask((b - a, d - c), g, x0, y0, ds, offset=(a, c))
        out[a:b, c:d][m] = value
    return out


def _mask_lookup(tissue: TissueMask, shape: tuple[int, int], x0: float, y0: float,
                 ds: float) -> np.ndarray:
    """Boolean raster: True where the pixel centre falls on a tissue pixel of ``tissue``."""
    import numpy as np

    h, w = shape
    m = np.asarray(tissue.mask, dtype=bool)
    cols = np.floor((x0 + (np.arange(w) + 0.5) * ds - tissue.origin_x)
                    / tissue.downsample_x).astype(np.int64)
    rows = np.floor((y0 + (np.arange(h) + 0.5) * ds - tissue.origin_y)
                    / tissue.downsample_y).astype(np.int64)
    cin = (cols >= 0) & (cols < m.shape[1])
    rin = (rows >= 0) & (rows < m.shape[0])
    out = np.zeros(shape, dtype=bool)
    out[np.ix_(rin, cin)] = m[np.ix_(rows[rin], cols[cin])]
    return out
