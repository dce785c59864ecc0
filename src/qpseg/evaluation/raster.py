"""What ``qpseg evaluate`` makes of a slide's QuPath objects: geometries and label rasters.

Reading a GeoJSON file, the valid polygonal part of a geometry, the instance geometries
(a cell's nucleus), the label classes used; rasterising objects at the eval pixel size tile
by tile (one tile's memory whatever the region), the confusion matrix computed tile by tile,
instance ids painted on a mask's grid, the instance overlap table computed from polygons
(exact areas), and the outcome codes of the error maps (read by :mod:`qpseg.report`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qpseg.labels import IGNORE_INDEX, ClassMap, label_role

if TYPE_CHECKING:
    import numpy as np
    from shapely.geometry.base import BaseGeometry

    from qpseg.metrics.instance import InstanceOverlap
    from qpseg.qupath.geojson import QuPathObject


_TILE = 1024
# Geometric instance areas are passed to the metric core as integers in 1/256 px² (its AJI sums
# are integer): IoUs and AJI are ratios, so the unit does not change them.
_AREA_SCALE = 256.0
_THUMB_SIDE = 512   # error maps: the longer side, in outcome cells (report.html enlarges
_MAP_SIDE = 512     # smaller ones to at least this many pixels, the tissue read at that size)
_PIXEL_OBJECT_TYPES = ("annotation",)
_INSTANCE_OBJECT_TYPES = ("detection", "cell")


# ============================================================================== reading data


def _read_objects(path: Path) -> list[QuPathObject]:
    from qpseg.qupath.geojson import read_geojson

    return read_geojson(path)


def _polygonal(geom: BaseGeometry) -> BaseGeometry | None:
    """The valid polygonal part of a geometry, or None."""
    try:
        if geom.geom_type in ("Polygon", "MultiPolygon") and geom.is_valid:
            g = geom
        else:  # imported here only: this runs once per object
            from qpseg.qupath.geojson import repair_polygonal

            g = repair_polygonal(geom)
    except Exception:  # GEOS refuses some degenerate input
        return None
    return None if g.is_empty or g.area <= 0 else g


def _instance_geometries(objs: Iterable[QuPathObject]) -> list[BaseGeometry]:
    """The valid polygonal geometry (nucleus of a cell) of each instance object, in order.

    Validity and area are tested for all at once (tens of thousands per slide); only the
    invalid ones go through :func:`_polygonal`'s repair one by one.
    """
    import numpy as np
    import shapely

    geoms = [o.nucleus_geometry if o.nucleus_geometry is not None else o.geometry
             for o in objs if o.object_type in _INSTANCE_OBJECT_TYPES]
    if not geoms:
        return []
    arr = np.array(geoms, dtype=object)
    polygonal = np.isin(shapely.get_type_id(arr), (3, 6))  # Polygon, MultiPolygon
    fine = polygonal & shapely.is_valid(arr) & (shapely.area(arr) > 0)
    out: list[BaseGeometry] = []
    for g, ok in zip(geoms, fine.tolist(), strict=True):
        if ok:
            out.append(g)
        elif (poly := _polygonal(g)) is not None:
            out.append(poly)
    return out


def _class_key(name: str | None) -> str:
    return (name or "").strip().lower()


def _class_names(objs: Iterable[QuPathObject]) -> list[str]:
    """Label-class names (role "class") used by ``objs``, first spelling of each."""
    seen: dict[str, str] = {}
    for o in objs:
        if label_role(o.classification) == "class" and o.classification:
            seen.setdefault(_class_key(o.classification), o.classification.strip())
    return list(seen.values())


# ============================================================================== rasterising


def _raster_tiles(
    objects: Sequence[QuPathObject], region: tuple[float, float, int, int], mpp: float,
    class_map: ClassMap, base_mpp: float, exhaustive: bool = False,
) -> Iterator[tuple[int, int, int, int, np.ndarray | None]]:
    """``(row, col, height, width, labels)`` per tile of ``region``: the labels of
    :func:`qpseg.labels.rasterize_labels` on that tile, or None for a tile no object reaches
    (then every pixel is Background when ``exhaustive``, else unlabelled).

    Each tile gets only the objects whose bounds reach it, in their original order, so the
    paint order (smaller on top, then file order) is the same as for the whole region.
    ``exhaustive``: unlabelled pixels are Background (``unlabelled="background"``).
    """
    import numpy as np
    import shapely

    from qpseg.labels import rasterize_labels

    x0, y0, width, height = region
    ds = mpp / base_mpp
    tree = shapely.STRtree([o.geometry for o in objects]) if objects else None
    for r in range(0, height, _TILE):
        for c in range(0, width, _TILE):
            th, tw = min(_TILE, height - r), min(_TILE, width - c)
            tx, ty = x0 + c * ds, y0 + r * ds
            hits = np.zeros(0, dtype=np.intp)
            if tree is not None:
                window = shapely.box(tx - ds, ty - ds, tx + (tw + 1) * ds, ty + (th + 1) * ds)
                hits = np.sort(tree.query(window))
            if hits.size == 0:
                yield r, c, th, tw, None
                continue
            yield r, c, th, tw, rasterize_labels(
                [objects[i] for i in hits.tolist()], (tx, ty, tw, th), mpp, class_map,
                base_mpp=base_mpp, unlabelled="background" if exhaustive else "ignore")


def _rasterize(
    objects: Sequence[QuPathObject], region: tuple[float, float, int, int], mpp: float,
    class_map: ClassMap, base_mpp: float, exhaustive: bool = False,
) -> np.ndarray:
    """:func:`qpseg.labels.rasterize_labels` tile by tile (same result, bounded work);
    ``exhaustive``: unlabelled pixels are Background."""
    import numpy as np

    _, _, width, height = region
    fill = 0 if exhaustive else class_map.ignore_index
    out = np.full((height, width), fill, dtype=np.uint8)
    for r, c, th, tw, tile in _raster_tiles(objects, region, mpp, class_map, base_mpp,
                                             exhaustive):
        if tile is not None:
            out[r:r + th, c:c + tw] = tile
    return out


def _tiled_confusion(
    truth: Sequence[QuPathObject], pred: Sequence[QuPathObject],
    region: tuple[float, float, int, int], mpp: float, class_map: ClassMap, base_mpp: float,
    exhaustive: bool,
) -> np.ndarray:
    """The confusion matrix of ``region`` at ``mpp`` computed one tile at a time, so memory
    stays that of one tile whatever the region's size (unpredicted pixels are Background)."""
    import numpy as np

    from qpseg.metrics.pixel import confusion_matrix

    n = len(class_map)
    total = np.zeros((n, n), dtype=np.int64)
    tiles = zip(_raster_tiles(truth, region, mpp, class_map, base_mpp, exhaustive),
                _raster_tiles(pred, region, mpp, class_map, base_mpp), strict=True)
    for (_, _, th, tw, t), (_, _, _, _, p) in tiles:
        if t is None:
            if not exhaustive:
                continue
            if p is None:  # Background everywhere on both sides
                total[0, 0] += th * tw
                continue
            t = np.zeros((th, tw), dtype=np.uint8)
        if p is None:
            p = np.zeros((th, tw), dtype=np.uint8)
        total += confusion_matrix(t, p, n, IGNORE_INDEX, pred_ignore=0)
    return total


def _paint_instances(geoms: Sequence[BaseGeometry], shape: tuple[int, int],
                     ds: float) -> np.ndarray:
    """Instance ids ``1..n`` drawn on a grid of ``ds`` level-0 px (pixel-centre rule of
    :func:`qpseg.labels.rasterize_labels`, one object at a time; later ones on top)."""
    import numpy as np

    from qpseg.labels import rasterize_labels
    from qpseg.qupath.geojson import QuPathObject

    cm = ClassMap.from_names(["instance"])
    out = np.zeros(shape, dtype=np.int32)
    h, w = shape
    for i, g in enumerate(geoms, start=1):
        minx, miny, maxx, maxy = g.bounds
        c0, r0 = max(math.floor(minx / ds) - 1, 0), max(math.floor(miny / ds) - 1, 0)
        c1, r1 = min(math.ceil(maxx / ds) + 1, w), min(math.ceil(maxy / ds) + 1, h)
        if c1 <= c0 or r1 <= r0:
            continue
        lab = rasterize_labels([QuPathObject(geometry=g, classification="instance")],
                               (c0 * ds, r0 * ds, c1 - c0, r1 - r0), ds, cm, base_mpp=1.0)
        out[r0:r1, c0:c1][lab == 1] = i
    return out


def _geometric_overlap(truth: Sequence[BaseGeometry],
                       pred: Sequence[BaseGeometry]) -> InstanceOverlap:
    """The metric core's sparse overlap table computed from polygons (exact areas)."""
    import numpy as np
    import shapely

    from qpseg.metrics.instance import InstanceOverlap

    tg = np.array(truth, dtype=object)
    pg = np.array(pred, dtype=object)
    ta = np.rint(shapely.area(tg) * _AREA_SCALE).astype(np.int64) if tg.size else \
        np.zeros(0, np.int64)
    pa = np.rint(shapely.area(pg) * _AREA_SCALE).astype(np.int64) if pg.size else \
        np.zeros(0, np.int64)
    tg, ta = tg[ta > 0], ta[ta > 0]
    pg, pa = pg[pa > 0], pa[pa > 0]
    if tg.size and pg.size:
        tree = shapely.STRtree(pg)
        ti, pj = tree.query(tg, predicate="intersects")
        inter = np.rint(shapely.area(shapely.intersection(tg[ti], pg[pj])) * _AREA_SCALE)
        inter = np.minimum(inter.astype(np.int64), np.minimum(ta[ti], pa[pj]))
        keep = inter > 0
        order = np.lexsort((pj[keep], ti[keep]))
        ti, pj, inter = ti[keep][order], pj[keep][order], inter[keep][order]
    else:
        ti = pj = np.zeros(0, np.intp)
        inter = np.zeros(0, np.int64)
    return InstanceOverlap(
        truth_ids=np.arange(1, ta.size + 1), pred_ids=np.arange(1, pa.size + 1),
        truth_area=ta, pred_area=pa, pair_truth=ti.astype(np.intp),
        pair_pred=pj.astype(np.intp), pair_inter=inter.astype(np.int64),
    )


def _overlay_codes(truth: np.ndarray, pred: np.ndarray, max_side: int = _THUMB_SIDE
                   ) -> np.ndarray:
    """Thumbnail of outcome codes ``outcome * 256 + class``, the worst outcome of each block
    kept. Outcomes: 0 unlabelled, 1 correct Background, 2 TP (correct class), 3 FN (class
    missed: predicted Background), 4 FP (a class predicted where the truth is Background or
    another class); the class (local index) is the truth's for TP and FN, the predicted one for
    FP, 0 otherwise."""
    import numpy as np

    truth = np.asarray(truth)
    pred = np.asarray(pred)
    labelled = truth != IGNORE_INDEX
    codes = np.zeros(truth.shape, dtype=np.uint16)
    codes[labelled] = 1 << 8
    tp = labelled & (truth == pred) & (truth != 0)
    fn = labelled & (truth != 0) & (pred == 0)
    fp = labelled & (pred != 0) & (pred != truth)
    codes[tp] = (2 << 8) | truth[tp].astype(np.uint16)
    codes[fn] = (3 << 8) | truth[fn].astype(np.uint16)
    codes[fp] = (4 << 8) | np.minimum(pred[fp], 255).astype(np.uint16)
    shape: tuple[int, ...] = codes.shape
    h, w = shape[0], shape[1]
    step = max(1, math.ceil(max(h, w) / max_side))
    if step == 1:
        return codes
    ph, pw = -h % step, -w % step
    padded = np.pad(codes, ((0, ph), (0, pw)))
    return padded.reshape((h + ph) // step, step, (w + pw) // step, step).max(axis=(1, 3))
