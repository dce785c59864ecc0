"""qpseg evaluate on the papers' protocols: exhaustive versus partial truth, benign slides,
the evaluation pixel size from the predictions' provenance, cells as pixel truth, AJI pooled
and per image, and the real nuclei ground truth of the stardist fixture. Every expected value
is computed by hand (or with numpy straight from the masks), not by qpseg."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from shapely import union_all
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry
from typer.testing import CliRunner

import qpseg.evaluate as evaluate_module
import qpseg.evaluation.raster as raster_module
import qpseg.evaluation.scoring as scoring_module
from qpseg.cli.evaluate import evaluate as evaluate_cmd
from qpseg.errors import QpsegWarning
from qpseg.evaluate import evaluate, provenance_mpp
from qpseg.qupath.geojson import QuPathObject, write_geojson
from qpseg.testing.projects import make_project

PROV = {"qpseg_model": "untrained", "qpseg_model_sha256": "0" * 64}


def ann(geom: BaseGeometry, cls: str | None, meta: dict[str, str] | None = None
        ) -> QuPathObject:
    return QuPathObject(geometry=geom, classification=cls, metadata=dict(meta or {}))


def det(geom: BaseGeometry, cls: str | None = None, kind: str = "detection",
        meta: dict[str, str] | None = None) -> QuPathObject:
    return QuPathObject(geometry=geom, object_type=kind, classification=cls,
                        metadata=dict(meta or {}))


def folders(tmp_path: Path, truth: dict[str, list[QuPathObject]],
            pred: dict[str, list[QuPathObject]]) -> tuple[Path, Path]:
    t, p = tmp_path / "t", tmp_path / "p"
    t.mkdir()
    p.mkdir()
    for name, objs in truth.items():
        write_geojson(t / f"{name}.geojson", objs)
    for name, objs in pred.items():
        write_geojson(p / f"{name}.geojson", objs)
    return t, p


def tumour(ev: evaluate_module.Evaluation) -> dict[str, float]:
    pooled = ev.pixel.pooled()
    i = list(ev.class_names).index("Tumor")
    return {"precision": float(pooled.precision[i]), "recall": float(pooled.recall[i]),
            "dice": float(pooled.f1[i]), "iou": float(pooled.iou[i])}


# ------------------------------------------------------------------- exhaustive versus partial


def test_untrained_model_on_tumour_only_outline(tmp_path: Path) -> None:
    # Truth: one tumour square of 40 x 40 px, nothing else drawn. An untrained model paints
    # the whole 100 x 100 px field Tumor. Partial scoring sees only the 1600 truth pixels (all
    # right); exhaustive truth charges the 8400 unannotated pixels painted Tumor.
    t, p = folders(tmp_path, {"a": [ann(box(20, 20, 60, 60), "Tumor")]},
                   {"a": [ann(box(0, 0, 100, 100), "Tumor")]})
    with pytest.warns(QpsegWarning, match="looks exhaustive"):
        partial = evaluate(t, p, tmp_path / "partial", mpp=1.0, eval_mpp=1.0,
                           truth_mode="partial", lesion_class="none")
    assert tumour(partial) == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "dice": 1.0, "iou": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error", QpsegWarning)  # exhaustive: no warning
        full = evaluate(t, p, tmp_path / "full", mpp=1.0, eval_mpp=1.0, lesion_class="none")
    assert full.truth_mode == "exhaustive"
    assert tumour(full) == pytest.approx(
        {"precision": 1600 / 10000, "recall": 1.0, "dice": 3200 / 11600, "iou": 1600 / 10000})
    cm = full.pixel.pooled().confusion
    assert cm.tolist() == [[0, 8400], [0, 1600]]
    # every CSV of scores and the report say which mode was used
    for name in ("per_slide.csv", "slides.csv", "summary.csv", "confusion.csv"):
        assert set(pd.read_csv(tmp_path / "full" / name).truth_mode) == {"exhaustive"}, name
        assert set(pd.read_csv(tmp_path / "partial" / name).truth_mode) == {"partial"}, name
    assert "exhaustive: unannotated pixels" in (tmp_path / "full" / "report.html").read_text(
        encoding="utf-8")


def test_two_squares_overlapping(tmp_path: Path) -> None:
    # truth 40 x 40 at (20, 20), prediction 40 x 40 at (40, 40): 20 x 20 = 400 px shared
    t, p = folders(tmp_path, {"a": [ann(box(20, 20, 60, 60), "Tumor")]},
                   {"a": [ann(box(40, 40, 80, 80), "Tumor")]})
    with pytest.warns(QpsegWarning, match="looks exhaustive"):
        partial = evaluate(t, p, mpp=1.0, eval_mpp=1.0, truth_mode="partial",
                           lesion_class="none")
    # partial: 1600 truth pixels, 400 hit, the 1200 predicted outside are not seen
    assert tumour(partial) == pytest.approx(
        {"precision": 1.0, "recall": 0.25, "dice": 800 / 2000, "iou": 0.25})
    full = evaluate(t, p, mpp=1.0, eval_mpp=1.0, lesion_class="none")
    assert tumour(full) == pytest.approx(
        {"precision": 0.25, "recall": 0.25, "dice": 800 / 3200, "iou": 400 / 2800})


def test_region_annotations_bound_exhaustive_truth(tmp_path: Path) -> None:
    # Region* says where the truth is exhaustive: outside it nothing is scored in either mode
    truth = [ann(box(0, 0, 50, 50), "Region*"), ann(box(0, 0, 20, 20), "Tumor")]
    t, p = folders(tmp_path, {"a": truth}, {"a": [ann(box(0, 0, 100, 100), "Tumor")]})
    full = evaluate(t, p, mpp=1.0, eval_mpp=1.0, lesion_class="none")
    assert tumour(full)["precision"] == pytest.approx(400 / 2500)


def benign_project(tmp_path: Path) -> Path:
    """Two 900 x 700 px slides at 0.5 µm/px: slide 0 holds one tumour, slide 1 is benign (its
    export holds no annotation); the prediction finds the tumour and one false positive of
    200 x 200 level-0 px on the benign slide."""
    proj = make_project(tmp_path / "proj", n_slides=2, width=900, height=700, mpp=0.5, seed=5)
    folder = proj.folder / "qpseg"
    write_geojson(proj.annotation_files[0], [ann(box(100, 100, 300, 300), "Tumor")])
    write_geojson(proj.annotation_files[1], [])
    (folder / "predictions").mkdir()
    e0, e1 = proj.entry_ids
    write_geojson(folder / "predictions" / f"{e0}.geojson",
                  [ann(box(100, 100, 300, 300), "Tumor", PROV)])
    write_geojson(folder / "predictions" / f"{e1}.geojson",
                  [ann(box(400, 300, 600, 500), "Tumor", PROV)])
    return proj.path


def test_benign_slide_with_a_known_false_positive(tmp_path: Path) -> None:
    path = benign_project(tmp_path)
    full = evaluate(path, path, tmp_path / "full", eval_mpp=2.0)
    assert [s.slide for s in full.slides] == ["slide_00.tif", "slide_01.tif"]
    benign = full.slides[1]
    # whole image at 2 µm/px (4 level-0 px per pixel): 225 x 175 pixels, the false positive
    # 50 x 50 of them
    assert benign.size == (225, 175)
    assert benign.confusion is not None
    assert benign.confusion.tolist() == [[225 * 175 - 2500, 2500], [0, 0]]
    lesions = pd.read_csv(tmp_path / "full" / "lesion_slides.csv")
    per = lesions.set_index("slide")
    assert per.loc["slide_01.tif", "n_fp"] == 1 and per.loc["slide_01.tif", "n_truth"] == 0
    assert per.loc["slide_00.tif", "n_detected"] == 1 and per.loc["slide_00.tif", "n_fp"] == 0
    assert per.loc["pooled", "n_fp"] == 1
    assert set(lesions.truth_mode) == {"exhaustive"}
    # Tumor pooled: 2500 px right on slide 0, 2500 px false positive on slide 1
    assert tumour(full)["precision"] == pytest.approx(0.5)

    with pytest.warns(QpsegWarning, match="looks exhaustive"):
        partial = evaluate(path, path, tmp_path / "partial", eval_mpp=2.0,
                           truth_mode="partial")
    assert [s.slide for s in partial.slides] == ["slide_00.tif"]
    assert [u.slide for u in partial.unmatched] == ["slide_01.tif"]
    assert partial.lesion is not None and partial.lesion.pooled_row()["n_fp"] == 0
    assert tumour(partial)["precision"] == pytest.approx(1.0)


def test_slide_with_only_unreviewed_ai_objects(tmp_path: Path) -> None:
    # The truth file holds only the AI's own object, unchanged and unlocked: it is left out.
    # Exhaustive: the slide is all-negative (the prediction is a false positive there);
    # partial: it is unmatched. Either way its left-out count is reported.
    ai = QuPathObject(geometry=box(0, 0, 40, 40), classification="Tumor",
                      metadata=dict(PROV), id="6f1c1b52-55a0-4d7e-9a43-2f6a8e1d0c11")
    t, p = folders(tmp_path, {"a": [ann(box(0, 0, 40, 40), "Tumor")], "b": [ai]},
                   {"a": [ann(box(0, 0, 40, 40), "Tumor", PROV)], "b": [ai]})
    for mode in ("exhaustive", "partial"):
        out = tmp_path / mode
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QpsegWarning)
            ev = evaluate(t, p, out, mpp=1.0, eval_mpp=1.0, truth_mode=mode)
        rows = pd.read_csv(out / "ai_objects.csv")
        assert rows[rows.slide == "b"].left_out.sum() == 1, mode
        assert ev.review.total("left_out") == 1
        scored = [s.slide for s in ev.slides]
        if mode == "exhaustive":
            assert scored == ["a", "b"]
            b = ev.slides[1]
            assert b.confusion is not None and b.confusion[0, 1] == 1600
            assert ev.lesion is not None and ev.lesion.pooled_row()["n_fp"] == 1
        else:
            assert scored == ["a"]
            assert [(u.slide, u.reason) for u in ev.unmatched] == [
                ("b", "truth holds only AI objects left out by --ai-objects")]


# ------------------------------------------------------------------- evaluation pixel size


def test_eval_mpp_defaults_to_the_predictions_provenance(tmp_path: Path) -> None:
    # level-0 0.25 µm/px; the model ran at 0.5 µm/px. Truth 20 x 20 level-0 px, prediction
    # shifted by 4 level-0 px: at 0.5 µm/px (2 level-0 px a pixel) 10 x 10 against 10 x 10
    # sharing 8 x 10, Dice 160 / 200.
    meta = {**PROV, "qpseg_mpp": "0.5", "qpseg_map_mpp": "0.5"}
    truth = [ann(box(0, 0, 40, 20), "Region*"), ann(box(0, 0, 20, 20), "Tumor")]
    t, p = folders(tmp_path, {"a": truth}, {"a": [ann(box(4, 0, 24, 20), "Tumor", meta)]})
    assert provenance_mpp(p / "a.geojson") == 0.5
    ev = evaluate(t, p, tmp_path / "out", mpp=0.25, lesion_class="none")
    assert ev.eval_mpp == 0.5 and "provenance" in ev.eval_mpp_source
    assert tumour(ev)["dice"] == pytest.approx(0.8)
    assert pd.read_csv(tmp_path / "out" / "slides.csv").eval_mpp.tolist() == [0.5]
    # no provenance: the documented fallback
    write_geojson(p / "a.geojson", [ann(box(4, 0, 24, 20), "Tumor")])
    ev = evaluate(t, p, mpp=0.25, lesion_class="none")
    assert ev.eval_mpp == 2.0 and "default" in ev.eval_mpp_source


def test_large_rasters_are_scored_in_tiles(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Same confusion whether the raster is scored whole or tile by tile.
    truth = [ann(box(10, 10, 130, 90), "Tumor"), ann(box(150, 20, 190, 60), "Stroma"),
             ann(box(100, 100, 120, 120), "Ignore*")]
    pred = [ann(box(20, 5, 140, 95), "Tumor"), ann(box(140, 30, 200, 70), "Stroma"),
            ann(box(0, 150, 30, 200), "Tumor")]
    t, p = folders(tmp_path, {"a": truth}, {"a": pred})
    whole = evaluate(t, p, mpp=1.0, eval_mpp=1.0)
    assert not any("in tiles" in n for n in whole.slides[0].notes)
    monkeypatch.setattr(scoring_module, "_FULL_RASTER_PIXELS", 5000)
    monkeypatch.setattr(raster_module, "_TILE", 32)
    tiled = evaluate(t, p, mpp=1.0, eval_mpp=1.0)
    assert any("in tiles" in n for n in tiled.slides[0].notes)
    np.testing.assert_array_equal(tiled.pixel.pooled().confusion,
                                  whole.pixel.pooled().confusion)
    # the bounding box of all objects (0, 5)-(200, 200), less the Ignore* square
    assert whole.pixel.pooled().confusion.sum() == 200 * 195 - 400


# ------------------------------------------------------------------- cells and instances


def app() -> typer.Typer:
    a = typer.Typer()
    a.command("evaluate")(evaluate_cmd)

    @a.command("noop")
    def _noop() -> None:
        pass

    return a


def test_cells_only_truth_is_pixel_truth_and_warns_without_predicted_instances(
        tmp_path: Path) -> None:
    # Two classified nuclei (cells whose nucleus is 10 x 10 px); the prediction is an
    # annotation over the first only: Nucleus Dice 2 * 100 / (200 + 100). Instance metrics
    # cannot score annotations: a warning says so (AJI 0).
    cells = [QuPathObject(geometry=g.buffer(3, join_style="mitre"), object_type="cell",
                          classification="Nucleus", nucleus_geometry=g)
             for g in (box(0, 0, 10, 10), box(20, 0, 30, 10))]
    t, p = folders(tmp_path, {"a": cells}, {"a": [ann(box(0, 0, 10, 10), "Nucleus")]})
    with pytest.warns(QpsegWarning, match="holds no detections or cells"):
        ev = evaluate(t, p, mpp=1.0, eval_mpp=1.0)
    assert ev.class_names == ("Background", "Nucleus")
    i = ev.class_names.index("Nucleus")
    assert float(ev.pixel.pooled().f1[i]) == pytest.approx(200 / 300)
    assert ev.instance is not None and ev.instance.pooled().aji == 0


def test_aji_pooled_and_per_image_mean(tmp_path: Path) -> None:
    # slide a: truth A, B; prediction P1 = half of A (IoU 0.5), P2 = B, P3 a spurious 10 x 10.
    #   AJI = (50 + 100) / (100 + 100 + 100) = 0.5
    # slide b: truth C, prediction C: AJI 1.  Pooled (150 + 100) / (300 + 100) = 0.625;
    # per-image mean (0.5 + 1) / 2 = 0.75.
    a, b_ = box(0, 0, 10, 10), box(20, 0, 30, 10)
    t, p = folders(tmp_path, {"a": [det(a), det(b_)], "b": [det(a)]},
                   {"a": [det(box(0, 0, 10, 5)), det(b_), det(box(50, 50, 60, 60))],
                    "b": [det(a)]})
    ev = evaluate(t, p, mpp=1.0, eval_mpp=1.0)
    assert ev.instance is not None
    assert [m.aji for m in ev.instance.per_slide] == pytest.approx([0.5, 1.0])
    assert ev.instance.pooled().aji == pytest.approx(0.625)
    assert ev.instance.image_mean("aji") == pytest.approx(0.75)
    res = CliRunner().invoke(app(), ["evaluate", "--truth", str(t), "--pred", str(p),
                                     "--out", str(tmp_path / "o"), "--mpp", "1", "--json"],
                             standalone_mode=False)
    assert res.exception is None, res.output
    data = json.loads(res.output)
    assert data["instance"]["aji_pooled"] == pytest.approx(0.625)
    assert data["instance"]["aji_image_mean"] == pytest.approx(0.75)
    assert data["truth_mode"] == "exhaustive"
    res = CliRunner().invoke(app(), ["evaluate", "--truth", str(t), "--pred", str(p),
                                     "--out", str(tmp_path / "o2"), "--mpp", "1"],
                             standalone_mode=False)
    assert "AJI 0.625 pooled over slides, 0.750 per-image mean" in res.output
    assert "truth mode: exhaustive" in res.output


# ------------------------------------------------------------------- the real nuclei fixture


def label_polygons(labels: np.ndarray) -> dict[int, BaseGeometry]:
    """Each label's pixels as the union of their unit squares (exact pixel-edge outlines)."""
    out: dict[int, BaseGeometry] = {}
    for v in np.unique(labels):
        if v == 0:
            continue
        m = np.zeros((labels.shape[0], labels.shape[1] + 2), dtype=np.int8)
        m[:, 1:-1] = labels == v
        step = np.diff(m, axis=1)
        r_on, c_on = np.nonzero(step == 1)
        _, c_off = np.nonzero(step == -1)
        out[int(v)] = union_all([box(c0, r, c1, r + 1)
                                 for r, c0, c1 in zip(r_on, c_on, c_off, strict=True)])
    return out


@pytest.mark.slow
def test_stardist_nuclei_at_their_own_resolution(image_fixtures: Path, tmp_path: Path) -> None:
    import tifffile
    from scipy import ndimage

    mask = tifffile.imread(image_fixtures / "stardist" / "mask2d.tif").astype(np.int64)
    # the prediction: every nucleus eroded by one pixel on its own (so it stays inside it)
    eroded = np.zeros_like(mask)
    for v in np.unique(mask)[1:]:
        eroded[ndimage.binary_erosion(mask == v)] = v
    a = np.bincount(mask.ravel())[1:]
    b = np.bincount(eroded.ravel(), minlength=a.size + 1)[1:]
    want_dice = 2 * b.sum() / (a.sum() + b.sum())  # B inside A: no false positive pixel
    want_aji = b.sum() / a.sum()  # each nucleus matched with its own eroded self
    meta = {**PROV, "qpseg_map_mpp": "0.5"}  # the fixture has no pixel size: say 0.5
    truth = [det(g, "Nucleus") for g in label_polygons(mask).values()]
    pred = [det(g, "Nucleus", meta=meta) for g in label_polygons(eroded).values()]
    t, p = folders(tmp_path, {"img2d": truth}, {"img2d": pred})
    ev = evaluate(t, p, tmp_path / "out", mpp=0.5)
    assert ev.eval_mpp == 0.5  # one evaluation pixel per image pixel
    i = ev.class_names.index("Nucleus")
    assert float(ev.pixel.pooled().f1[i]) == pytest.approx(want_dice, abs=1e-12)
    assert ev.instance is not None
    assert ev.instance.pooled().aji == pytest.approx(want_aji, abs=1e-9)
    assert ev.instance.per_slide[0].n_true == 125


def test_bad_truth_mode_is_a_config_error(tmp_path: Path) -> None:
    from qpseg.errors import ConfigError

    t, p = folders(tmp_path, {"a": [ann(box(0, 0, 4, 4), "Tumor")]},
                   {"a": [ann(box(0, 0, 4, 4), "Tumor")]})
    with pytest.raises(ConfigError, match="--truth-mode"):
        evaluate(t, p, mpp=1.0, truth_mode="complete")
    shutil.rmtree(t)
