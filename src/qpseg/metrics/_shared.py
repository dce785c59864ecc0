"""Helpers shared by the pixel, lesion and instance metrics (private to qpseg.metrics).

NaN-aware ratios and means, the label-array checks that raise
:class:`~qpseg.errors.LabelError`, and the long-format per-slide summary rows. Kept apart from
the package ``__init__`` so the metric modules never import their own package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from qpseg.errors import LabelError

if TYPE_CHECKING:
    import numpy as np


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
