"""qpseg.metrics.instance: AJI by hand, perfect scores, StarDist mask with known perturbations.

Expected values on the real mask come from a deliberately simple, independent implementation
(per-instance boolean masks, a dense IoU matrix, Hungarian matching from scipy, Kumar's AJI as
a plain loop) — not from the library.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from qpseg.errors import ConfigError, LabelError, QpsegError
from qpseg.metrics.instance import (
    MAP_THRESHOLDS,
    InstanceAccumulator,
    InstanceMetrics,
    _max_weight_matching,
    aji,
    aji_plus,
    instance_metrics,
    instance_overlap,
    match_instances,
)

# ---------------------------------------------------------------------------- reference code


def ref_iou(truth: np.ndarray, pred: np.ndarray) -> tuple[list[int], list[int], np.ndarray]:
    tids = [int(v) for v in np.unique(truth) if v != 0]
    pids = [int(v) for v in np.unique(pred) if v != 0]
    iou = np.zeros((len(tids), len(pids)))
    for i, a in enumerate(tids):
        ma = truth == a
        for b in np.unique(pred[ma]):  # only predictions that touch it can overlap it
            if b == 0:
                continue
            mb = pred == b
            iou[i, pids.index(int(b))] = int((ma & mb).sum()) / int((ma | mb).sum())
    return tids, pids, iou


def ref_counts(iou: np.ndarray, t: float) -> tuple[int, int, int, float]:
    """TP, FP, FN and summed IoU of a maximum one-to-one matching with IoU > t (Hungarian)."""
    n_t, n_p = iou.shape
    if n_t == 0 or n_p == 0:
        return 0, n_p, n_t, 0.0
    ok = iou > t
    r, c = linear_sum_assignment(ok.astype(float), maximize=True)
    keep = ok[r, c]
    tp = int(keep.sum())
    return tp, n_p - tp, n_t - tp, float(iou[r[keep], c[keep]].sum())


def ref_aji(
    truth: np.ndarray, pred: np.ndarray, tids: list[int], pids: list[int], iou: np.ndarray
) -> float:
    """Kumar et al. 2017, Algorithm 1, as a loop over boolean masks."""
    c = u = 0
    used = set()
    for i, a in enumerate(tids):
        ma = truth == a
        if iou.shape[1] == 0 or iou[i].max() == 0:
            u += int(ma.sum())
            continue
        j = int(np.argmax(iou[i]))  # first maximum = smallest id
        mb = pred == pids[j]
        c += int((ma & mb).sum())
        u += int((ma | mb).sum())
        used.add(pids[j])
    for b in pids:
        if b not in used:
            u += int((pred == b).sum())
    return c / u if u else math.nan


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


def check_against_reference(truth: np.ndarray, pred: np.ndarray) -> InstanceMetrics:
    m = instance_metrics(truth, pred)
    tids, pids, iou = ref_iou(truth, pred)
    ov = instance_overlap(truth, pred)
    assert ov.truth_ids.tolist() == tids
    assert ov.pred_ids.tolist() == pids
    np.testing.assert_allclose(ov.dense_iou(), iou)
    for t in MAP_THRESHOLDS:
        tp, fp, fn, _ = ref_counts(iou, t)
        got = m.at(t)
        assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn), t
    assert _same(m.aji, ref_aji(truth, pred, tids, pids, iou))
    tp, fp, fn, s = ref_counts(iou, 0.5)
    den = tp + 0.5 * fp + 0.5 * fn
    assert _same(m.pq, s / den if den else math.nan)
    dsb = [ref_counts(iou, t) for t in MAP_THRESHOLDS]
    ap = [tp / (tp + fp + fn) if tp + fp + fn else math.nan for tp, fp, fn, _ in dsb]
    assert _same(m.map, float(np.mean(ap)))
    return m


# ---------------------------------------------------------------------------- hand cases


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((8, 10), np.uint16)
    pred = np.zeros((8, 10), np.uint16)
    truth[0:4, 0:4] = 5  # G1, 16 px
    truth[0:2, 6:10] = 9  # G2, 8 px
    pred[0:4, 1:5] = 2  # S1: 12 px in common with G1, union 20 -> IoU 0.6
    pred[0:2, 8:10] = 7  # S2: 4 px, inside G2 -> IoU 4/8 = 0.5 exactly
    pred[6:8, 0:2] = 40  # S3: 4 px, false positive
    return truth, pred


def test_aji_and_counts_by_hand() -> None:
    truth, pred = _hand_case()
    m = instance_metrics(truth, pred)
    # AJI: C = 12 + 4, U = 20 + 8 + 4 (S3 unused) = 32
    assert (m.aji_c, m.aji_u) == (16, 32)
    assert m.aji == 0.5
    assert m.aji_plus == 0.5  # already one-to-one
    # IoU > 0.5 strictly: G2-S2 (exactly 0.5) does not match
    assert m.at(0.5) == {
        "tp": 1, "fp": 2, "fn": 1, "precision": 1 / 3, "recall": 1 / 2, "f1": 2 / 5,
        "ap": 1 / 4, "mean_matched_iou": pytest.approx(0.6),
    }
    assert m.at(0.55)["tp"] == 1
    assert m.at(0.6)["tp"] == 0  # 0.6 is not > 0.6
    assert m.map == pytest.approx(2 * 0.25 / 10)
    assert m.map_precision == pytest.approx(2 * (1 / 3) / 10)
    assert m.sq == pytest.approx(0.6)
    assert m.dq == pytest.approx(0.4)
    assert m.pq == pytest.approx(0.6 / 2.5)
    row = m.summary_row()
    assert (row["tp_50"], row["fp_50"], row["fn_50"]) == (1, 2, 1)
    assert row["f1_70"] == 0.0 and row["precision_70"] == 0.0
    rows = m.to_rows()
    assert [r["iou_threshold"] for r in rows] == list(MAP_THRESHOLDS)
    # at a threshold below 0.5 the Hungarian path matches G2-S2 too
    m2 = instance_metrics(truth, pred, thresholds=[0.3])
    assert m2.at(0.3)["tp"] == 2
    assert m2.thresholds[0] == 0.3


def test_merge_aji_vs_aji_plus_by_hand() -> None:
    truth = np.zeros((4, 8), np.uint8)
    truth[:, 0:4] = 1
    truth[:, 4:8] = 2
    pred = np.zeros_like(truth)
    pred[:, 0:8] = 3  # one prediction covering both (IoU 0.5 with each)
    m = instance_metrics(truth, pred)
    # AJI lets both truths take S: C = 16 + 16, U = 32 + 32
    assert m.aji == pytest.approx(0.5)
    # AJI+ matches S once: C = 16, U = 32 + 16 (the unmatched truth)
    assert (m.aji_plus_c, m.aji_plus_u) == (16, 48)
    assert m.at(0.5)["tp"] == 0
    assert m.pq == 0.0
    assert math.isnan(m.sq)


def test_identical_inputs_are_perfect() -> None:
    rng = np.random.default_rng(0)
    lab = np.zeros((40, 40), np.int32)
    for k in range(12):
        r, c = rng.integers(0, 36, 2)
        lab[r : r + 4, c : c + 4] = 1000 * (k + 1)  # later ones overwrite: odd shapes too
    m = instance_metrics(lab, lab)
    assert m.aji == m.aji_plus == m.map == m.pq == m.sq == m.dq == 1.0
    # renumbered prediction ids change nothing
    perm = lab.copy()
    perm[lab > 0] = 7 + lab[lab > 0] // 1000 * 3
    assert instance_metrics(lab, perm).summary_row()["aji"] == 1.0


def test_empty_images() -> None:
    z = np.zeros((5, 5), np.uint8)
    m = instance_metrics(z, z)
    assert m.n_true == m.n_pred == 0
    assert math.isnan(m.aji) and math.isnan(m.map) and math.isnan(m.pq) and math.isnan(m.f1[0])
    one = z.copy()
    one[1:3, 1:3] = 4
    m = instance_metrics(one, z)
    assert m.aji == 0.0 and m.map == 0.0 and m.pq == 0.0 and m.recall[0] == 0.0
    assert math.isnan(m.precision[0])
    m = instance_metrics(z, one)
    assert m.aji == 0.0 and m.at(0.5)["fp"] == 1
    empty = instance_metrics(np.zeros((0, 3), np.uint8), np.zeros((0, 3), np.uint8))
    assert empty.n_true == 0


# ---------------------------------------------------------------------------- StarDist mask


@pytest.fixture(scope="module")
def mask2d(image_fixtures: Path) -> np.ndarray:
    tifffile = pytest.importorskip("tifffile")
    return np.asarray(tifffile.imread(image_fixtures / "stardist" / "mask2d.tif"))


def test_stardist_mask_against_itself(mask2d: np.ndarray) -> None:
    ov = instance_overlap(mask2d, mask2d)
    assert ov.n_true == 125  # non-contiguous ids up to 183
    assert int(ov.truth_ids.max()) == 183
    # label 129 has two connected parts (392 + 2 px) and is still one instance
    i129 = int(np.flatnonzero(ov.truth_ids == 129)[0])
    assert ov.truth_area[i129] == int((mask2d == 129).sum()) == 394
    m = instance_metrics(mask2d, mask2d)
    assert (m.aji, m.aji_plus, m.pq, m.map, m.f1[0]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert m.at(0.95)["tp"] == 125 and m.at(0.95)["fp"] == 0


def _touching_pair(lab: np.ndarray) -> tuple[int, int]:
    a, b = lab[:, :-1], lab[:, 1:]
    touch = (a != b) & (a > 0) & (b > 0)
    pairs = sorted({(int(x), int(y)) for x, y in zip(a[touch], b[touch], strict=True)})
    for x, y in pairs:
        if int((lab == x).sum()) != int((lab == y).sum()):
            return x, y
    raise AssertionError("no touching pair of unequal size")  # pragma: no cover


def test_stardist_shift(mask2d: np.ndarray) -> None:
    d = 3
    shifted = np.zeros_like(mask2d)
    shifted[:, d:] = mask2d[:, :-d]
    m = check_against_reference(mask2d, shifted)
    # one interior nucleus: its IoU after the shift is |A ∩ (A+d)| / (2|A| - |A ∩ (A+d)|)
    ov = instance_overlap(mask2d, shifted)
    lab = int(ov.truth_ids[np.argmax(ov.truth_area)])
    a = mask2d == lab
    inter = int((a[:, :-d] & a[:, d:]).sum())
    expected = inter / (2 * int(a.sum()) - inter)
    i = int(np.flatnonzero(ov.truth_ids == lab)[0])
    j = int(np.flatnonzero(ov.pred_ids == lab)[0])
    assert ov.dense_iou()[i, j] == pytest.approx(expected)
    assert expected < 1.0
    assert m.aji < 1.0 and m.map < 1.0


def test_stardist_merge(mask2d: np.ndarray) -> None:
    x, y = _touching_pair(mask2d)
    merged = mask2d.copy()
    merged[merged == y] = x
    m = check_against_reference(mask2d, merged)
    # the merged object still covers > half of the union with the larger nucleus
    assert m.at(0.5)["tp"] == 124  # exactly one fewer
    assert m.at(0.5)["fp"] == 0
    assert m.at(0.5)["fn"] == 1
    assert m.n_pred == 124


def test_stardist_split(mask2d: np.ndarray) -> None:
    ov = instance_overlap(mask2d, mask2d)
    lab = int(ov.truth_ids[np.argmax(ov.truth_area)])
    _, cols = np.nonzero(mask2d == lab)
    cut = int(np.quantile(cols, 0.3))  # left ~30 % gets a new id
    split = mask2d.copy()
    part = (mask2d == lab) & (np.arange(mask2d.shape[1])[None, :] <= cut)
    split[part] = 999
    big = int((mask2d == lab).sum()) - int(part.sum())
    assert big > int((mask2d == lab).sum()) / 2
    m = check_against_reference(mask2d, split)
    assert m.n_pred == 126
    assert (m.at(0.5)["tp"], m.at(0.5)["fp"], m.at(0.5)["fn"]) == (125, 1, 0)
    frac = big / int((mask2d == lab).sum())  # IoU of the larger half with the nucleus
    for t in MAP_THRESHOLDS:
        assert m.at(t)["tp"] == (125 if frac > t else 124), t


def test_stardist_relabel_and_big_ids(mask2d: np.ndarray) -> None:
    shifted = np.zeros_like(mask2d)
    shifted[2:, :] = mask2d[:-2, :]
    ref = instance_metrics(mask2d, shifted).summary_row()
    # ids beyond what fits a joint int64 key take the compacting path
    big = mask2d.astype(np.uint64) * np.uint64(2**56)
    assert instance_metrics(big, shifted).summary_row() == ref
    # huge ids and no background at all: ids come back exactly (no float round trip)
    full = np.full((3, 3), 2**63 + 5, dtype=np.uint64)
    full[0] = 2**64 - 1
    ov = instance_overlap(full, full[::-1])
    assert ov.truth_ids.tolist() == [2**63 + 5, 2**64 - 1]
    assert ov.truth_area.tolist() == [6, 3]
    assert ov.pair_inter.tolist() == [3, 3, 3]  # (A, A), (A, B), (B, A): one row each


# ---------------------------------------------------------------------------- matching


def test_match_instances_hungarian_below_half() -> None:
    # 1-D layout (x4 px): T1 [0,20) T2 [20,32); P2 [0,8) P1 [8,28). IoU: T1-P1 12/28 = 0.43,
    # T1-P2 8/20 = 0.4, T2-P1 8/24 = 0.33, T2-P2 0. At IoU > 0.3 greedy-by-IoU would take
    # T1-P1 and stop at 1 match; the maximum matching is T1-P2 + T2-P1 = 2 matches.
    truth = np.zeros((3, 40), np.uint8)
    pred = np.zeros_like(truth)
    truth[:, 0:20] = 1
    truth[:, 20:32] = 2
    pred[:, 0:8] = 2
    pred[:, 8:28] = 1
    ov = instance_overlap(truth, pred)
    _, _, iou = ref_iou(truth, pred)
    np.testing.assert_allclose(ov.dense_iou(), iou)
    np.testing.assert_allclose(iou, [[12 / 28, 8 / 20], [8 / 24, 0.0]])
    ti, pj, ci = match_instances(ov, 0.3)
    assert sorted(zip(ti.tolist(), pj.tolist(), strict=True)) == [(0, 1), (1, 0)]
    assert instance_metrics(truth, pred, thresholds=[0.3]).at(0.3)["tp"] == 2
    for t in (0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5):
        ti, pj, ci = match_instances(ov, t)
        assert len(set(ti.tolist())) == ti.size and len(set(pj.tolist())) == pj.size
        assert (ci > t).all()
        assert ti.size == ref_counts(iou, t)[0], t
    with pytest.raises(ConfigError):
        match_instances(ov, 1.0)


def test_sparse_iou_and_aji_functions() -> None:
    truth, pred = _hand_case()
    ov = instance_overlap(truth, pred)
    np.testing.assert_allclose(ov.sparse_iou().toarray(), ov.dense_iou())
    assert aji(ov) == (16, 32)
    assert aji_plus(ov) == (16, 32)


def test_accumulator_pooling() -> None:
    truth, pred = _hand_case()
    acc = InstanceAccumulator()
    a = acc.add(truth, pred, "a")
    b = acc.add(truth, truth, "b")
    pooled = acc.pooled()
    assert pooled.n_true == 4 and pooled.n_pred == 5
    assert pooled.at(0.5)["tp"] == 3
    assert pooled.aji == pytest.approx((16 + 24) / (32 + 24))
    rows = {r["metric"]: r for r in acc.summary_rows()}
    assert rows["aji"]["slide_mean"] == pytest.approx((a.aji + b.aji) / 2)
    assert rows["aji"]["pooled"] == pytest.approx(40 / 56)
    assert rows["f1_50"]["n_slides"] == 2
    assert InstanceMetrics.combine([]).n_true == 0
    other = instance_metrics(truth, pred, thresholds=[0.3])
    with pytest.raises(ConfigError):
        InstanceMetrics.combine([a, other])


def test_input_errors() -> None:
    a = np.zeros((4, 4), np.int32)
    with pytest.raises(LabelError):
        instance_metrics(a, a[:3])
    with pytest.raises(LabelError):
        instance_metrics(a.astype(np.float32), a)
    neg = a.copy()
    neg[0, 0] = -2
    with pytest.raises(LabelError, match="negative"):
        instance_metrics(neg, a)
    with pytest.raises(ConfigError):
        instance_metrics(a, a, thresholds=[1.5])


@settings(max_examples=150, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.uint8, np.int16, np.uint32, np.int64, bool]),
)
def test_fuzz_against_reference(shape: tuple[int, int], k: int, seed: int, dtype: type) -> None:
    rng = np.random.default_rng(seed)
    truth: np.ndarray = rng.integers(0, k + 1, shape).astype(dtype)
    pred: np.ndarray = rng.integers(0, k + 1, shape).astype(dtype)
    m = check_against_reference(truth, pred)
    # AJI+'s matching is one-to-one and reaches the Hungarian optimum of the total IoU
    ov = instance_overlap(truth, pred)
    sel = _max_weight_matching(ov.pair_truth, ov.pair_pred, ov.pair_iou, ov.n_true, ov.n_pred)
    assert np.unique(ov.pair_truth[sel]).size == np.unique(ov.pair_pred[sel]).size == sel.sum()
    dense = ov.dense_iou()
    if dense.size:
        r, c = linear_sum_assignment(dense, maximize=True)
        assert ov.pair_iou[sel].sum() == pytest.approx(dense[r, c].sum())
    assert 0.0 <= m.aji <= 1.0 or math.isnan(m.aji)
    assert 0.0 <= m.aji_plus <= 1.0 or math.isnan(m.aji_plus)
    same = instance_metrics(truth, truth)
    assert same.aji == 1.0 or same.n_true == 0


@settings(max_examples=200, deadline=None)
@given(
    st_shape=st.tuples(st.integers(0, 6), st.integers(0, 6)),
    sp_shape=st.tuples(st.integers(0, 6), st.integers(0, 6)),
    seed=st.integers(0, 2**32 - 1),
    dt=st.sampled_from([np.int8, np.uint16, np.int64, np.uint64, np.float64, bool]),
    dp=st.sampled_from([np.int8, np.uint16, np.int64, np.uint64, np.float64, bool]),
)
def test_fuzz_any_input(
    st_shape: tuple[int, int], sp_shape: tuple[int, int], seed: int, dt: type, dp: type
) -> None:
    rng = np.random.default_rng(seed)
    choices = [0, 1, 2, -1, 200, 2**40]
    truth: np.ndarray = np.array(rng.choice(choices, st_shape)).astype(dt)
    pred: np.ndarray = np.array(rng.choice(choices, sp_shape)).astype(dp)
    try:
        m = instance_metrics(truth, pred)
    except QpsegError:
        return
    assert m.n_true == np.unique(truth[truth != 0]).size
    assert 0 <= m.at(0.5)["tp"] <= min(m.n_true, m.n_pred)
