"""report.html: slides by image name, the model line and its training split, error maps over
the tissue with a colour per class and outcome, and the figures a paper would show."""

from __future__ import annotations

import html as html_mod
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from shapely.affinity import translate
from shapely.geometry import box

from qpseg.evaluate import evaluate
from qpseg.evaluation.raster import _overlay_codes
from qpseg.metrics.lesion import LesionAccumulator, lesion_metrics
from qpseg.models.package import PackageConfig
from qpseg.qupath.geojson import QuPathObject, read_geojson, write_geojson
from qpseg.report import (
    MAP_MIN_SIDE,
    error_map_image,
    froc_points,
    outcome_colors,
    render_report,
)
from qpseg.testing.projects import SyntheticProject, make_project

SHA = "ab" * 32


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SyntheticProject:
    return make_project(tmp_path_factory.mktemp("proj"), n_slides=2, width=900, height=700,
                        mpp=0.5, seed=3)


def _package(folder: Path, train: list[str], val: list[str]) -> Path:
    cfg = PackageConfig(
        architecture="tiny_unet", architecture_kwargs={}, class_names=("Background", "Tumor"),
        class_colors=((255, 255, 255), (200, 0, 0)), ignore_index=255, mpp=2.0, tile_px=64,
        mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), qpseg_version="0",
        training={"split": {"train": train, "val": val, "test": []}}, weights_sha256=SHA)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_json()), encoding="utf-8")
    return folder


def _predictions(project: SyntheticProject, dest: Path, *, shift: float = 0.0) -> Path:
    """The project's annotations as qpseg predictions (provenance metadata) in a copy of the
    project, shifted by ``shift`` level-0 px so that there are errors to draw."""
    shutil.copytree(project.folder, dest)
    pred_dir = dest / "qpseg" / "predictions"
    pred_dir.mkdir()
    meta = {"qpseg_model": "tumour_net", "qpseg_model_sha256": SHA, "qpseg_run": "run-7",
            "qpseg_architecture": "tiny_unet"}
    for f in (dest / "qpseg" / "annotations").glob("*.geojson"):
        objs = [QuPathObject(translate(o.geometry, shift, 0), classification=o.classification,
                             metadata=dict(meta)) for o in read_geojson(f)]
        write_geojson(pred_dir / f.name, objs)
    return dest / "project.qpproj"


def _section(page: str, title: str) -> str:
    return page.split(f"<h2>{title}")[1].split("<h2>")[0]


def test_report_names_slides_marks_the_training_split_and_names_the_model(
        project: SyntheticProject, tmp_path: Path) -> None:
    """Truth: the exported annotation files (named by entry id); prediction: a project. The
    report shows image names (not "1", "2"), the model's name, SHA-256 and run, the package's
    training split, and marks the slide it was trained on; each slide links to its overlay."""
    pred = _predictions(project, tmp_path / "pred", shift=20)
    pred_dir = pred.parent / "qpseg" / "predictions"
    names = [s.path.name for s in project.slides]
    first = project.entry_ids[0]
    (pred_dir / f"{first}.overlay.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    truth = tmp_path / "truth"
    shutil.copytree(project.folder / "qpseg" / "annotations", truth)
    stems = sorted(p.stem for p in truth.glob("*.geojson"))
    assert stems == sorted(str(e) for e in project.entry_ids)
    pkg = _package(tmp_path / "pkg", train=[names[0]], val=[])
    out = tmp_path / "out"
    ev = evaluate(truth, pred, out, mpp=0.5, model=pkg, n_bootstrap=0)
    assert [s.slide for s in ev.slides] == names
    page = html_mod.unescape((out / "report.html").read_text(encoding="utf-8"))
    assert "tumour_net (tiny_unet)" in page and SHA in page and "run-7" in page
    assert f"training slides: {names[0]}" in page
    slides = _section(page, "Slides")
    rows = slides.split("<tr>")[2:]
    assert names[0] in rows[0] and "train</span>" in rows[0]  # marked
    assert names[1] in rows[1] and "train</span>" not in rows[1]
    assert f"href='../pred/qpseg/predictions/{first}.overlay.png'" in rows[0]
    assert "overlay" not in rows[1]  # no overlay written for the second slide
    assert "1 slide(s) were in the model's training or validation split" in page
    assert ev.model is not None and ev.model.subset_of(names[0].upper()) == "train"


def test_model_package_is_found_from_the_run_metadata(project: SyntheticProject,
                                                      tmp_path: Path) -> None:
    """Without --model: the package path recorded by `qpseg infer` in run_metadata.json."""
    pred = _predictions(project, tmp_path / "pred")
    names = [s.path.name for s in project.slides]
    pkg = _package(tmp_path / "pkg", train=[], val=[Path(names[1]).stem])
    (pred.parent / "qpseg" / "predictions" / "run_metadata.json").write_text(
        json.dumps({"model": {"path": str(pkg)}, "slides": []}), encoding="utf-8")
    ev = evaluate(project.path, pred, tmp_path / "out", n_bootstrap=0)
    assert ev.model is not None and ev.model.package == str(pkg)
    assert ev.model.subset_of(names[1]) == "val" and ev.model.subset_of(names[0]) is None
    # without a package: what the provenance says, and that the split is unknown
    (pred.parent / "qpseg" / "predictions" / "run_metadata.json").unlink()
    ev = evaluate(project.path, pred, tmp_path / "out2", n_bootstrap=0)
    assert ev.model is not None and ev.model.names == ("tumour_net",)
    assert ev.model.sha256 == (SHA,) and ev.model.package is None
    page = (tmp_path / "out2" / "report.html").read_text(encoding="utf-8")
    assert "training split</td><td>unknown: the model package was not found" in page


def test_folder_slides_are_named_by_the_run_metadata(tmp_path: Path) -> None:
    """Two folders of <entryID>.geojson: the names `qpseg infer` recorded are shown."""
    for side in ("t", "p"):
        (tmp_path / side).mkdir()
        write_geojson(tmp_path / side / "3.geojson",
                      [QuPathObject(box(0, 0, 100, 100), classification="Tumor")])
    (tmp_path / "p" / "run_metadata.json").write_text(json.dumps(
        {"slides": [{"key": "3", "name": "patient_12_HE.svs"}]}), encoding="utf-8")
    ev = evaluate(tmp_path / "t", tmp_path / "p", mpp=0.5, eval_mpp=2.0, report=False)
    assert [s.slide for s in ev.slides] == ["patient_12_HE.svs"]


def test_outcome_colours_differ_per_class_and_outcome() -> None:
    for k in (2, 3, 4, 6, 9):
        colours = outcome_colors(k)
        assert len(colours) == 3 * (k - 1)
        assert len(set(colours.values())) == len(colours), k
    c = outcome_colors(3)
    green = [c[(2, 1)], c[(2, 2)]]
    assert all(g[1] > max(g[0], g[2]) for g in green)  # TP greens
    assert all(c[(3, i)][2] > max(c[(3, i)][:2]) for i in (1, 2))  # FN blues
    assert all(c[(4, i)][0] > max(c[(4, i)][1:]) for i in (1, 2))  # FP reds


def test_overlay_codes_keep_the_class_of_each_outcome() -> None:
    truth = np.array([[1, 1, 2, 0, 255]], dtype=np.uint8)
    pred = np.array([[1, 0, 1, 2, 2]], dtype=np.uint8)
    codes = _overlay_codes(truth, pred)
    assert codes.tolist() == [[2 << 8 | 1, 3 << 8 | 1, 4 << 8 | 1, 4 << 8 | 2, 0]]


def test_error_map_is_readable_and_drawn_over_the_tissue() -> None:
    codes = np.array([[2 << 8 | 1, 2 << 8 | 2], [3 << 8 | 1, 1 << 8]], dtype=np.uint16)
    colours = outcome_colors(3)
    im = np.asarray(error_map_image(codes, 3))
    assert im.shape == (MAP_MIN_SIDE, MAP_MIN_SIDE, 3)
    assert tuple(im[10, 10]) == colours[(2, 1)]   # TP of class 1
    assert tuple(im[10, 300]) == colours[(2, 2)]  # TP of class 2: another colour
    assert tuple(im[300, 10]) == colours[(3, 1)]
    tissue = np.zeros((600, 600, 3), dtype=np.uint8)
    tissue[..., 0] = 180  # pinkish tissue
    tissue[..., 2] = 150
    over = np.asarray(error_map_image(codes, 3, tissue))
    assert over.shape == (600, 600, 3)
    assert tuple(over[400, 400]) == (180, 0, 150)  # correct Background: the tissue itself
    tp = over[10, 10].astype(float)
    want = 0.45 * np.array([180, 0, 150]) + 0.55 * np.array(colours[(2, 1)])
    assert np.allclose(tp, want, atol=1)  # the class colour blended with the tissue


def test_froc_points_known_answer() -> None:
    """Truth: a 3-px lesion (ITC at 10 µm/px) and a 300-px wide one (macro); prediction: the
    macro one and a 2-px false positive. Keeping only lesions larger than the false positive
    removes it; larger than the largest leaves nothing."""
    truth = np.zeros((40, 400), bool)
    pred = np.zeros((40, 400), bool)
    truth[1:4, 1:2] = True             # ITC: 3 px tall, 30 µm wide at most
    truth[10:30, 50:350] = True        # macro: 300 px = 3 mm
    pred[10:30, 60:340] = True
    pred[35:37, 380:381] = True        # false positive, 2 px
    m = lesion_metrics(truth, pred, 10.0, slide="s")
    acc = LesionAccumulator()
    acc.add(m)
    pts = froc_points(acc)
    assert pts[0]["min_diameter_um"] == 0.0
    assert pts[0]["fp_per_slide"] == 1.0 and pts[0]["sensitivity"] == 0.5
    assert pts[0]["sensitivity_itc"] == 0.0 and pts[0]["sensitivity_macro"] == 1.0
    assert np.isnan(pts[0]["sensitivity_micro"])
    assert pts[1]["fp_per_slide"] == 0.0 and pts[1]["sensitivity"] == 0.5
    assert len(pts) == 3 and pts[2]["fp_per_slide"] == 0.0 and pts[2]["sensitivity"] == 0.0


def test_report_holds_the_figures_and_opens_offline(project: SyntheticProject,
                                                    tmp_path: Path) -> None:
    """Strip plots of Dice and IoU, the confusion matrix, lesion sizes with FROC points,
    instance F1 by IoU threshold, error maps over the tissue (>= 512 px) with a legend per
    class, nothing fetched from the network."""
    pred = _predictions(project, tmp_path / "pred", shift=25)
    pred_dir = pred.parent / "qpseg" / "predictions"
    for f in pred_dir.glob("*.geojson"):  # nuclei too, for the instance metrics
        objs = read_geojson(f)
        nuclei = [QuPathObject(box(x, 40, x + 12, 52), object_type="detection")
                  for x in range(20, 200, 30)]
        write_geojson(f, [*objs, *nuclei])
        truth_f = project.folder / "qpseg" / "annotations" / f.name
        write_geojson(pred.parent / "qpseg" / "annotations" / f.name,
                      [*read_geojson(truth_f),
                       *[QuPathObject(translate(n.geometry, 3, 0), object_type="detection")
                         for n in nuclei]])
    out = tmp_path / "out"
    ev = evaluate(pred, pred, out, n_bootstrap=0)
    assert ev.instance is not None and ev.lesion is not None
    text = (out / "report.html").read_text(encoding="utf-8")
    page = html_mod.unescape(text)
    for title in ("Dice per class across slides", "IoU per class across slides",
                  "Confusion matrix (pooled, row-normalised)", "Lesion detection: sensitivity",
                  "Instance F1 by IoU threshold", "Dice per slide and class"):
        assert title in page, title
    for svg in text.split("<svg")[1:]:
        ET.fromstring("<svg" + svg.split("</svg>")[0] + "</svg>")  # well-formed
    assert "micrometastasis (≤ 2 mm)" in _section(page, "Lesions")
    assert "<script" not in text and "http" not in text.replace("http://www.w3.org/2000/svg", "")
    maps = _section(page, "Errors per slide")
    for name in ("Tumor", "Stroma", "Necrosis"):
        assert f"<b>{name}</b>: " in maps
    assert maps.count("TP <small>") == 3 and maps.count("FN <small>") == 3
    sizes = [(int(w), int(h)) for w, h in re.findall(r"width='(\d+)' height='(\d+)' src='data:"
                                                     r"image/jpeg;base64,", maps)]
    assert len(sizes) == 2 and all(max(s) >= MAP_MIN_SIDE for s in sizes)
    assert all(s.tissue is not None for s in ev.slides)
    # the tissue is really under the map: not a flat colour
    assert all(float(s.tissue.std()) > 5 for s in ev.slides if s.tissue is not None)
    # without a reachable slide the map is drawn on white and the report says so
    for s in ev.slides:
        s.tissue = None
    assert "drawn without the tissue" in render_report(ev, out)
