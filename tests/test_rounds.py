"""Review rounds: the history file, the corrected regions and their weight in training, and
fine-tuning with the recipe of the package it starts from."""

from __future__ import annotations

import csv
import dataclasses
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from shapely.geometry import Point, box

from qpseg.cli import main
from qpseg.demo import DEMO_TRAIN_CONFIG, build_example
from qpseg.errors import ProjectError
from qpseg.qupath.classes import default_color
from qpseg.qupath.geojson import QuPathObject, read_geojson, write_geojson
from qpseg.rounds import (
    RoundRecord,
    corrected_regions,
    history_path,
    read_history,
    record_round,
)
from qpseg.testing.projects import qupath_exported, write_ai_predictions

SHA_A, SHA_B = "aa" * 32, "bb" * 32


def _obj(geom, cls: str, **kw) -> QuPathObject:
    return QuPathObject(geom, classification=cls, class_color=default_color(cls), **kw)


# ------------------------------------------------------------------------------ history file


def test_history_appends_rounds_and_a_rerun_replaces_its_own(tmp_path: Path) -> None:
    project = tmp_path / "project.qpproj"
    a = RoundRecord(SHA_A, ("1", "2"), n_ai=10, n_kept=6, n_accepted=3, n_reshaped=2,
                    n_deleted=1, n_added=4, area_changed_px=1234.0, dice=0.8)
    rows, first = record_round(project, a)
    assert first.round == 1 and [r.round for r in rows] == [1]
    rows, second = record_round(project, RoundRecord(SHA_B, ("3",), n_reshaped=1, dice=0.9))
    assert second.round == 2 and [r.model_sha256 for r in rows] == [SHA_A, SHA_B]
    # The pathologist reviewed more of round 1's slides and evaluate-edits ran again.
    rows, again = record_round(project, dataclasses.replace(a, n_added=5, entries=("1", "2", "4")))
    assert again.round == 1
    back = read_history(history_path(project))
    assert [(r.round, r.model_sha256) for r in back] == [(1, SHA_A), (2, SHA_B)]
    assert back[0].n_added == 5 and back[0].entries == ("1", "2", "4")
    assert back[0].corrections == 2 + 1 + 5 and back[1].corrections == 1
    with history_path(project).open(encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and table[0]["slides_reviewed"] == "3"
    assert table[0]["corrections"] == "8" and table[0]["area_changed_px"] == "1234.0"
    assert table[1]["area_changed_um2"] == ""  # unknown pixel size: empty, not "nan"


def test_effort_is_compared_per_reviewed_slide(tmp_path: Path) -> None:
    from qpseg.rounds import history_svg

    project = tmp_path / "project.qpproj"
    # Round 1: 8 corrections on 4 slides; round 2: 6 on 2 slides. The raw count falls, the
    # effort per slide rises (2 -> 3): that is what the history and its plot must show.
    record_round(project, RoundRecord(SHA_A, ("1", "2", "3", "4"), n_reshaped=5, n_added=3,
                                      area_changed_um2=4000.0))
    rows, _ = record_round(project, RoundRecord(SHA_B, ("5", "6"), n_deleted=6,
                                                area_changed_um2=3000.0))
    assert [r.corrections for r in rows] == [8, 6]
    assert [r.corrections_per_slide for r in rows] == [2.0, 3.0]
    assert [r.area_changed_um2_per_slide for r in rows] == [1000.0, 1500.0]
    with history_path(project).open(encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert [(t["corrections_per_slide"], t["area_changed_um2_per_slide"]) for t in table] == [
        ("2.00", "1000.0"), ("3.00", "1500.0")]
    svg = history_svg(rows)
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)"', svg)]
    assert heights[1] == pytest.approx(heights[0] * 1.5, abs=0.2)  # bars: per slide, not raw counts
    assert "8 corrections on 4 slide(s)" in svg
    assert RoundRecord(SHA_A, ()).corrections_per_slide != 0  # NaN: nothing reviewed


def test_a_history_from_before_per_slide_effort_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "qpseg" / "rounds.csv"
    path.parent.mkdir()
    old = ("round,model_sha256,slides_reviewed,entries,n_ai,n_kept,n_accepted,n_reshaped,"
           "n_reclassified,n_deleted,n_added,corrections,area_changed_px,area_changed_um2,dice,"
           f"recorded\n1,{SHA_A},2,3;4,9,5,5,1,0,2,1,4,80.0,20.0,0.9,2026-01-01T00:00:00+00:00\n")
    path.write_text(old, encoding="utf-8")
    (rec,) = read_history(path)
    assert rec.corrections_per_slide == 2.0 and rec.area_changed_um2_per_slide == 10.0
    _, new = record_round(tmp_path, RoundRecord(SHA_B, ("5",), n_added=1))
    assert new.round == 2
    with path.open(encoding="utf-8") as fh:
        assert [t["corrections_per_slide"] for t in csv.DictReader(fh)] == ["2.00", "1.00"]


def test_a_damaged_history_is_one_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "qpseg" / "rounds.csv"
    path.parent.mkdir()
    path.write_text("round,model_sha256\n1,abc\n", encoding="utf-8")
    with pytest.raises(ProjectError, match="columns missing") as err:
        record_round(tmp_path, RoundRecord(SHA_A, ("1",)))
    assert err.value.path == path
    assert path.read_text(encoding="utf-8") == "round,model_sha256\n1,abc\n"  # untouched


# ------------------------------------------------------------------- a project reviewed twice


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory):
    return build_example(tmp_path_factory.mktemp("ex"), n_train=2, n_test=1, size_px=768)


@pytest.fixture
def project(example, tmp_path: Path):
    from qpseg.demo import Example

    shutil.copytree(example.folder, tmp_path / "project")
    folder = tmp_path / "project"
    return Example(folder / "project.qpproj", example.train_ids, example.test_ids,
                   folder / "qpseg" / "ground_truth")


def _predict(ex, eid: int, sha: str) -> list[QuPathObject]:
    truth = [o for o in read_geojson(ex.ground_truth / f"{eid}.geojson")
             if o.classification != "Region*"]
    return write_ai_predictions(ex.folder, eid, truth, model_sha256=sha)


def _review(ex, eid: int, ai: list[QuPathObject]) -> dict[str, int]:
    """The export after a review: the largest object reshaped, the next deleted, one added
    where it was, the rest locked (accepted); the entry's earlier annotations kept."""
    order = sorted(ai, key=lambda o: -o.geometry.area)
    reshaped, deleted = order[0], order[1]
    ann = ex.folder / "qpseg" / "annotations" / f"{eid}.geojson"
    final = read_geojson(ann) if ann.is_file() else []
    final.append(qupath_exported(reshaped, geometry=reshaped.geometry.buffer(-8)))
    final += [qupath_exported(o, locked=True) for o in order[2:]]
    spot = deleted.geometry.representative_point()
    final.append(qupath_exported(_obj(Point(spot.x, spot.y).buffer(16), "Tumor",
                                      id="11111111-2222-4333-8444-555555555555")))
    write_geojson(ann, final, backup=False)
    return {"n_reshaped": 1, "n_deleted": 1, "n_added": 1, "n_accepted": len(order) - 2}


def test_evaluate_edits_history_records_each_model_once(project, capsys) -> None:
    import os

    ex = project
    one, two = ex.train_ids
    ai = _predict(ex, one, SHA_A)
    _predict(ex, two, SHA_A)
    did = _review(ex, one, ai)
    baseline = ex.folder / "before"
    baseline.mkdir()
    for eid in ex.train_ids:  # the export before the review: its annotations are not "added"
        shutil.copy2(ex.folder / "qpseg" / "annotations" / f"{eid}.geojson", baseline)
    src = read_geojson(baseline / f"{one}.geojson")
    write_geojson(baseline / f"{one}.geojson",
                  [o for o in src if "qpseg_model" not in o.metadata
                   and o.id != "11111111-2222-4333-8444-555555555555"], backup=False)
    out = ex.folder / "edits"
    args = ["evaluate-edits", str(ex.project), "--out", str(out), "--baseline", str(baseline),
            "--history"]
    assert main(args) == 0
    assert main(args) == 0  # rerun of the same round: replaced, not added
    rounds = read_history(ex.folder / "qpseg" / "rounds.csv")
    assert [(r.round, r.model_sha256, r.entries) for r in rounds] == [(1, SHA_A, (str(one),))]
    got = {k: getattr(rounds[0], k) for k in did}
    assert got == did
    assert 0 < rounds[0].dice < 1 and rounds[0].area_changed_um2 > 0
    text = capsys.readouterr().out
    assert "review round 1 recorded: 3 corrections on 1 reviewed slide(s)" in text

    # Round 2: a new model predicts the second slide (later), which is reviewed in turn.
    ai2 = _predict(ex, two, SHA_B)
    os.utime(ex.folder / "qpseg" / "predictions" / f"{two}.geojson", None)
    _review(ex, two, ai2)
    assert main(args) == 0
    rounds = read_history(ex.folder / "qpseg" / "rounds.csv")
    assert [(r.round, r.model_sha256, r.entries) for r in rounds] == [
        (1, SHA_A, (str(one),)), (2, SHA_B, (str(two),))]
    assert rounds[0].n_reshaped == 1 and rounds[1].n_reshaped == 1
    html = (out / "rounds.html").read_text(encoding="utf-8")
    assert html.count("<rect") == 2 and "round 2" in html


def test_a_class_the_model_knows_but_did_not_predict_here_counts_as_added(project) -> None:
    """The model's classes come from the run's ``run_metadata.json`` as ``qpseg infer``
    writes it (``model.class_names``), so a region of a class the model predicted nowhere on
    the reviewed slides is a correction (added) the first time, not only once another
    slide's predictions happen to include that class."""
    import json

    from qpseg.edits import evaluate_edits

    ex = project
    one = ex.train_ids[0]
    truth = [o for o in read_geojson(ex.ground_truth / f"{one}.geojson")
             if o.classification == "Tumor"]
    ai = write_ai_predictions(ex.folder, one, truth, model_sha256=SHA_A)
    preds = ex.folder / "qpseg" / "predictions"
    (preds / "run_metadata.json").write_text(json.dumps({"model": {
        "sha256": SHA_A, "class_names": ["Background", "Tumor", "Stroma", "Necrosis"]}}))
    ann = ex.folder / "qpseg" / "annotations" / f"{one}.geojson"
    far = box(0, 0, 40, 40)  # no AI object there
    assert not any(o.geometry.intersects(far) for o in ai)
    write_geojson(ann, [qupath_exported(o, locked=True) for o in ai]
                  + [_obj(far, "Necrosis", id="11111111-2222-4333-8444-666666666666")],
                  backup=False)
    others = [e for e in ex.train_ids if e != one]
    for eid in others:  # only the reviewed slide is compared
        (ex.folder / "qpseg" / "annotations" / f"{eid}.geojson").unlink()
    res = evaluate_edits(ex.project, ex.folder / "edits")
    row = next(r for r in res.rows() if str(r["entry_id"]) == str(one))
    assert (row["n_added"], row["n_user_other"], row["n_accepted"]) == (1, 0, len(ai))


# ------------------------------------------------------------------------ corrected regions


def test_corrected_regions_are_where_the_review_changed_the_model() -> None:
    meta = {"qpseg_model": "m", "qpseg_model_sha256": SHA_A}
    kept = _obj(box(0, 0, 100, 100), "Tumor", id="a", metadata=meta)
    reshaped = _obj(box(200, 0, 300, 100), "Tumor", id="b", metadata=meta)
    deleted = _obj(box(400, 0, 500, 100), "Stroma", id="c", metadata=meta)
    recl = _obj(box(600, 0, 700, 100), "Tumor", id="d", metadata=meta)
    exported = [
        qupath_exported(kept, locked=True),
        qupath_exported(reshaped, geometry=box(200, 0, 250, 100)),
        qupath_exported(recl, classification="Necrosis"),
        _obj(box(0, 0, 150, 100), "Tumor", id="own"),   # drawn over the kept one and beyond
        _obj(box(-50, -50, 900, 200), "Region*", id="region"),
        _obj(box(420, 20, 440, 40), "Ignore*", id="pen"),
    ]
    regions = corrected_regions(exported, [kept, reshaped, deleted, recl])
    from shapely import union_all

    got = union_all(regions)
    # reshaped (its original outline holds the new one), deleted, reclassified, and the part
    # of the pathologist's own Tumor outline no Tumor prediction covered.
    assert got.area == pytest.approx(10000 + 10000 + 10000 + 5000)
    assert got.contains(Point(125, 50)) and not got.contains(Point(50, 50))
    assert corrected_regions(exported, []) == []
    untouched = [qupath_exported(o) for o in (kept, reshaped, deleted, recl)]
    assert corrected_regions(untouched, [kept, reshaped, deleted, recl]) == []


def test_correction_weight_draws_corrected_tiles_more_often(tmp_path: Path) -> None:
    from qpseg.data.grid import SlideRecord, Tile
    from qpseg.training.data import correction_items

    meta = {"qpseg_model": "m", "qpseg_model_sha256": SHA_A}
    # (ids are UUIDs, as QuPath writes them: the GeoJSON writer replaces anything else)
    gone = _obj(box(300, 300, 400, 400), "Tumor", id="0000000a-0000-4000-8000-000000000001",
                metadata=meta)
    fine = _obj(box(20, 20, 60, 60), "Tumor", id="0000000a-0000-4000-8000-000000000002",
                metadata=meta)
    pf, af = tmp_path / "pred.geojson", tmp_path / "export.geojson"
    write_geojson(pf, [gone, fine], backup=False)
    write_geojson(af, [qupath_exported(fine, locked=True)], backup=False)
    rec = SlideRecord(path=str(tmp_path / "s.tif"), mpp=0.5, width=512, height=512,
                      entry_id=7, annotation_file=str(af))
    manifest = SimpleNamespace(entries=[SimpleNamespace(entry_id=7, predictions_file=str(pf))])
    # 64 px tiles at 1 µm/px: 128 level-0 px each, a 4 x 4 grid over the slide.
    tiles = [Tile(0, x, y, 1.0, (1, 0)) for y in range(0, 512, 128) for x in range(0, 512, 128)]
    items, n = correction_items(manifest, [rec], tiles, None, 3, 64, 1.0)  # type: ignore[arg-type]
    over = {i for i, t in enumerate(tiles) if box(t.x, t.y, t.x + 128, t.y + 128)
            .intersects(gone.geometry)}
    assert over == {10, 11, 14, 15} and n == 4
    assert items is not None and len(items) == len(tiles) + 2 * 4
    counts = {t: sum(1 for i, _ in items if i == t) for t in range(len(tiles))}
    assert all(counts[t] == (3 if t in over else 1) for t in counts)
    assert correction_items(manifest, [rec], tiles, None, 1, 64, 1.0) == (None, 0)  # type: ignore[arg-type]


def test_training_weighs_the_corrections_of_a_reviewed_slide(project, tmp_path: Path) -> None:
    from qpseg.training.run import train

    ex = project
    one = ex.train_ids[0]
    _review(ex, one, _predict(ex, one, SHA_A))
    # Both slides train (no validation slide), so the reviewed one is among them.
    cfg = {**{k: v for k, v in DEMO_TRAIN_CONFIG.items() if k != "model"},
           "split": {"val": 0.0, "test": 0.0}}
    res = train(ex.project, tmp_path / "m", model="tiny_unet", config=cfg, dry_run=True)
    corr, items = res.summary["corrections"], res.summary["train"]
    assert corr["weight"] == 3 and corr["tiles"] > 0
    assert items["items"] == items["tiles"] + 2 * corr["tiles"]
    off = train(ex.project, tmp_path / "m2", model="tiny_unet", config=cfg, dry_run=True,
                overrides={"data": {"correction_weight": 1}})
    assert off.summary["corrections"] == {} and off.summary["train"]["items"] == items["tiles"]


# --------------------------------------------------------------- fine-tuning: the recipe


def _package(folder: Path, training: dict) -> Path:
    from qpseg.models import create_model, save_package

    model = create_model("tiny_unet", 4, tile_px=64, base_filters=8, depth=3)
    return save_package(folder, model, class_names=["Background", "Tumor", "Stroma", "Necrosis"],
                        mpp=2.0, training=training)


def test_fine_tuning_uses_the_packages_recipe_with_a_shorter_schedule(tmp_path: Path) -> None:
    from qpseg.training.run import FINETUNE_SCHEDULE, finetune_recipe

    cfg = {**DEMO_TRAIN_CONFIG, "pretrained": "imagenet", "split": {"val": 0.25, "file": "x"},
           "train": {**DEMO_TRAIN_CONFIG["train"], "device": "cuda"}}
    m1 = _package(tmp_path / "m1", {"config": cfg})
    recipe = finetune_recipe(m1)
    assert recipe["model"] == "tiny_unet" and "pretrained" not in recipe
    assert recipe["train"]["steps"] == 75 and recipe["train"]["epochs"] == 5
    assert FINETUNE_SCHEDULE == 0.5
    assert recipe["optimizer"] == {**DEMO_TRAIN_CONFIG["optimizer"],
                                   "lr": DEMO_TRAIN_CONFIG["optimizer"]["lr"] / 3}
    assert recipe["split"] == {"val": 0.25} and "device" not in recipe["train"]
    # A package that was itself fine-tuned keeps its (already short) schedule.
    m2 = _package(tmp_path / "m2", {"config": {**cfg, "train": recipe["train"]},
                                    "initialisation": {"init_from": {"package": str(m1)}}})
    assert finetune_recipe(m2)["train"]["steps"] == 75
    assert finetune_recipe(m2)["optimizer"] == DEMO_TRAIN_CONFIG["optimizer"]


def test_train_init_from_alone_runs_the_recipe(project, tmp_path: Path) -> None:
    from qpseg.training.run import train

    m1 = _package(tmp_path / "m1", {"config": DEMO_TRAIN_CONFIG})
    res = train(project.project, tmp_path / "m2", overrides={"init_from": str(m1)},
                dry_run=True)
    assert res.config["model"] == "tiny_unet"
    assert res.config["train"]["steps"] == 75 and res.config["loss"]["name"] == "ce"
    assert res.config["model_kwargs"] == DEMO_TRAIN_CONFIG["model_kwargs"]
    assert res.config["data"]["mpp"] == 2.0
    # --steps (an override) still decides.
    res = train(project.project, tmp_path / "m3", overrides={"init_from": str(m1),
                                                             "train": {"steps": 9}},
                dry_run=True)
    assert res.config["train"]["steps"] == 9
