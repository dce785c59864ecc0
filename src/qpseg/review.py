"""Which objects of a reviewed annotation export are the pathologist's truth: one rule.

After a review in QuPath, the annotation export (``<project>/qpseg/annotations/<entryID>
.geojson``) holds the pathologist's own annotations *and* every object ``qpseg infer`` wrote
that is still in the image (QuPath keeps an object's id and metadata through GeoJSON import,
editing and export). Counting the AI objects nobody touched as truth scores a model against
itself and trains it on its own output. Every reader of truth (``import-project`` and hence
``train``, ``evaluate --truth``, ``evaluate-edits``) applies this module's rule:

* An **AI object** carries the metadata key :data:`qpseg.objects.MARKER_KEY`
  (``qpseg_model``), which ``qpseg infer`` writes on every object.
* Its **original** is the object with the same id in the predictions qpseg saved
  (``<project>/qpseg/predictions/<entryID>.geojson``; for ``evaluate`` with a folder of truth
  files, the prediction file matched to the slide). The comparison is :func:`review`, the one
  "unchanged" test (``evaluate-edits`` uses it for its kept/reshaped/reclassified counts):

  - **reclassified**: the class differs (case and surrounding spaces ignored), or the object
    type does (a detection converted to an annotation);
  - **reshaped**: the outlines (polygon boundaries, or the points/lines themselves; a cell's
    nucleus too) are further apart than ``tolerance_px`` level-0 pixels anywhere (Hausdorff
    distance), default :data:`DEFAULT_TOLERANCE_PX` = 1 px. QuPath stores ROI vertices as
    32-bit floats (``GeometryTools.java`` lines 100-103, v0.5.1: ``FLOAT_FACTORY``) and writes
    GeoJSON coordinates with 2 decimals (``ROITypeAdapters.java`` line 74, v0.5.1:
    ``numDecimalPlaces = 2``): an untouched object comes back moved by at most ~0.01 px even
    at 10⁵ px, far inside the tolerance, while a reshape of a few pixels anywhere on a large
    outline is caught (a mean-shift or area test would average it away).

* Each AI object gets a **status**: ``unreviewed`` (unchanged, not locked), ``accepted``
  (unchanged and locked in QuPath — the convention for "I checked this one, it is right":
  QuPath writes ``"isLocked": true`` only for locked objects, ``QuPathTypeAdapters.java``
  lines 387-391, v0.5.1, and ``groovy/import_predictions.groovy`` never replaces a locked
  object), ``edited`` (reshaped and/or reclassified) or ``unproven`` (no original found: no
  predictions file, or its id is not in it, e.g. another run's object).
* The **policy** (``--ai-objects``) decides which count as truth:

  - ``unreviewed-out`` (default): everything but ``unreviewed``. An ``unproven`` object cannot
    be shown to be unchanged, so it counts, and a warning names how many (and which model and
    run made them) so the right predictions can be supplied;
  - ``all-out``: no AI object is truth (only the pathologist's own objects);
  - ``all-in``: every AI object is truth (the behaviour before this rule).

* A left-out annotation is *no evidence* either way: where it lies inside a ``Region*``
  annotation (exhaustively labelled area, Background where nothing is drawn), the region is cut
  back by it, so its pixels are unlabelled there, not Background — unless the pathologist's
  own annotation labels them.

The library returns the counts per object type, class and status (:class:`ReviewCounts`); the
CLI prints them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError, QpsegWarning
from qpseg.objects import MARKER_KEY

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from qpseg.qupath.geojson import QuPathObject

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_TOLERANCE_PX",
    "POLICIES",
    "STATUSES",
    "AiObjectWarning",
    "Review",
    "ReviewCounts",
    "TruthSelection",
    "check_policy",
    "check_tolerance",
    "counts_as_truth",
    "is_ai_object",
    "review",
    "select_truth",
    "truth_from_files",
    "unproven_note",
]

POLICIES: tuple[str, ...] = ("unreviewed-out", "all-out", "all-in")
DEFAULT_POLICY = "unreviewed-out"
#: largest outline shift (level-0 px) of an AI object still counted as unchanged
DEFAULT_TOLERANCE_PX = 1.0
STATUSES: tuple[str, ...] = ("unreviewed", "accepted", "edited", "unproven")


class AiObjectWarning(QpsegWarning):
    """AI objects in the truth whose originals cannot be found (they count as truth)."""


def check_policy(value: str) -> str:
    """``value`` as a policy name; :class:`ConfigError` for anything else."""
    v = str(value).strip().lower()
    if v not in POLICIES:
        raise ConfigError(f"--ai-objects must be one of {', '.join(POLICIES)}, not {value!r}")
    return v


def check_tolerance(value: float) -> float:
    """``value`` as a tolerance in pixels; :class:`ConfigError` unless finite and >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"tolerance must be a number of pixels, not {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"tolerance must be a finite number of pixels >= 0, not {value}")
    return v


def is_ai_object(obj: QuPathObject) -> bool:
    """True for an object qpseg wrote (its metadata holds the ``qpseg_model`` marker)."""
    return MARKER_KEY in obj.metadata


def counts_as_truth(status: str, policy: str) -> bool:
    """Whether an AI object with this status is truth under ``policy`` (module doc)."""
    if policy == "all-in":
        return True
    if policy == "all-out":
        return False
    return status != "unreviewed"


@dataclass(frozen=True)
class Review:
    """How a final AI object compares with its original."""

    status: str          # one of STATUSES
    reshaped: bool = False
    reclassified: bool = False

    @property
    def unchanged(self) -> bool:
        """True when the object has an original and neither outline nor class changed."""
        return self.status in ("unreviewed", "accepted")


def _key(name: str | None) -> str:
    return (name or "").strip().lower()


def _outline(geom: BaseGeometry) -> BaseGeometry:
    """What is compared: a polygon's boundary (so a filled hole or a removed part shows), a
    point's or line's own geometry."""
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom.boundary
    if geom.geom_type == "GeometryCollection":
        import shapely

        return shapely.union_all([_outline(g) for g in geom.geoms])
    return geom


def _family(geom: BaseGeometry | None) -> str:
    if geom is None:
        return "none"
    t = geom.geom_type
    if t in ("Polygon", "MultiPolygon"):
        return "area"
    if t in ("LineString", "MultiLineString", "LinearRing"):
        return "line"
    if t in ("Point", "MultiPoint"):
        return "point"
    return t


def _moved(a: Sequence[BaseGeometry | None], b: Sequence[BaseGeometry | None],
           tol: float) -> list[bool]:
    """Per pair: True when the geometries differ by more than ``tol`` px anywhere."""
    import numpy as np
    import shapely

    out = [False] * len(a)
    todo: list[int] = []
    for i, (ga, gb) in enumerate(zip(a, b, strict=True)):
        if ga is None and gb is None:
            continue
        if ga is None or gb is None or _family(ga) != _family(gb) \
                or ga.is_empty != gb.is_empty:
            out[i] = True
        elif not ga.is_empty:
            todo.append(i)
    if not todo:
        return out
    arr_a = np.array([a[i] for i in todo], dtype=object)
    arr_b = np.array([b[i] for i in todo], dtype=object)
    same = shapely.equals_exact(arr_a, arr_b, tolerance=0.0)
    for k in np.flatnonzero(~same).tolist():
        i = todo[k]
        try:
            d = float(shapely.hausdorff_distance(_outline(arr_a[k]), _outline(arr_b[k])))
        except (shapely.errors.GEOSException, ValueError, TypeError):
            d = math.nan  # GEOS refuses the geometry: not provably unchanged
        out[i] = not d <= tol  # NaN: changed
    return out


def review(finals: Sequence[QuPathObject], originals: Sequence[QuPathObject | None],
           tolerance_px: float = DEFAULT_TOLERANCE_PX) -> list[Review]:
    """Compare each final AI object with its original (``None``: not found); module doc.

    This is the one "unchanged" test of qpseg: the truth rule and ``evaluate-edits`` both call
    it. Vectorised over the pairs (tens of thousands of detections per slide).
    """
    tol = check_tolerance(tolerance_px)
    if len(finals) != len(originals):
        raise ValueError("finals and originals differ in length")
    pairs = [(i, f, o) for i, (f, o) in enumerate(zip(finals, originals, strict=True))
             if o is not None]
    moved = _moved([o.geometry for _, _, o in pairs], [f.geometry for _, f, _ in pairs], tol)
    nuc = _moved([o.nucleus_geometry for _, _, o in pairs],
                 [f.nucleus_geometry for _, f, _ in pairs], tol)
    out = [Review("unproven")] * len(finals)
    for (i, f, o), m, n in zip(pairs, moved, nuc, strict=True):
        reshaped = m or n
        recl = _key(f.classification) != _key(o.classification) \
            or f.object_type != o.object_type
        if reshaped or recl:
            status = "edited"
        elif f.is_locked and not o.is_locked:
            status = "accepted"
        else:
            status = "unreviewed"
        out[i] = Review(status, reshaped, recl)
    return out


# ============================================================================== counts


_COUNT_KEYS = ("unreviewed", "accepted", "edited", "unproven", "kept", "left_out")


@dataclass
class ReviewCounts:
    """AI objects in a truth, per (object type, class) and status, and what the policy did."""

    policy: str = DEFAULT_POLICY
    counts: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)

    def add(self, obj: QuPathObject, status: str, kept: bool) -> None:
        """Count one AI object."""
        key = (obj.object_type, (obj.classification or "").strip())
        row = self.counts.setdefault(key, dict.fromkeys(_COUNT_KEYS, 0))
        row[status] += 1
        row["kept" if kept else "left_out"] += 1

    def merge(self, other: ReviewCounts) -> ReviewCounts:
        """Add ``other``'s counts to these (same policy); returns self."""
        for key, row in other.counts.items():
            mine = self.counts.setdefault(key, dict.fromkeys(_COUNT_KEYS, 0))
            for k, v in row.items():
                mine[k] += v
        return self

    def total(self, what: str) -> int:
        """Sum of one count (a status, ``kept`` or ``left_out``) over types and classes."""
        return sum(row[what] for row in self.counts.values())

    @property
    def n_ai(self) -> int:
        """AI objects seen."""
        return self.total("kept") + self.total("left_out")

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (object type, class): ``object_type``, ``class_name``, the status
        counts, ``kept`` and ``left_out``; annotations first, then by class."""
        keys = sorted(self.counts, key=lambda k: (k[0] != "annotation", k[0], k[1].lower()))
        return [{"object_type": t, "class_name": c, **self.counts[(t, c)]} for t, c in keys]

    def to_json(self) -> dict[str, Any]:
        """JSON form: the policy and :meth:`rows`."""
        return {"policy": self.policy, "classes": self.rows()}

    @classmethod
    def from_json(cls, data: Any) -> ReviewCounts:
        """Inverse of :meth:`to_json` (an empty count for anything malformed)."""
        out = cls()
        if not isinstance(data, dict):
            return out
        out.policy = str(data.get("policy", DEFAULT_POLICY))
        for r in data.get("classes") or []:
            if isinstance(r, dict):
                out.counts[(str(r.get("object_type", "annotation")),
                            str(r.get("class_name", "")))] = {
                    k: int(r.get(k, 0) or 0) for k in _COUNT_KEYS}
        return out

    def lines(self) -> list[str]:
        """Human-readable lines, one per (object type, class), for the CLI to print."""
        if not self.counts:
            return []
        out = []
        for r in self.rows():
            what = r["class_name"] or "unclassified"
            if r["object_type"] != "annotation":
                what += f" ({r['object_type']}s)"
            parts = [f"{r[s]} {s.replace('_', ' ')}" for s in STATUSES if r[s]]
            out.append(f"AI objects ({self.policy}): {what}: {r['left_out']} left out, "
                       f"{r['kept']} kept ({', '.join(parts)})")
        return out


# ============================================================================== selection


@dataclass
class TruthSelection:
    """The truth objects of one slide after the rule, and what was left out."""

    objects: list[QuPathObject]
    counts: ReviewCounts
    left_out: list[QuPathObject] = field(default_factory=list)
    unproven: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, run) -> n
    originals_source: str = ""
    originals_sha256: str | None = None

    def unproven_note(self) -> str | None:
        """The warning text for AI objects that count without an original (None: none)."""
        return unproven_note(self.unproven, self.counts.policy, self.originals_source)


def unproven_note(unproven: dict[tuple[str, str], int], policy: str,
                  source: str) -> str | None:
    """The warning text for AI objects kept without an original: how many, made by which
    model and run (from their metadata), and where the originals were looked for (``source``,
    "" when no predictions file was found). None when there are none or the policy does not
    depend on originals."""
    if not unproven or policy != "unreviewed-out":
        return None
    n = sum(unproven.values())
    made = "; ".join(f"{k} by model {m!r}" + (f" run {r}" if r else "")
                     for (m, r), k in sorted(unproven.items()))
    where = f"not in {source}" if source else "no saved predictions found"
    return (f"{n} AI object(s) have no original ({where}; {made}): they cannot be shown to be "
            "unchanged and count as truth; give the predictions of that run, or pass "
            "--ai-objects all-out to leave every AI object out")


def _carve_regions(objects: list[QuPathObject],
                   left_out: Sequence[QuPathObject]) -> list[QuPathObject]:
    """``objects`` with each ``Region*`` annotation cut back by the left-out annotations."""
    from qpseg.labels import label_role

    regions = [i for i, o in enumerate(objects)
               if o.object_type == "annotation" and label_role(o.classification) == "region"]
    holes = [o.geometry for o in left_out if o.object_type == "annotation"]
    if not regions or not holes:
        return objects
    import shapely

    from qpseg.qupath.geojson import repair_polygonal

    polys = [repair_polygonal(g) for g in holes]
    cut = shapely.union_all([p for p in polys if not p.is_empty])
    if cut.is_empty:
        return objects
    out = list(objects)
    for i in regions:
        reg = repair_polygonal(out[i].geometry)
        if reg.intersects(cut):
            out[i] = dataclasses.replace(out[i], geometry=repair_polygonal(reg.difference(cut)))
    return out


def select_truth(
    objects: Sequence[QuPathObject],
    originals: Iterable[QuPathObject] | None,
    *,
    policy: str = DEFAULT_POLICY,
    tolerance_px: float = DEFAULT_TOLERANCE_PX,
    originals_source: str = "",
) -> TruthSelection:
    """Apply the rule (module doc) to one slide's exported objects.

    ``originals``: the objects qpseg saved for this slide (matched by id), ``None`` when no
    predictions file was found. Returns the truth objects (in file order, ``Region*``
    annotations cut back by left-out annotations), the left-out ones and the counts.
    """
    pol = check_policy(policy)
    counts = ReviewCounts(pol)
    ai_idx = [i for i, o in enumerate(objects) if is_ai_object(o)]
    if not ai_idx:
        return TruthSelection(list(objects), counts, originals_source=originals_source)
    by_id: dict[str, QuPathObject] = {}
    for o in originals or ():
        if o.id and o.id not in by_id:
            by_id[o.id] = o
    finals = [objects[i] for i in ai_idx]
    reviews = review(finals, [by_id.get(f.id) if f.id else None for f in finals], tolerance_px)
    drop: set[int] = set()
    unproven: dict[tuple[str, str], int] = {}
    for i, f, r in zip(ai_idx, finals, reviews, strict=True):
        keep = counts_as_truth(r.status, pol)
        counts.add(f, r.status, keep)
        if not keep:
            drop.add(i)
        if r.status == "unproven":
            k = (f.metadata.get(MARKER_KEY, ""), f.metadata.get("qpseg_run", ""))
            unproven[k] = unproven.get(k, 0) + 1
    kept = [o for i, o in enumerate(objects) if i not in drop]
    left = [objects[i] for i in sorted(drop)]
    return TruthSelection(_carve_regions(kept, left), counts, left, unproven, originals_source)


def truth_from_files(
    objects: Sequence[QuPathObject],
    predictions_file: str | os.PathLike[str] | None,
    *,
    policy: str = DEFAULT_POLICY,
    tolerance_px: float = DEFAULT_TOLERANCE_PX,
    expected_sha256: str | None = None,
    where: str = "",
    warn: bool = True,
) -> TruthSelection:
    """:func:`select_truth` with the originals read from ``predictions_file`` (None: none
    found). Warns (:class:`AiObjectWarning`, prefixed with ``where``) about AI objects kept
    without an original and about an unreadable predictions file.

    ``expected_sha256``: the predictions must still be the file an earlier import compared
    against (a manifest re-reading its truth); otherwise :class:`~qpseg.errors.LabelError`,
    since the same export would give different labels. ``warn=False``: no warnings (the
    import already gave them).
    """
    import warnings

    from qpseg.errors import GeoJSONError, LabelError

    prefix = f"{where}: " if where else ""
    if not any(is_ai_object(o) for o in objects) and expected_sha256 is None:
        return select_truth(objects, None, policy=policy, tolerance_px=tolerance_px)
    originals: list[QuPathObject] | None = None
    sha: str | None = None
    pf = Path(predictions_file) if predictions_file is not None else None
    if pf is not None:
        from qpseg._io import sha256_file
        from qpseg.qupath.geojson import read_geojson

        try:
            sha = sha256_file(pf)
            originals = read_geojson(pf)
        except OSError as exc:
            if warn:
                warnings.warn(f"{prefix}{pf}: the saved predictions cannot be read ({exc}); "
                              "AI objects are compared with nothing", AiObjectWarning,
                              stacklevel=2)
        except GeoJSONError as exc:
            if warn:
                    warnings.warn(f"{prefix}{exc.one_line()} (the saved predictions: AI objects "
                              "are compared with nothing)", AiObjectWarning, stacklevel=2)
            originals = None
    if expected_sha256 is not None and sha != expected_sha256:
        raise LabelError("the saved predictions the truth was compared with at import "
                         "changed or are gone: run `qpseg import-project` again",
                         pf if pf is not None else where or None)
    sel = select_truth(objects, originals, policy=policy, tolerance_px=tolerance_px,
                       originals_source=str(pf) if originals is not None else "")
    sel.originals_sha256 = sha if originals is not None else None
    note = sel.unproven_note()
    if note is not None and warn:
        warnings.warn(f"{prefix}{note}", AiObjectWarning, stacklevel=2)
    return sel
