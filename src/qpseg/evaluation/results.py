"""The result of ``qpseg evaluate``: :class:`Evaluation`, its CSV rows and files.

Per-slide scores and the accumulators over slides become the rows of ``per_slide.csv``,
``slides.csv``, ``summary.csv`` (with percentile bootstrap confidence intervals,
:func:`bootstrap_ci`), ``confusion.csv``, the lesion and instance CSVs, ``unmatched.csv``,
``failed.csv`` and ``ai_objects.csv``; :meth:`Evaluation.write` writes them atomically
(:func:`write_csv`). ``report.html`` is :mod:`qpseg.report`'s, which reads an
:class:`Evaluation`; this module does not import it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.evaluation.inputs import Failed, Unmatched
from qpseg.evaluation.provenance import ModelInfo
from qpseg.evaluation.scoring import DEFAULT_TRUTH_MODE, SlideScore

if TYPE_CHECKING:
    import numpy as np

    from qpseg.metrics.instance import InstanceAccumulator
    from qpseg.metrics.lesion import LesionAccumulator
    from qpseg.metrics.pixel import PixelAccumulator
    from qpseg.review import ReviewCounts


#: columns of ``per_slide.csv`` (one row per slide x class; pixel counts at the eval mpp)
PER_SLIDE_COLUMNS: tuple[str, ...] = (
    "slide", "entry_id", "class_index", "class_name", "n_truth", "n_pred", "tp", "fp", "fn",
    "tn", "precision", "recall", "f1", "dice", "iou", "truth_mode",
)
#: columns of ``slides.csv`` (one row per scored slide)
SLIDE_COLUMNS: tuple[str, ...] = (
    "slide", "entry_id", "truth_file", "pred_file", "base_mpp", "mpp_source", "mpp_replaced",
    "eval_mpp", "width", "height", "n_pixels", "accuracy", "miou", "mrecall", "mprecision",
    "mf1", "n_truth_instances", "n_pred_instances", "truth_mode", "notes",
)
#: columns of ``summary.csv``
SUMMARY_COLUMNS: tuple[str, ...] = (
    "level", "class_index", "class_name", "metric", "n_slides", "slide_mean", "slide_std",
    "ci_low", "ci_high", "slide_min", "slide_max", "pooled", "truth_mode",
)
CONFUSION_COLUMNS: tuple[str, ...] = ("slide", "truth_class", "pred_class", "count",
                                      "row_fraction", "truth_mode")
UNMATCHED_COLUMNS: tuple[str, ...] = ("side", "slide", "path", "reason")
FAILED_COLUMNS: tuple[str, ...] = ("slide", "entry_id", "truth_file", "pred_file", "reason")


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over slides (``NaN`` skipped).

    ``n_boot`` resamples of the defined values with replacement, drawn from
    ``numpy.random.default_rng(seed)`` (so the interval is reproducible); ``(NaN, NaN)`` with
    fewer than two defined values.
    """
    import numpy as np

    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    n = int(v.size)
    if n < 2 or n_boot < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 4_000_000 // n)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        means[start:start + k] = v[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _with_ci(rows: list[dict[str, Any]], values_of: Callable[[dict[str, Any]], list[float]],
             level: str, n_boot: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        lo, hi = bootstrap_ci(values_of(r), n_boot=n_boot, seed=seed)
        row = {"level": level, "class_index": r.get("class_index"),
               "class_name": r.get("class_name", ""), **r, "ci_low": lo, "ci_high": hi}
        out.append({k: row.get(k) for k in SUMMARY_COLUMNS})
    return out


@dataclass
class Evaluation:
    """The result of :func:`evaluate`: per-slide scores, accumulators and what was left out."""

    truth: str
    pred: str
    class_names: tuple[str, ...]
    eval_mpp: float
    slides: list[SlideScore]
    pixel: PixelAccumulator
    lesion_class: str | None
    lesion: LesionAccumulator | None
    instance: InstanceAccumulator | None
    unmatched: list[Unmatched]
    failed: list[Failed]
    notes: list[str] = field(default_factory=list)
    seed: int = 0
    n_bootstrap: int = 2000
    files: dict[str, Path] = field(default_factory=dict)
    ai_objects: str = "unreviewed-out"
    truth_mode: str = DEFAULT_TRUTH_MODE
    eval_mpp_source: str = "--eval-mpp"   # where eval_mpp came from
    unscored: list[SlideScore] = field(default_factory=list)  # matched, nothing to score
    model: ModelInfo | None = None  # what made the predictions (provenance, package)

    @property
    def _reviewed(self) -> list[SlideScore]:
        """Scored and unscored slides: the AI-object counts of both are reported."""
        return [*self.slides, *self.unscored]

    @property
    def review(self) -> ReviewCounts:
        """The truth rule's counts (AI objects in the truth left out / kept) over all slides."""
        from qpseg.review import ReviewCounts

        total = ReviewCounts(self.ai_objects)
        for s in self._reviewed:
            if s.review is not None:
                total.merge(s.review)
        return total

    @property
    def mpp_changes(self) -> list[tuple[SlideScore, float, float]]:
        """``(slide, old, new)`` for every slide whose known pixel size ``--mpp-override``
        replaced (the CLI prints them)."""
        return [(s, s.mpp_replaced, s.base_mpp) for s in self.slides
                if s.mpp_replaced is not None and s.base_mpp is not None]

    def ai_object_rows(self) -> list[dict[str, Any]]:
        """``ai_objects.csv``: per slide, object type and class, the AI objects of the truth
        by status and whether they were kept or left out (:mod:`qpseg.review`)."""
        return [{"slide": s.slide, "entry_id": s.entry_id, "policy": self.ai_objects, **r}
                for s in self._reviewed if s.review is not None for r in s.review.rows()]

    @property
    def pixel_slides(self) -> list[SlideScore]:
        """Slides with a labelled area (in the order of ``pixel.per_slide``)."""
        return [s for s in self.slides if s.confusion is not None]

    # -- rows of the CSV files
    def per_slide_rows(self) -> list[dict[str, Any]]:
        """``per_slide.csv``: one row per slide x class (:data:`PER_SLIDE_COLUMNS`)."""
        rows = []
        for s, m in zip(self.pixel_slides, self.pixel.per_slide, strict=True):
            for r in m.to_rows():
                r["entry_id"] = s.entry_id
                r["truth_mode"] = self.truth_mode
                rows.append({k: r.get(k) for k in PER_SLIDE_COLUMNS})
        return rows

    def slide_rows(self) -> list[dict[str, Any]]:
        """``slides.csv``: one row per scored slide (:data:`SLIDE_COLUMNS`)."""
        pix = {s.slide: m for s, m in zip(self.pixel_slides, self.pixel.per_slide, strict=True)}
        rows = []
        for s in self.slides:
            m = pix.get(s.slide)
            row: dict[str, Any] = {
                "slide": s.slide, "entry_id": s.entry_id, "truth_file": s.truth_file,
                "pred_file": s.pred_file, "base_mpp": s.base_mpp, "mpp_source": s.mpp_source,
                "mpp_replaced": s.mpp_replaced, "eval_mpp": s.eval_mpp,
                "width": s.size[0] if s.size else None, "height": s.size[1] if s.size else None,
                "n_truth_instances": s.instance.n_true if s.instance else None,
                "n_pred_instances": s.instance.n_pred if s.instance else None,
                "truth_mode": self.truth_mode, "notes": "; ".join(s.notes),
            }
            if m is not None:
                row.update({k: v for k, v in m.summary_row().items() if k != "slide"})
            rows.append({k: row.get(k) for k in SLIDE_COLUMNS})
        return rows

    def confusion_rows(self) -> list[dict[str, Any]]:
        """``confusion.csv``: per slide and ``pooled``, long format (truth rows)."""
        rows = []
        for m in self.pixel.per_slide:
            rows += m.confusion_rows()
        if self.pixel.per_slide:
            rows += self.pixel.pooled().confusion_rows()
        return [{**r, "truth_mode": self.truth_mode} for r in rows]

    def lesion_rows(self) -> list[dict[str, Any]]:
        """``lesions.csv``: one row per truth or predicted lesion; ``row0..col1`` in raster
        pixels, ``qupath_x0..qupath_y1`` the same box in level-0 (QuPath) pixels."""
        if self.lesion is None:
            return []
        where = {s.slide: s for s in self.pixel_slides}
        rows = []
        for r in self.lesion.per_slide:
            s = where.get(r.slide)
            for row in r.to_rows():
                row = {"lesion_class": self.lesion_class, **row}
                if s is not None and s.downsample is not None:
                    (ox, oy), ds = s.origin, s.downsample
                    row.update(qupath_x0=ox + row["col0"] * ds, qupath_y0=oy + row["row0"] * ds,
                               qupath_x1=ox + row["col1"] * ds, qupath_y1=oy + row["row1"] * ds)
                rows.append({**row, "truth_mode": self.truth_mode})
        return rows

    def lesion_slide_rows(self) -> list[dict[str, Any]]:
        """``lesion_slides.csv``: one row per slide plus ``pooled``."""
        if self.lesion is None:
            return []
        rows = [{"lesion_class": self.lesion_class, **r.summary_row()}
                for r in self.lesion.per_slide]
        if rows:
            rows.append({"lesion_class": self.lesion_class, **self.lesion.pooled_row()})
        return [{**r, "truth_mode": self.truth_mode} for r in rows]

    def instance_rows(self) -> list[dict[str, Any]]:
        """``instances.csv``: one row per slide plus ``pooled``."""
        if self.instance is None:
            return []
        rows = [r.summary_row() for r in self.instance.per_slide]
        if rows:
            rows.append(self.instance.pooled().summary_row())
        return [{**r, "truth_mode": self.truth_mode} for r in rows]

    def summary_rows(self) -> list[dict[str, Any]]:
        """``summary.csv`` (:data:`SUMMARY_COLUMNS`): per metric the mean, std, min and max over
        slides, the 95 % percentile bootstrap CI of the mean, and the value pooled over slides.
        ``level`` is ``pixel``, ``lesion`` or ``instance``."""
        nb, seed = self.n_bootstrap, self.seed
        rows: list[dict[str, Any]] = []
        per = self.pixel.per_slide
        if per:
            class_rows = [m.to_rows() for m in per]
            slide_rows = [m.summary_row() for m in per]

            def pixel_values(r: dict[str, Any]) -> list[float]:
                ci = r["class_index"]
                if ci is None:
                    return [float(s[r["metric"]]) for s in slide_rows]
                return [float(c[ci][r["metric"]]) for c in class_rows]

            rows += _with_ci(self.pixel.summary_rows(), pixel_values, "pixel", nb, seed)
        if self.lesion is not None and len(self.lesion):
            lrows = [r.summary_row() for r in self.lesion.per_slide]
            for r in lrows:
                r["category_agreement"] = float(r["category_agrees"])
            rows += _with_ci(self.lesion.summary_rows(),
                             lambda r: [float(x[r["metric"]]) for x in lrows], "lesion", nb,
                             seed)
        if self.instance is not None and len(self.instance):
            irows = [r.summary_row() for r in self.instance.per_slide]
            rows += _with_ci(self.instance.summary_rows(),
                             lambda r: [float(x[r["metric"]]) for x in irows], "instance", nb,
                             seed)
        for r in rows:
            r["truth_mode"] = self.truth_mode
        return rows

    def unmatched_rows(self) -> list[dict[str, Any]]:
        """``unmatched.csv``: side, slide, path, reason."""
        return [{"side": u.side, "slide": u.slide, "path": u.path, "reason": u.reason}
                for u in self.unmatched]

    def failed_rows(self) -> list[dict[str, Any]]:
        """``failed.csv``: slide, entry_id, truth_file, pred_file, reason."""
        return [{"slide": f.slide, "entry_id": f.entry_id, "truth_file": f.truth_file,
                 "pred_file": f.pred_file, "reason": f.reason} for f in self.failed]

    def summary(self) -> dict[str, Any]:
        """A small JSON-able overview (what the CLI prints)."""
        out: dict[str, Any] = {
            "truth": self.truth, "pred": self.pred, "classes": list(self.class_names),
            "eval_mpp": self.eval_mpp, "eval_mpp_source": self.eval_mpp_source,
            "truth_mode": self.truth_mode, "n_scored": len(self.slides),
            "n_failed": len(self.failed), "n_unmatched": len(self.unmatched),
            "lesion_class": self.lesion_class, "notes": list(self.notes),
            "files": {k: str(v) for k, v in self.files.items()},
            "ai_objects": self.review.to_json(),
        }
        if self.pixel.per_slide:
            pooled = self.pixel.pooled()
            out["pixel"] = {
                "pooled_miou": pooled.miou, "pooled_mf1": pooled.mf1,
                "slide_mean_mf1": _mean([m.mf1 for m in self.pixel.per_slide]),
                "dice": {n: float(v) for n, v in zip(self.class_names, pooled.f1, strict=True)},
            }
        if self.lesion is not None and len(self.lesion):
            row = self.lesion.pooled_row()
            out["lesion"] = {k: row[k] for k in ("n_truth", "n_detected", "sensitivity", "n_fp",
                                                 "category_agreement")}
        if self.instance is not None and len(self.instance):
            pooled_i = self.instance.pooled()
            out["instance"] = {"aji_pooled": pooled_i.aji,
                               "aji_image_mean": self.instance.image_mean("aji"),
                               "map": pooled_i.map, "pq": pooled_i.pq,
                               "f1_50": float(pooled_i.at(0.5)["f1"])}
        return out

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write the CSVs into ``out_dir`` atomically; returns the paths (the dict that is
        :attr:`files`: :func:`qpseg.evaluate.evaluate` adds ``report.html`` to it).

        Always written: ``per_slide.csv``, ``slides.csv``, ``summary.csv``, ``confusion.csv``,
        ``unmatched.csv``, ``failed.csv``; ``lesions.csv`` and ``lesion_slides.csv`` when a
        lesion class was scored; ``instances.csv`` when instance data was present.
        """
        out = Path(out_dir)
        files: dict[str, Path] = {}

        def put(name: str, rows: list[dict[str, Any]], cols: Sequence[str] | None) -> None:
            files[name] = write_csv(out / name, rows, cols)

        put("per_slide.csv", self.per_slide_rows(), PER_SLIDE_COLUMNS)
        put("slides.csv", self.slide_rows(), SLIDE_COLUMNS)
        put("summary.csv", self.summary_rows(), SUMMARY_COLUMNS)
        put("confusion.csv", self.confusion_rows(), CONFUSION_COLUMNS)
        if self.lesion is not None:
            put("lesions.csv", self.lesion_rows(), _LESION_COLUMNS)
            put("lesion_slides.csv", self.lesion_slide_rows(), None)
        if self.instance is not None:
            put("instances.csv", self.instance_rows(), None)
        put("unmatched.csv", self.unmatched_rows(), UNMATCHED_COLUMNS)
        put("failed.csv", self.failed_rows(), FAILED_COLUMNS)
        put("ai_objects.csv", self.ai_object_rows(), AI_OBJECT_COLUMNS)
        self.files = files
        return files


AI_OBJECT_COLUMNS: tuple[str, ...] = (
    "slide", "entry_id", "policy", "object_type", "class_name", "unreviewed", "accepted",
    "edited", "unproven", "kept", "left_out",
)
_LESION_COLUMNS: tuple[str, ...] = (
    "lesion_class", "slide", "source", "label", "area_px", "area_um2", "diameter_um",
    "category", "hit", "n_overlaps", "overlaps", "row0", "col0", "row1", "col1", "qupath_x0",
    "qupath_y0", "qupath_x1", "qupath_y1", "truth_mode",
)


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None) -> Path:
    """Write ``rows`` as CSV atomically (``columns`` fixes the header even with no rows)."""
    import pandas as pd

    from qpseg._io import atomic_write

    df = pd.DataFrame(list(rows), columns=list(columns) if columns is not None else None)
    for col in df.columns:
        # integer columns with gaps (None) would print as floats ("3.0"): keep them integers
        vals = [r[col] for r in rows if r.get(col) is not None]
        if (vals and len(vals) < len(rows)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in vals)):
            df[col] = df[col].astype("Int64")
    with atomic_write(path, "w", backup=False) as fh:
        df.to_csv(fh, index=False, lineterminator="\n")
    return path
