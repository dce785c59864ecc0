"""Instance-level (nuclei) metrics: AJI, AJI+, mAP, P/R/F1 at IoU thresholds, PQ (lagree2021).

Inputs are instance label images of equal shape: 0 is background, every other value one
instance; ids need not be contiguous and an instance may have several connected parts (it is
the label that defines it). Definitions:

* **Overlap.** Intersections of every (truth, prediction) pair that shares pixels come from one
  sparse contingency table (run-length encoded joint labels, then a sort), never a dense
  ``n_true x n_pred`` matrix, so 10⁴ instances cost a few tens of ms.
  ``IoU = |G ∩ S| / |G ∪ S|``.
* **Matching at an IoU threshold t** is one-to-one; a pair matches when ``IoU > t`` (strictly
  greater, as in the 2018 Data Science Bowl, "IoU above the threshold", and in Kirillov et al.'s
  PQ, "IoU > 0.5"). For ``t >= 0.5`` such pairs are unique (two disjoint truth instances cannot
  both cover more than half of the union with one prediction), so no assignment is needed. For
  ``t < 0.5`` the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``, per connected
  component of the overlap graph) maximises the number of matches, then their total IoU
  (StarDist's ``matching`` rule). Then TP = matches, FP = n_pred - TP, FN = n_true - TP,
  precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN).
* **mAP** (lagree2021: "average precision over multiple IoU thresholds ... ten IoU thresholds
  starting at 0.5 and increasing linearly by 0.05 to 0.95"; the paper cites the 2018 Data
  Science Bowl, Caicedo et al. 2019) is taken as the DSB 2018 score: the mean over
  t in {0.5, 0.55, ..., 0.95} of ``TP/(TP+FP+FN)``. Caveat: lagree2021's Table 2 does not fit
  that reading if its F1 and mAP come from the same counts (GB U-Net, MoNuSeg: F1(0.5) = 0.686
  and F1(0.7) = 0.401 bound the DSB mAP above by (4·0.522 + 6·0.251)/10 = 0.36, yet 0.391 is
  reported; Watershed: bound 0.09, reported 0.158), while the mean of *precision* TP/(TP+FP)
  over the same thresholds fits it; that is reported too, as ``map_precision``.
* **AJI** (Kumar et al. 2017, the paper's ref. 16): every truth instance G takes the prediction S
  of largest IoU with it (ties: the smallest prediction id; a prediction may be taken by several
  G); C += |G ∩ S|, U += |G ∪ S|; a G that overlaps no prediction adds |G| to U; every
  prediction taken by no G adds its area to U. AJI = C / U. This is HoVer-Net's ``get_fast_aji``.
* **AJI+** (Graham et al. 2019): as AJI but with a one-to-one matching that maximises the total
  IoU (Hungarian over pairs with IoU > 0), so over-segmentation is not counted twice.
* **PQ** (Kirillov et al. 2019) at IoU > 0.5: SQ = mean IoU of matched pairs, DQ = F1 at 0.5,
  PQ = SQ · DQ = Σ IoU(matched) / (TP + FP/2 + FN/2).

Undefined values are ``NaN``: everything with an empty denominator, e.g. all scores when both
images are empty, SQ when nothing matches (PQ is then 0 if there are instances at all).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qpseg.errors import ConfigError, LabelError
from qpseg.metrics._shared import _as_label_pair, _fratio, _ratio, _summary_rows

__all__ = [
    "MAP_THRESHOLDS",
    "REPORT_THRESHOLDS",
    "SUMMARY_METRICS",
    "InstanceAccumulator",
    "InstanceMetrics",
    "InstanceOverlap",
    "aji",
    "aji_plus",
    "instance_metrics",
    "instance_overlap",
    "match_instances",
]

#: IoU thresholds of the mAP (lagree2021, DSB 2018): 0.5, 0.55, ..., 0.95
MAP_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
#: thresholds whose precision/recall/F1 go into :meth:`InstanceMetrics.summary_row`
REPORT_THRESHOLDS: tuple[float, ...] = (0.5, 0.7)

_CHUNK = 1 << 20


@dataclass(frozen=True, eq=False)
class InstanceOverlap:
    """Sparse overlap table of two instance label images.

    ``truth_ids`` / ``pred_ids`` are the label values present (sorted); ``pair_truth`` and
    ``pair_pred`` index into them, one entry per overlapping pair, with ``pair_inter`` pixels in
    common.
    """

    truth_ids: np.ndarray
    pred_ids: np.ndarray
    truth_area: np.ndarray
    pred_area: np.ndarray
    pair_truth: np.ndarray
    pair_pred: np.ndarray
    pair_inter: np.ndarray

    @property
    def n_true(self) -> int:
        return int(self.truth_ids.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_ids.size)

    @property
    def pair_union(self) -> np.ndarray:
        return self.truth_area[self.pair_truth] + self.pred_area[self.pair_pred] - self.pair_inter

    @property
    def pair_iou(self) -> np.ndarray:
        return self.pair_inter / self.pair_union

    def dense_iou(self) -> np.ndarray:
        """``(n_true, n_pred)`` IoU matrix (for small cases and tests)."""
        out = np.zeros((self.n_true, self.n_pred))
        out[self.pair_truth, self.pair_pred] = self.pair_iou
        return out

    def sparse_iou(self) -> Any:
        """The IoU matrix as a ``scipy.sparse.csr_array``."""
        from scipy.sparse import csr_array

        return csr_array(
            (self.pair_iou, (self.pair_truth, self.pair_pred)), shape=(self.n_true, self.n_pred)
        )


def _flat_ids(arr: np.ndarray, name: str) -> np.ndarray:
    flat = arr.reshape(-1)
    if flat.dtype == np.bool_:
        return flat.view(np.uint8)
    if np.issubdtype(flat.dtype, np.signedinteger) and flat.size and int(flat.min()) < 0:
        raise LabelError(f"{name} instance labels must not be negative (found {int(flat.min())})")
    return flat


def _compact(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel to ``0..k`` keeping 0 as background: ``(codes, values)`` with values[0] == 0."""
    vals, inv = np.unique(flat, return_inverse=True)
    if vals.size == 0 or vals[0] != 0:
        vals = np.concatenate([np.zeros(1, dtype=vals.dtype), vals])
        inv = inv + 1
    return inv.astype(np.int64), vals


def instance_overlap(truth: Any, pred: Any) -> InstanceOverlap:
    """Areas of all instances and intersections of all overlapping (truth, prediction) pairs."""
    t_arr, p_arr = _as_label_pair(truth, pred)
    t = _flat_ids(t_arr, "truth")
    p = _flat_ids(p_arr, "prediction")
    tmax = int(t.max()) if t.size else 0
    pmax = int(p.max()) if p.size else 0
    t_vals = p_vals = None
    if (tmax + 1) * (pmax + 1) >= 1 << 62:  # the joint key would overflow int64
        t, t_vals = _compact(t)
        p, p_vals = _compact(p)
        tmax, pmax = t_vals.size - 1, p_vals.size - 1
    base = pmax + 1
    keys: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    for start in range(0, t.size, _CHUNK):
        # run-length encode the pair (truth, pred) along the flattened image: nuclei are runs of
        # equal pairs along rows, so the sort below sees ~10x fewer elements than pixels
        a = t[start : start + _CHUNK]
        b = p[start : start + _CHUNK]
        change = np.empty(a.size, dtype=bool)
        change[0] = True
        np.not_equal(a[1:], a[:-1], out=change[1:])
        change[1:] |= b[1:] != b[:-1]
        starts = np.flatnonzero(change)
        run = np.diff(starts, append=a.size)
        ra, rb = a[starts], b[starts]
        fg = (ra != 0) | (rb != 0)
        k = ra[fg].astype(np.int64)
        k *= base
        k += rb[fg].astype(np.int64, copy=False)
        keys.append(k)
        lens.append(run[fg])
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    ln = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    order = np.argsort(key)
    key, ln = key[order], ln[order]
    if key.size:
        bounds = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
        ukey, cnt = key[bounds], np.add.reduceat(ln, bounds).astype(np.int64)
    else:
        ukey, cnt = key, ln.astype(np.int64)
    kt, kp = ukey // base, ukey % base
    tm, pm = kt > 0, kp > 0
    truth_ids = np.unique(kt[tm])
    pred_ids = np.unique(kp[pm])
    truth_area = np.bincount(
        np.searchsorted(truth_ids, kt[tm]), weights=cnt[tm], minlength=truth_ids.size
    )
    pred_area = np.bincount(
        np.searchsorted(pred_ids, kp[pm]), weights=cnt[pm], minlength=pred_ids.size
    )
    both = tm & pm
    pair_truth = np.searchsorted(truth_ids, kt[both])
    pair_pred = np.searchsorted(pred_ids, kp[both])
    if t_vals is not None and p_vals is not None:
        truth_ids, pred_ids = t_vals[truth_ids], p_vals[pred_ids]
    return InstanceOverlap(
        truth_ids=truth_ids, pred_ids=pred_ids,
        truth_area=np.rint(truth_area).astype(np.int64),
        pred_area=np.rint(pred_area).astype(np.int64),
        pair_truth=pair_truth.astype(np.intp), pair_pred=pair_pred.astype(np.intp),
        pair_inter=cnt[both],
    )


def _max_weight_matching(
    ti: np.ndarray, pj: np.ndarray, weight: np.ndarray, n_true: int, n_pred: int
) -> np.ndarray:
    """Boolean mask of the pairs in a one-to-one matching of maximal total ``weight`` (> 0).

    Solved per connected component of the bipartite overlap graph: where a component has a
    single truth or a single prediction its heaviest pair is taken (ties: the first in pair
    order), the others go through ``linear_sum_assignment``.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    selected = np.zeros(ti.size, dtype=bool)
    if ti.size == 0:
        return selected
    n = n_true + n_pred
    graph = coo_array((np.ones(ti.size), (ti, pj + n_true)), shape=(n, n))
    n_comp, comp = connected_components(graph, directed=False)
    pc = comp[ti]
    # a component with one truth or one prediction (a pair, a split or a merge) is solved by
    # its heaviest pair; only the others need the Hungarian algorithm
    nt_c = np.bincount(comp[:n_true], minlength=n_comp)
    np_c = np.bincount(comp[n_true:], minlength=n_comp)
    star = np.minimum(nt_c, np_c)[pc] == 1
    idx = np.flatnonzero(star)
    if idx.size:
        order = idx[np.lexsort((-weight[idx], pc[idx]))]
        best = order[np.concatenate([[True], np.diff(pc[order]) != 0])]
        selected[best] = True
    multi = np.flatnonzero(~star)
    if multi.size:
        multi = multi[np.argsort(pc[multi], kind="stable")]
        cuts = np.flatnonzero(np.diff(pc[multi])) + 1
        for part in np.split(multi, cuts):
            rows, r_inv = np.unique(ti[part], return_inverse=True)
            cols, c_inv = np.unique(pj[part], return_inverse=True)
            w = np.zeros((rows.size, cols.size))
            w[r_inv, c_inv] = weight[part]
            which = np.full((rows.size, cols.size), -1, dtype=np.intp)
            which[r_inv, c_inv] = part
            r, c = linear_sum_assignment(w, maximize=True)
            chosen = which[r, c]
            selected[chosen[chosen >= 0]] = True
    return selected


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not 0.0 <= t < 1.0:
        raise ConfigError(f"IoU threshold must be in [0, 1), not {threshold}")
    return t


def match_instances(
    overlap: InstanceOverlap, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching at ``IoU > threshold``: ``(truth_index, pred_index, iou)`` of the
    matched pairs (indices into ``overlap.truth_ids`` / ``pred_ids``).

    ``threshold >= 0.5``: the pairs above it (unique by geometry); below 0.5: Hungarian, most
    matches first, then largest total IoU.
    """
    thr = _check_threshold(threshold)
    iou = overlap.pair_iou
    cand = iou > thr
    ti, pj, ci = overlap.pair_truth[cand], overlap.pair_pred[cand], iou[cand]
    if thr < 0.5 and ci.size:
        # 1 per match dominates: the IoU term sums to < 1/2 whatever the number of matches
        weight = 1.0 + ci / (2.0 * ci.size + 1.0)
        sel = _max_weight_matching(ti, pj, weight, overlap.n_true, overlap.n_pred)
        ti, pj, ci = ti[sel], pj[sel], ci[sel]
    return ti, pj, ci


def aji(overlap: InstanceOverlap) -> tuple[int, int]:
    """Kumar et al.'s aggregated Jaccard index as ``(C, U)``; AJI = C / U."""
    ov = overlap
    iou = ov.pair_iou
    used_pred = np.zeros(ov.n_pred, dtype=bool)
    has_pair = np.zeros(ov.n_true, dtype=bool)
    c = u = 0
    if iou.size:
        # per truth instance: largest IoU first, then the smallest prediction id
        order = np.lexsort((ov.pair_pred, -iou, ov.pair_truth))
        first = order[np.concatenate([[True], np.diff(ov.pair_truth[order]) != 0])]
        c = int(ov.pair_inter[first].sum())
        u = int(ov.pair_union[first].sum())
        used_pred[ov.pair_pred[first]] = True
        has_pair[ov.pair_truth[first]] = True
    u += int(ov.truth_area[~has_pair].sum()) + int(ov.pred_area[~used_pred].sum())
    return c, u


def aji_plus(overlap: InstanceOverlap) -> tuple[int, int]:
    """AJI+ (Graham et al. 2019) as ``(C, U)``: one-to-one, total-IoU-maximising matching."""
    ov = overlap
    iou = ov.pair_iou
    sel = _max_weight_matching(ov.pair_truth, ov.pair_pred, iou, ov.n_true, ov.n_pred)
    matched_t = np.zeros(ov.n_true, dtype=bool)
    matched_p = np.zeros(ov.n_pred, dtype=bool)
    matched_t[ov.pair_truth[sel]] = True
    matched_p[ov.pair_pred[sel]] = True
    c = int(ov.pair_inter[sel].sum())
    u = int(ov.pair_union[sel].sum())
    u += int(ov.truth_area[~matched_t].sum()) + int(ov.pred_area[~matched_p].sum())
    return c, u


def _key(t: float) -> str:
    """Column suffix of a threshold: 0.5 -> "50", 0.75 -> "75"."""
    return f"{round(t * 100):02d}"


@dataclass(frozen=True, eq=False)
class InstanceMetrics:
    """Instance metrics of one slide (or pooled over slides): raw counts plus derived scores.

    ``tp`` and ``iou_sum`` (sum of the IoU of the matched pairs) have one entry per threshold
    in ``thresholds`` (which always contains :data:`MAP_THRESHOLDS`). Pooling adds the counts.
    """

    slide: str
    n_true: int
    n_pred: int
    thresholds: tuple[float, ...]
    tp: np.ndarray
    iou_sum: np.ndarray
    aji_c: int
    aji_u: int
    aji_plus_c: int
    aji_plus_u: int

    # -- per-threshold arrays
    @property
    def fp(self) -> np.ndarray:
        return self.n_pred - self.tp

    @property
    def fn(self) -> np.ndarray:
        return self.n_true - self.tp

    @property
    def precision(self) -> np.ndarray:
        return _ratio(self.tp, self.n_pred)

    @property
    def recall(self) -> np.ndarray:
        return _ratio(self.tp, self.n_true)

    @property
    def f1(self) -> np.ndarray:
        return _ratio(2 * self.tp, self.n_true + self.n_pred)

    @property
    def ap(self) -> np.ndarray:
        """DSB 2018 score per threshold, TP / (TP + FP + FN)."""
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def mean_matched_iou(self) -> np.ndarray:
        return _ratio(self.iou_sum, self.tp)

    def _at(self, values: np.ndarray, t: float) -> float:
        for i, th in enumerate(self.thresholds):
            if abs(th - t) < 1e-9:
                return float(values[i])
        raise ConfigError(f"IoU threshold {t} was not computed; have {self.thresholds}")

    def _map_mask(self) -> np.ndarray:
        return np.array([any(abs(t - m) < 1e-9 for m in MAP_THRESHOLDS) for t in self.thresholds])

    # -- scalars
    @property
    def aji(self) -> float:
        return _fratio(self.aji_c, self.aji_u)

    @property
    def aji_plus(self) -> float:
        return _fratio(self.aji_plus_c, self.aji_plus_u)

    @property
    def map(self) -> float:
        """Mean over IoU 0.5:0.05:0.95 of TP/(TP+FP+FN) (DSB 2018)."""
        return float(self.ap[self._map_mask()].mean())

    @property
    def map_precision(self) -> float:
        """Mean over IoU 0.5:0.05:0.95 of TP/(TP+FP) (matches lagree2021's reported values)."""
        return float(self.precision[self._map_mask()].mean())

    @property
    def sq(self) -> float:
        return self._at(self.mean_matched_iou, 0.5)

    @property
    def dq(self) -> float:
        return self._at(self.f1, 0.5)

    @property
    def pq(self) -> float:
        i = self.thresholds.index(0.5)
        return _fratio(float(self.iou_sum[i]), 0.5 * (self.n_true + self.n_pred))

    def at(self, threshold: float) -> dict[str, float]:
        """TP/FP/FN/precision/recall/F1/AP/mean matched IoU at one computed threshold."""
        return {
            "tp": self._at(self.tp, threshold), "fp": self._at(self.fp, threshold),
            "fn": self._at(self.fn, threshold),
            "precision": self._at(self.precision, threshold),
            "recall": self._at(self.recall, threshold), "f1": self._at(self.f1, threshold),
            "ap": self._at(self.ap, threshold),
            "mean_matched_iou": self._at(self.mean_matched_iou, threshold),
        }

    # -- flat records
    def to_rows(self) -> list[dict[str, Any]]:
        """One row per threshold: ``slide, iou_threshold, n_true, n_pred, tp, fp, fn,
        precision, recall, f1, ap, mean_matched_iou``."""
        cols = {
            "tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision,
            "recall": self.recall, "f1": self.f1, "ap": self.ap,
            "mean_matched_iou": self.mean_matched_iou,
        }
        rows = []
        for i, t in enumerate(self.thresholds):
            row: dict[str, Any] = {
                "slide": self.slide, "iou_threshold": t, "n_true": self.n_true,
                "n_pred": self.n_pred,
            }
            for k, v in cols.items():
                row[k] = int(v[i]) if k in ("tp", "fp", "fn") else float(v[i])
            rows.append(row)
        return rows

    def summary_row(self) -> dict[str, Any]:
        """``slide`` and :data:`SUMMARY_METRICS` (``f1_50`` = F1 at IoU 0.5, etc.)."""
        row: dict[str, Any] = {
            "slide": self.slide, "n_true": self.n_true, "n_pred": self.n_pred,
            "aji": self.aji, "aji_plus": self.aji_plus, "map": self.map,
            "map_precision": self.map_precision, "pq": self.pq, "sq": self.sq, "dq": self.dq,
        }
        for t in REPORT_THRESHOLDS:
            vals = self.at(t)
            for k in ("tp", "fp", "fn"):
                row[f"{k}_{_key(t)}"] = int(vals[k])
            for k in ("precision", "recall", "f1"):
                row[f"{k}_{_key(t)}"] = vals[k]
        return row

    @classmethod
    def combine(cls, items: Sequence[InstanceMetrics], slide: str = "pooled") -> InstanceMetrics:
        """Pool slides: counts, matched IoU and AJI's C and U are summed, then scored."""
        if not items:
            th = tuple(MAP_THRESHOLDS)
            zero = np.zeros(len(th))
            return cls(slide, 0, 0, th, zero.astype(np.int64), zero, 0, 0, 0, 0)
        th = items[0].thresholds
        if any(it.thresholds != th for it in items):
            raise ConfigError("cannot pool instance metrics computed at different IoU thresholds")
        return cls(
            slide=slide, n_true=sum(it.n_true for it in items),
            n_pred=sum(it.n_pred for it in items), thresholds=th,
            tp=np.sum([it.tp for it in items], axis=0),
            iou_sum=np.sum([it.iou_sum for it in items], axis=0),
            aji_c=sum(it.aji_c for it in items), aji_u=sum(it.aji_u for it in items),
            aji_plus_c=sum(it.aji_plus_c for it in items),
            aji_plus_u=sum(it.aji_plus_u for it in items),
        )


#: numeric columns of :meth:`InstanceMetrics.summary_row`
SUMMARY_METRICS: tuple[str, ...] = (
    "n_true", "n_pred", "aji", "aji_plus", "map", "map_precision", "pq", "sq", "dq",
    *(f"{k}_{_key(t)}" for t in REPORT_THRESHOLDS
      for k in ("tp", "fp", "fn", "precision", "recall", "f1")),
)


def instance_metrics(
    truth: Any,
    pred: Any,
    *,
    slide: str = "",
    thresholds: Sequence[float] = (),
    overlap: InstanceOverlap | None = None,
) -> InstanceMetrics:
    """All instance metrics of one slide from two instance label images.

    ``thresholds`` adds IoU thresholds to the always computed :data:`MAP_THRESHOLDS`. Pass a
    precomputed ``overlap`` (from :func:`instance_overlap`) to skip that step; ``truth`` and
    ``pred`` are then ignored.
    """
    ov = instance_overlap(truth, pred) if overlap is None else overlap
    ths = tuple(sorted({*MAP_THRESHOLDS, *(round(_check_threshold(t), 6) for t in thresholds)}))
    iou = ov.pair_iou
    tp = np.zeros(len(ths), dtype=np.int64)
    iou_sum = np.zeros(len(ths))
    for i, t in enumerate(ths):
        if t >= 0.5:
            m = iou > t  # unique pairs, no assignment needed
            tp[i], iou_sum[i] = int(m.sum()), float(iou[m].sum())
        else:
            _, _, ci = match_instances(ov, t)
            tp[i], iou_sum[i] = ci.size, float(ci.sum())
    ac, au = aji(ov)
    pc, pu = aji_plus(ov)
    return InstanceMetrics(slide, ov.n_true, ov.n_pred, ths, tp, iou_sum, ac, au, pc, pu)


@dataclass
class InstanceAccumulator:
    """Collects per-slide :class:`InstanceMetrics`; per-slide mean and pooled values."""

    thresholds: Sequence[float] = ()
    per_slide: list[InstanceMetrics] = field(default_factory=list)

    def add(self, truth: Any, pred: Any, slide: str = "") -> InstanceMetrics:
        """Score one slide, keep and return its result."""
        res = instance_metrics(truth, pred, slide=slide, thresholds=self.thresholds)
        self.per_slide.append(res)
        return res

    def __len__(self) -> int:
        return len(self.per_slide)

    def __iter__(self) -> Iterator[InstanceMetrics]:
        return iter(self.per_slide)

    def pooled(self, slide: str = "pooled") -> InstanceMetrics:
        """One result over all slides' instances together (AJI: sums over every slide)."""
        return InstanceMetrics.combine(self.per_slide, slide)

    def image_mean(self, metric: str = "aji") -> float:
        """The mean over slides (images) of one :meth:`InstanceMetrics.summary_row` value,
        undefined (NaN) ones skipped: the per-image mean AJI the nuclei papers report, as
        opposed to :meth:`pooled`, which weighs every instance the same."""
        values = [float(r.summary_row()[metric]) for r in self.per_slide]
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    def summary_rows(self) -> list[dict[str, Any]]:
        """Long format: ``metric, n_slides, slide_mean, slide_std, slide_min, slide_max,
        pooled`` for each of :data:`SUMMARY_METRICS`."""
        return _summary_rows(
            [r.summary_row() for r in self.per_slide], self.pooled().summary_row(),
            SUMMARY_METRICS,
        )
