"""``qpseg evaluate-edits``: how much did the pathologist change the AI's objects?

Compares, per project entry, the objects ``qpseg infer`` wrote
(``<project>/qpseg/predictions/<entryID>.geojson``; each carries the metadata key
:data:`QPSEG_MARKER` = ``qpseg_model``) with a fresh annotation export made *after* the review
(``<project>/qpseg/annotations/<entryID>.geojson``, ``groovy/export_annotations.groovy``).

Rules (QuPath keeps an object's id, and its metadata, through GeoJSON import, editing and
export):

* An AI object is **matched** to the exported object with the same id. An AI object whose id is
  missing is matched to a not yet matched exported object that carries the qpseg marker and
  overlaps it with IoU ≥ 0.5 (largest IoU first), for exports whose ids were not preserved.
* A matched object is **kept** when :func:`qpseg.review.review` (the one "unchanged" test,
  shared with every reader of truth) finds its class and object type unchanged and its
  outline nowhere moved by more than ``tolerance_px`` level-0 pixels (Hausdorff distance of
  the outlines). Otherwise it is **reshaped** (geometry changed; the area change is reported)
  and/or **reclassified** (class changed); ``n_changed`` counts either. A kept object that is
  locked in QuPath was explicitly **accepted** (``n_accepted``, part of ``n_kept``).
* An AI object with no match was **deleted**.
* An exported object that is not matched is:
  ``other-ai`` when it carries the qpseg marker (from another run, or a copy);
  ``existing`` when its id is in the optional *baseline* export (annotations from before the
  review, ``--baseline DIR``); ``user-other`` when it has no label class (unclassified,
  ``Ignore*``, ``Region*``); **added** when its class is one of the model's classes (the
  classes of the AI objects, plus ``classes`` of ``run_metadata.json`` in the predictions
  folder) or it overlaps an AI object; ``user-other`` otherwise. So the pathologist's own
  earlier annotations of a model class count as added unless a baseline is given.
* The final objects are truth by the rule of :mod:`qpseg.review` (``ai_objects``, CLI
  ``--ai-objects``): by default an unchanged, unlocked AI object is an *unreviewed prediction*
  and is left out (``n_left_out``), ``other-ai`` objects (no original here) count, with a
  warning; ``all-in`` counts every AI object, ``all-out`` none.
* **Dice** per class between the union of the AI objects (their AI class) and the union of the
  final truth objects (matched ones with their final class, plus added ones, plus other-ai ones
  the rule keeps); exact areas of the polygons. An AI object whose final version the rule left
  out is left out of the AI side too (there is no judgement to compare it with), so by default
  the Dice measures agreement on what the pathologist reviewed (``all-in``: on everything; a
  slide nobody reviewed has no Dice). Deleted AI objects stay on the AI side. The slide's Dice
  sums over classes: ``2 Σ|A∩F| / Σ(|A| + |F|)``.

The export script exports annotations and the detections/cells qpseg wrote (QuPath 0.5+ keeps
metadata on detections); an export without any detections while the AI wrote some (QuPath 0.4,
or an older export script) would count them all as "deleted", and a note says so.

Pixel size (for the µm² columns only): the rule of every command,
:func:`qpseg.slide.choose_pixel_size` — the slide's own, else the QuPath project's calibration,
else ``--mpp``; ``--mpp-override`` makes ``--mpp`` replace a known value (``edits.csv`` says
where each value came from, ``mpp_source``, and what was replaced, ``mpp_replaced``). Unknown,
the µm² columns stay empty.

Outputs: ``edits.csv`` (one row per slide), ``edits_per_class.csv``, ``edit_objects.csv`` (one
row per AI or added object), ``edits_summary.csv`` (totals and per-slide statistics) and
``edits_skipped.csv``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError, QpsegError, QpsegWarning
from qpseg.labels import label_role
from qpseg.objects import MARKER_KEY
from qpseg.review import (
    DEFAULT_POLICY,
    DEFAULT_TOLERANCE_PX,
    AiObjectWarning,
    ReviewCounts,
    check_policy,
    check_tolerance,
    counts_as_truth,
    is_ai_object,
    review,
    unproven_note,
)

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from qpseg.qupath.geojson import QuPathObject
    from qpseg.slide import PixelSize

__all__ = [
    "EDIT_COLUMNS",
    "OBJECT_COLUMNS",
    "QPSEG_MARKER",
    "EditsResult",
    "ObjectEdit",
    "SlideEdits",
    "compare_edits",
    "evaluate_edits",
]

#: metadata key that marks objects written by qpseg
QPSEG_MARKER = MARKER_KEY
STATUSES: tuple[str, ...] = (
    "kept", "reshaped", "reclassified", "reshaped+reclassified", "deleted", "added",
    "other-ai", "existing", "user-other",
)
EDIT_COLUMNS: tuple[str, ...] = (
    "slide", "entry_id", "predictions_file", "annotations_file", "mpp", "mpp_source",
    "mpp_replaced", "n_ai", "n_kept",
    "n_accepted", "n_left_out", "n_reshaped", "n_reclassified", "n_changed", "n_deleted",
    "n_added", "n_other_ai",
    "n_existing", "n_user_other", "kept_fraction", "ai_area_px", "final_area_px",
    "area_added_px", "area_removed_px", "reshaped_abs_area_change_px", "ai_area_um2",
    "final_area_um2", "area_added_um2", "area_removed_um2", "dice", "notes",
)
CLASS_COLUMNS: tuple[str, ...] = (
    "slide", "entry_id", "class_name", "n_ai", "n_final", "ai_area_px", "final_area_px",
    "intersection_px", "dice",
)
OBJECT_COLUMNS: tuple[str, ...] = (
    "slide", "entry_id", "object_id", "status", "matched_by", "ai_class", "final_class",
    "ai_area_px", "final_area_px", "area_change_px", "iou", "review", "in_truth",
)
SUMMARY_COLUMNS: tuple[str, ...] = (
    "metric", "n_slides", "pooled", "slide_mean", "slide_std", "slide_min", "slide_max",
)
_COUNT_METRICS = ("n_ai", "n_kept", "n_accepted", "n_left_out", "n_reshaped", "n_reclassified",
                  "n_changed", "n_deleted",
                  "n_added", "n_other_ai", "n_existing", "n_user_other", "ai_area_px",
                  "final_area_px", "area_added_px", "area_removed_px",
                  "reshaped_abs_area_change_px")


@dataclass(frozen=True)
class ObjectEdit:
    """What happened to one AI object (or one added object)."""

    object_id: str | None
    status: str
    matched_by: str            # "id", "geometry" or ""
    ai_class: str | None
    final_class: str | None
    ai_area_px: float
    final_area_px: float
    iou: float
    review: str = ""           # the truth rule's status of the final object (qpseg.review)
    in_truth: bool | None = None  # whether the final object counts as truth (None: none)

    @property
    def area_change_px(self) -> float:
        """Final minus AI area (level-0 px²); NaN for deleted/added objects."""
        if self.status in ("deleted", "added", "other-ai", "existing", "user-other"):
            return math.nan
        return self.final_area_px - self.ai_area_px


@dataclass(frozen=True)
class ClassEdits:
    """AI vs final area of one class on one slide."""

    class_name: str
    n_ai: int
    n_final: int
    ai_area_px: float
    final_area_px: float
    intersection_px: float

    @property
    def dice(self) -> float:
        den = self.ai_area_px + self.final_area_px
        return 2.0 * self.intersection_px / den if den > 0 else math.nan


@dataclass
class SlideEdits:
    """The comparison of one slide's AI objects with the reviewed export."""

    slide: str
    entry_id: int | None
    objects: list[ObjectEdit]
    classes: list[ClassEdits]
    ai_area_px: float         # AI objects compared (the rule's AI side, module doc)
    final_area_px: float      # final truth objects
    area_added_px: float      # final outside the AI union (class-agnostic)
    area_removed_px: float    # AI union outside the final union
    mpp: float | None = None
    predictions_file: str = ""
    annotations_file: str = ""
    notes: list[str] = field(default_factory=list)
    review: ReviewCounts = field(default_factory=ReviewCounts)
    mpp_source: str | None = None     # where ``mpp`` came from (PixelSize.source)
    mpp_replaced: float | None = None  # the known value --mpp-override replaced

    def count(self, *statuses: str) -> int:
        """Objects with one of these statuses."""
        return sum(o.status in statuses for o in self.objects)

    @property
    def n_ai(self) -> int:
        return self.count("kept", "reshaped", "reclassified", "reshaped+reclassified",
                          "deleted")

    @property
    def dice(self) -> float:
        inter = sum(c.intersection_px for c in self.classes)
        den = sum(c.ai_area_px + c.final_area_px for c in self.classes)
        return 2.0 * inter / den if den > 0 else math.nan

    def row(self) -> dict[str, Any]:
        """One row of ``edits.csv`` (:data:`EDIT_COLUMNS`)."""
        um2 = self.mpp * self.mpp if self.mpp else math.nan
        n_ai = self.n_ai
        reshaped = [o for o in self.objects if o.status.startswith("reshaped")]
        row: dict[str, Any] = {
            "slide": self.slide, "entry_id": self.entry_id,
            "predictions_file": self.predictions_file,
            "annotations_file": self.annotations_file, "mpp": self.mpp,
            "mpp_source": self.mpp_source, "mpp_replaced": self.mpp_replaced, "n_ai": n_ai,
            "n_kept": self.count("kept"),
            "n_accepted": sum(o.review == "accepted" for o in self.objects),
            "n_left_out": self.review.total("left_out"),
            "n_reshaped": self.count("reshaped", "reshaped+reclassified"),
            "n_reclassified": self.count("reclassified", "reshaped+reclassified"),
            "n_changed": self.count("reshaped", "reclassified", "reshaped+reclassified"),
            "n_deleted": self.count("deleted"), "n_added": self.count("added"),
            "n_other_ai": self.count("other-ai"), "n_existing": self.count("existing"),
            "n_user_other": self.count("user-other"),
            "kept_fraction": self.count("kept") / n_ai if n_ai else math.nan,
            "ai_area_px": self.ai_area_px, "final_area_px": self.final_area_px,
            "area_added_px": self.area_added_px, "area_removed_px": self.area_removed_px,
            "reshaped_abs_area_change_px": sum(abs(o.area_change_px) for o in reshaped),
            "ai_area_um2": self.ai_area_px * um2, "final_area_um2": self.final_area_px * um2,
            "area_added_um2": self.area_added_px * um2,
            "area_removed_um2": self.area_removed_px * um2,
            "dice": self.dice, "notes": "; ".join(self.notes),
        }
        return {k: row[k] for k in EDIT_COLUMNS}

    def class_rows(self) -> list[dict[str, Any]]:
        """Rows of ``edits_per_class.csv``."""
        return [{"slide": self.slide, "entry_id": self.entry_id, "class_name": c.class_name,
                 "n_ai": c.n_ai, "n_final": c.n_final, "ai_area_px": c.ai_area_px,
                 "final_area_px": c.final_area_px, "intersection_px": c.intersection_px,
                 "dice": c.dice} for c in self.classes]

    def object_rows(self) -> list[dict[str, Any]]:
        """Rows of ``edit_objects.csv``."""
        return [{"slide": self.slide, "entry_id": self.entry_id, "object_id": o.object_id,
                 "status": o.status, "matched_by": o.matched_by, "ai_class": o.ai_class,
                 "final_class": o.final_class, "ai_area_px": o.ai_area_px,
                 "final_area_px": o.final_area_px, "area_change_px": o.area_change_px,
                 "iou": o.iou, "review": o.review, "in_truth": o.in_truth}
                for o in self.objects]


# ============================================================================== comparison


def _key(name: str | None) -> str:
    return (name or "").strip().lower()


def _poly(geom: BaseGeometry) -> BaseGeometry | None:
    from qpseg.evaluation.raster import _polygonal

    return _polygonal(geom)


def _area(g: BaseGeometry | None) -> float:
    return float(g.area) if g is not None else 0.0


def _iou(a: BaseGeometry | None, b: BaseGeometry | None) -> float:
    if a is None or b is None:
        return math.nan
    inter = a.intersection(b).area
    union = a.area + b.area - inter
    return float(inter / union) if union > 0 else math.nan


def _union(geoms: Sequence[BaseGeometry]) -> BaseGeometry | None:
    import shapely

    return shapely.union_all(list(geoms)) if geoms else None


def _overlapping(ai: Sequence[BaseGeometry], candidates: Sequence[int],
                 geoms: Sequence[BaseGeometry | None]) -> set[int]:
    """The candidates ``j`` whose ``geoms[j]`` shares a positive area with some AI polygon.

    Equivalent to intersecting each with the union of the AI polygons, but each is compared
    only with the AI polygons an STRtree finds near it, in one vectorised pass: linear in the
    number of objects rather than objects x union size.
    """
    import numpy as np
    import shapely

    if not ai or not candidates:
        return set()
    tree = shapely.STRtree(np.asarray(ai, dtype=object))
    cand = np.asarray(candidates, dtype=np.int64)
    arr = np.empty(len(cand), dtype=object)
    arr[:] = [geoms[j] for j in candidates]
    src, hit = tree.query(arr, predicate="intersects")
    if src.size == 0:
        return set()
    area = shapely.area(shapely.intersection(arr[src], tree.geometries[hit]))
    return {int(j) for j in np.unique(cand[src[area > 0]])}


def compare_edits(
    ai: Sequence[QuPathObject],
    final: Sequence[QuPathObject],
    *,
    slide: str = "",
    entry_id: int | None = None,
    tolerance_px: float = DEFAULT_TOLERANCE_PX,
    model_classes: Iterable[str] | None = None,
    baseline_ids: Iterable[str] = (),
    mpp: float | None = None,
    ai_objects: str = DEFAULT_POLICY,
    predictions_file: str = "",
) -> SlideEdits:
    """Compare one slide's AI objects with the objects after review (module doc rules).

    ``ai_objects`` is the truth rule's policy (:mod:`qpseg.review`); the result's ``review``
    holds its counts per class; ``predictions_file`` (where ``ai`` was read) names the
    originals in its warning.
    """
    import numpy as np
    import shapely

    tol = check_tolerance(tolerance_px)
    policy = check_policy(ai_objects)
    classes = {_key(c) for c in (model_classes or ())} | {
        _key(o.classification) for o in ai if label_role(o.classification) == "class"}
    baseline = set(baseline_ids)
    ai_poly = [_poly(o.geometry) for o in ai]
    fin_poly = [_poly(o.geometry) for o in final]

    by_id: dict[str, int] = {}
    for j, o in enumerate(final):
        if o.id and o.id not in by_id:
            by_id[o.id] = j
    match: dict[int, tuple[int, str]] = {}
    used: set[int] = set()
    for i, o in enumerate(ai):
        hit = by_id.get(o.id) if o.id else None
        if hit is not None and hit not in used:
            match[i] = (hit, "id")
            used.add(hit)
    # ids lost on the way through QuPath: match marked objects by overlap
    left_ai = [i for i in range(len(ai)) if i not in match and ai_poly[i] is not None]
    left_fin = [j for j in range(len(final)) if j not in used and is_ai_object(final[j])
                and fin_poly[j] is not None]
    if left_ai and left_fin:
        cands = []
        tree = shapely.STRtree(np.array([fin_poly[j] for j in left_fin], dtype=object))
        for i in left_ai:
            for k in tree.query(ai_poly[i], predicate="intersects"):
                j = left_fin[int(k)]
                v = _iou(ai_poly[i], fin_poly[j])
                if v >= 0.5:
                    cands.append((-v, i, j))
        for _, i, j in sorted(cands):
            if i not in match and j not in used:
                match[i] = (j, "geometry")
                used.add(j)

    # the truth rule: matched final objects against their originals, the one "unchanged" test
    matched = sorted(match)
    reviews = dict(zip(matched, review([final[match[i][0]] for i in matched],
                                       [ai[i] for i in matched], tol), strict=True))
    counts = ReviewCounts(policy)
    truth_fin: set[int] = set()   # final objects that count as truth
    objects: list[ObjectEdit] = []
    for i, o in enumerate(ai):
        a_area = _area(ai_poly[i])
        if i not in match:
            objects.append(ObjectEdit(o.id, "deleted", "", o.classification, None, a_area,
                                      math.nan, math.nan))
            continue
        j, how = match[i]
        f = final[j]
        r = reviews[i]
        resh, recl = r.reshaped, r.reclassified
        status = ("reshaped+reclassified" if resh and recl else "reshaped" if resh
                  else "reclassified" if recl else "kept")
        keep = counts_as_truth(r.status, policy)
        if is_ai_object(f):
            counts.add(f, r.status, keep)
        if keep:
            truth_fin.add(j)
        objects.append(ObjectEdit(o.id, status, how, o.classification, f.classification, a_area,
                                  _area(fin_poly[j]), _iou(ai_poly[i], fin_poly[j]),
                                  r.status, keep))

    overlaps_ai = _overlapping(
        [g for g in ai_poly if g is not None],
        [j for j, f in enumerate(final) if j not in used and not is_ai_object(f)
         and label_role(f.classification) == "class" and fin_poly[j] is not None
         and _key(f.classification) not in classes], fin_poly)
    added: list[int] = []
    unproven: dict[tuple[str, str], int] = {}
    for j, f in enumerate(final):
        if j in used:
            continue
        review_status, in_truth = "", None
        if is_ai_object(f):
            status = "other-ai"
            review_status, in_truth = "unproven", counts_as_truth("unproven", policy)
            counts.add(f, "unproven", in_truth)
            if in_truth:
                truth_fin.add(j)
                added.append(j)
            made = (f.metadata.get(MARKER_KEY, ""), f.metadata.get("qpseg_run", ""))
            unproven[made] = unproven.get(made, 0) + 1
        elif f.id is not None and f.id in baseline:
            status = "existing"
        elif label_role(f.classification) != "class":
            status = "user-other"
        elif _key(f.classification) in classes or j in overlaps_ai:
            status = "added"
            added.append(j)
        else:
            status = "user-other"
        objects.append(ObjectEdit(f.id, status, "", None, f.classification, math.nan,
                                  _area(fin_poly[j]), math.nan, review_status, in_truth))

    # areas per class: AI (AI classes) vs final (matched objects' final class + added)
    ai_by: dict[str, list[BaseGeometry]] = {}
    fin_by: dict[str, list[BaseGeometry]] = {}
    names: dict[str, str] = {}
    ai_side = [i for i in range(len(ai)) if i not in match or match[i][0] in truth_fin]
    for i in ai_side:
        o = ai[i]
        if label_role(o.classification) == "class" and ai_poly[i] is not None:
            names.setdefault(_key(o.classification), (o.classification or "").strip())
            ai_by.setdefault(_key(o.classification), []).append(ai_poly[i])
    final_ids = [j for j, _ in match.values() if j in truth_fin] + added
    for j in final_ids:
        f = final[j]
        if label_role(f.classification) == "class" and fin_poly[j] is not None:
            names.setdefault(_key(f.classification), (f.classification or "").strip())
            fin_by.setdefault(_key(f.classification), []).append(fin_poly[j])
    class_edits = []
    for key in sorted(names, key=lambda k: names[k].lower()):
        ua, uf = _union(ai_by.get(key, [])), _union(fin_by.get(key, []))
        inter = float(ua.intersection(uf).area) if ua is not None and uf is not None else 0.0
        class_edits.append(ClassEdits(names[key], len(ai_by.get(key, [])),
                                      len(fin_by.get(key, [])), _area(ua), _area(uf), inter))
    side_union = _union([ai_poly[i] for i in ai_side if ai_poly[i] is not None])
    fin_union = _union([fin_poly[j] for j in final_ids if fin_poly[j] is not None])
    ai_a, fin_a = _area(side_union), _area(fin_union)
    both = float(side_union.intersection(fin_union).area) if side_union is not None \
        and fin_union is not None else 0.0
    result = SlideEdits(slide, entry_id, objects, class_edits, ai_a, fin_a, fin_a - both,
                        ai_a - both, mpp, review=counts)
    note = unproven_note(unproven, policy, predictions_file or "the predictions")
    if note is not None:
        result.notes.append(note)
        warnings.warn(f"{slide}: {note}" if slide else note, AiObjectWarning, stacklevel=2)
    ai_types = {o.object_type for o in ai}
    if ai_types - {"annotation"} and not any(f.object_type != "annotation" for f in final):
        result.notes.append(
            "AI objects include detections/cells but the export holds none (QuPath 0.4 keeps "
            "no metadata on detections, or an older export script); those count as deleted")
    return result


# ============================================================================== project level


@dataclass
class EditsResult:
    """The result of :func:`evaluate_edits`."""

    project: str
    slides: list[SlideEdits]
    skipped: list[tuple[str, str]]   # (slide, reason): no predictions, no export
    failed: list[tuple[str, str]]    # (slide, reason): unreadable files
    files: dict[str, Path] = field(default_factory=dict)
    ai_objects: str = DEFAULT_POLICY

    @property
    def review(self) -> ReviewCounts:
        """The truth rule's counts over all slides."""
        total = ReviewCounts(self.ai_objects)
        for s in self.slides:
            total.merge(s.review)
        return total

    @property
    def mpp_changes(self) -> list[tuple[SlideEdits, float, float]]:
        """``(slide, old, new)`` for every slide whose known pixel size ``--mpp-override``
        replaced (the CLI prints them)."""
        return [(s, s.mpp_replaced, s.mpp) for s in self.slides
                if s.mpp_replaced is not None and s.mpp is not None]

    def rows(self) -> list[dict[str, Any]]:
        """``edits.csv``."""
        return [s.row() for s in self.slides]

    def summary_rows(self) -> list[dict[str, Any]]:
        """``edits_summary.csv``: per metric the value over all slides (counts and areas
        summed, ratios of the sums) and the mean/std/min/max over slides."""
        import numpy as np

        rows = self.rows()
        out = []
        pooled: dict[str, float] = {m: float(sum(r[m] for r in rows)) for m in _COUNT_METRICS}
        pooled["kept_fraction"] = (pooled["n_kept"] / pooled["n_ai"] if pooled["n_ai"]
                                   else math.nan)
        inter = sum(c.intersection_px for s in self.slides for c in s.classes)
        den = sum(c.ai_area_px + c.final_area_px for s in self.slides for c in s.classes)
        pooled["dice"] = 2 * inter / den if den > 0 else math.nan
        for metric in (*_COUNT_METRICS, "kept_fraction", "dice"):
            v = np.array([float(r[metric]) for r in rows], dtype=np.float64)
            v = v[~np.isnan(v)]
            out.append({
                "metric": metric, "n_slides": int(v.size), "pooled": pooled[metric],
                "slide_mean": float(v.mean()) if v.size else math.nan,
                "slide_std": float(v.std(ddof=1)) if v.size > 1 else math.nan,
                "slide_min": float(v.min()) if v.size else math.nan,
                "slide_max": float(v.max()) if v.size else math.nan,
            })
        return out

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write the CSVs into ``out_dir`` atomically; returns their paths."""
        from qpseg.evaluate import write_csv

        out = Path(out_dir)
        files = {
            "edits.csv": write_csv(out / "edits.csv", self.rows(), EDIT_COLUMNS),
            "edits_per_class.csv": write_csv(
                out / "edits_per_class.csv",
                [r for s in self.slides for r in s.class_rows()], CLASS_COLUMNS),
            "edit_objects.csv": write_csv(
                out / "edit_objects.csv",
                [r for s in self.slides for r in s.object_rows()], OBJECT_COLUMNS),
            "edits_summary.csv": write_csv(out / "edits_summary.csv", self.summary_rows(),
                                           SUMMARY_COLUMNS),
            "edits_skipped.csv": write_csv(
                out / "edits_skipped.csv",
                [{"slide": s, "status": "skipped", "reason": r} for s, r in self.skipped]
                + [{"slide": s, "status": "failed", "reason": r} for s, r in self.failed],
                ("slide", "status", "reason")),
        }
        self.files = files
        return files


def _run_classes(folder: Path) -> list[str]:
    """Class names from ``run_metadata.json`` (``classes``: names or ``{name}`` objects)."""
    f = folder / "run_metadata.json"
    if not f.is_file():
        return []
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        warnings.warn(f"{f}: not readable JSON; ignored", QpsegWarning, stacklevel=3)
        return []
    found = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(found, list) and isinstance(data, dict) \
            and isinstance(data.get("model"), dict):
        found = data["model"].get("class_names")  # where `qpseg infer` writes them
    if not isinstance(found, list):
        return []
    out = []
    for c in found:
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, dict) and isinstance(c.get("name"), str):
            out.append(c["name"])
    return [c for c in out if label_role(c) == "class" and _key(c) != "background"]


def _entry_pixel_size(entry: Any, mpp: float | None, override: bool
                      ) -> tuple[PixelSize | None, list[str]]:
    """The entry's pixel size by :func:`qpseg.slide.choose_pixel_size` (None when unknown)
    and the notes for the user."""
    from qpseg.errors import SlideError
    from qpseg.slide import choose_pixel_size, open_slide

    notes: list[str] = []
    native = None
    if entry.image_path is not None and entry.image_found:
        try:
            with open_slide(entry.image_path) as slide:
                native = slide.native_mpp
        except SlideError as exc:
            notes.append(f"the slide cannot be opened to read its pixel size "
                         f"({exc.one_line()})")
    try:
        chosen = choose_pixel_size(native, entry.mpp_xy, mpp, override=override,
                                   path=entry.image_path)
    except SlideError as exc:
        if native is not None or entry.mpp_xy is not None:  # stored, but not plausible
            notes.append(f"{exc.message}; the µm² columns are empty")
        return None, notes
    return chosen, [*notes, *chosen.notes]


def evaluate_edits(
    project: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    predictions_dir: str | os.PathLike[str] | None = None,
    annotations_dir: str | os.PathLike[str] | None = None,
    baseline_dir: str | os.PathLike[str] | None = None,
    tolerance_px: float = DEFAULT_TOLERANCE_PX,
    mpp: float | None = None,
    ai_objects: str = DEFAULT_POLICY,
    mpp_override: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> EditsResult:
    """Compare every entry's AI objects with its reviewed annotation export (module doc).

    ``predictions_dir`` / ``annotations_dir`` default to ``<project>/qpseg/predictions`` and
    ``<project>/qpseg/annotations``; ``baseline_dir`` holds exports from before the review
    (their objects are not "added"). ``mpp`` is the pixel size of the µm² columns for slides
    without one of their own or in the project; ``mpp_override`` makes it replace known
    values (module doc; the replacements are in :attr:`EditsResult.mpp_changes`).
    ``ai_objects``: the truth rule's policy (:mod:`qpseg.review`). ``out_dir`` is checked to
    be writable before any file is read (:class:`~qpseg.errors.OutputError`).
    ``progress(done, total, slide)`` is called as entries are read, then compared.
    Raises :class:`ConfigError` when there is nothing to compare; entries whose files cannot
    be read are listed in ``failed``.
    """
    from qpseg._io import ensure_writable_dir
    from qpseg.errors import GeoJSONError
    from qpseg.manifest import find_annotation_file
    from qpseg.qupath.geojson import read_geojson
    from qpseg.qupath.project import QuPathProject
    from qpseg.slide import check_mpp

    try:
        tol = check_tolerance(tolerance_px)
    except ConfigError as exc:
        raise ConfigError(f"--tolerance-px: {exc.message}") from None
    policy = check_policy(ai_objects)
    if mpp is not None:
        mpp = check_mpp(mpp, "--mpp", error=ConfigError)
    if mpp_override and mpp is None:
        raise ConfigError("--mpp-override needs --mpp (the pixel size that replaces the "
                          "slides' own)")
    proj = QuPathProject.load(project)
    if out_dir is not None:
        ensure_writable_dir(out_dir)
    base = proj.path.parent / "qpseg"
    pred_dir = Path(predictions_dir) if predictions_dir is not None else base / "predictions"
    ann_dir = Path(annotations_dir) if annotations_dir is not None else base / "annotations"
    if not pred_dir.is_dir():
        raise ConfigError("no predictions folder (run `qpseg infer` first)", pred_dir)
    if not ann_dir.is_dir():
        raise ConfigError("no annotation export folder (run export_annotations.groovy in QuPath "
                          "after the review; `qpseg groovy --out DIR` writes it)", ann_dir)
    base_dir = Path(baseline_dir) if baseline_dir is not None else None
    if base_dir is not None and not base_dir.is_dir():
        raise ConfigError("baseline folder not found", base_dir)

    loaded: list[tuple[Any, Path, Path, list[QuPathObject], list[QuPathObject], set[str]]] = []
    skipped: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    model_classes = set(_run_classes(pred_dir))
    n_with_predictions = 0
    n_entries = len(proj.entries)
    for step, entry in enumerate(proj.entries, 1):  # reading, then comparing (progress)
        name = entry.image_name or f"entry {entry.entry_id}"
        if progress is not None:
            progress(step, 2 * n_entries, name)
        pf = find_annotation_file(entry, [pred_dir])
        if pf is None:
            skipped.append((name, "no predictions"))
            continue
        n_with_predictions += 1
        af = find_annotation_file(entry, [ann_dir])
        if af is None:
            skipped.append((name, f"no annotation export in {ann_dir}"))
            continue
        try:
            ai = read_geojson(pf)
            final = read_geojson(af)
            ids: set[str] = set()
            if base_dir is not None:
                bf = find_annotation_file(entry, [base_dir])
                if bf is not None:
                    ids = {o.id for o in read_geojson(bf) if o.id}
        except GeoJSONError as exc:
            failed.append((name, exc.one_line()))
            continue
        model_classes |= {o.classification for o in ai
                          if o.classification and label_role(o.classification) == "class"}
        loaded.append((entry, pf, af, ai, final, ids))
    if n_with_predictions == 0:
        raise ConfigError("no entry has predictions (<entryID>.geojson)", pred_dir)
    if not loaded and not failed:
        raise ConfigError("no entry with predictions has an annotation export (run "
                          "export_annotations.groovy in QuPath after the review; `qpseg groovy "
                          "--out DIR` writes it)", ann_dir)

    slides: list[SlideEdits] = []
    unused: list[str] = []  # slides with a pixel size of their own: --mpp is not used
    for step, (entry, pf, af, ai, final, ids) in enumerate(loaded, n_entries + 1):
        name = entry.image_name or f"entry {entry.entry_id}"
        if progress is not None:
            progress(step, n_entries + len(loaded), name)
        chosen, mpp_notes = _entry_pixel_size(entry, mpp, mpp_override)  # the CLI prints notes
        if chosen is not None and chosen.given_unused:
            unused.append(f"{name} {chosen.mpp:g} µm/px from the {chosen.source}")
        try:
            res = compare_edits(ai, final, slide=name, entry_id=entry.entry_id,
                                tolerance_px=tol, model_classes=model_classes,
                                baseline_ids=ids, ai_objects=policy, predictions_file=str(pf),
                                mpp=chosen.mpp if chosen is not None else None)
        except QpsegError as exc:
            failed.append((name, exc.one_line()))
            continue
        except (ValueError, TypeError) as exc:  # GEOS refusing degenerate geometry
            failed.append((name, f"{type(exc).__name__}: {exc}"))
            continue
        res.predictions_file, res.annotations_file = str(pf), str(af)
        res.notes += mpp_notes
        if chosen is not None:
            res.mpp_source, res.mpp_replaced = chosen.source, chosen.replaced
        try:
            if af.stat().st_mtime < pf.stat().st_mtime:
                res.notes.append("the annotation export is older than the predictions: "
                                 "export again after the review")
        except OSError:
            pass
        slides.append(res)
    if not slides:
        raise QpsegError(f"no entry could be compared; first failure: {failed[0][0]}: "
                         f"{failed[0][1]}", proj.path)
    if unused and mpp is not None:
        warnings.warn(
            f"--mpp {mpp:g} is not used for {len(unused)} slide(s) with a pixel size of their "
            f"own ({'; '.join(unused[:3])}{'; ...' if len(unused) > 3 else ''}); pass "
            "--mpp-override to replace it", QpsegWarning, stacklevel=2)
    result = EditsResult(str(proj.path), slides, skipped, failed, ai_objects=policy)
    if out_dir is not None:
        result.write(out_dir)
    return result
