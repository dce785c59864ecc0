"""Class and instance maps -> QuPath objects: the review defaults, the per-object finishing
(hole filling, minimum area, simplification, clipping to the image, cell expansion) and
:func:`polygonise` / :func:`polygonise_instances`. The rules are in :mod:`qpseg.objects`'s
docstring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError
from qpseg.labels import ClassMap
from qpseg.objects_geometry import MapGeometry, _non_negative
from qpseg.objects_measure import (
    AREA,
    CELL,
    MAX_DIAMETER,
    NUCLEUS,
    PERIMETER,
    PROBABILITY,
    SIZE_CATEGORY,
    SIZE_CATEGORY_CODES,
    _category_name,
    _hull_diameters,
    _lesion_set,
    _object_metadata,
)
from qpseg.objects_scan import (
    _PROB_UNIT,
    DEFAULT_BLOCK_SIZE,
    PolygoniseProgress,
    _check_block_size,
    _merge,
    _Objects,
    _Probs,
    _scan,
    _shape2d,
)
from qpseg.qupath.geojson import QuPathObject

if TYPE_CHECKING:  # numpy/shapely are imported lazily: the CLI must start fast
    import numpy as np

__all__ = [
    "MAX_SIMPLIFY_AREA_CHANGE",
    "REVIEW_DEFAULTS",
    "polygonise",
    "polygonise_instances",
]

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
    Objects come in raster order of their first pixel; see :mod:`qpseg.objects`'s docstring
    for every rule.
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
    nucleus grown by ``cell_expansion_um`` (see :mod:`qpseg.objects`). Class: the most frequent
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
