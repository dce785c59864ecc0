"""qpseg.metrics.lesion: diameters, ITC/micro/macro categories, detection, slide category."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpseg.errors import ConfigError, LabelError, QpsegError
from qpseg.metrics.lesion import (
    SLIDE_CATEGORIES,
    LesionAccumulator,
    label_lesions,
    lesion_metrics,
    max_feret_diameters,
    size_category,
)


def _diam(mask: np.ndarray, mpp: float = 1.0) -> float:
    labels, n = label_lesions(mask)
    assert n == 1
    return float(max_feret_diameters(labels, mpp)[0])


def test_diameter_hand_computed() -> None:
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    assert _diam(one) == pytest.approx(math.sqrt(2))  # pixel corners, not centres
    rect = np.zeros((50, 60), np.uint8)
    rect[5:35, 5:45] = 1  # 30 x 40 px
    assert _diam(rect) == pytest.approx(50.0)
    assert _diam(rect, 0.25) == pytest.approx(12.5)
    line = np.zeros((3, 12), bool)
    line[1, 1:11] = True  # 1 x 10 px
    assert _diam(line) == pytest.approx(math.sqrt(101))
    ell = np.zeros((12, 12), bool)  # an L: 10 px down, 6 px across the bottom row
    ell[1:11, 1] = True
    ell[10, 1:7] = True
    # farthest corners: top-left of (1,1) = (1,1) and bottom-right of (10,6) = (11,7)
    assert _diam(ell) == pytest.approx(math.hypot(10, 6))
    # two labels, one missing id in between -> NaN for it
    lab = np.zeros((10, 10), np.int32)
    lab[0:2, 0:2] = 1
    lab[5:8, 5:9] = 3
    d = max_feret_diameters(lab, 2.0)
    assert d[0] == pytest.approx(2 * math.hypot(2, 2))
    assert math.isnan(d[1])
    assert d[2] == pytest.approx(2 * math.hypot(3, 4))


def test_diameter_close_to_skimage_feret() -> None:
    from skimage.measure import regionprops

    yy, xx = np.mgrid[:300, :300]
    disc = ((yy - 150) ** 2 + (xx - 140) ** 2) < 100**2
    ellipse = ((yy - 150) / 120.0) ** 2 + ((xx - 150) / 40.0) ** 2 < 1
    for mask in (disc, ellipse):
        labels, _ = label_lesions(mask)
        ours = max_feret_diameters(labels, 1.0)[0]
        ref = regionprops(labels)[0].feret_diameter_max
        assert abs(ours - ref) < 1.5


def test_size_category_boundaries() -> None:
    assert size_category(0.0) == "itc"
    assert size_category(200.0) == "itc"  # "no greater than 0.2 mm"
    assert size_category(200.0 + 1e-7) == "itc"  # float noise at the boundary
    assert size_category(200.01) == "micro"
    assert size_category(2000.0) == "micro"
    assert size_category(2000.5) == "macro"
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ConfigError):
            size_category(bad)


def test_brief_example_at_half_micron() -> None:
    # 0.1 mm at 0.5 mpp is 200 px: a disc 200 px across is an ITC (~100 µm);
    # a 283 x 283 px square has a diagonal of 400.2 px = 200.1 µm: just a micrometastasis.
    yy, xx = np.mgrid[:420, :420]
    disc = ((yy - 150 + 0.5) ** 2 + (xx - 150 + 0.5) ** 2) <= 100**2
    d = _diam(disc, 0.5)
    assert 99.0 < d < 101.0
    assert size_category(d) == "itc"
    square = np.zeros((300, 300), bool)
    square[5:288, 5:288] = True
    d = _diam(square, 0.5)
    assert d == pytest.approx(0.5 * 283 * math.sqrt(2))
    assert size_category(d) == "micro"


def _slide() -> tuple[np.ndarray, np.ndarray]:
    """mpp 4: truth ITC 30x40 px (200 µm), micro 300x400 px (2000 µm), macro 301x400 px
    (2002.4 µm); prediction: a blob on the ITC, a 150x150 px blob inside the macro, nothing on
    the micro, one 10x10 px false positive."""
    truth = np.zeros((720, 1300), np.uint8)
    pred = np.zeros_like(truth)
    truth[10:40, 10:50] = 1  # ITC
    truth[100:400, 100:500] = 1  # micro
    truth[100:401, 700:1100] = 1  # macro
    pred[20:30, 45:60] = 1  # overlaps the ITC, sticks out of it
    pred[200:350, 800:950] = 1  # inside the macro
    pred[600:610, 600:610] = 1  # false positive
    return truth, pred


def test_lesion_slide_hand_built() -> None:
    truth, pred = _slide()
    m = lesion_metrics(truth, pred, 4.0, slide="s1")
    assert m.n_truth == 3
    cats = sorted((les.category, round(les.diameter_um, 1)) for les in m.truth)
    assert cats == [("itc", 200.0), ("macro", 2002.4), ("micro", 2000.0)]
    assert m.n_detected == 2
    assert m.sensitivity == pytest.approx(2 / 3)
    by = m.by_category()
    assert by["itc"]["n_truth"] == 1 and by["itc"]["sensitivity"] == 1.0
    assert by["micro"]["n_truth"] == 1 and by["micro"]["sensitivity"] == 0.0
    assert by["macro"]["n_truth"] == 1 and by["macro"]["sensitivity"] == 1.0
    assert m.n_pred == 3
    assert m.n_fp == 1
    assert m.lesion_precision == pytest.approx(2 / 3)
    # the FP (10x10 px = 56.6 µm) is an ITC-sized false positive
    assert by["itc"]["n_fp"] == 1 and by["micro"]["n_fp"] == 0
    assert m.truth_category == "macro"
    # largest prediction: 150x150 px, diagonal 212.1 px = 848.5 µm -> micro
    assert m.pred_category == "micro"
    assert not m.category_agrees
    itc = next(les for les in m.truth if les.category == "itc")
    assert itc.area_px == 1200
    assert itc.area_um2 == pytest.approx(1200 * 16.0)
    assert itc.bbox == (10, 10, 40, 50)
    assert itc.hit and len(itc.overlaps) == 1
    row = m.summary_row()
    assert row["slide"] == "s1"
    assert row["n_truth_micro"] == 1 and row["n_detected_micro"] == 0
    assert row["truth_category"] == "macro" and row["category_agrees"] is False
    rows = m.to_rows()
    assert len(rows) == 6
    assert {r["source"] for r in rows} == {"truth", "pred"}
    fp = [r for r in rows if r["source"] == "pred" and not r["hit"]]
    assert len(fp) == 1 and fp[0]["overlaps"] == "" and fp[0]["row0"] == 600


def test_one_prediction_detecting_two_lesions() -> None:
    truth = np.zeros((20, 20), np.uint8)
    truth[2:5, 2:5] = 1
    truth[2:5, 10:13] = 1
    pred = np.zeros_like(truth)
    pred[3, 3:12] = 1  # one bar across both
    m = lesion_metrics(truth, pred, 1.0)
    assert m.n_detected == 2 and m.n_pred == 1 and m.n_fp == 0
    assert m.pred[0].overlaps == (1, 2)


def test_connectivity() -> None:
    diag = np.zeros((6, 6), bool)
    diag[1, 1] = diag[2, 2] = diag[3, 3] = True
    assert label_lesions(diag)[1] == 1  # 8-connected by default
    assert label_lesions(diag, connectivity=1)[1] == 3
    m = lesion_metrics(diag, diag, 1.0, connectivity=1)
    assert m.n_truth == 3 and m.n_detected == 3
    with pytest.raises(ConfigError):
        label_lesions(diag, connectivity=3)


def test_valid_area_drops_outside_predictions() -> None:
    truth, pred = _slide()
    valid = np.zeros(truth.shape, bool)
    valid[:500] = True  # the FP at rows 600-609 lies outside
    m = lesion_metrics(truth, pred, 4.0, valid=valid)
    assert m.n_pred == 2 and m.n_fp == 0 and m.n_pred_outside == 1
    assert [les.label for les in m.pred] == [1, 2]
    with pytest.raises(LabelError):
        lesion_metrics(truth, pred, 4.0, valid=valid[:10])


def test_negative_slides_and_accumulator() -> None:
    truth, pred = _slide()
    empty = np.zeros((50, 50), np.uint8)
    fp_only = empty.copy()
    fp_only[5:8, 5:8] = 1
    acc = LesionAccumulator()
    acc.add(lesion_metrics(truth, pred, 4.0, slide="a"))
    acc.add(lesion_metrics(empty, empty, 4.0, slide="b"))
    acc.add(lesion_metrics(empty, fp_only, 4.0, slide="c"))
    b = acc.per_slide[1]
    assert b.truth_category == b.pred_category == "negative" and b.category_agrees
    assert math.isnan(b.sensitivity) and math.isnan(b.lesion_precision)
    assert acc.per_slide[2].pred_category == "itc"
    pooled = acc.pooled_row()
    assert pooled["n_truth"] == 3 and pooled["n_detected"] == 2
    assert pooled["n_fp"] == 2
    assert pooled["sensitivity"] == pytest.approx(2 / 3)
    assert pooled["category_agreement"] == pytest.approx(1 / 3)
    cm = acc.category_confusion()
    idx = {c: i for i, c in enumerate(SLIDE_CATEGORIES)}
    assert cm[idx["macro"], idx["micro"]] == 1
    assert cm[idx["negative"], idx["negative"]] == 1
    assert cm[idx["negative"], idx["itc"]] == 1
    assert cm.sum() == 3
    rows = {r["metric"]: r for r in acc.summary_rows()}
    assert rows["n_fp"]["slide_mean"] == pytest.approx(2 / 3)
    assert rows["n_fp"]["pooled"] == 2
    assert rows["sensitivity"]["n_slides"] == 1  # NaN on the two negative slides
    assert rows["category_agreement"]["slide_mean"] == pytest.approx(1 / 3)


def test_input_errors() -> None:
    a = np.zeros((4, 4), np.uint8)
    with pytest.raises(ConfigError):
        lesion_metrics(a, a, 0.0)
    with pytest.raises(ConfigError):
        lesion_metrics(a, a, "x")  # type: ignore[arg-type]
    with pytest.raises(LabelError):
        lesion_metrics(a, a[:3], 1.0)
    with pytest.raises(LabelError):
        lesion_metrics(a.astype(float), a, 1.0)
    with pytest.raises(LabelError):
        lesion_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), 1.0)


@settings(max_examples=150, deadline=None)
@given(
    shape=st.tuples(st.integers(0, 12), st.integers(0, 12)),
    mpp=st.floats(0.01, 20),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([bool, np.uint8, np.int32, np.float32]),
)
def test_fuzz(shape: tuple[int, int], mpp: float, seed: int, dtype: type) -> None:
    rng = np.random.default_rng(seed)
    truth: np.ndarray = (rng.random(shape) < 0.3).astype(dtype)
    pred: np.ndarray = (rng.random(shape) < 0.3).astype(dtype)
    try:
        m = lesion_metrics(truth, pred, mpp)
    except QpsegError:
        assert dtype is np.float32
        return
    assert 0 <= m.n_detected <= m.n_truth
    assert 0 <= m.n_fp <= m.n_pred
    for les in (*m.truth, *m.pred):
        assert les.diameter_um >= math.sqrt(2) * mpp * (1 - 1e-9)
        assert les.category in SLIDE_CATEGORIES[1:]
    # swapping roles: detected truth lesions <-> true-positive predictions
    swapped = lesion_metrics(pred, truth, mpp)
    assert swapped.n_tp_pred == m.n_detected
    assert swapped.n_detected == m.n_tp_pred
