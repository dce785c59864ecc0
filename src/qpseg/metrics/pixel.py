"""Pixel-level metrics: confusion matrix and per-class scores, per slide and over slides.

Definitions (ho2021 eqs. 3-5, khalil2022 eqs. 5-9), per class ``c`` and counted in pixels:

* ``TP`` truth ``c`` and predicted ``c``; ``FP`` predicted ``c``, truth another class;
  ``FN`` truth ``c``, predicted another class; ``TN`` = evaluated pixels - TP - FP - FN.
* precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = Dice = 2 TP / (2 TP + FP + FN),
  IoU = TP / (TP + FP + FN).
* A ratio with a zero denominator is ``NaN``: recall of a class absent from the truth, precision
  of a class never predicted, IoU/F1 of a class absent from both.
* mIoU / mRecall / mPrecision / mF1 are the means over classes (khalil2022 eq. 6:
  ``1/(q+1) * sum_b IoU_b``) skipping ``NaN`` — so mIoU averages over the classes present in the
  truth *or* the prediction, mRecall over classes present in the truth, mPrecision over classes
  predicted. ho2021 does not say how absent classes are treated; it excludes classes that are
  not evaluated on a dataset (necrotic, adipose, background on its Dataset-II), which
  ``mean_classes`` reproduces.

Only pixels inside the labelled area are evaluated: truth pixels equal to an ignore index
(:data:`qpseg.labels.IGNORE_INDEX`, 255, by default; a sequence of indices is allowed) are
skipped. The confusion matrix has truth in rows and prediction in columns, like scikit-learn.
It is computed with one ``np.bincount`` over chunks of 4 Mi pixels (lookup tables for 8/16-bit
labels), so memory stays bounded for whole-slide label maps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from qpseg.errors import ConfigError, LabelError
from qpseg.labels import IGNORE_INDEX
from qpseg.metrics._shared import _as_label_pair, _nanmean, _ratio, _summary_rows

__all__ = [
    "CLASS_METRICS",
    "SLIDE_METRICS",
    "PixelAccumulator",
    "PixelMetrics",
    "confusion_matrix",
    "pixel_metrics",
]

_CHUNK = 1 << 22

#: numeric per-class columns of :meth:`PixelMetrics.to_rows`
CLASS_METRICS: tuple[str, ...] = (
    "n_truth", "n_pred", "tp", "fp", "fn", "tn", "precision", "recall", "f1", "dice", "iou",
)
#: numeric per-slide columns of :meth:`PixelMetrics.summary_row`
SLIDE_METRICS: tuple[str, ...] = ("n_pixels", "accuracy", "miou", "mrecall", "mprecision", "mf1")

PredIgnore = Literal["error", "exclude"] | int


def _ignore_tuple(ignore_index: int | Sequence[int] | None) -> tuple[int, ...]:
    if ignore_index is None:
        return ()
    if isinstance(ignore_index, int | np.integer):
        return (int(ignore_index),)
    return tuple(int(i) for i in ignore_index)


def _codes(flat: np.ndarray, n: int, ignore: tuple[int, ...]) -> np.ndarray:
    """Map label values to ``0..n-1`` (classes), ``n`` (ignore values), ``n+1`` (anything else)."""
    if flat.dtype == np.bool_:
        flat = flat.view(np.uint8)
    size = flat.dtype.itemsize
    if size <= 2:
        # a lookup table over every possible value: one gather instead of several masks
        unsigned = np.dtype(f"u{size}")
        values = np.arange(1 << (8 * size), dtype=unsigned).view(flat.dtype).astype(np.int64)
        lut = np.full(values.size, n + 1, dtype=np.intp)
        is_class = (values >= 0) & (values < n)
        lut[is_class] = values[is_class]
        lut[np.isin(values, ignore)] = n
        return lut[flat.view(unsigned)]
    codes = flat.astype(np.intp)  # uint64 >= 2**63 wraps negative: still "anything else"
    codes[(codes < 0) | (codes >= n)] = n + 1
    if ignore:
        codes[np.isin(flat, ignore)] = n
    return codes


def _bad_values(arr: np.ndarray, n: int, ignore: tuple[int, ...], where: np.ndarray | None) -> str:
    """A short list of the offending values, for error messages only."""
    vals = np.unique(arr if where is None else arr[where])
    bad = [int(v) for v in vals if not (0 <= int(v) < n) and int(v) not in ignore]
    more = ", ..." if len(bad) > 5 else ""
    return ", ".join(str(v) for v in bad[:5]) + more


def _coded_confusion(t: np.ndarray, p: np.ndarray, n: int, ignore: tuple[int, ...]) -> np.ndarray:
    """``(n+2, n+2)`` counts over the codes of :func:`_codes` (classes, ignore, invalid)."""
    m = n + 2
    ft, fp = t.reshape(-1), p.reshape(-1)
    if ft.dtype.itemsize == 1 and fp.dtype.itemsize == 1:
        # 8-bit labels (the usual case): a joint histogram over all 256 x 256 value pairs is one
        # cheap bincount; the codes are applied to the 65536 bins afterwards, not to the pixels.
        joint = np.zeros(1 << 16, dtype=np.int64)
        for start in range(0, ft.size, _CHUNK):
            key = ft[start : start + _CHUNK].view(np.uint8).astype(np.uint16) << 8
            key |= fp[start : start + _CHUNK].view(np.uint8)
            joint += np.bincount(key, minlength=1 << 16)
        ct = _codes(np.arange(256, dtype=np.uint8).view(ft.dtype), n, ignore)
        cp = _codes(np.arange(256, dtype=np.uint8).view(fp.dtype), n, ignore)
        bins = (ct[:, None] * m + cp[None, :]).ravel()
        counts = np.bincount(bins, weights=joint, minlength=m * m)
        return np.rint(counts).astype(np.int64).reshape(m, m)
    counts = np.zeros(m * m, dtype=np.int64)
    for start in range(0, ft.size, _CHUNK):
        tc = _codes(ft[start : start + _CHUNK], n, ignore)
        pc = _codes(fp[start : start + _CHUNK], n, ignore)
        tc *= m
        tc += pc
        counts += np.bincount(tc, minlength=m * m)
    return counts.reshape(m, m)


def confusion_matrix(
    truth: Any,
    pred: Any,
    n_classes: int,
    ignore_index: int | Sequence[int] | None = IGNORE_INDEX,
    pred_ignore: PredIgnore = "error",
) -> np.ndarray:
    """Confusion matrix, ``int64`` ``(n_classes, n_classes)``: truth rows, prediction columns.

    ``truth`` and ``pred`` are label arrays of equal shape (any integer dtype or bool). Truth
    pixels equal to an ``ignore_index`` are skipped; any other truth value outside
    ``0..n_classes-1`` is a :class:`LabelError`, as is such a prediction value at an evaluated
    pixel. A prediction equal to an ignore index ("not predicted", e.g. outside the tissue mask)
    at an evaluated pixel is handled by ``pred_ignore``: ``"error"`` (default) raises,
    ``"exclude"`` skips the pixel, an ``int`` counts it as that class (e.g. 0, background).
    """
    n = int(n_classes)
    if n < 1 or n > 1 << 15:
        raise ConfigError(f"number of classes must be between 1 and 32768, not {n_classes}")
    ignore = _ignore_tuple(ignore_index)
    clash = [i for i in ignore if 0 <= i < n]
    if clash:
        raise ConfigError(f"ignore index {clash[0]} is also a class index (0..{n - 1})")
    if not isinstance(pred_ignore, str) and not 0 <= int(pred_ignore) < n:
        raise ConfigError(f"pred_ignore class {pred_ignore} is not a class index (0..{n - 1})")
    if isinstance(pred_ignore, str) and pred_ignore not in ("error", "exclude"):
        raise ConfigError(f"pred_ignore must be 'error', 'exclude' or a class index: {pred_ignore}")
    t, p = _as_label_pair(truth, pred)
    cm = _coded_confusion(t, p, n, ignore)
    if cm[n + 1].any():
        raise LabelError(
            f"truth has {int(cm[n + 1].sum())} pixels that are neither a class (0..{n - 1}) nor "
            f"ignored {list(ignore)}: values {_bad_values(t, n, ignore, None)}"
        )
    if cm[:n, n + 1].any():
        valid = ~np.isin(t, ignore)
        raise LabelError(
            f"prediction has {int(cm[:n, n + 1].sum())} evaluated pixels that are not a class "
            f"(0..{n - 1}): values {_bad_values(p, n, ignore, valid)}"
        )
    out = cm[:n, :n].copy()
    unpredicted = cm[:n, n]
    if unpredicted.any():
        if pred_ignore == "error":
            raise LabelError(
                f"prediction has {int(unpredicted.sum())} pixels equal to an ignore index "
                f"{list(ignore)} inside the labelled area of the truth"
            )
        if not isinstance(pred_ignore, str):
            out[:, int(pred_ignore)] += unpredicted
    return out


@dataclass(frozen=True, eq=False)
class PixelMetrics:
    """Pixel metrics of one slide (or of several, pooled) derived from a confusion matrix.

    Per-class arrays (``tp``, ``precision``, ``iou``, ...) have one entry per class; scalar means
    (``miou``, ...) average over ``mean_classes`` (all classes when ``None``), skipping ``NaN``.
    """

    confusion: np.ndarray
    class_names: tuple[str, ...]
    slide: str = ""
    mean_classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        cm = np.asarray(self.confusion)
        k = len(self.class_names)
        if cm.shape != (k, k):
            raise LabelError(f"confusion matrix has shape {cm.shape}, expected ({k}, {k})")
        if self.mean_classes is not None and any(not 0 <= c < k for c in self.mean_classes):
            raise ConfigError(f"mean_classes {self.mean_classes} are not all in 0..{k - 1}")
        object.__setattr__(self, "confusion", cm.astype(np.int64, copy=False))

    # -- counts
    @property
    def n_pixels(self) -> int:
        """Evaluated (labelled) pixels."""
        return int(self.confusion.sum())

    @property
    def tp(self) -> np.ndarray:
        return np.diag(self.confusion).copy()

    @property
    def fp(self) -> np.ndarray:
        return self.confusion.sum(axis=0) - self.tp

    @property
    def fn(self) -> np.ndarray:
        return self.confusion.sum(axis=1) - self.tp

    @property
    def tn(self) -> np.ndarray:
        return self.n_pixels - self.tp - self.fp - self.fn

    @property
    def n_truth(self) -> np.ndarray:
        """Pixels of each class in the truth (support)."""
        return self.confusion.sum(axis=1)

    @property
    def n_pred(self) -> np.ndarray:
        """Pixels of each class in the prediction (within the evaluated area)."""
        return self.confusion.sum(axis=0)

    # -- per-class ratios (NaN where undefined)
    @property
    def precision(self) -> np.ndarray:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> np.ndarray:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> np.ndarray:
        """F1 = Dice coefficient, 2 TP / (2 TP + FP + FN)."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def iou(self) -> np.ndarray:
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def confusion_normalised(self) -> np.ndarray:
        """Rows divided by their sums (fraction of each true class predicted as each class)."""
        return _ratio(self.confusion, self.confusion.sum(axis=1, keepdims=True))

    # -- scalars
    def _mean(self, values: np.ndarray) -> float:
        if self.mean_classes is not None:
            values = values[list(self.mean_classes)]
        return _nanmean(values)

    @property
    def accuracy(self) -> float:
        """Overall pixel accuracy, trace / evaluated pixels."""
        n = self.n_pixels
        return float(np.trace(self.confusion)) / n if n else float("nan")

    @property
    def miou(self) -> float:
        return self._mean(self.iou)

    @property
    def mrecall(self) -> float:
        return self._mean(self.recall)

    @property
    def mprecision(self) -> float:
        return self._mean(self.precision)

    @property
    def mf1(self) -> float:
        """Mean F1 = mean Dice over classes."""
        return self._mean(self.f1)

    # -- flat records
    def to_rows(self) -> list[dict[str, Any]]:
        """One row per class: ``slide, class_index, class_name`` and :data:`CLASS_METRICS`."""
        cols = {
            "n_truth": self.n_truth, "n_pred": self.n_pred, "tp": self.tp, "fp": self.fp,
            "fn": self.fn, "tn": self.tn, "precision": self.precision, "recall": self.recall,
            "f1": self.f1, "dice": self.f1, "iou": self.iou,
        }
        rows = []
        for i, name in enumerate(self.class_names):
            row: dict[str, Any] = {"slide": self.slide, "class_index": i, "class_name": name}
            for key in CLASS_METRICS:
                v = cols[key][i]
                row[key] = int(v) if np.issubdtype(cols[key].dtype, np.integer) else float(v)
            rows.append(row)
        return rows

    def summary_row(self) -> dict[str, Any]:
        """One row: ``slide`` and :data:`SLIDE_METRICS`."""
        return {
            "slide": self.slide, "n_pixels": self.n_pixels, "accuracy": self.accuracy,
            "miou": self.miou, "mrecall": self.mrecall, "mprecision": self.mprecision,
            "mf1": self.mf1,
        }

    def confusion_rows(self) -> list[dict[str, Any]]:
        """Long format: ``slide, truth_class, pred_class, count, row_fraction``."""
        norm = self.confusion_normalised
        return [
            {"slide": self.slide, "truth_class": ti, "pred_class": pi,
             "count": int(self.confusion[i, j]), "row_fraction": float(norm[i, j])}
            for i, ti in enumerate(self.class_names)
            for j, pi in enumerate(self.class_names)
        ]


def _names(classes: int | Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, int | np.integer):
        return tuple(str(i) for i in range(int(classes)))
    names = tuple(str(c) for c in classes)
    if not names:
        raise ConfigError("no classes given")
    return names


def pixel_metrics(
    truth: Any,
    pred: Any,
    classes: int | Sequence[str],
    *,
    ignore_index: int | Sequence[int] | None = IGNORE_INDEX,
    slide: str = "",
    mean_classes: Sequence[int] | None = None,
    pred_ignore: PredIgnore = "error",
) -> PixelMetrics:
    """Pixel metrics of one slide; ``classes`` is the class names (index order) or their count.

    See :func:`confusion_matrix` for ``ignore_index`` and ``pred_ignore``, and the module
    docstring for the definitions.
    """
    names = _names(classes)
    cm = confusion_matrix(truth, pred, len(names), ignore_index, pred_ignore)
    return PixelMetrics(cm, names, slide, None if mean_classes is None else tuple(mean_classes))


@dataclass
class PixelAccumulator:
    """Collects per-slide :class:`PixelMetrics`; gives the per-slide mean and the pooled value.

    "Pooled" sums the slides' confusion matrices and scores the sum (every pixel weighs the
    same); "per-slide mean" scores each slide and averages (every slide weighs the same,
    khalil2022's convention). The two differ when slides differ in size.
    """

    classes: int | Sequence[str]
    ignore_index: int | Sequence[int] | None = IGNORE_INDEX
    mean_classes: Sequence[int] | None = None
    pred_ignore: PredIgnore = "error"
    per_slide: list[PixelMetrics] = field(default_factory=list)

    @property
    def class_names(self) -> tuple[str, ...]:
        return _names(self.classes)

    def add(self, truth: Any, pred: Any, slide: str = "") -> PixelMetrics:
        """Score one slide, keep and return its result."""
        res = pixel_metrics(
            truth, pred, self.class_names, ignore_index=self.ignore_index, slide=slide,
            mean_classes=self.mean_classes, pred_ignore=self.pred_ignore,
        )
        self.per_slide.append(res)
        return res

    def add_confusion(self, confusion: Any, slide: str = "") -> PixelMetrics:
        """Keep a slide given by its confusion matrix (e.g. summed over its tiles)."""
        mc = None if self.mean_classes is None else tuple(self.mean_classes)
        res = PixelMetrics(np.asarray(confusion), self.class_names, slide, mc)
        self.per_slide.append(res)
        return res

    def __len__(self) -> int:
        return len(self.per_slide)

    def __iter__(self) -> Iterator[PixelMetrics]:
        return iter(self.per_slide)

    def pooled(self, slide: str = "pooled") -> PixelMetrics:
        """Metrics of the summed confusion matrix of all slides."""
        k = len(self.class_names)
        total = np.zeros((k, k), dtype=np.int64)
        for r in self.per_slide:
            total += r.confusion
        mc = None if self.mean_classes is None else tuple(self.mean_classes)
        return PixelMetrics(total, self.class_names, slide, mc)

    def slide_values(self, metric: str, class_index: int | None = None) -> np.ndarray:
        """One value per slide: a :data:`SLIDE_METRICS` name, or a per-class metric with
        ``class_index`` (e.g. for bootstrap confidence intervals)."""
        if class_index is None:
            if metric not in SLIDE_METRICS:
                raise ConfigError(f"unknown slide metric {metric!r}; one of {SLIDE_METRICS}")
            return np.array([r.summary_row()[metric] for r in self.per_slide], dtype=np.float64)
        if metric not in CLASS_METRICS:
            raise ConfigError(f"unknown class metric {metric!r}; one of {CLASS_METRICS}")
        return np.array(
            [r.to_rows()[class_index][metric] for r in self.per_slide], dtype=np.float64
        )

    def summary_rows(self) -> list[dict[str, Any]]:
        """Long format, one row per (class, metric) and per slide-level metric.

        Columns: ``class_index`` (``None`` for the class means), ``class_name`` (``""`` for
        them), ``metric``, ``n_slides``, ``slide_mean``, ``slide_std``, ``slide_min``,
        ``slide_max``, ``pooled``. ``n_slides`` counts the slides where the metric is defined.
        """
        pooled = self.pooled()
        rows = _summary_rows(
            [r.summary_row() for r in self.per_slide], pooled.summary_row(), SLIDE_METRICS,
            {"class_index": None, "class_name": ""},
        )
        per_slide_rows = [r.to_rows() for r in self.per_slide]
        for i, (name, prow) in enumerate(zip(self.class_names, pooled.to_rows(), strict=True)):
            rows += _summary_rows(
                [s[i] for s in per_slide_rows], prow, CLASS_METRICS,
                {"class_index": i, "class_name": name},
            )
        return rows
