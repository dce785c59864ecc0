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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Public names are loaded lazily (PEP 562): importing qpseg.metrics costs nothing. The
# submodules share their helpers through qpseg.metrics._shared, never through this package.
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
