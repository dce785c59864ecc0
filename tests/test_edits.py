"""qpseg evaluate-edits: a crafted before/after pair with known kept/reshaped/deleted/added."""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pytest
import typer
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry
from typer.testing import CliRunner

from qpseg.cli.evaluate import evaluate_edits as edits_cmd
from qpseg.edits import QPSEG_MARKER, compare_edits, evaluate_edits
from qpseg.errors import ConfigError
from qpseg.qupath.geojson import QuPathObject, write_geojson
from qpseg.review import AiObjectWarning
from qpseg.testing.projects import SyntheticProject, make_project

MARK = {QPSEG_MARKER: "tiny_unet", "qpseg_run": "2025-01-01T00:00:00"}


def uid() -> str:
    return str(uuid.uuid4())


def ai(geom: BaseGeometry, cls: str, oid: str | None = None) -> QuPathObject:
    return QuPathObject(geometry=geom, classification=cls, id=oid or uid(),
                        metadata=dict(MARK))


def user(geom: BaseGeometry, cls: str | None, oid: str | None = None) -> QuPathObject:
    return QuPathObject(geometry=geom, classification=cls, id=oid or uid())


def edited(o: QuPathObject, geom: BaseGeometry | None = None,
           cls: str | None = None) -> QuPathObject:
    """The object as QuPath exports it after an edit: same id and metadata."""
    return QuPathObject(geometry=geom if geom is not None else o.geometry,
                        classification=cls if cls is not None else o.classification,
                        id=o.id, metadata=dict(o.metadata))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SyntheticProject:
    return make_project(tmp_path_factory.mktemp("proj"), n_slides=2, width=256, height=256,
                        mpp=0.5, seed=1, annotations=False)


def crafted() -> tuple[list[QuPathObject], list[QuPathObject], set[str]]:
    a1 = ai(box(0, 0, 100, 100), "Tumor")
    a2 = ai(box(200, 0, 300, 100), "Tumor")
    a3 = ai(box(0, 200, 100, 300), "Stroma")
    a4 = ai(box(200, 200, 300, 300), "Stroma")
    a5 = ai(box(400, 0, 450, 50), "Tumor")
    # a1 kept: an extra vertex on an edge and sub-pixel jitter
    kept = Polygon([(0, 0), (50, 0), (100.2, 0), (100, 100), (0, 100.1)])
    existing = user(box(700, 700, 750, 750), "Tumor")
    final = [
        edited(a1, kept),
        edited(a2, box(200, 0, 350, 100)),                 # reshaped, +5000 px²
        edited(a3, cls="Tumor"),                           # reclassified
        edited(a5, box(400, 0, 480, 50), cls="Stroma"),    # both
        user(box(500, 500, 600, 600), "Tumor"),            # added: a model class
        user(box(0, 0, 50, 50), "Immune cells"),           # added: over an AI object
        user(box(900, 900, 950, 950), "Immune cells"),     # neither: the user's own
        user(box(0, 0, 1000, 1000), "Region*"),            # not a label class
        existing,                                          # in the baseline
        ai(box(800, 0, 850, 50), "Tumor"),                 # qpseg object of another run
    ]
    return [a1, a2, a3, a4, a5], final, {existing.id or ""}


def test_compare_edits_counts_and_dice() -> None:
    before, after, baseline = crafted()
    # all-in: every AI object in the export is truth, the other run's one too
    res = compare_edits(before, after, slide="s", baseline_ids=baseline, mpp=0.5,
                        ai_objects="all-in")
    row = res.row()
    counts = {k: row[k] for k in ("n_ai", "n_kept", "n_reshaped", "n_reclassified", "n_changed",
                                  "n_deleted", "n_added", "n_other_ai", "n_existing",
                                  "n_user_other")}
    assert counts == {"n_ai": 5, "n_kept": 1, "n_reshaped": 2, "n_reclassified": 2,
                      "n_changed": 3, "n_deleted": 1, "n_added": 2, "n_other_ai": 1,
                      "n_existing": 1, "n_user_other": 2}
    assert [o.status for o in res.objects[:5]] == [
        "kept", "reshaped", "reclassified", "deleted", "reshaped+reclassified"]
    assert res.objects[1].area_change_px == pytest.approx(5000)
    assert res.objects[1].iou == pytest.approx(10000 / 15000)
    assert row["reshaped_abs_area_change_px"] == pytest.approx(5000 + 1500)
    # per class, by hand: AI Tumor = a1 + a2 + a5 = 22500; final Tumor = a1 + a2' + a3' + the
    # added tumour + the other run's = 47500 (+ the jitter); common 20000
    by = {c.class_name: c for c in res.classes}
    assert by["Tumor"].ai_area_px == pytest.approx(22500)
    assert by["Tumor"].final_area_px == pytest.approx(47500, abs=30)
    assert by["Tumor"].intersection_px == pytest.approx(20000)
    assert by["Tumor"].dice == pytest.approx(40000 / 70000, abs=1e-3)
    assert by["Stroma"].dice == 0 and by["Stroma"].ai_area_px == 20000
    assert by["Immune cells"].final_area_px == 2500 and by["Immune cells"].n_ai == 0
    assert res.dice == pytest.approx(40000 / (70000 + 24000 + 2500), abs=1e-3)
    assert row["area_removed_px"] == pytest.approx(10000)           # a4 deleted
    assert row["area_added_px"] == pytest.approx(19000, abs=30)     # a2 +5000, a5 +1500, new 2
    assert row["ai_area_um2"] == pytest.approx(42500 * 0.25)
    assert row["kept_fraction"] == pytest.approx(0.2)
    assert (row["n_left_out"], row["n_accepted"]) == (0, 0)
    # the default rule: a1 (kept, not locked) is an unreviewed prediction, left out of both
    # sides; the Dice is over what the pathologist reviewed. The other run's object has no
    # original here: it counts, with a warning naming its model and run
    with pytest.warns(AiObjectWarning, match="1 AI object.*no original.*'tiny_unet' run 2025"):
        res = compare_edits(before, after, slide="s", baseline_ids=baseline, mpp=0.5)
    row = res.row()
    assert (row["n_kept"], row["n_left_out"], row["n_deleted"]) == (1, 1, 1)
    assert [(o.review, o.in_truth) for o in res.objects[:5]] == [
        ("unreviewed", False), ("edited", True), ("edited", True), ("", None), ("edited", True)]
    by = {c.class_name: c for c in res.classes}
    assert by["Tumor"].ai_area_px == pytest.approx(12500)       # a2 + a5
    assert by["Tumor"].final_area_px == pytest.approx(37500)    # a2' + a3' + added + other run
    assert by["Tumor"].dice == pytest.approx(20000 / 50000)
    assert row["ai_area_px"] == pytest.approx(32500)            # a2 + a3 + a4 + a5
    assert res.review.rows() == [
        {"object_type": "annotation", "class_name": "Stroma", "unreviewed": 0, "accepted": 0,
         "edited": 1, "unproven": 0, "kept": 1, "left_out": 0},
        {"object_type": "annotation", "class_name": "Tumor", "unreviewed": 1, "accepted": 0,
         "edited": 2, "unproven": 1, "kept": 3, "left_out": 1}]
    # no tolerance: the jittered outline counts as reshaped
    with pytest.warns(AiObjectWarning):
        strict = compare_edits(before, after, tolerance_px=0.0, baseline_ids=baseline)
    assert strict.row()["n_kept"] == 0 and strict.row()["n_reshaped"] == 3
    # without the baseline, the user's earlier tumour is "added"
    with pytest.warns(AiObjectWarning):
        assert compare_edits(before, after).row()["n_added"] == 3


def test_ids_lost_match_by_geometry() -> None:
    a = [ai(box(0, 0, 100, 100), "Tumor"), ai(box(200, 0, 300, 100), "Tumor"),
         ai(box(400, 0, 500, 100), "Tumor")]
    # QuPath gave new ids, kept the metadata; the second moved by 10 px, the third is gone
    b = [ai(box(0, 0, 100, 100), "Tumor"), ai(box(210, 0, 310, 100), "Tumor")]
    res = compare_edits(a, b)
    assert [(o.status, o.matched_by) for o in res.objects] == [
        ("kept", "geometry"), ("reshaped", "geometry"), ("deleted", "")]
    assert res.row()["n_added"] == 0


def write_pair(project: SyntheticProject, folder: Path) -> Path:
    proj = folder / "proj"
    shutil.copytree(project.folder, proj)
    before, after, baseline = crafted()
    pdir, adir, bdir = (proj / "qpseg" / d for d in ("predictions", "annotations", "before"))
    e1, e2 = project.entry_ids
    write_geojson(pdir / f"{e1}.geojson", before)
    write_geojson(bdir / f"{e1}.geojson", [o for o in after if o.id in baseline])
    write_geojson(adir / f"{e1}.geojson", after)
    # second entry: nothing changed
    same = [ai(box(10, 10, 60, 60), "Tumor")]
    write_geojson(pdir / f"{e2}.geojson", same)
    write_geojson(adir / f"{e2}.geojson", same)
    for f in (adir / f"{e1}.geojson", adir / f"{e2}.geojson"):
        os.utime(f, (os.path.getmtime(f) + 10, os.path.getmtime(f) + 10))
    return proj / "project.qpproj"


def run_cli(args: list[str]) -> tuple[int | None, str, BaseException | None]:
    a = typer.Typer()
    a.command("evaluate-edits")(edits_cmd)
    a.command("noop")(lambda: None)
    res = CliRunner().invoke(a, ["evaluate-edits", *args], standalone_mode=False)
    exc = res.exception if not isinstance(res.exception, SystemExit) else None
    return res.return_value, res.output, exc


def test_project_edits_through_cli(project: SyntheticProject, tmp_path: Path) -> None:
    path = write_pair(project, tmp_path)
    out = tmp_path / "out"
    with pytest.warns(AiObjectWarning, match="no original"):
        code, output, exc = run_cli([str(path), "--out", str(out), "--baseline",
                                     str(path.parent / "qpseg" / "before")])
    assert exc is None and code == 0, output
    df = pd.read_csv(out / "edits.csv")
    assert list(df.entry_id) == list(project.entry_ids)
    first, second = df.iloc[0], df.iloc[1]
    assert (first.n_ai, first.n_kept, first.n_deleted, first.n_added) == (5, 1, 1, 2)
    # the second slide: nothing changed, nothing locked: nobody reviewed it, no Dice
    assert (second.n_ai, second.n_kept, second.n_left_out) == (1, 1, 1)
    assert math.isnan(second.dice)
    # the counts per class are printed
    assert "AI objects (unreviewed-out): Tumor: 2 left out, 3 kept (2 unreviewed, 2 edited, " \
           "1 unproven)" in output
    assert "Stroma: 0 left out, 1 kept (1 edited)" in output
    code, output, exc = run_cli([str(path), "--out", str(out), "--baseline",
                                 str(path.parent / "qpseg" / "before"), "--ai-objects", "all-in"])
    assert exc is None and code == 0, output
    df = pd.read_csv(out / "edits.csv")
    first, second = df.iloc[0], df.iloc[1]
    assert (second.n_ai, second.n_kept, second.n_left_out, second.dice) == (1, 1, 0, 1.0)
    assert first.mpp == 0.5 and first.ai_area_um2 == pytest.approx(42500 * 0.25)
    objs = pd.read_csv(out / "edit_objects.csv")
    assert (objs.status == "deleted").sum() == 1
    assert set(pd.read_csv(out / "edits_per_class.csv").class_name) == {
        "Tumor", "Stroma", "Immune cells"}
    summary = pd.read_csv(out / "edits_summary.csv").set_index("metric")
    assert summary.loc["n_ai", "pooled"] == 6
    assert summary.loc["kept_fraction", "pooled"] == pytest.approx(2 / 6)
    assert summary.loc["n_deleted", "slide_mean"] == pytest.approx(0.5)
    assert pd.read_csv(out / "edits_skipped.csv").empty
    assert "kept" in output


def test_edits_errors_and_notes(project: SyntheticProject, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(project.folder, bare)
    with pytest.raises(ConfigError, match="no predictions folder"):
        evaluate_edits(bare)
    path = write_pair(project, tmp_path)
    adir = path.parent / "qpseg" / "annotations"
    e1, e2 = project.entry_ids
    (adir / f"{e2}.geojson").write_text("{broken", encoding="utf-8")
    code, _, exc = run_cli([str(path), "--out", str(tmp_path / "o")])
    assert exc is None and code == 1
    skipped = pd.read_csv(tmp_path / "o" / "edits_skipped.csv")
    assert list(skipped.status) == ["failed"] and "not valid JSON" in skipped.reason[0]
    # an export older than the predictions is flagged
    pf = path.parent / "qpseg" / "predictions" / f"{e1}.geojson"
    os.utime(adir / f"{e1}.geojson", (os.path.getmtime(pf) - 100,) * 2)
    res = evaluate_edits(path)
    assert any("older than the predictions" in n for n in res.slides[0].notes)
    shutil.rmtree(adir)
    adir.mkdir()
    with pytest.raises(ConfigError, match="no entry with predictions has an annotation export"):
        evaluate_edits(path)


def test_detections_missing_from_annotation_export() -> None:
    a = [QuPathObject(geometry=box(0, 0, 10, 10), object_type="detection",
                      classification="Tumor", id=uid(), metadata=dict(MARK))]
    res = compare_edits(a, [user(box(100, 100, 200, 200), "Other")])
    assert res.row()["n_deleted"] == 1
    assert "the export holds none" in res.notes[0]
    # the export script now includes qpseg's detections: a reviewed, unchanged one is kept
    res = compare_edits(a, [a[0], user(box(100, 100, 200, 200), "Other")])
    assert (res.row()["n_kept"], res.row()["n_deleted"]) == (1, 0) and not res.notes


def test_the_slides_own_pixel_size_wins_over_mpp(project: SyntheticProject,
                                                  tmp_path: Path) -> None:
    """The slides say 0.5 µm/px: --mpp 0.25 does not replace that (the rule of every command:
    the slide's own, else the project's, else --mpp), so the µm² columns use 0.5; before,
    --mpp was used first. --mpp-override replaces it, and the CLI prints old -> new."""
    from qpseg.errors import QpsegWarning

    path = write_pair(project, tmp_path)
    with pytest.warns(QpsegWarning, match=r"--mpp 0.25 is not used for 2 slide\(s\)"):
        res = evaluate_edits(path, mpp=0.25, ai_objects="all-in")
    first = res.rows()[0]
    assert (first["mpp"], first["mpp_source"], first["mpp_replaced"]) == (0.5, "slide", None)
    assert first["ai_area_um2"] == pytest.approx(42500 * 0.25)
    code, output, exc = run_cli([str(path), "--out", str(tmp_path / "o"), "--mpp", "0.25",
                                 "--mpp-override", "--ai-objects", "all-in"])
    assert exc is None and code == 0, output
    first = pd.read_csv(tmp_path / "o" / "edits.csv").iloc[0]
    assert (first.mpp, first.mpp_source, first.mpp_replaced) == (0.25, "override", 0.5)
    assert first.ai_area_um2 == pytest.approx(42500 * 0.25 * 0.25)
    assert "pixel size replaced: slide_00.tif: 0.5 -> 0.25 µm/px (--mpp-override)" in \
        " ".join(output.split())
    for bad in (0.0, 352.8):
        with pytest.raises(ConfigError, match=r"--mpp: .*plausible"):
            evaluate_edits(path, mpp=bad)
    with pytest.raises(ConfigError, match="--mpp-override needs --mpp"):
        evaluate_edits(path, mpp_override=True)


def test_user_object_of_another_class_is_added_only_when_it_shares_area() -> None:
    # Overlap with the AI objects is decided per object against the AI polygons near it: an
    # edge shared with an AI object is no overlap, a sliver of area is.
    a1, a2 = ai(box(0, 0, 100, 100), "Tumor"), ai(box(300, 0, 400, 100), "Tumor")
    touching = user(box(100, 0, 150, 50), "Immune cells")
    sliver = user(box(399, 50, 450, 60), "Immune cells")
    across = user(box(50, 40, 350, 60), "Immune cells")  # spans both, no vertex inside
    far = user(box(1000, 0, 1050, 50), "Immune cells")
    res = compare_edits([a1, a2], [edited(a1), edited(a2), touching, sliver, across, far],
                        ai_objects="all-in")
    status = {o.object_id: o.status for o in res.objects}
    assert status[touching.id] == "user-other" and status[far.id] == "user-other"
    assert status[sliver.id] == "added" and status[across.id] == "added"
    assert res.row()["n_added"] == 2
