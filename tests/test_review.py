"""The review round trip: AI objects the pathologist left untouched are not truth.

The real situation: ``qpseg infer`` writes predictions (ids + provenance metadata) to
``<project>/qpseg/predictions/<entryID>.geojson``; they are imported into QuPath, reviewed and
exported to ``<project>/qpseg/annotations/<entryID>.geojson``. QuPath keeps ids and metadata,
stores vertices as float32 and writes 2 decimals; the pathologist reshapes one, reclassifies
one, locks one, deletes one, leaves one alone and adds two annotations of their own.
"""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import typer
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry
from typer.testing import CliRunner

from qpseg.cli.evaluate import evaluate as evaluate_cmd
from qpseg.edits import compare_edits, evaluate_edits
from qpseg.errors import ConfigError, LabelError, OutputError
from qpseg.evaluate import evaluate
from qpseg.manifest import import_project
from qpseg.objects import provenance
from qpseg.qupath.geojson import QuPathObject, read_geojson, write_geojson
from qpseg.review import AiObjectWarning, review, select_truth
from qpseg.testing.projects import SyntheticProject, make_project

PROV = provenance("tiny_unet", "ab" * 32, mpp=0.5, run="20250101T000000Z")


def qupath_round(g: BaseGeometry) -> BaseGeometry:
    """What QuPath does to coordinates on the way through: float32 vertices (FLOAT_FACTORY),
    GeoJSON written with 2 decimals."""
    return shapely.transform(
        g, lambda c: np.round(c.astype(np.float32).astype(np.float64), 2))


def ai(geom: BaseGeometry, cls: str) -> QuPathObject:
    return QuPathObject(geometry=geom, classification=cls, id=str(uuid.uuid4()),
                        metadata=dict(PROV))


def exported(o: QuPathObject, geom: BaseGeometry | None = None, cls: str | None = None,
             locked: bool = False) -> QuPathObject:
    """The object as QuPath exports it after the review: same id and metadata."""
    return dataclasses.replace(o, geometry=qupath_round(geom if geom is not None else o.geometry),
                               classification=cls or o.classification, is_locked=locked)


def user(geom: BaseGeometry, cls: str) -> QuPathObject:
    return QuPathObject(geometry=geom, classification=cls, id=str(uuid.uuid4()))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> SyntheticProject:
    return make_project(tmp_path_factory.mktemp("review"), n_slides=1, width=800, height=400,
                        mpp=0.5, seed=5, classes=("Tumor", "Stroma"), annotations=False)


def reviewed_project(base: SyntheticProject, dest: Path) -> Path:
    """Predictions as infer writes them, and the export after the review."""
    shutil.copytree(base.folder, dest)
    p1 = ai(box(0, 0, 100, 100), "Stroma")        # left alone: an unreviewed prediction
    p2 = ai(box(200, 0, 300, 100), "Stroma")      # reshaped: 4 px wider
    p3 = ai(box(400, 0, 500, 100), "Tumor")       # reclassified to Stroma
    p4 = ai(box(0, 200, 100, 300), "Tumor")       # locked: accepted as it is
    p5 = ai(box(200, 200, 300, 300), "Tumor")     # deleted
    eid = base.entry_ids[0]
    write_geojson(dest / "qpseg" / "predictions" / f"{eid}.geojson", [p1, p2, p3, p4, p5])
    export = [
        exported(p1), exported(p2, box(200, 0, 304, 100)), exported(p3, cls="Stroma"),
        exported(p4, locked=True),
        user(box(400, 200, 500, 300), "Tumor"), user(box(600, 0, 700, 100), "Stroma"),
    ]
    write_geojson(dest / "qpseg" / "annotations" / f"{eid}.geojson", export)
    return dest / "project.qpproj"


def rows(counts: object) -> dict[str, dict[str, int]]:
    return {r["class_name"]: {k: r[k] for k in ("unreviewed", "accepted", "edited", "unproven",
                                                "kept", "left_out")}
            for r in counts.rows()}  # type: ignore[attr-defined]


EXPECTED = {"Stroma": {"unreviewed": 1, "accepted": 0, "edited": 2, "unproven": 0, "kept": 2,
                       "left_out": 1},
            "Tumor": {"unreviewed": 0, "accepted": 1, "edited": 0, "unproven": 0, "kept": 1,
                      "left_out": 0}}


def test_import_project_leaves_unreviewed_predictions_out(base: SyntheticProject,
                                                          tmp_path: Path) -> None:
    path = reviewed_project(base, tmp_path / "p")
    m = import_project(path, tmp_path / "out", use_paquo=False)
    e = m.entries[0]
    # Stroma: p2' (104 x 100) + p3' + the pathologist's; p1 is left out. Tumor: p4 + theirs.
    assert (e.classes["Stroma"].count, e.classes["Stroma"].area_px) == (3, 30400)
    assert (e.classes["Tumor"].count, e.classes["Tumor"].area_px) == (2, 20000)
    assert rows(m.review) == EXPECTED and m.review.policy == "unreviewed-out"
    assert e.predictions_file is not None and e.predictions_sha256
    # training reads the truth again through the manifest: the same objects
    assert sorted(o.geometry.bounds for o in m.annotations_for(e)) == sorted(
        o.geometry.bounds for o in read_geojson(e.annotation_file or "")
        if o.geometry.bounds != (0, 0, 100, 100))
    assert len(m.truth_objects(e)) == 5
    # before the rule (all-in), the untouched prediction inflated the Stroma labels
    inflated = import_project(path, None, use_paquo=False, ai_objects="all-in").entries[0]
    assert (inflated.classes["Stroma"].count, inflated.classes["Stroma"].area_px) == (4, 40400)
    only_own = import_project(path, None, use_paquo=False, ai_objects="all-out").entries[0]
    assert {k: v.count for k, v in only_own.classes.items()} == {"Stroma": 1, "Tumor": 1}
    # the saved predictions changed after the import: re-reading the truth refuses
    pf = Path(e.predictions_file)
    pf.write_text(pf.read_text(encoding="utf-8").replace("tiny_unet", "tiny_unez"),
                  encoding="utf-8")
    with pytest.raises(LabelError, match="changed or are gone"):
        m.annotations_for(e)


def test_import_project_everything_unreviewed_says_why(base: SyntheticProject,
                                                       tmp_path: Path) -> None:
    dest = tmp_path / "p"
    shutil.copytree(base.folder, dest)
    eid = base.entry_ids[0]
    preds = [ai(box(0, 0, 100, 100), "Stroma")]
    write_geojson(dest / "qpseg" / "predictions" / f"{eid}.geojson", preds)
    write_geojson(dest / "qpseg" / "annotations" / f"{eid}.geojson", [exported(preds[0])])
    with pytest.raises(LabelError, match=r"once 1 AI object.* left out.*all-in"):
        import_project(dest / "project.qpproj", None, use_paquo=False)


def test_evaluate_truth_dice_inflation(base: SyntheticProject, tmp_path: Path) -> None:
    path = reviewed_project(base, tmp_path / "p")
    # eval raster = level 0: exact pixel counts. Truth Stroma: p2' 10400 (pred Stroma on
    # 10000), p3' 10000 (pred Tumor), own 10000 (pred nothing): Dice 20000 / 40400.
    ev = evaluate(path, path, tmp_path / "o", eval_mpp=0.5, report=False, truth_mode="partial")
    dice = ev.summary()["pixel"]["dice"]
    assert dice["Stroma"] == pytest.approx(20000 / 40400)
    assert dice["Tumor"] == pytest.approx(0.5)
    assert rows(ev.review) == EXPECTED
    csv = pd.read_csv(tmp_path / "o" / "ai_objects.csv")
    assert list(csv.left_out) == [1, 0] and list(csv.class_name) == ["Stroma", "Tumor"]
    # before the rule: the untouched prediction scores against itself
    before = evaluate(path, path, None, eval_mpp=0.5, report=False, ai_objects="all-in",
                      truth_mode="partial")
    assert before.summary()["pixel"]["dice"]["Stroma"] == pytest.approx(40000 / 60400)


def test_evaluate_truth_folder_uses_the_matched_predictions(base: SyntheticProject,
                                                             tmp_path: Path) -> None:
    path = reviewed_project(base, tmp_path / "p")
    eid = base.entry_ids[0]
    tdir, pdir = tmp_path / "truth", tmp_path / "pred"
    tdir.mkdir()
    pdir.mkdir()
    shutil.copy(path.parent / "qpseg" / "annotations" / f"{eid}.geojson", tdir / "s.geojson")
    shutil.copy(path.parent / "qpseg" / "predictions" / f"{eid}.geojson", pdir / "s.geojson")
    ev = evaluate(tdir, pdir, None, mpp=0.5, eval_mpp=0.5, report=False,
                  truth_mode="partial")
    assert rows(ev.review) == EXPECTED
    assert ev.summary()["pixel"]["dice"]["Stroma"] == pytest.approx(20000 / 40400)
    # predictions of another run (new ids): the AI objects cannot be proven unchanged; they
    # count, and the warning names the model and run from their metadata
    other = [dataclasses.replace(o, id=str(uuid.uuid4())) for o in read_geojson(pdir / "s.geojson")]
    write_geojson(pdir / "s.geojson", other)
    with pytest.warns(AiObjectWarning, match=r"4 AI object.*no original.*'tiny_unet' run 2025"):
        ev = evaluate(tdir, pdir, None, mpp=0.5, eval_mpp=0.5, report=False)
    assert ev.review.total("unproven") == 4 and ev.review.total("left_out") == 0
    assert any("no original" in n for s in ev.slides for n in s.notes)


def test_evaluate_cli_prints_counts(base: SyntheticProject, tmp_path: Path) -> None:
    path = reviewed_project(base, tmp_path / "p")
    a = typer.Typer()
    a.command("evaluate")(evaluate_cmd)
    a.command("noop")(lambda: None)
    res = CliRunner().invoke(a, ["evaluate", "--truth", str(path), "--pred", str(path), "--out",
                                 str(tmp_path / "o"), "--eval-mpp", "0.5", "--no-report"],
                             standalone_mode=False)
    assert res.exception is None, res.output
    out = " ".join(res.output.split())
    assert ("AI objects (unreviewed-out): Stroma: 1 left out, 2 kept (1 unreviewed, 2 edited)"
            in out)
    assert "AI objects (unreviewed-out): Tumor: 0 left out, 1 kept (1 accepted)" in out
    res = CliRunner().invoke(a, ["evaluate", "--truth", str(path), "--pred", str(path), "--out",
                                 str(tmp_path / "o"), "--ai-objects", "some"],
                             standalone_mode=False)
    assert isinstance(res.exception, ConfigError) and "--ai-objects" in str(res.exception)


def test_evaluate_edits_counts_the_review(base: SyntheticProject, tmp_path: Path) -> None:
    path = reviewed_project(base, tmp_path / "p")
    res = evaluate_edits(path, tmp_path / "o")
    r = res.rows()[0]
    assert {k: r[k] for k in ("n_ai", "n_kept", "n_accepted", "n_left_out", "n_reshaped",
                              "n_reclassified", "n_deleted", "n_added")} == {
        "n_ai": 5, "n_kept": 2, "n_accepted": 1, "n_left_out": 1, "n_reshaped": 1,
        "n_reclassified": 1, "n_deleted": 1, "n_added": 2}
    assert rows(res.review) == EXPECTED


def test_out_must_be_writable_before_work(base: SyntheticProject, tmp_path: Path) -> None:
    path = reviewed_project(base, tmp_path / "p")
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(OutputError, match="not a folder"):
        evaluate(path, path, blocker, eval_mpp=0.5, report=False)
    with pytest.raises(OutputError, match="not a folder"):
        evaluate_edits(path, blocker)


# -------------------------------------------------------------------------- the one test


def ring(cx: float, cy: float, r: float, n: int = 400) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.c_[cx + r * np.cos(t), cy + r * np.sin(t)]


def test_unchanged_survives_qupath_rounding_but_not_a_small_reshape() -> None:
    pts = ring(99_000.123, 98_000.456, 3000)
    orig = ai(Polygon(pts), "Tumor")
    assert review([exported(orig)], [orig])[0].status == "unreviewed"
    bumped = pts.copy()
    bumped[10] += (3.0, 0.0)       # one vertex of a 19 000 px outline moved by 3 px
    r = review([exported(orig, Polygon(bumped))], [orig])[0]
    assert (r.status, r.reshaped, r.reclassified) == ("edited", True, False)
    # evaluate-edits uses the same test: a mean-shift rule (area of the symmetric difference
    # per perimeter pixel) called this "kept"
    res = compare_edits([orig], [exported(orig, Polygon(bumped))])
    assert res.objects[0].status == "reshaped"
    # a filled hole or a removed part is a reshape too, though every vertex lies in the other
    holed = ai(Polygon(ring(500, 500, 300, 64), [ring(500, 500, 50, 32)]), "Tumor")
    assert review([exported(holed, Polygon(holed.geometry.exterior))], [holed])[0].reshaped
    # locked and unchanged: accepted; class changed: edited; no original: unproven
    assert review([exported(orig, locked=True)], [orig])[0].status == "accepted"
    assert review([exported(orig, cls="tumor ")], [orig])[0].status == "unreviewed"
    assert review([exported(orig, cls="Stroma")], [orig])[0].reclassified
    assert review([exported(orig)], [None])[0].status == "unproven"


def test_left_out_prediction_inside_a_region_is_unlabelled_not_background() -> None:
    p = ai(box(10, 10, 50, 50), "Tumor")
    own = user(box(20, 20, 30, 30), "Stroma")
    region = user(box(0, 0, 100, 100), "Region*")
    sel = select_truth([exported(p), own, region], [p])
    assert [o.id for o in sel.left_out] == [p.id]
    reg = next(o for o in sel.objects if o.classification == "Region*")
    assert reg.geometry.area == pytest.approx(10000 - 1600)
    assert not reg.geometry.contains(box(20, 20, 30, 30).centroid)
    assert any(o.id == own.id for o in sel.objects)
