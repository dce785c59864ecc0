"""Segmentation metrics, pure numpy, no file I/O: pixel, lesion and instance level.

* :mod:`qpseg.metrics.pixel` — confusion matrix, per-class TP/FP/FN/TN, precision, recall,
  F1/Dice, IoU and their class means (mIoU, mRecall, mPrecision, ho2021 / khalil2022), per slide
  and pooled over slides (:class:`PixelAccumulator`).
* :mod:`qpseg.metrics.lesion` — CAMELYON-style lesion detection (khalil2022): connected lesions,
  largest diameter, ITC / micro / macro categories, sensitivity, false positives, slide category.
* :mod:`qpseg.metrics.instance` — nuclei instance metrics (lagree2021): AJI, AJI+, mAP over
  IoU 0.5:0.05:0.95, precision/recall/F1 at IoU 0.5 and 0.7, panoptic quality.

Conventions shared by all three modules:

* A ratio whose denominator is 0 (e.g. recall of a class absent from the truth) is ``NaN``, never
  0 or 1; every mean here skips ``NaN`` (a mean of nothing but ``NaN`` is ``NaN``).
* Every result is a small dataclass with ``to_rows()`` (flat dicts with stable column names, one
  per class / lesion / IoU threshold) and ``summary_row()`` (one flat dict per slide), ready for
  ``pandas.DataFrame`` / CSV. Accumulators keep per-slide results and give both the per-slide
  mean and the value pooled over slides (``summary_rows()``), since papers report either.
* Bad input arrays (shape mismatch, float labels, values that are not classes) raise
  :class:`~qpseg.errors.LabelError`; bad parameters raise :class:`~qpseg.errors.ConfigError`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from qpseg.errors import LabelError

if TYPE_CHECKING:
    import numpy as np

    from qpseg.metrics.instance import (
        MAP_THRESHOLDS,
        InstanceAccumulator,
        InstanceMetrics,
        InstanceOverlap,
        instance_metrics,
        instance_overlap,
        match_instances,
    )
    from qpseg.metrics.lesion import (
        SLIDE_CATEGORIES,
        Lesion,
        LesionAccumulator,
        LesionMetrics,
        lesion_metrics,
        max_feret_diameters,
        size_category,
    )
    from qpseg.metrics.pixel import (
        PixelAccumulator,
        PixelMetrics,
        confusion_matrix,
        pixel_metrics,
    )

__all__ = [
    "MAP_THRESHOLDS",
    "SLIDE_CATEGORIES",
    "InstanceAccumulator",
    "InstanceMetrics",
    "InstanceOverlap",
    "Lesion",
    "LesionAccumulator",
    "LesionMetrics",
    "PixelAccumulator",
    "PixelMetrics",
    "confusion_matrix",
    "instance_metrics",
    "instance_overlap",
    "lesion_metrics",
    "match_instances",
    "max_feret_diameters",
    "pixel_metrics",
    "size_category",
]

# Public names are loaded lazily (PEP 562): importing qpseg.metrics costs nothing, and the
# submodules can import the shared helpers below without an import cycle.
_EXPORTS: dict[str, str] = {
    "MAP_THRESHOLDS": "instance",
    "InstanceAccumulator": "instance",
    "InstanceMetrics": "instance",
    "InstanceOverlap": "instance",
    "instance_metrics": "instance",
    "instance_overlap": "instance",
    "match_instances": "instance",
    "SLIDE_CATEGORIES": "lesion",
    "Lesion": "lesion",
    "LesionAccumulator": "lesion",
    "LesionMetrics": "lesion",
    "lesion_metrics": "lesion",
    "max_feret_diameters": "lesion",
    "size_category": "lesion",
    "PixelAccumulator": "pixel",
    "PixelMetrics": "pixel",
    "confusion_matrix": "pixel",
    "pixel_metrics": "pixel",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qpseg.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qpseg.metrics.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# --------------------------------------------------------------------------------------------
# helpers shared by the submodules (private)


def _ratio(num: Any, den: Any) -> np.ndarray:
    """``num / den`` elementwise as float64, ``NaN`` where ``den == 0``."""
    import numpy as np

    n = np.asarray(num, dtype=np.float64)
    d = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(n, d).shape, np.nan)
    np.divide(n, d, out=out, where=d != 0)
    return out


def _fratio(num: float, den: float) -> float:
    """Scalar ``num / den``, ``NaN`` when ``den == 0``."""
    return float(num) / float(den) if den else math.nan


def _nanmean(values: Any) -> float:
    """Mean ignoring ``NaN``; ``NaN`` (without a RuntimeWarning) when nothing is left."""
    import numpy as np

    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _as_labels(a: Any, name: str) -> np.ndarray:
    """``a`` as an integer (or boolean) numpy array, else :class:`LabelError`."""
    import numpy as np

    try:
        arr = np.asarray(a)
    except Exception as exc:  # ragged lists, objects that refuse conversion
        raise LabelError(f"{name} is not an array: {exc}") from exc
    if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.integer):
        raise LabelError(f"{name} must hold integer or boolean labels, not {arr.dtype}")
    return arr


def _as_label_pair(truth: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays checked with :func:`_as_labels` and for equal shapes."""
    t = _as_labels(truth, "truth")
    p = _as_labels(pred, "prediction")
    if t.shape != p.shape:
        raise LabelError(f"truth has shape {t.shape} but prediction has shape {p.shape}")
    return t, p


def _describe(values: Sequence[float]) -> dict[str, float]:
    """``n_slides`` (defined values), ``slide_mean``, ``slide_std`` (ddof=1), min and max."""
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    n = int(arr.size)
    return {
        "n_slides": n,
        "slide_mean": float(arr.mean()) if n else math.nan,
        "slide_std": float(arr.std(ddof=1)) if n > 1 else math.nan,
        "slide_min": float(arr.min()) if n else math.nan,
        "slide_max": float(arr.max()) if n else math.nan,
    }


def _summary_rows(
    per_slide: Sequence[Mapping[str, Any]],
    pooled: Mapping[str, Any],
    metrics: Sequence[str],
    group: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Long-format summary rows: one per metric, per-slide statistics next to the pooled value.

    Columns: the ``group`` keys, ``metric``, ``n_slides`` (slides where the metric is defined),
    ``slide_mean``, ``slide_std``, ``slide_min``, ``slide_max``, ``pooled``.
    """
    rows: list[dict[str, Any]] = []
    for metric in metrics:
        values = [float(r[metric]) for r in per_slide]
        row: dict[str, Any] = dict(group or {})
        row["metric"] = metric
        row.update(_describe(values))
        row["pooled"] = float(pooled[metric])
        rows.append(row)
    return rows
