"""qpseg.metrics.pixel: hand-computed cases, scikit-learn cross-check, pooling, ignore pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpseg.errors import ConfigError, LabelError, QpsegError
from qpseg.metrics import pixel as pixel_mod
from qpseg.metrics.pixel import PixelAccumulator, PixelMetrics, confusion_matrix, pixel_metrics


def _two_squares() -> tuple[np.ndarray, np.ndarray]:
    """10x10 truth square and a 10x10 predicted square shifted by (5, 5) in a 20x20 image."""
    truth = np.zeros((20, 20), np.uint8)
    pred = np.zeros((20, 20), np.uint8)
    truth[0:10, 0:10] = 1
    pred[5:15, 5:15] = 1
    return truth, pred


def test_two_squares_hand_computed() -> None:
    truth, pred = _two_squares()
    m = pixel_metrics(truth, pred, ["Background", "Tumor"])
    # overlap 5x5 = 25; each square 100; union 175; image 400
    assert m.confusion.tolist() == [[225, 75], [75, 25]]
    assert m.tp.tolist() == [225, 25]
    assert m.fp.tolist() == [75, 75]
    assert m.fn.tolist() == [75, 75]
    assert m.tn.tolist() == [25, 225]
    assert m.iou[1] == pytest.approx(25 / 175)
    assert m.f1[1] == pytest.approx(2 * 25 / 200)  # Dice 0.25
    assert m.precision[1] == pytest.approx(0.25)
    assert m.recall[1] == pytest.approx(0.25)
    assert m.iou[0] == pytest.approx(225 / 375)
    assert m.miou == pytest.approx((25 / 175 + 225 / 375) / 2)
    assert m.accuracy == pytest.approx(250 / 400)
    rows = m.to_rows()
    assert rows[1]["class_name"] == "Tumor"
    assert rows[1]["dice"] == rows[1]["f1"] == pytest.approx(0.25)
    assert isinstance(rows[1]["tp"], int)


def _three_class_case() -> tuple[np.ndarray, np.ndarray]:
    # (truth, pred) pairs, listed by hand, plus 7 ignored pixels with arbitrary predictions
    pairs = [(0, 0)] * 5 + [(0, 1)] * 2 + [(1, 1)] * 3 + [(1, 2)] * 1 + [(2, 0)] * 4
    pairs += [(2, 2)] * 6 + [(255, 2)] * 4 + [(255, 0)] * 3
    rng = np.random.default_rng(3)
    order = rng.permutation(len(pairs))
    arr = np.array(pairs, dtype=np.uint8)[order]
    return arr[:, 0].reshape(4, 7), arr[:, 1].reshape(4, 7)


def test_three_class_confusion_by_hand() -> None:
    truth, pred = _three_class_case()
    m = pixel_metrics(truth, pred, ["a", "b", "c"])
    assert m.confusion.tolist() == [[5, 2, 0], [0, 3, 1], [4, 0, 6]]
    assert m.n_pixels == 21
    np.testing.assert_allclose(m.precision, [5 / 9, 3 / 5, 6 / 7])
    np.testing.assert_allclose(m.recall, [5 / 7, 3 / 4, 6 / 10])
    np.testing.assert_allclose(m.iou, [5 / 11, 3 / 6, 6 / 11])
    np.testing.assert_allclose(m.f1, [10 / 16, 6 / 9, 12 / 17])
    np.testing.assert_allclose(
        m.confusion_normalised, [[5 / 7, 2 / 7, 0], [0, 3 / 4, 1 / 4], [4 / 10, 0, 6 / 10]]
    )
    assert m.miou == pytest.approx((5 / 11 + 3 / 6 + 6 / 11) / 3)
    assert m.mrecall == pytest.approx((5 / 7 + 3 / 4 + 6 / 10) / 3)
    assert m.mprecision == pytest.approx((5 / 9 + 3 / 5 + 6 / 7) / 3)
    assert m.tn.tolist() == [21 - 5 - 4 - 2, 21 - 3 - 2 - 1, 21 - 6 - 1 - 4]
    crow = m.confusion_rows()
    assert len(crow) == 9
    assert crow[1] == {
        "slide": "", "truth_class": "a", "pred_class": "b", "count": 2, "row_fraction": 2 / 7
    }


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.uint64])
def test_against_sklearn(dtype: type) -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    n = 4
    truth: np.ndarray = rng.integers(0, n, (97, 61)).astype(dtype)
    pred: np.ndarray = rng.integers(0, n, (97, 61)).astype(dtype)
    truth[rng.random(truth.shape) < 0.2] = 255
    pred[(rng.random(pred.shape) < 0.1) & (truth == 255)] = 255  # ignored: never looked at
    m = pixel_metrics(truth, pred, n)
    keep = truth != 255
    t, p = truth[keep].astype(int), pred[keep].astype(int)
    labels = list(range(n))
    np.testing.assert_array_equal(m.confusion, skm.confusion_matrix(t, p, labels=labels))
    np.testing.assert_allclose(m.f1, skm.f1_score(t, p, labels=labels, average=None))
    np.testing.assert_allclose(m.iou, skm.jaccard_score(t, p, labels=labels, average=None))
    np.testing.assert_allclose(
        m.precision, skm.precision_score(t, p, labels=labels, average=None)
    )
    np.testing.assert_allclose(m.recall, skm.recall_score(t, p, labels=labels, average=None))
    assert m.mf1 == pytest.approx(skm.f1_score(t, p, labels=labels, average="macro"))
    assert m.accuracy == pytest.approx(skm.accuracy_score(t, p))
    np.testing.assert_allclose(
        m.confusion_normalised,
        skm.confusion_matrix(t, p, labels=labels, normalize="true"),
    )


def test_sklearn_absent_class_is_nan_not_zero() -> None:
    skm = pytest.importorskip("sklearn.metrics")
    truth = np.array([0, 0, 1, 1, 1], np.uint8)
    pred = np.array([0, 1, 1, 1, 0], np.uint8)
    m = pixel_metrics(truth, pred, 3)  # class 2 in neither
    assert math.isnan(m.iou[2]) and math.isnan(m.recall[2]) and math.isnan(m.precision[2])
    ref = skm.f1_score(truth, pred, labels=[0, 1, 2], average=None, zero_division=np.nan)
    np.testing.assert_allclose(m.f1, ref)
    # nan-aware means: class 2 does not drag the mean down
    assert m.miou == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_nan_conventions_and_mean_classes() -> None:
    # class 1 is predicted but absent from the truth: recall NaN, precision 0, IoU 0
    truth = np.array([[0, 0, 2, 2]], np.uint8)
    pred = np.array([[0, 1, 2, 2]], np.uint8)
    m = pixel_metrics(truth, pred, 3)
    assert math.isnan(m.recall[1])
    assert m.precision[1] == 0.0
    assert m.iou[1] == 0.0
    assert m.mrecall == pytest.approx((1 / 2 + 1) / 2)  # over classes in the truth
    assert m.mprecision == pytest.approx((1 + 0 + 1) / 3)  # over predicted classes
    assert m.miou == pytest.approx((1 / 2 + 0 + 1) / 3)
    # ho2021 excluded classes (e.g. background) from its means: mean_classes
    m2 = pixel_metrics(truth, pred, 3, mean_classes=[1, 2])
    assert m2.miou == pytest.approx(0.5)
    assert m2.mrecall == pytest.approx(1.0)
    # all-ignored slide: every ratio NaN, no warnings
    empty = pixel_metrics(np.full((3, 3), 255, np.uint8), np.zeros((3, 3), np.uint8), 2)
    assert empty.n_pixels == 0
    assert math.isnan(empty.miou) and math.isnan(empty.accuracy)


def test_per_slide_mean_differs_from_pooled() -> None:
    acc = PixelAccumulator(["bg", "tumor"])
    # slide A: 1000 px, 100 tumour px of which 90 found (IoU 0.9); slide B: 20 px, 10 tumour px
    # of which 1 found (IoU 0.1). No false positives anywhere.
    ta = np.zeros(1000, np.uint8)
    ta[:100] = 1
    pa = ta.copy()
    pa[90:100] = 0
    tb = np.zeros(20, np.uint8)
    tb[:10] = 1
    pb = np.zeros(20, np.uint8)
    pb[0] = 1
    acc.add(ta, pa, "A")
    acc.add(tb, pb, "B")
    assert len(acc) == 2
    assert [r.slide for r in acc] == ["A", "B"]
    assert acc.per_slide[0].iou[1] == pytest.approx(0.9)
    assert acc.per_slide[1].iou[1] == pytest.approx(0.1)
    pooled = acc.pooled()
    assert pooled.confusion.tolist() == [[900 + 10, 0], [10 + 9, 91]]
    assert pooled.iou[1] == pytest.approx(91 / 110)
    rows = {(r["class_name"], r["metric"]): r for r in acc.summary_rows()}
    iou = rows[("tumor", "iou")]
    assert iou["slide_mean"] == pytest.approx(0.5)
    assert iou["slide_std"] == pytest.approx(np.std([0.9, 0.1], ddof=1))
    assert iou["pooled"] == pytest.approx(91 / 110)
    assert iou["n_slides"] == 2
    # bg IoU: A 900/910, B 10/19
    miou_a = (900 / 910 + 0.9) / 2
    miou_b = (10 / 19 + 0.1) / 2
    miou = rows[("", "miou")]
    assert miou["class_index"] is None
    assert miou["slide_mean"] == pytest.approx((miou_a + miou_b) / 2)
    assert miou["pooled"] == pytest.approx((910 / 929 + 91 / 110) / 2)
    np.testing.assert_allclose(acc.slide_values("iou", 1), [0.9, 0.1])
    np.testing.assert_allclose(acc.slide_values("miou"), [miou_a, miou_b])
    with pytest.raises(ConfigError):
        acc.slide_values("nope")
    # add_confusion gives the same as add
    acc2 = PixelAccumulator(["bg", "tumor"])
    acc2.add_confusion(acc.per_slide[0].confusion, "A")
    acc2.add_confusion(acc.per_slide[1].confusion, "B")
    assert acc2.summary_rows() == acc.summary_rows()


def test_summary_nan_slides_are_skipped() -> None:
    acc = PixelAccumulator(2)
    acc.add(np.array([0, 0, 1, 1], np.uint8), np.array([0, 0, 1, 0], np.uint8), "with")
    acc.add(np.array([0, 0, 0, 0], np.uint8), np.array([0, 0, 0, 0], np.uint8), "without")
    rows = {(r["class_index"], r["metric"]): r for r in acc.summary_rows()}
    rec = rows[(1, "recall")]
    assert rec["n_slides"] == 1  # recall of class 1 is NaN on the slide without it
    assert rec["slide_mean"] == pytest.approx(0.5)
    assert math.isnan(rec["slide_std"])


def test_ignore_pixels_are_excluded() -> None:
    truth, pred = _two_squares()
    base = pixel_metrics(truth, pred, 2)
    truth2 = truth.copy()
    truth2[:, 15:] = 255  # an unlabelled strip
    pred2 = pred.copy()
    pred2[:, 15:] = 1  # whatever is predicted there must not count
    m = pixel_metrics(truth2, pred2, 2)
    assert m.n_pixels == 20 * 15
    expected = confusion_matrix(truth[:, :15], pred[:, :15], 2)
    np.testing.assert_array_equal(m.confusion, expected)
    assert m.confusion.sum() < base.confusion.sum()
    # several ignore indices
    truth3 = truth2.copy()
    truth3[0, 0] = 254
    m3 = pixel_metrics(truth3, pred2, 2, ignore_index=[254, 255])
    assert m3.n_pixels == 20 * 15 - 1
    with pytest.raises(LabelError, match="254"):
        pixel_metrics(truth3, pred2, 2)
    # no ignore index at all: 255 is then just an invalid value
    with pytest.raises(LabelError):
        pixel_metrics(truth2, pred2, 2, ignore_index=None)


def test_unpredicted_pixels_in_labelled_area() -> None:
    truth = np.array([[0, 1, 1, 255]], np.uint8)
    pred = np.array([[0, 255, 1, 255]], np.uint8)
    with pytest.raises(LabelError, match="ignore index"):
        pixel_metrics(truth, pred, 2)
    ex = pixel_metrics(truth, pred, 2, pred_ignore="exclude")
    assert ex.confusion.tolist() == [[1, 0], [0, 1]]
    as_bg = pixel_metrics(truth, pred, 2, pred_ignore=0)
    assert as_bg.confusion.tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ConfigError):
        pixel_metrics(truth, pred, 2, pred_ignore=5)
    with pytest.raises(ConfigError):
        pixel_metrics(truth, pred, 2, pred_ignore="drop")  # type: ignore[arg-type]


def test_input_errors() -> None:
    a = np.zeros((4, 4), np.uint8)
    with pytest.raises(LabelError, match="shape"):
        pixel_metrics(a, np.zeros((4, 5), np.uint8), 2)
    with pytest.raises(LabelError, match="float"):
        pixel_metrics(a.astype(float), a, 2)
    bad = a.copy()
    bad[0, 0] = 7
    with pytest.raises(LabelError, match="7"):
        pixel_metrics(bad, a, 2)
    with pytest.raises(LabelError, match="7"):
        pixel_metrics(a, bad, 2)
    with pytest.raises(ConfigError):
        pixel_metrics(a, a, 2, ignore_index=1)
    with pytest.raises(ConfigError):
        pixel_metrics(a, a, 0)
    with pytest.raises(ConfigError):
        pixel_metrics(a, a, [])
    with pytest.raises(ConfigError):
        pixel_metrics(a, a, 2, mean_classes=[3])
    with pytest.raises(LabelError):
        PixelMetrics(np.zeros((2, 3)), ("a", "b"))
    # negative values in signed arrays are invalid, not wrapped into a class
    neg = a.astype(np.int8)
    neg[1, 1] = -1
    with pytest.raises(LabelError, match="-1"):
        pixel_metrics(neg, a, 2)
    with pytest.raises(LabelError, match="-1"):
        pixel_metrics(neg.astype(np.int64), a, 2)


def test_chunks_and_dtypes_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 5, 10_001).astype(np.uint8)
    pred = rng.integers(0, 5, 10_001).astype(np.uint8)
    truth[rng.random(truth.size) < 0.1] = 255
    ref = confusion_matrix(truth, pred, 5)
    # independent count
    expected = np.zeros((5, 5), np.int64)
    for t, p in zip(truth.tolist(), pred.tolist(), strict=True):
        if t != 255:
            expected[t, p] += 1
    np.testing.assert_array_equal(ref, expected)
    monkeypatch.setattr(pixel_mod, "_CHUNK", 999)  # many chunks, ragged last one
    for dt in (np.uint8, np.uint16, np.int32, np.int64):
        np.testing.assert_array_equal(
            confusion_matrix(truth.astype(dt), pred.astype(dt), 5), expected
        )
    np.testing.assert_array_equal(
        confusion_matrix(truth.astype(np.uint16), pred, 5), expected
    )
    # non-contiguous input (a transposed view)
    t2 = truth[:10_000].reshape(100, 100)
    p2 = pred[:10_000].reshape(100, 100)
    np.testing.assert_array_equal(
        confusion_matrix(t2.T, p2.T, 5), confusion_matrix(t2, p2, 5)
    )


def test_bool_inputs() -> None:
    truth = np.array([True, True, False, False])
    pred = np.array([True, False, True, False])
    assert confusion_matrix(truth, pred, 2, ignore_index=None).tolist() == [[1, 1], [1, 1]]


_dtypes = st.sampled_from([np.uint8, np.int8, np.uint16, np.int32, np.int64, np.uint64, bool])


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 6),
    shape=st.tuples(st.integers(0, 7), st.integers(0, 7)),
    dt=_dtypes,
    dp=_dtypes,
    seed=st.integers(0, 2**32 - 1),
)
def test_fuzz_any_arrays(
    n: int, shape: tuple[int, int], dt: type, dp: type, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    choices = [*range(n), n, 255, 300, -1]
    truth: np.ndarray = np.array(rng.choice(choices, shape)).astype(dt)
    pred: np.ndarray = np.array(rng.choice(choices, shape)).astype(dp)
    try:
        m = pixel_metrics(truth, pred, n)
    except QpsegError:
        return
    keep = truth.astype(np.int64) != 255  # int8 and bool arrays cannot hold 255
    assert m.n_pixels == int(keep.sum())
    assert m.confusion.shape == (n, n)
    for v in (m.precision, m.recall, m.f1, m.iou):
        finite = v[~np.isnan(v)]
        assert ((finite >= 0) & (finite <= 1)).all()


def test_package_exports_are_lazy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, qpseg.metrics as m\n"
        "assert 'numpy' not in sys.modules and 'qpseg.metrics.pixel' not in sys.modules\n"
        "for name in m.__all__:\n"
        "    getattr(m, name)\n"
        "assert 'qpseg.metrics.instance' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    import qpseg.metrics as metrics

    with pytest.raises(AttributeError):
        _ = metrics.no_such_name
