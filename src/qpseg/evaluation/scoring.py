"""Scoring one matched slide for ``qpseg evaluate``: its :class:`SlideScore`.

:func:`_score_pair` reads both sides, applies the truth rule of :mod:`qpseg.review` to the
truth's AI objects, chooses the slide's pixel size and class list, and scores pixels, lesions
and instances: on the eval raster over the image or the truth's labelled area (geometry
against geometry), or on a label mask's grid (:func:`_score_mask_pair`). The options all
slides share are an :class:`_Options`; the worker processes (:mod:`qpseg.evaluation.workers`)
call :func:`_score_pair` once per slide.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qpseg.errors import ConfigError, LabelError, QpsegError, QpsegWarning, SlideError
from qpseg.evaluation.inputs import InputItem, display_name, read_label_mask
from qpseg.evaluation.raster import (
    _INSTANCE_OBJECT_TYPES,
    _MAP_SIDE,
    _PIXEL_OBJECT_TYPES,
    _THUMB_SIDE,
    _class_key,
    _class_names,
    _geometric_overlap,
    _instance_geometries,
    _overlay_codes,
    _paint_instances,
    _polygonal,
    _rasterize,
    _read_objects,
    _tiled_confusion,
)
from qpseg.labels import BACKGROUND, IGNORE_INDEX, ClassMap, label_role

if TYPE_CHECKING:
    import numpy as np
    from shapely.geometry.base import BaseGeometry

    from qpseg.metrics.instance import InstanceMetrics
    from qpseg.metrics.lesion import LesionMetrics
    from qpseg.qupath.geojson import QuPathObject
    from qpseg.review import ReviewCounts


#: default pixel size (µm/px) at which pixel and lesion metrics are computed from GeoJSON
DEFAULT_EVAL_MPP = 2.0
#: ``--truth-mode``: ``exhaustive`` (unannotated pixels are Background) or ``partial``
TRUTH_MODES: tuple[str, ...] = ("exhaustive", "partial")
#: the default: an unannotated pixel is Background, so a model is charged for what it paints
#: outside the outlines (partial scoring of tumour-only outlines rewards painting everything)
DEFAULT_TRUTH_MODE = "exhaustive"
#: default lesion classes, in order of preference (case-insensitive)
LESION_CLASS_NAMES: tuple[str, ...] = ("Tumor", "Tumour", "Metastasis")
#: evaluation rasters up to this many pixels are scored in one piece; larger ones tile by tile
_FULL_RASTER_PIXELS = 50_000_000


@dataclass
class SlideScore:
    """What was computed for one matched slide (class indices local to ``class_names``)."""

    slide: str
    entry_id: int | None
    truth_file: str
    pred_file: str
    base_mpp: float | None
    eval_mpp: float | None
    size: tuple[int, int] | None              # raster width, height
    class_names: tuple[str, ...]              # local class list (Background first)
    confusion: np.ndarray | None              # local confusion matrix, None: no labelled area
    truth_classes: tuple[str, ...] = ()       # class names the truth uses
    pred_classes: tuple[str, ...] = ()        # class names the prediction uses
    lesions: dict[str, LesionMetrics] = field(default_factory=dict)  # class key -> result
    instance: InstanceMetrics | None = None
    thumbnail: np.ndarray | None = None       # :func:`_overlay_codes`
    tissue: np.ndarray | None = None          # RGB of the slide under the thumbnail (enlarged)
    overlay: str | None = None                # the prediction's overlay PNG (qpseg infer)
    notes: list[str] = field(default_factory=list)
    review: ReviewCounts | None = None        # the truth rule's counts (AI objects in truth)
    origin: tuple[float, float] = (0.0, 0.0)  # level-0 position of raster pixel (0, 0)
    downsample: float | None = None           # level-0 px per raster px
    mpp_source: str | None = None             # where base_mpp came from (PixelSize.source)
    mpp_replaced: float | None = None         # the known value --mpp-override replaced
    mpp_given_unused: bool = False            # --mpp differs from the slide's/project's own
    has_region: bool = False                  # the truth has Region* annotations
    pred_instances: bool | None = None        # the prediction holds detections or cells


@dataclass
class _Options:
    classes: tuple[str, ...] | None
    mpp: float | None
    eval_mpp: float
    mask_mpp: float | None
    lesion_class: str | None     # None: auto; "": off
    instances: bool | None
    thumbnails: bool
    ai_objects: str = "unreviewed-out"
    mpp_override: bool = False
    truth_mode: str = DEFAULT_TRUTH_MODE


def _pixel_size_option(value: float | None, what: str) -> float | None:
    """A pixel-size option checked by the one plausibility rule (None stays None)."""
    if value is None:
        return None
    from qpseg.slide import check_mpp

    return check_mpp(value, what, error=ConfigError)


def _base_mpp(t: InputItem, p: InputItem, opts: _Options, score: SlideScore) -> float:
    """Level-0 pixel size of a matched pair by :func:`qpseg.slide.choose_pixel_size`: the
    slide's own (truth side first), else the project's calibration, else ``--mpp``
    (``--mpp-override``: ``--mpp`` replaces a known value). Where it came from goes to
    ``score``; :class:`SlideError` when no value is known."""
    from qpseg.slide import choose_pixel_size, open_slide

    native: tuple[float, float] | None = None
    for item in (t, p):
        if item.image_path is None:
            continue
        try:
            with open_slide(item.image_path) as slide:
                native = slide.native_mpp
            break
        except SlideError as exc:
            note = (f"the slide cannot be opened to read its pixel size "
                    f"({exc.one_line()}); the project's or --mpp is used")
            score.notes.append(note)
            warnings.warn(f"{score.slide}: {note}", QpsegWarning, stacklevel=2)
    project = next((i.mpp for i in (t, p) if i.mpp is not None), None)
    chosen = choose_pixel_size(native, project, opts.mpp, override=opts.mpp_override,
                               path=t.image_path or p.image_path or t.path)
    for note in chosen.notes:
        score.notes.append(note)
        warnings.warn(f"{score.slide}: {note}", QpsegWarning, stacklevel=2)
    score.mpp_source, score.mpp_replaced = chosen.source, chosen.replaced
    score.mpp_given_unused = chosen.given_unused
    return chosen.mpp


def _local_class_map(names: Sequence[str], opts: _Options) -> ClassMap:
    if opts.classes is not None:
        return ClassMap.from_names(opts.classes)
    uniq: dict[str, str] = {}
    for n in names:
        if _class_key(n) != _class_key(BACKGROUND):
            uniq.setdefault(_class_key(n), n)
    return ClassMap.from_names(sorted(uniq.values(), key=str.lower))


def _lesion_candidates(cm: ClassMap, opts: _Options) -> list[int]:
    if opts.lesion_class == "":
        return []
    if opts.lesion_class is not None:
        idx = cm.index_of(opts.lesion_class)
        return [] if idx is None else [idx]
    wanted = {n.lower() for n in LESION_CLASS_NAMES}
    return [c.index for c in cm.classes if c.name.lower() in wanted]


def _bounds(geoms: Iterable[BaseGeometry]) -> tuple[float, float, float, float] | None:
    import numpy as np
    import shapely

    arr = np.array(list(geoms), dtype=object)
    if arr.size == 0:
        return None
    b = shapely.bounds(arr)
    b = b[np.isfinite(b).all(axis=1)]
    if b.size == 0:
        return None
    return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())


def _grid_region(box: tuple[float, float, float, float], ds: float,
                 size: tuple[int, int] | None) -> tuple[float, float, int, int] | None:
    """Raster region (x, y, w, h at ``ds`` level-0 px per pixel) covering the level-0 box
    ``(minx, miny, maxx, maxy)`` clipped to the image, on a grid aligned to multiples of the
    pixel from the image origin; None when nothing is left."""
    minx, miny, maxx, maxy = box
    if size is not None:
        minx, miny = max(minx, 0.0), max(miny, 0.0)
        maxx, maxy = min(maxx, float(size[0])), min(maxy, float(size[1]))
    if not (maxx > minx and maxy > miny):
        return None
    x0 = math.floor(minx / ds) * ds
    y0 = math.floor(miny / ds) * ds
    w = max(1, math.ceil((maxx - x0) / ds - 1e-9))
    h = max(1, math.ceil((maxy - y0) / ds - 1e-9))
    return x0, y0, w, h


def _eval_region(
    truth_geoms: Sequence[BaseGeometry], pred_geoms: Sequence[BaseGeometry], ds: float,
    size: tuple[int, int] | None,
) -> tuple[float, float, int, int] | None:
    """Raster region (x, y, w, h at the eval pixel size) covering the truth's labelled area and
    whole predicted objects touching it; None when the labelled area is empty."""
    tb = _bounds(truth_geoms)
    if tb is None:
        return None
    minx, miny, maxx, maxy = tb
    for g in pred_geoms:
        gx0, gy0, gx1, gy1 = g.bounds
        if gx1 >= tb[0] and gx0 <= tb[2] and gy1 >= tb[1] and gy0 <= tb[3]:
            minx, miny = min(minx, gx0), min(miny, gy0)
            maxx, maxy = max(maxx, gx1), max(maxy, gy1)
    return _grid_region((minx, miny, maxx, maxy), ds, size)


def _exhaustive_region(
    geoms: Sequence[BaseGeometry], ds: float, size: tuple[int, int] | None,
) -> tuple[float, float, int, int] | None:
    """Raster region of exhaustive truth: the whole image, or, when the image size is not
    known (GeoJSON folders), the bounding box of every truth and predicted object; None when
    the size is unknown and there is no object."""
    if size is not None:
        return _grid_region((0.0, 0.0, float(size[0]), float(size[1])), ds, size)
    b = _bounds(geoms)
    return None if b is None else _grid_region(b, ds, None)


def _region_filter(truth_objs: Sequence[QuPathObject],
                   geoms: list[BaseGeometry]) -> list[BaseGeometry]:
    """Instances whose interior point lies in the truth's Region* annotations (if any)."""
    import numpy as np
    import shapely

    regions = [g for o in truth_objs if o.object_type == "annotation"
               and label_role(o.classification) == "region"
               and (g := _polygonal(o.geometry)) is not None]
    if not regions or not geoms:
        return geoms
    area = shapely.union_all(regions)
    shapely.prepare(area)
    pts = shapely.point_on_surface(np.array(geoms, dtype=object))
    keep = shapely.intersects(area, pts)
    return [g for g, k in zip(geoms, keep, strict=True) if k]


def _score_pixels(
    score: SlideScore, truth_map: np.ndarray, pred_map: np.ndarray, cm: ClassMap,
    mpp: float | None, opts: _Options, confusion: np.ndarray | None = None,
) -> None:
    """Confusion (unless given: computed at a finer grid), lesions and the overlay of one
    slide from its truth and prediction rasters at ``mpp``."""
    from qpseg.metrics.lesion import lesion_metrics
    from qpseg.metrics.pixel import confusion_matrix

    score.confusion = confusion if confusion is not None else confusion_matrix(
        truth_map, pred_map, len(cm), IGNORE_INDEX, pred_ignore=0)
    valid = truth_map != IGNORE_INDEX
    cands = _lesion_candidates(cm, opts)
    if cands and mpp is None:
        score.notes.append("lesion metrics skipped: pixel size unknown (pass --mpp)")
    elif mpp is not None:
        for idx in cands:
            score.lesions[_class_key(cm.classes[idx].name)] = lesion_metrics(
                truth_map == idx, pred_map == idx, mpp, slide=score.slide, valid=valid)
    if opts.thumbnails:
        score.thumbnail = _overlay_codes(truth_map, pred_map)


def _pixel_objects(objs: Sequence[QuPathObject], truth: bool) -> list[QuPathObject]:
    """The objects drawn as pixel labels: the classified annotations (the truth's ``Region*``
    and ``Ignore*`` annotations too); where there is no classified annotation, the classified
    detections and cells instead, each drawn as the geometry instance metrics score (a cell's
    nucleus when it has one), so a cells-only truth or prediction is pixel data as well."""
    import dataclasses

    ann = [o for o in objs if o.object_type in _PIXEL_OBJECT_TYPES]
    out = [o for o in ann if label_role(o.classification) == "class"]
    if not out:
        out = [o if o.nucleus_geometry is None
               else dataclasses.replace(o, geometry=o.nucleus_geometry, nucleus_geometry=None)
               for o in objs if o.object_type in _INSTANCE_OBJECT_TYPES
               and label_role(o.classification) == "class"]
    if truth:
        out += [o for o in ann if label_role(o.classification) in ("region", "ignore")]
    return out


def _pixel_pass(score: SlideScore, truth_pix: Sequence[QuPathObject],
                pred_pix: Sequence[QuPathObject], region: tuple[float, float, int, int],
                mpp: float, base: float, cm: ClassMap, opts: _Options, exhaustive: bool) -> None:
    """Score ``region`` at ``mpp``: in one raster when it is small enough, else the confusion
    tile by tile at ``mpp`` and lesions and overlay on a grid coarsened to fit in memory."""
    x0, y0, w, h = region
    ds = mpp / base
    score.size = (w, h)
    score.origin, score.downsample = (x0, y0), ds
    if w * h <= _FULL_RASTER_PIXELS:
        truth_map = _rasterize(truth_pix, region, mpp, cm, base, exhaustive)
        pred_map = _rasterize(pred_pix, region, mpp, cm, base)
        pred_map[pred_map == IGNORE_INDEX] = 0
        _score_pixels(score, truth_map, pred_map, cm, mpp, opts)
        return
    confusion = _tiled_confusion(truth_pix, pred_pix, region, mpp, cm, base, exhaustive)
    k = math.ceil(math.sqrt(w * h / _FULL_RASTER_PIXELS))
    coarse = (x0, y0, math.ceil(w / k), math.ceil(h / k))
    truth_map = _rasterize(truth_pix, coarse, mpp * k, cm, base, exhaustive)
    pred_map = _rasterize(pred_pix, coarse, mpp * k, cm, base)
    pred_map[pred_map == IGNORE_INDEX] = 0
    score.notes.append(f"pixel metrics computed in tiles at {mpp:g} µm/px ({w} x {h} pixels); "
                       f"lesions and the overlay at {mpp * k:g} µm/px")
    score.size, score.downsample = (coarse[2], coarse[3]), ds * k
    _score_pixels(score, truth_map, pred_map, cm, mpp * k, opts, confusion=confusion)


def _score_geometry_pair(t: InputItem, p: InputItem, opts: _Options, score: SlideScore,
                         truth_objs: list[QuPathObject], pred_objs: list[QuPathObject]) -> None:
    truth_pix = _pixel_objects(truth_objs, truth=True)
    pred_pix = _pixel_objects(pred_objs, truth=False)
    score.truth_classes = tuple(_class_names(truth_pix))
    score.has_region = any(label_role(o.classification) == "region" for o in truth_pix)
    has_instances = any(o.object_type in _INSTANCE_OBJECT_TYPES for o in truth_objs)
    score.pred_instances = any(o.object_type in _INSTANCE_OBJECT_TYPES for o in pred_objs)
    # Exhaustive truth: unlabelled pixels are Background over the whole image, unless Region*
    # annotations say where the truth is exhaustive. A truth of unclassified detections or
    # cells only is instance data: it has no pixel classes to compare a prediction with.
    exhaustive = opts.truth_mode == "exhaustive" and not score.has_region
    pixels = bool(score.truth_classes) or score.has_region or (
        exhaustive and not has_instances)
    if not pixels and has_instances:
        score.notes.append("pixel metrics skipped: the truth's detections/cells carry no class")
    score.pred_classes = tuple(_class_names(pred_pix)) if pixels else ()
    cm = _local_class_map([*score.truth_classes, *score.pred_classes], opts)
    score.class_names = tuple(cm.names)

    labelled = []
    for o in truth_pix:
        role = label_role(o.classification)
        if role == "region" or (role == "class" and cm.index_of(o.classification) is not None):
            labelled.append(o.geometry)
    pred_known = [o for o in pred_pix if cm.index_of(o.classification) is not None]
    if pixels and len(pred_known) < len(pred_pix):
        score.notes.append(f"{len(pred_pix) - len(pred_known)} predicted object(s) of classes "
                           "not evaluated were ignored")
    if pixels and (labelled or exhaustive):
        base = _base_mpp(t, p, opts, score)
        score.base_mpp = base
        score.eval_mpp = opts.eval_mpp
        ds = opts.eval_mpp / base
        size = t.size or p.size
        if exhaustive:
            region = _exhaustive_region([*labelled, *(o.geometry for o in pred_known)], ds,
                                        size)
            if size is None:
                score.notes.append("image size unknown: exhaustive truth scored over the "
                                   "bounding box of the truth's and the prediction's objects")
        else:
            region = _eval_region(labelled, [o.geometry for o in pred_known], ds, size)
        if region is not None:
            _pixel_pass(score, truth_pix, pred_known, region, opts.eval_mpp, base, cm, opts,
                        exhaustive)
        elif exhaustive:  # nothing drawn anywhere and no image size: an empty negative slide
            import numpy as np

            score.confusion = np.zeros((len(cm), len(cm)), dtype=np.int64)

    if opts.instances is not False:
        truth_inst = _instance_geometries(truth_objs)
        if truth_inst:
            from qpseg.metrics.instance import instance_metrics

            pred_inst = _instance_geometries(pred_objs)
            truth_inst = _region_filter(truth_objs, truth_inst)
            pred_inst = _region_filter(truth_objs, pred_inst)
            score.instance = instance_metrics(
                None, None, slide=score.slide, overlap=_geometric_overlap(truth_inst, pred_inst))


def _mask_grid(t: InputItem, p: InputItem, shape: tuple[int, int], opts: _Options,
               base: float | None) -> tuple[float, float | None]:
    """(level-0 px per mask px, mask µm/px or None) for a mask of ``shape`` (rows, cols)."""
    if opts.mask_mpp is not None:
        if base is not None:
            return opts.mask_mpp / base, opts.mask_mpp
        return 1.0, opts.mask_mpp
    size = t.size or p.size
    if size is not None:
        dsx, dsy = size[0] / shape[1], size[1] / shape[0]
        if abs(dsx - dsy) > 0.02 * max(dsx, dsy) + 1.0 / min(shape):
            raise LabelError(f"mask of {shape[1]} x {shape[0]} pixels does not have the "
                             f"slide's aspect ratio ({size[0]} x {size[1]}); pass --mask-mpp")
        ds = (dsx + dsy) / 2
        return ds, None if base is None else base * ds
    return 1.0, base


def _score_mask_pair(t: InputItem, p: InputItem, t_kind: str, p_kind: str, opts: _Options,
                     score: SlideScore, truth_objs: list[QuPathObject] | None,
                     pred_objs: list[QuPathObject] | None) -> None:
    """At least one side is a label mask: everything happens on the mask's grid."""
    import numpy as np

    t_cls = read_label_mask(t.path) if t_kind == "masks" and t.path else None
    t_ins = read_label_mask(t.instance_path) if t_kind == "masks" and t.instance_path else None
    p_cls = read_label_mask(p.path) if p_kind == "masks" and p.path else None
    p_ins = read_label_mask(p.instance_path) if p_kind == "masks" and p.instance_path else None
    shapes = {a.shape for a in (t_cls, t_ins, p_cls, p_ins) if a is not None}
    if len(shapes) > 1:
        raise LabelError("truth and prediction masks differ in size: "
                         + ", ".join(f"{s[1]} x {s[0]}" for s in sorted(shapes)))
    shape = next(iter(shapes))
    geometry = truth_objs is not None or pred_objs is not None
    base = None
    if geometry or opts.mpp is not None:
        try:
            base = _base_mpp(t, p, opts, score)
        except QpsegError:
            base = None
    ds, mask_mpp = _mask_grid(t, p, shape, opts, base)
    score.base_mpp, score.eval_mpp = base, mask_mpp
    score.size = (shape[1], shape[0])
    score.downsample = ds
    region = (0.0, 0.0, shape[1], shape[0])

    if opts.classes is not None:
        cm = ClassMap.from_names(opts.classes)
    else:  # masks on both sides, no names: classes are numbered
        top = max(int(a[a != IGNORE_INDEX].max(initial=0)) for a in (t_cls, p_cls)
                  if a is not None) if (t_cls is not None or p_cls is not None) else 0
        if top >= IGNORE_INDEX:
            raise LabelError(f"class mask value {top} is not a class index (0..254)")
        cm = ClassMap.from_names([f"class {i}" for i in range(1, top + 1)])
    score.class_names = tuple(cm.names)

    truth_map = pred_map = None
    if t_cls is not None:
        truth_map = t_cls
        present = np.unique(t_cls)
        score.truth_classes = tuple(cm.names[v] for v in present if 0 < v < len(cm))
    elif truth_objs is not None:
        ann = _pixel_objects(truth_objs, truth=True)
        score.truth_classes = tuple(_class_names(ann))
        score.has_region = any(label_role(o.classification) == "region" for o in ann)
        exhaustive = opts.truth_mode == "exhaustive" and not score.has_region
        has_instances = any(o.object_type in _INSTANCE_OBJECT_TYPES for o in truth_objs)
        if score.truth_classes or score.has_region or (exhaustive and not has_instances):
            truth_map = _rasterize(ann, region, ds, cm, 1.0, exhaustive)
    if p_cls is not None:
        pred_map = p_cls
        present = np.unique(p_cls)
        score.pred_classes = tuple(cm.names[v] for v in present if 0 < v < len(cm))
    elif pred_objs is not None:
        pix = _pixel_objects(pred_objs, truth=False)
        score.pred_instances = any(o.object_type in _INSTANCE_OBJECT_TYPES for o in pred_objs)
        score.pred_classes = tuple(_class_names(pix))
        pred_map = _rasterize([o for o in pix if cm.index_of(o.classification) is not None],
                              region, ds, cm, 1.0)
        pred_map[pred_map == IGNORE_INDEX] = 0
    if truth_map is not None and (truth_map != IGNORE_INDEX).any():
        if pred_map is None:
            pred_map = np.zeros(shape, dtype=np.uint8)
        _score_pixels(score, truth_map, pred_map, cm, mask_mpp, opts)

    if opts.instances is not False:
        from qpseg.metrics.instance import instance_metrics

        truth_inst = t_ins
        if truth_inst is None and truth_objs is not None:
            geoms = _instance_geometries(truth_objs)
            truth_inst = _paint_instances(geoms, shape, ds) if geoms else None
        if truth_inst is not None:
            pred_inst = p_ins
            if pred_inst is None and pred_objs is not None:
                pred_inst = _paint_instances(_instance_geometries(pred_objs), shape, ds)
            if pred_inst is None:
                pred_inst = np.zeros(shape, dtype=np.int32)
            score.instance = instance_metrics(truth_inst, pred_inst, slide=score.slide)


def _score_pair(t: InputItem, p: InputItem, t_kind: str, p_kind: str,
                opts: _Options) -> SlideScore:
    score = SlideScore(
        slide=display_name(t, p), entry_id=t.entry_id if t.entry_id is not None else p.entry_id,
        truth_file=t.files, pred_file=p.files, base_mpp=None, eval_mpp=None, size=None,
        class_names=(), confusion=None,
    )
    truth_objs = _read_objects(t.path) if t_kind != "masks" and t.path else None
    pred_objs = _read_objects(p.path) if p_kind != "masks" and p.path else None
    if truth_objs is not None:
        truth_objs = _truth_rule(t, p, opts, score, truth_objs, pred_objs)
    if t_kind == "masks" or p_kind == "masks":
        _score_mask_pair(t, p, t_kind, p_kind, opts, score, truth_objs, pred_objs)
    else:
        _score_geometry_pair(t, p, opts, score, truth_objs or [], pred_objs or [])
    if opts.thumbnails:
        overlay = p.overlay
        score.overlay = str(overlay) if overlay is not None else None
        image = t.image_path or p.image_path
        if score.thumbnail is not None and image is not None:
            _read_tissue(score, image)
    return score


def _read_tissue(score: SlideScore, image: Path) -> None:
    """The slide's pixels under the error map of ``score`` (its scored region), at the size
    report.html shows (the longer side at least ``_MAP_SIDE``); a note when unreadable."""
    import numpy as np

    from qpseg.slide import open_slide

    assert score.thumbnail is not None
    th, tw = score.thumbnail.shape[:2]
    if score.size is None or score.downsample is None or score.base_mpp is None:
        return
    factor = max(1, math.ceil(_MAP_SIDE / max(th, tw)))
    # one thumbnail cell covers `step` raster pixels of `downsample` level-0 pixels each
    step = max(1, math.ceil(max(score.size) / _THUMB_SIDE))
    mpp = score.base_mpp * score.downsample * step / factor
    try:
        with open_slide(image, mpp=score.base_mpp) as slide:
            rgb = slide.read_region_mpp(score.origin[0], score.origin[1], tw * factor,
                                        th * factor, mpp)
    except (SlideError, ValueError, MemoryError) as exc:
        text = exc.one_line() if isinstance(exc, SlideError) else f"{type(exc).__name__}: {exc}"
        score.notes.append(f"the error map is drawn without the tissue ({text})")
        return
    score.tissue = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)


def _truth_rule(t: InputItem, p: InputItem, opts: _Options, score: SlideScore,
                truth_objs: list[QuPathObject],
                pred_objs: list[QuPathObject] | None) -> list[QuPathObject]:
    """The truth objects by the rule of :mod:`qpseg.review`; counts go to ``score.review``.

    The originals of the truth's AI objects: the predictions saved in the truth's project
    (``qpseg/predictions``), and the prediction file matched to the slide (for a folder of
    truth files, the only place they can be).
    """
    from qpseg.review import AiObjectWarning, is_ai_object, select_truth

    if not any(is_ai_object(o) for o in truth_objs):
        return truth_objs
    originals: list[QuPathObject] = []
    sources: list[str] = []
    same = (t.originals is not None and p.path is not None
            and t.originals.resolve() == p.path.resolve())
    if t.originals is not None and not same:
        from qpseg.errors import GeoJSONError

        try:
            originals += _read_objects(t.originals)
            sources.append(str(t.originals))
        except GeoJSONError as exc:
            warnings.warn(f"{exc.one_line()} (the saved predictions: AI objects of the truth "
                          "cannot be compared with them)", AiObjectWarning, stacklevel=2)
    if pred_objs is not None and p.path is not None:
        originals += pred_objs
        sources.append(str(p.path))
    sel = select_truth(truth_objs, originals if sources else None, policy=opts.ai_objects,
                       originals_source=" or ".join(sources))
    score.review = sel.counts
    note = sel.unproven_note()
    if note is not None:
        score.notes.append(note)
        warnings.warn(f"{t.name}: {note}", AiObjectWarning, stacklevel=2)
    return sel.objects
