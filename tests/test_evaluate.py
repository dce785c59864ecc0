"""qpseg evaluate: known answers on hand-built and generated slides, every input kind, errors."""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from PIL import Image
from shapely import union_all
from shapely.affinity import translate
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry
from typer.testing import CliRunner

from qpseg.cli.evaluate import evaluate as evaluate_cmd
from qpseg.errors import ConfigError, LabelError, QpsegError, QpsegWarning
from qpseg.evaluate import (
    PER_SLIDE_COLUMNS,
    SUMMARY_COLUMNS,
    bootstrap_ci,
    evaluate,
    load_input,
    match_inputs,
    read_label_mask,
)
from qpseg.qupath.geojson import QuPathObject, read_geojson, write_geojson
from qpseg.testing.projects import SyntheticProject, make_project


def ann(geom: BaseGeometry, cls: str | None) -> QuPathObject:
    return QuPathObject(geometry=geom, classification=cls)


def det(geom: BaseGeometry, kind: str = "detection", cls: str | None = None) -> QuPathObject:
    return QuPathObject(geometry=geom, object_type=kind, classification=cls)


def app() -> typer.Typer:
    a = typer.Typer()
    a.command("evaluate")(evaluate_cmd)

    @a.command("noop")
    def _noop() -> None:  # a second command keeps "evaluate" a named sub-command
        pass

    return a


def run_cli(args: list[str]) -> tuple[int | None, str, BaseException | None]:
    res = CliRunner().invoke(app(), ["evaluate", *args], standalone_mode=False)
    exc = res.exception if not isinstance(res.exception, SystemExit) else None
    return res.return_value, res.output, exc


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SyntheticProject:
    return make_project(tmp_path_factory.mktemp("proj"), n_slides=2, width=900, height=700,
                        mpp=0.5, seed=3)


def copy_project(project: SyntheticProject, dest: Path) -> Path:
    shutil.copytree(project.folder, dest)
    return dest / "project.qpproj"


# --------------------------------------------------------------------------------------------
# independent expected values (shapely areas)


def paint(objs: list[tuple[BaseGeometry, str]]) -> dict[str, BaseGeometry]:
    """Class -> visible geometry, smaller objects on top (ties: later on top)."""
    order = sorted(range(len(objs)), key=lambda i: (-objs[i][0].area, i))
    covered: BaseGeometry = Polygon()
    out: dict[str, list[BaseGeometry]] = {}
    for i in reversed(order):
        g, c = objs[i]
        out.setdefault(c, []).append(g.difference(covered))
        covered = union_all([covered, g])
    return {c: union_all(v) for c, v in out.items()}


def expected_scores(truth: dict[str, BaseGeometry], pred: dict[str, BaseGeometry],
                    labelled: BaseGeometry) -> dict[str, tuple[float, float]]:
    """Class -> (Dice, IoU) from exact areas inside the labelled area."""
    out = {}
    for c, t in truth.items():
        p = pred.get(c, Polygon()).intersection(labelled)
        tp = t.intersection(p).area
        fp, fn = p.area - tp, t.area - tp
        out[c] = (2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn))
    return out


# --------------------------------------------------------------------------------------------
# known answers


def test_grid_aligned_boxes_give_exact_dice(tmp_path: Path) -> None:
    # level-0 0.5 µm/px, evaluated at 2 µm/px: every edge is on a multiple of 4 px -> exact
    region = box(0, 0, 1600, 800)
    truth = [(box(0, 0, 400, 400), "Tumor"), (box(400, 0, 880, 400), "Stroma"),
             (box(1000, 400, 1200, 600), "Tumor"), (box(100, 500, 300, 700), "Necrosis")]
    # prediction: the first tumour shifted by (+40, +24), the second tumour removed
    pred = [(translate(truth[0][0], 40, 24), "Tumor"), truth[1], truth[3]]
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    write_geojson(tmp_path / "t" / "s1.geojson",
                  [ann(region, "Region*")] + [ann(g, c) for g, c in truth])
    write_geojson(tmp_path / "p" / "s1.geojson", [ann(g, c) for g, c in pred])
    ev = evaluate(tmp_path / "t", tmp_path / "p", tmp_path / "out", mpp=0.5, eval_mpp=2.0)

    t_cls = paint(truth)
    t_cls["Background"] = region.difference(union_all([g for g, _ in truth]))
    p_cls = paint(pred)
    p_cls["Background"] = region.difference(union_all([g for g, _ in pred]))
    want = expected_scores(t_cls, p_cls, region)
    df = pd.read_csv(tmp_path / "out" / "per_slide.csv")
    assert tuple(df.columns) == PER_SLIDE_COLUMNS
    for c, (dice, iou) in want.items():
        row = df[df.class_name == c].iloc[0]
        assert row.dice == pytest.approx(dice, abs=1e-12), c
        assert row.iou == pytest.approx(iou, abs=1e-12), c
        # pixel counts are exact areas / 16 (4 x 4 level-0 px per eval pixel)
        assert row.n_truth == pytest.approx(t_cls[c].area / 16)
    assert df[df.class_name == "Stroma"].iloc[0].dice < 1.0  # the shifted tumour covers it
    cm = pd.read_csv(tmp_path / "out" / "confusion.csv")
    pooled = cm[cm.slide == "pooled"]
    total = pooled["count"].sum()
    assert total == region.area / 16
    # lesions: two tumour lesions; the removed one (ITC, 100 µm side) missed
    les = pd.read_csv(tmp_path / "out" / "lesion_slides.csv")
    row = les[les.slide == "s1"].iloc[0]
    assert (row.n_truth, row.n_detected, row.n_fp) == (2, 1, 0)
    assert row.n_truth_itc == 1 and row.n_detected_itc == 0
    assert row.n_truth_micro == 1 and row.n_detected_micro == 1
    assert ev.lesion_class == "Tumor"


def test_lesion_categories_hand_built(tmp_path: Path) -> None:
    # 1 µm per level-0 pixel, evaluated at 4 µm/px
    region = box(0, 0, 4000, 4000)
    itc = box(3600, 3600, 3700, 3700)         # 100 µm side: 141 µm diagonal
    micro = box(2600, 200, 3100, 700)          # 500 µm side: 707 µm
    macro = box(200, 200, 1700, 1700)          # 1500 µm side: 2121 µm
    fp = box(3000, 2000, 3040, 2040)           # inside the region: a false positive
    ignored = box(3200, 3000, 3500, 3300)      # an Ignore* area: not labelled
    outside = box(3300, 3100, 3400, 3200)      # a prediction inside it: left out
    far = box(6000, 6000, 6100, 6100)          # beyond the labelled area's box: not drawn
    write_geojson(tmp_path / "truth.geojson",
                  [ann(region, "Region"), ann(itc, "Metastasis"), ann(micro, "Metastasis"),
                   ann(macro, "Metastasis"), ann(ignored, "Ignore")])
    write_geojson(tmp_path / "pred.geojson",
                  [ann(macro, "Metastasis"), ann(itc.buffer(-20, join_style="mitre"),
                                                  "Metastasis"),
                   ann(fp, "Metastasis"), ann(outside, "Metastasis"), ann(far, "Metastasis")])
    ev = evaluate(tmp_path / "truth.geojson", tmp_path / "pred.geojson", tmp_path / "out",
                  mpp=1.0, eval_mpp=4.0)
    assert ev.lesion_class == "Metastasis"
    lesions = pd.read_csv(tmp_path / "out" / "lesions.csv")
    truth = lesions[lesions.source == "truth"].sort_values("diameter_um")
    assert list(truth.category) == ["itc", "micro", "macro"]
    assert truth.diameter_um.tolist() == pytest.approx(
        [100 * math.sqrt(2), 500 * math.sqrt(2), 1500 * math.sqrt(2)])
    assert list(truth.hit) == [True, False, True]
    pred = lesions[lesions.source == "pred"]
    assert len(pred) == 3 and pred.hit.sum() == 2
    # level-0 boxes of the lesions are given for QuPath
    big = truth.iloc[-1]
    assert (big.qupath_x0, big.qupath_y0, big.qupath_x1, big.qupath_y1) == (200, 200, 1700, 1700)
    row = pd.read_csv(tmp_path / "out" / "lesion_slides.csv").iloc[0]
    assert (row.n_truth, row.n_detected, row.n_fp, row.n_pred_outside) == (3, 2, 1, 1)
    assert (row.sensitivity_itc, row.sensitivity_micro, row.sensitivity_macro) == (1, 0, 1)
    assert row.truth_category == "macro" and row.pred_category == "macro"


def test_synthetic_project_removed_and_shifted(project: SyntheticProject, tmp_path: Path) -> None:
    path = copy_project(project, tmp_path / "proj")
    pred_dir = path.parent / "qpseg" / "predictions"
    pred_dir.mkdir()
    expected = []
    for eid, slide in zip(project.entry_ids, project.slides, strict=True):
        regions = [(r.geometry, r.class_name) for r in slide.regions]
        pred = [(translate(regions[0][0], 12, -8), regions[0][1]), *regions[2:]]  # 1 removed
        write_geojson(pred_dir / f"{eid}.geojson", [ann(g, c) for g, c in pred])
        labelled = union_all([g for g, _ in regions])
        expected.append(expected_scores(paint(regions), paint(pred), labelled))
    ev = evaluate(path, path, tmp_path / "out", eval_mpp=0.5, truth_mode="partial")
    assert not ev.failed and not ev.unmatched
    df = pd.read_csv(tmp_path / "out" / "per_slide.csv")
    for slide, want in zip(project.slides, expected, strict=True):
        name = slide.path.name
        for c, (dice, iou) in want.items():
            row = df[(df.slide == name) & (df.class_name == c)].iloc[0]
            # rasterising at 0.5 µm/px: a fraction of a pixel along every edge
            assert row.dice == pytest.approx(dice, abs=0.01), (name, c)
            assert row.iou == pytest.approx(iou, abs=0.01), (name, c)
    assert any(d < 0.95 for w in expected for d, _ in w.values())  # the edits matter
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert tuple(summary.columns) == SUMMARY_COLUMNS
    tum = summary[(summary.level == "pixel") & (summary.class_name == "Tumor")
                  & (summary.metric == "dice")].iloc[0]
    vals = df[df.class_name == "Tumor"].dice.to_numpy()
    assert tum.slide_mean == pytest.approx(vals.mean())
    assert tum.slide_std == pytest.approx(vals.std(ddof=1))
    assert tum.slide_min <= tum.ci_low <= tum.slide_mean <= tum.ci_high <= tum.slide_max
    pooled = ev.pixel.pooled()
    assert tum.pooled == pytest.approx(float(pooled.f1[ev.class_names.index("Tumor")]))


def test_perfect_prediction_through_cli(project: SyntheticProject, tmp_path: Path) -> None:
    path = copy_project(project, tmp_path / "proj")
    shutil.copytree(path.parent / "qpseg" / "annotations", path.parent / "qpseg" / "predictions")
    out = tmp_path / "out"
    code, output, exc = run_cli(["--truth", str(path), "--pred", str(path), "--out", str(out)])
    assert exc is None, output
    assert code == 0
    for name in ("per_slide.csv", "slides.csv", "summary.csv", "confusion.csv", "lesions.csv",
                 "lesion_slides.csv", "unmatched.csv", "failed.csv", "report.html"):
        assert (out / name).is_file(), name
    assert not (out / "instances.csv").exists()  # no detections or cells anywhere
    df = pd.read_csv(out / "per_slide.csv")
    present = df[df.n_truth > 0]
    assert len(present) == 8  # exhaustive by default: Background has truth pixels too
    assert (present.dice == 1).all() and (present.iou == 1).all()
    assert (df.truth_mode == "exhaustive").all()
    assert (df.fp == 0).all() and (df.fn == 0).all()
    slides = pd.read_csv(out / "slides.csv")
    assert list(slides.entry_id) == list(project.entry_ids)
    assert (slides.miou == 1).all() and (slides.eval_mpp == 2.0).all()
    summary = pd.read_csv(out / "summary.csv")
    assert (summary[summary.metric == "dice"].dropna(subset=["pooled"]).pooled == 1).all()
    assert pd.read_csv(out / "unmatched.csv").empty
    # the report is self-contained: inline SVG charts and the error maps over the slides
    # (the truth is a project whose images are found: JPEG of the tissue under the map)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/jpeg;base64,") == 2
    svgs = html.split("<svg")[1:]
    assert len(svgs) == 5  # Dice and IoU strips, confusion, Dice per slide, lesion FROC
    for s in svgs:
        ET.fromstring("<svg" + s.split("</svg>")[0] + "</svg>")  # well-formed
    assert "http" not in html.replace("http://www.w3.org/2000/svg", "")


def test_project_against_geojson_folder_with_unmatched(project: SyntheticProject,
                                                       tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    # matched by image name (with its extension); a stranger; the second slide has no file
    shutil.copy(project.annotation_files[0], pred / f"{project.slides[0].path.name}.geojson")
    shutil.copy(project.annotation_files[1], pred / "unknown_slide.geojson")
    out = tmp_path / "out"
    code, output, exc = run_cli(["--truth", str(project.path), "--pred", str(pred),
                                 "--out", str(out)])
    assert exc is None and code == 0, output
    um = pd.read_csv(out / "unmatched.csv").sort_values("side")
    assert list(um.side) == ["pred", "truth"]
    assert um.iloc[0].slide == "unknown_slide" and um.iloc[0].reason == "no matching truth"
    assert um.iloc[1].slide == project.slides[1].path.name
    assert "unmatched" in output
    assert list(pd.read_csv(out / "slides.csv").slide) == [project.slides[0].path.name]


def test_matching_rules(tmp_path: Path, project: SyntheticProject) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    for name in ("2.geojson", "slide_00.geojson", "other.svs.geojson", "run_metadata.json",
                 "2.metadata.json"):
        (folder / name).write_text("{}")
    inp = load_input(folder, "pred")
    assert inp.kind == "geojson"
    assert sorted(i.name for i in inp.items) == ["2", "other.svs", "slide_00"]
    truth = load_input(project.path, "truth")
    pairs, unmatched = match_inputs(truth, inp)
    # entry 1 by image name without extension, entry 2 by its id
    assert [(t.entry_id, p.name) for t, p in pairs] == [(1, "slide_00"), (2, "2")]
    assert [(u.side, u.slide) for u in unmatched] == [("pred", "other.svs")]


def test_geojson_folders_need_mpp_and_nothing_matching_fails(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    write_geojson(tmp_path / "t" / "a.geojson", [ann(box(0, 0, 40, 40), "Tumor")])
    write_geojson(tmp_path / "p" / "b.geojson", [ann(box(0, 0, 40, 40), "Tumor")])
    with pytest.raises(ConfigError, match="--mpp"):
        evaluate(tmp_path / "t", tmp_path / "p")
    with pytest.raises(ConfigError, match="nothing matches"):
        evaluate(tmp_path / "t", tmp_path / "p", mpp=0.5)
    _, _, exc = run_cli(["--truth", str(tmp_path / "t"), "--pred", str(tmp_path / "p"),
                         "--out", str(tmp_path / "o"), "--mpp", "0.5"])
    assert isinstance(exc, ConfigError) and "nothing matches" in str(exc)
    with pytest.raises(ConfigError, match="not found"):
        evaluate(tmp_path / "missing", tmp_path / "p", mpp=0.5)
    assert not (tmp_path / "o").exists()  # nothing written
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no GeoJSON"):
        evaluate(tmp_path / "t", tmp_path / "empty", mpp=0.5)


def test_classes_disagree(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    write_geojson(tmp_path / "t" / "a.geojson",
                  [ann(box(0, 0, 80, 80), "Tumor"), ann(box(80, 0, 160, 80), "Stroma")])
    write_geojson(tmp_path / "p" / "a.geojson",
                  [ann(box(0, 0, 80, 80), "Tumour"), ann(box(80, 0, 160, 80), "Stroma")])
    with pytest.raises(LabelError, match=r"classes disagree.*'Tumour'"):
        evaluate(tmp_path / "t", tmp_path / "p", mpp=0.5, eval_mpp=0.5)
    # with explicit classes the unknown prediction class counts as Background (warned)
    with pytest.warns(UserWarning, match="Tumour"):
        ev = evaluate(tmp_path / "t", tmp_path / "p", mpp=0.5, eval_mpp=0.5,
                      classes=["Tumor", "Stroma"])
    m = ev.pixel.per_slide[0]
    assert ev.class_names == ("Background", "Tumor", "Stroma")
    assert m.recall.tolist()[1:] == [0.0, 1.0]
    assert int(m.confusion[1, 0]) == 80 * 80  # all Tumor truth predicted Background


def test_failed_slide_listed_others_scored(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    for name in ("a", "b"):
        write_geojson(tmp_path / "t" / f"{name}.geojson", [ann(box(0, 0, 80, 80), "Tumor")])
    write_geojson(tmp_path / "p" / "a.geojson", [ann(box(0, 0, 80, 80), "Tumor")])
    (tmp_path / "p" / "b.geojson").write_text("{not json", encoding="utf-8")
    code, output, exc = run_cli(["--truth", str(tmp_path / "t"), "--pred", str(tmp_path / "p"),
                                 "--out", str(tmp_path / "o"), "--mpp", "1", "--no-report"])
    assert exc is None and code == 1, output
    failed = pd.read_csv(tmp_path / "o" / "failed.csv")
    assert list(failed.slide) == ["b"] and "not valid JSON" in failed.reason[0]
    assert list(pd.read_csv(tmp_path / "o" / "slides.csv").slide) == ["a"]
    assert not (tmp_path / "o" / "report.html").exists()
    # every slide failing is an error
    (tmp_path / "p" / "a.geojson").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(QpsegError, match="no slide could be scored"):
        evaluate(tmp_path / "t", tmp_path / "p", mpp=1.0)


def test_truth_without_labels_is_unmatched(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    write_geojson(tmp_path / "t" / "a.geojson", [ann(box(0, 0, 80, 80), "Tumor")])
    write_geojson(tmp_path / "t" / "b.geojson", [ann(box(0, 0, 80, 80), None),
                                                 ann(box(0, 0, 80, 80), "Ignore*")])
    for name in ("a", "b"):
        write_geojson(tmp_path / "p" / f"{name}.geojson", [ann(box(0, 0, 80, 80), "Tumor")])
    ev = evaluate(tmp_path / "t", tmp_path / "p", mpp=1.0, eval_mpp=1.0, truth_mode="partial")
    assert [s.slide for s in ev.slides] == ["a"]
    assert [(u.slide, u.reason) for u in ev.unmatched] == [
        ("b", "truth has no labelled annotations or instances")]


def test_ignore_and_unlabelled_pixels_are_not_scored(tmp_path: Path) -> None:
    # region 100x100 px, a tumour 40x40 inside, Ignore* over part of the tumour and over
    # part of the background, where a predicted lesion lies
    truth = [ann(box(0, 0, 100, 100), "Region*"), ann(box(0, 0, 40, 40), "Tumor"),
             ann(box(0, 0, 20, 20), "Ignore*"), ann(box(60, 60, 90, 90), "Ignore*")]
    pred = [ann(box(0, 0, 40, 40), "Tumor"), ann(box(70, 70, 80, 80), "Tumor")]
    write_geojson(tmp_path / "t.geojson", truth)
    write_geojson(tmp_path / "p.geojson", pred)
    ev = evaluate(tmp_path / "t.geojson", tmp_path / "p.geojson", mpp=1.0, eval_mpp=1.0)
    m = ev.pixel.per_slide[0]
    assert m.n_pixels == 100 * 100 - 20 * 20 - 30 * 30
    assert m.confusion.tolist() == [[100 * 100 - 40 * 40 - 30 * 30, 0], [0, 40 * 40 - 20 * 20]]
    assert ev.lesion is not None and ev.lesion.per_slide[0].n_pred_outside == 1


def test_label_mask_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=(60, 80)).astype(np.uint8)
    truth[:10] = 255  # unlabelled rows
    pred = truth.copy()
    pred[10:30, :40] = 2
    pred[:10] = 0
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    Image.fromarray(truth).save(tmp_path / "t" / "s1.png")
    Image.fromarray(pred).save(tmp_path / "p" / "s1_labels.png")
    ev = evaluate(tmp_path / "t", tmp_path / "p", tmp_path / "out", mask_mpp=2.0)
    from sklearn.metrics import confusion_matrix, f1_score

    valid = truth != 255
    ref = confusion_matrix(truth[valid], pred[valid], labels=[0, 1, 2])
    assert ev.class_names == ("Background", "class 1", "class 2")
    assert ev.pixel.per_slide[0].confusion.tolist() == ref.tolist()
    f1 = f1_score(truth[valid], pred[valid], labels=[0, 1, 2], average=None)
    df = pd.read_csv(tmp_path / "out" / "per_slide.csv")
    assert df.f1.to_numpy() == pytest.approx(f1)
    # named classes: index 1 = the first name
    with pytest.warns(QpsegWarning, match="pixel size is unknown"):
        ev2 = evaluate(tmp_path / "t", tmp_path / "p", classes=["Tumor", "Stroma"])
    assert ev2.class_names == ("Background", "Tumor", "Stroma")
    assert ev2.pixel.per_slide[0].confusion.tolist() == ref.tolist()
    assert ev2.lesion is None  # no pixel size: lesion metrics skipped
    assert "pixel size unknown" in ev2.slides[0].notes[0]


def test_geojson_truth_against_mask_prediction(tmp_path: Path) -> None:
    # truth in level-0 px at 0.5 µm/px; prediction mask at 2 µm/px (4 level-0 px per pixel)
    write_geojson(tmp_path / "a.geojson",
                  [ann(box(0, 0, 400, 400), "Region*"), ann(box(0, 0, 200, 200), "Tumor")])
    mask = np.zeros((100, 100), np.uint8)
    mask[:50, :60] = 1  # 10 columns too wide
    (tmp_path / "p").mkdir()
    Image.fromarray(mask).save(tmp_path / "p" / "a.png")
    with pytest.raises(ConfigError, match="--classes"):
        evaluate(tmp_path / "a.geojson", tmp_path / "p", mpp=0.5)
    ev = evaluate(tmp_path / "a.geojson", tmp_path / "p", mpp=0.5, mask_mpp=2.0,
                  classes=["Tumor"])
    m = ev.pixel.per_slide[0]
    assert m.confusion.tolist() == [[100 * 100 - 2500 - 500, 500], [0, 2500]]
    assert ev.lesion is not None and ev.lesion.per_slide[0].mpp == 2.0


def test_instance_masks_stardist(image_fixtures: Path, tmp_path: Path) -> None:
    mask = read_label_mask(image_fixtures / "stardist" / "mask2d.tif")
    assert mask.shape == (512, 512) and len(np.unique(mask)) == 126
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    (tmp_path / "q").mkdir()
    shutil.copy(image_fixtures / "stardist" / "mask2d.tif", tmp_path / "t" / "img_instances.tif")
    shutil.copy(image_fixtures / "stardist" / "mask2d.tif", tmp_path / "p" / "img_instances.tif")
    perturbed = mask.copy()
    ids = [i for i in np.unique(mask) if i]
    perturbed[mask == ids[0]] = 0          # one nucleus missed
    perturbed[mask == ids[1]] = ids[2]     # two nuclei merged into one
    Image.fromarray(perturbed.astype(np.uint16)).save(tmp_path / "q" / "img_instances.png")
    ev = evaluate(tmp_path / "t", tmp_path / "p", tmp_path / "out")
    row = pd.read_csv(tmp_path / "out" / "instances.csv").iloc[0]
    assert (row.n_true, row.n_pred, row.tp_50, row.fp_50, row.fn_50) == (125, 125, 125, 0, 0)
    assert row.aji == 1 and row.pq == 1 and row["map"] == 1
    assert ev.pixel.per_slide == []  # instance masks only
    ev2 = evaluate(tmp_path / "t", tmp_path / "q")
    assert ev2.instance is not None
    r = ev2.instance.per_slide[0]
    assert (r.n_true, r.n_pred) == (125, 123)
    # the merged instance matches the larger of its two nuclei (IoU = its share of the union,
    # > 0.5 unless both are equal); the other 122 are untouched
    a1, a2 = int((mask == ids[1]).sum()), int((mask == ids[2]).sum())
    assert r.at(0.5)["tp"] == 122 + (a1 != a2)
    assert (r.at(0.5)["fn"], r.at(0.5)["fp"]) == (125 - r.at(0.5)["tp"], 123 - r.at(0.5)["tp"])
    assert r.aji < 1


def test_instances_from_cells_and_detections(tmp_path: Path) -> None:
    # truth: three 10x10 nuclei as cells (the cell outline is larger); prediction: one exact,
    # one shifted by half its width (IoU 1/3), one missing, one false positive
    n = [box(10, 10, 20, 20), box(40, 10, 50, 10 + 10), box(70, 10, 80, 20)]
    truth = [QuPathObject(geometry=g.buffer(4), object_type="cell", nucleus_geometry=g)
             for g in n]
    truth.append(ann(box(0, 0, 96, 96), "Region*"))
    pred = [det(n[0]), det(translate(n[1], 5, 0)), det(box(10, 60, 20, 70)),
            det(box(300, 300, 310, 310))]  # the last outside the region: not scored
    write_geojson(tmp_path / "t.geojson", truth)
    write_geojson(tmp_path / "p.geojson", pred)
    ev = evaluate(tmp_path / "t.geojson", tmp_path / "p.geojson", tmp_path / "out", mpp=0.25)
    row = pd.read_csv(tmp_path / "out" / "instances.csv").iloc[0]
    assert (row.n_true, row.n_pred, row.tp_50, row.fp_50, row.fn_50) == (3, 3, 1, 2, 2)
    # AJI by hand: C = 100 + 50, U = 100 + 150 + 100 (missed) + 100 (unused FP) = 450
    assert row.aji == pytest.approx(150 / 450)
    assert row.f1_50 == pytest.approx(1 / 3)
    assert row.pq == pytest.approx(1 / 3)  # sum IoU of matches / (TP + FP/2 + FN/2)
    assert row["map"] == pytest.approx(1 / 5)  # TP/(TP+FP+FN) = 1/5 at every threshold
    assert ev.pixel.per_slide[0].n_pixels == 12 * 12  # Region* only, 8 level-0 px per pixel


def test_bootstrap_ci() -> None:
    assert bootstrap_ci([0.7, 0.7, 0.7]) == (pytest.approx(0.7), pytest.approx(0.7))
    assert all(math.isnan(v) for v in bootstrap_ci([0.5, math.nan]))
    vals = np.random.default_rng(1).uniform(size=40)
    lo, hi = bootstrap_ci(vals, seed=3)
    assert bootstrap_ci(vals, seed=3) == (lo, hi)
    assert lo < vals.mean() < hi
    se = vals.std(ddof=1) / math.sqrt(vals.size)
    # close to the normal approximation for a mean of 40 uniform values
    assert lo == pytest.approx(vals.mean() - 1.96 * se, abs=0.5 * se)
    assert hi == pytest.approx(vals.mean() + 1.96 * se, abs=0.5 * se)


def test_read_label_mask_rejects_non_masks(tmp_path: Path, image_fixtures: Path) -> None:
    with pytest.raises(LabelError, match="colour image"):
        read_label_mask(image_fixtures / "skimage" / "ihc.png")
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(LabelError, match="cannot read"):
        read_label_mask(tmp_path / "x.png")
    grey = np.dstack([np.arange(12, dtype=np.uint8).reshape(3, 4)] * 3)
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert read_label_mask(tmp_path / "g.png").tolist() == grey[..., 0].tolist()


def test_predictions_as_detections_paint_pixels(tmp_path: Path) -> None:
    write_geojson(tmp_path / "t.geojson", [ann(box(0, 0, 64, 64), "Tumor")])
    write_geojson(tmp_path / "p.geojson", [det(box(0, 0, 32, 64), cls="Tumor")])
    ev = evaluate(tmp_path / "t.geojson", tmp_path / "p.geojson", mpp=1.0, eval_mpp=1.0,
                  instances=False)
    assert ev.pixel.per_slide[0].recall[1] == pytest.approx(0.5)
    assert ev.instance is None
    read_geojson(tmp_path / "p.geojson")


def test_cli_flags_json_and_switches(tmp_path: Path) -> None:
    import json

    truth = [ann(box(0, 0, 96, 96), "Region*"), ann(box(0, 0, 48, 48), "Tumor"),
             det(box(60, 60, 70, 70), "cell")]
    pred = [ann(box(0, 0, 48, 40), "Tumor"), det(box(60, 60, 70, 70))]
    write_geojson(tmp_path / "t.geojson", truth)
    write_geojson(tmp_path / "p.geojson", pred)
    base = ["--truth", str(tmp_path / "t.geojson"), "--pred", str(tmp_path / "p.geojson"),
            "--mpp", "1", "--eval-mpp", "1"]
    code, output, exc = run_cli([*base, "--out", str(tmp_path / "a"), "--json"])
    assert exc is None and code == 0, output
    data = json.loads(output)
    assert data["pixel"]["dice"]["Tumor"] == pytest.approx(2 * 40 / 88)
    assert data["lesion"]["n_detected"] == 1 and data["instance"]["aji_pooled"] == 1
    code, output, exc = run_cli([*base, "--out", str(tmp_path / "b"), "--json",
                                 "--lesion-class", "none", "--no-instances", "--seed", "7"])
    assert exc is None and code == 0, output
    data = json.loads(output)
    assert "lesion" not in data and "instance" not in data
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "ai_objects.csv", "confusion.csv", "failed.csv", "per_slide.csv", "report.html",
        "slides.csv", "summary.csv", "unmatched.csv"]
    _, _, exc = run_cli([*base, "--out", str(tmp_path / "c"), "--lesion-class", "Stroma"])
    assert isinstance(exc, ConfigError) and "Stroma" in str(exc)
    _, _, exc = run_cli([*base, "--out", str(tmp_path / "c"), "--eval-mpp", "-1"])
    assert isinstance(exc, ConfigError) and "--eval-mpp" in str(exc)


def test_infer_side_outputs_are_not_masks() -> None:
    from qpseg.evaluation.inputs import _mask_stem

    assert _mask_stem("4.heatmap.ome.tif") is None
    assert _mask_stem("4.overlay.png") is None
    assert _mask_stem("4.png") == ("4", "class")


def test_worker_processes_give_the_same_results(tmp_path: Path) -> None:
    """Slides scored in two spawned processes: identical CSVs, the failed slide listed, and
    a worker's reader warning said in the parent."""
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    rng = np.random.default_rng(3)
    for s in range(3):
        centres = rng.uniform(20, 180, (12, 2))
        truth = [ann(box(0, 0, 200, 200), "Region*"), ann(box(50, 50, 120, 140), "Tumor")]
        truth += [det(Polygon(box(x - 5, y - 5, x + 5, y + 5)), "cell") for x, y in centres]
        pred = [ann(box(60 + 5 * s, 50, 130, 140), "Tumor")]
        pred += [det(box(x - 4, y - 5 + s, x + 5, y + 5)) for x, y in centres[s:]]
        write_geojson(tmp_path / "t" / f"s{s}.geojson", truth)
        write_geojson(tmp_path / "p" / f"s{s}.geojson", pred)
    data = json.loads((tmp_path / "p" / "s1.geojson").read_text(encoding="utf-8"))
    data["features"].insert(0, {"type": "Feature", "geometry": 7})  # unreadable: a warning
    (tmp_path / "p" / "s1.geojson").write_text(json.dumps(data), encoding="utf-8")
    write_geojson(tmp_path / "t" / "bad.geojson", [ann(box(0, 0, 80, 80), "Tumor")])
    (tmp_path / "p" / "bad.geojson").write_text("{not json", encoding="utf-8")

    one = evaluate(tmp_path / "t", tmp_path / "p", tmp_path / "o1", mpp=0.5, report=False)
    with pytest.warns(Warning, match="s1.geojson: feature 0: geometry is a number"):
        two = evaluate(tmp_path / "t", tmp_path / "p", tmp_path / "o2", mpp=0.5,
                       report=False, workers=2)
    assert [f.slide for f in two.failed] == ["bad"] and len(two.slides) == 3
    for name in ("per_slide.csv", "slides.csv", "summary.csv", "instances.csv", "lesions.csv",
                 "failed.csv", "confusion.csv"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes(), name
    assert {k: v for k, v in one.summary().items() if k != "files"} == {
        k: v for k, v in two.summary().items() if k != "files"}
    with pytest.raises(ConfigError, match="--workers"):
        evaluate(tmp_path / "t", tmp_path / "p", mpp=0.5, workers=-1)


# --------------------------------------------------------------------------------------------
# pixel size: the slide's own, else the project's, else --mpp; --mpp-override replaces


@pytest.fixture(scope="module")
def project_0499(tmp_path_factory: pytest.TempPathFactory) -> SyntheticProject:
    """One slide whose own pixel size is 0.499 µm/px, a truth export and a prediction."""
    p = make_project(tmp_path_factory.mktemp("p0499"), n_slides=1, width=2000, height=1000,
                     mpp=0.499, annotations=False)
    eid = p.entry_ids[0]
    for sub, dx in (("annotations", 0), ("predictions", 40)):
        (p.folder / "qpseg" / sub).mkdir(parents=True, exist_ok=True)
        write_geojson(p.folder / "qpseg" / sub / f"{eid}.geojson",
                      [ann(box(dx, 0, 1996 + dx, 998), "Tumor")] if sub == "predictions" else
                      [ann(box(0, 0, 1996, 998), "Region*"), ann(box(0, 0, 998, 998), "Tumor")])
    return p


def test_the_slides_own_pixel_size_wins_over_mpp(project_0499: SyntheticProject,
                                                  tmp_path: Path) -> None:
    """--mpp 0.5 for a slide that says 0.499: the slide's value is used (as import-project
    does). The raster spans the slide's 2000 px (the shifted prediction reaches its edge):
    2000 / (2 / 0.499) = 499 px, not 2000 / 4 = 500. --mpp was used first before, scoring
    every project slide at the wrong scale without a word."""
    p = project_0499
    with pytest.warns(QpsegWarning, match=r"--mpp 0.5 is not used.*--mpp-override"):
        ev = evaluate(p.path, p.path, tmp_path / "o", mpp=0.5, eval_mpp=2.0, report=False)
    [s] = ev.slides
    assert (s.base_mpp, s.mpp_source, s.mpp_replaced) == (pytest.approx(0.499), "slide", None)
    assert s.size == (499, 250)
    row = pd.read_csv(tmp_path / "o" / "slides.csv").iloc[0]
    assert row.base_mpp == pytest.approx(0.499) and row.mpp_source == "slide"


def test_mpp_override_replaces_the_slides_pixel_size(project_0499: SyntheticProject,
                                                     tmp_path: Path) -> None:
    p = project_0499
    ev = evaluate(p.path, p.path, tmp_path / "o", mpp=0.5, mpp_override=True, eval_mpp=2.0,
                  report=False)
    [s] = ev.slides
    assert (s.base_mpp, s.mpp_source, s.mpp_replaced) == (0.5, "override",
                                                          pytest.approx(0.499))
    assert s.size == (500, 250)
    code, output, exc = run_cli(["--truth", str(p.path), "--pred", str(p.path), "--out",
                                 str(tmp_path / "c"), "--mpp", "0.5", "--mpp-override",
                                 "--no-report"])
    assert exc is None and code == 0, output
    assert "pixel size replaced: slide_00.tif: 0.499 -> 0.5 µm/px (--mpp-override)" in \
        " ".join(output.split())
    with pytest.raises(ConfigError, match="--mpp-override needs --mpp"):
        evaluate(p.path, p.path, mpp_override=True)


@pytest.mark.parametrize("value", [0.001, 352.8, math.nan])
def test_implausible_pixel_sizes_are_refused_by_the_one_rule(tmp_path: Path,
                                                             value: float) -> None:
    """--mpp, --eval-mpp and --mask-mpp are checked by slide.check_mpp (0.01..100 µm/px):
    352.8 (a 72-dpi tag) passed the old check (anything up to 10⁴)."""
    write_geojson(tmp_path / "t.geojson", [ann(box(0, 0, 40, 40), "Tumor")])
    for option in ("mpp", "eval_mpp", "mask_mpp"):
        with pytest.raises(ConfigError, match=f"--{option.replace('_', '-')}: .*plausible"):
            evaluate(tmp_path / "t.geojson", tmp_path / "t.geojson",
                     **{"mpp": 0.5, option: value})  # type: ignore[arg-type]


def test_report_shows_the_ai_object_counts_and_policy(tmp_path: Path) -> None:
    """report.html lists, per class, the objects qpseg wrote that the truth holds: by review
    status, kept and left out, and the --ai-objects policy (as ai_objects.csv has them)."""
    import html as html_mod
    import uuid

    mark = {"qpseg_model": "tiny_unet", "qpseg_run": "r1"}
    p1 = QuPathObject(box(0, 0, 100, 100), classification="Stroma", id=str(uuid.uuid4()),
                      metadata=dict(mark))
    p2 = QuPathObject(box(200, 0, 300, 100), classification="Tumor", id=str(uuid.uuid4()),
                      metadata=dict(mark))
    p3 = QuPathObject(box(400, 0, 500, 100), classification="Tumor", id=str(uuid.uuid4()),
                      metadata=dict(mark))
    reshaped = QuPathObject(box(200, 0, 320, 100), classification="Tumor", id=p2.id,
                            metadata=dict(mark))
    locked = QuPathObject(p3.geometry, classification="Tumor", id=p3.id, metadata=dict(mark),
                          is_locked=True)
    own = [ann(box(0, 200, 100, 300), "Tumor"), ann(box(0, 400, 100, 500), "Stroma")]
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    write_geojson(tmp_path / "t" / "s.geojson", [p1, reshaped, locked, *own])
    write_geojson(tmp_path / "p" / "s.geojson", [p1, p2, p3])
    ev = evaluate(tmp_path / "t", tmp_path / "p", tmp_path / "o", mpp=0.5, eval_mpp=2.0)
    page = html_mod.unescape((tmp_path / "o" / "report.html").read_text(encoding="utf-8"))
    section = page.split("<h2>AI objects in the truth</h2>")[1].split("<h2>")[0]
    assert "--ai-objects unreviewed-out" in section
    cells = [[c.split("</td>")[0] for c in row.split("<td>")[1:]]
             for row in section.split("<tr>")[2:]]
    # class, type, unreviewed, accepted, edited, unproven, kept, left out
    assert cells == [["Stroma", "annotation", "1", "0", "0", "0", "0", "1"],
                     ["Tumor", "annotation", "0", "1", "1", "0", "2", "0"],
                     ["<b>all</b>", "", "1", "1", "1", "0", "2", "1"]]
    assert "unreviewed-out: 2 kept, 1 left out" in page
    csv = pd.read_csv(tmp_path / "o" / "ai_objects.csv")
    assert list(csv.kept) == [0, 2] and list(csv.left_out) == [1, 0]
    assert ev.review.total("left_out") == 1
    # the policy the user chose is the one shown
    evaluate(tmp_path / "t", tmp_path / "p", tmp_path / "o2", mpp=0.5, eval_mpp=2.0,
             ai_objects="all-in")
    page = html_mod.unescape((tmp_path / "o2" / "report.html").read_text(encoding="utf-8"))
    assert "--ai-objects all-in: every object qpseg wrote counts as truth" in page
    assert "all-in: 3 kept, 0 left out" in page
