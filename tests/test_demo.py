"""The demo's example project and its recipe (the full demo runs in CI's install line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpseg.cli import main
from qpseg.demo import CLASSES, DEMO_TRAIN_CONFIG, build_example
from qpseg.qupath.geojson import read_geojson

ROOT = Path(__file__).resolve().parents[1]


def test_demo_recipe_matches_the_example_config_file() -> None:
    import yaml

    on_disk = yaml.safe_load((ROOT / "examples" / "configs" / "tiny_unet_demo.yaml").read_text())
    assert on_disk == DEMO_TRAIN_CONFIG


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory):
    return build_example(tmp_path_factory.mktemp("ex"), n_train=2, n_test=1, size_px=768)


def test_example_has_sparse_annotations_and_full_truth(example) -> None:
    assert example.train_ids == (1, 2) and example.test_ids == (3,)
    ann = example.folder / "qpseg" / "annotations"
    assert sorted(p.name for p in ann.glob("*.geojson")) == ["1.geojson", "2.geojson"]
    for eid in example.train_ids:
        objs = read_geojson(ann / f"{eid}.geojson")
        classes = {o.classification for o in objs}
        assert {"Region*", "Ignore*"} <= classes and classes & {"Tumor", "Stroma", "Necrosis"}
        truth = read_geojson(example.ground_truth / f"{eid}.geojson")
        labelled = sum(o.geometry.area for o in objs if o.classification in ("Tumor", "Stroma",
                                                                               "Necrosis"))
        full = sum(o.geometry.area for o in truth if o.classification != "Region*")
        assert 0 < labelled < full  # partial labels, as pathologists draw them
    assert (example.ground_truth / "3.geojson").is_file()


def test_example_is_reused_and_reloads_with_info(example, capsys) -> None:
    stamp = example.folder / "qpseg" / "example.json"
    before = stamp.stat().st_mtime_ns
    again = build_example(example.folder, n_train=2, n_test=1, size_px=768)
    assert again == example and stamp.stat().st_mtime_ns == before
    assert main(["info", str(example.project), "--json", "--open-slides"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["found"] for e in info["entries"]] == [True, True, True]
    assert {e["mpp"] for e in info["entries"]} == {0.5}


def test_import_of_example_uses_only_training_entries(example, tmp_path) -> None:
    from qpseg.manifest import import_project

    with pytest.warns(UserWarning, match="no annotation"):
        m = import_project(example.project, tmp_path)
    assert [e.status for e in m.entries] == ["ok", "ok", "no-annotations"]
    assert m.class_map.names[0] == "Background"
    assert set(m.class_map.names) == {"Background", "Tumor", "Stroma", "Necrosis"}


# --- the demo's output folder: it never replaces what it did not make ---------------------------


class _WentAhead(Exception):
    """Raised by a stand-in for the demo's work: the demo got past its folder check."""


def _real_project(folder: Path) -> dict[Path, bytes]:
    """A user's project and model where the demo would put its own; returns path -> bytes."""
    files = {
        folder / "project" / "project.qpproj": b'{"version": "0.5.1", "images": [{"x": 1}]}',
        folder / "project" / "project.qpproj.backup": b'{"version": "0.5.1"}',
        folder / "project" / "classes.json": b'{"pathClasses": [{"name": "Mine"}]}',
        folder / "model" / "weights.safetensors": b"hours of training",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _stop_demo(monkeypatch: pytest.MonkeyPatch, calls: list[dict]) -> None:
    """Replace the demo's slow work with a recorder that stops it."""
    import qpseg.demo

    def fake_run_demo(out, **kwargs):
        calls.append({"out": Path(out), **kwargs})
        raise _WentAhead

    monkeypatch.setattr(qpseg.demo, "run_demo", fake_run_demo)


def test_demo_refuses_a_folder_with_a_real_project(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "work"
    files = _real_project(out)
    calls: list[dict] = []
    _stop_demo(monkeypatch, calls)
    assert main(["demo", "--out", str(out)]) == 8
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: ") and "--force" in err[0]
    assert calls == []
    assert {p: p.read_bytes() for p in files} == files
    assert sorted(p.name for p in out.iterdir()) == ["model", "project"]  # no marker either


def test_demo_library_refuses_too(tmp_path, monkeypatch) -> None:
    import qpseg.demo
    from qpseg.errors import OutputError

    out = tmp_path / "work"
    files = _real_project(out)

    def went_ahead(*args, **kwargs):
        raise _WentAhead

    monkeypatch.setattr(qpseg.demo, "build_example", went_ahead)
    with pytest.raises(OutputError, match="not made by `qpseg demo`") as info:
        qpseg.demo.run_demo(out, device="cpu")
    assert Path(info.value.path) == out
    assert {p: p.read_bytes() for p in files} == files


def test_demo_runs_in_new_empty_and_its_own_folders(tmp_path, monkeypatch) -> None:
    calls: list[dict] = []
    _stop_demo(monkeypatch, calls)
    new, empty = tmp_path / "new" / "deeper", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        with pytest.raises(_WentAhead):
            main(["demo", "--out", str(out)])
        assert (out / ".qpseg-demo").is_file()
    # A rerun into the demo's own folder (marker present, full of its outputs) goes ahead.
    (empty / "model").mkdir()
    (empty / "model" / "config.json").write_text("{}")
    with pytest.raises(_WentAhead):
        main(["demo", "--out", str(empty)])
    assert [c["out"] for c in calls] == [new, empty, empty]
    assert all(c["force"] is False for c in calls)


def test_demo_out_from_environment_as_ci_sets_it(tmp_path, monkeypatch) -> None:
    calls: list[dict] = []
    _stop_demo(monkeypatch, calls)
    for _ in range(2):  # CI's fresh temp dir, then a rerun into it
        monkeypatch.setenv("QPSEG_DEMO_OUT", str(tmp_path / "ci-demo"))
        with pytest.raises(_WentAhead):
            main(["demo"])
    assert [c["out"] for c in calls] == [tmp_path / "ci-demo"] * 2


def test_demo_recognises_a_folder_from_before_the_marker(tmp_path, monkeypatch) -> None:
    calls: list[dict] = []
    _stop_demo(monkeypatch, calls)
    stamp = tmp_path / "old" / "project" / "qpseg" / "example.json"
    stamp.parent.mkdir(parents=True)
    stamp.write_text('{"settings": {}}')
    with pytest.raises(_WentAhead):
        main(["demo", "--out", str(tmp_path / "old")])
    assert (tmp_path / "old" / ".qpseg-demo").is_file()


def test_demo_force_takes_over_a_folder(tmp_path, monkeypatch) -> None:
    calls: list[dict] = []
    _stop_demo(monkeypatch, calls)
    out = tmp_path / "work"
    _real_project(out)
    with pytest.raises(_WentAhead):
        main(["demo", "--out", str(out), "--force"])
    assert calls[0]["force"] is True and (out / ".qpseg-demo").is_file()


def test_demo_out_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    calls: list[dict] = []
    _stop_demo(monkeypatch, calls)
    out = tmp_path / "file"
    out.write_text("x")
    assert main(["demo", "--out", str(out)]) == 8
    assert capsys.readouterr().err.startswith(f"error: {out}: is not a folder")
    assert calls == [] and out.read_text() == "x"


def test_demo_last_lines_name_scripts_that_exist(tmp_path, monkeypatch, capsys) -> None:
    import re

    import qpseg.demo
    from qpseg.cli.groovy import packaged_script
    from qpseg.demo import DemoResult, Example

    out = tmp_path / "qpseg-demo"

    def fake_run_demo(out_arg, **kwargs):
        out_arg = Path(out_arg)
        ex = Example(out_arg / "project" / "project.qpproj", (1,), (2,), out_arg / "truth")
        return DemoResult(example=ex, out=out_arg, scores=[
            {"slide": "test_01", "entry_id": "2", "role": "held-out", "dice_Tumor": 0.9}],
            paths={"predictions": out_arg / "p", "evaluation": out_arg / "e",
                   "model": out_arg / "m"})

    monkeypatch.setattr(qpseg.demo, "run_demo", fake_run_demo)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QPSEG_DEMO_OUT", raising=False)
    assert main(["demo"]) == 0  # the default --out, a relative path
    monkeypatch.chdir(out)  # QuPath's file dialog does not start where qpseg ran
    text = capsys.readouterr().out
    named = re.findall(r"(\S+\.groovy)", text)
    assert named, text
    for name in named:
        path = Path(name)
        assert path.is_absolute() and path.is_file(), name
        assert path.read_bytes() == packaged_script(path.name)


# --- the review round: a simulated QuPath review, read back by every reader of truth ----------


def _predict_truth(example, folder: Path) -> dict[int, list]:
    """Predictions as `qpseg infer` writes them (ids, provenance metadata), from a perfect model:
    one object per ground-truth region of every entry."""
    import uuid

    from qpseg.objects import predictions_path, provenance, write_predictions
    from qpseg.qupath.geojson import QuPathObject

    prov = provenance("tiny_unet", "cd" * 32, mpp=2.0, run="20250101T000000Z")
    out = {}
    for eid in (*example.train_ids, *example.test_ids):
        truth = read_geojson(example.ground_truth / f"{eid}.geojson")
        objs = [QuPathObject(o.geometry, classification=o.classification,
                             class_color=o.class_color, id=str(uuid.uuid4()),
                             metadata=dict(prov))
                for o in truth if o.classification != "Region*"]
        write_predictions(predictions_path(folder, eid), objs)
        out[eid] = objs
    return out


@pytest.fixture(scope="module")
def reviewed(example, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the example with predictions, its export before the review, and one round."""
    import shutil

    from qpseg.demo import Example, run_review_round

    root = tmp_path_factory.mktemp("review")
    shutil.copytree(example.folder, root / "project")
    ex = Example(root / "project" / "project.qpproj", example.train_ids, example.test_ids,
                 root / "project" / "qpseg" / "ground_truth")
    preds = _predict_truth(ex, ex.folder)
    ann = ex.folder / "qpseg" / "annotations"
    before = {p.name: p.read_bytes() for p in ann.iterdir()}
    rnd = run_review_round(ex, ex.folder / "qpseg" / "predictions", root / "review")
    return ex, preds, before, rnd


def _sum(counts: dict, what: str) -> int:
    return sum(c[what] for c in counts.values())


def test_review_round_counts_are_what_the_edits_imply(reviewed) -> None:
    ex, preds, before, rnd = reviewed
    sim = rnd.simulation
    assert rnd.ok and rnd.mismatches() == [] and rnd.observed == rnd.expected
    assert sim.entry_id in ex.train_ids and sim.exported == (1, 2, 3)
    assert {k: len(v) for k, v in sim.actions.items()} == {
        "reshaped": 1, "reclassified": 1, "locked": 1, "deleted": 1, "added": 1,
        "untouched": len(preds[sim.entry_id]) - 4}
    n = sum(len(v) for v in preds.values())  # 6 regions on each of the 3 slides
    assert n == 18
    # Known answers: the 3 reviewed objects count, every untouched one (all slides) is left out.
    for reader in ("import-project", "evaluate", "evaluate-edits"):
        counts = rnd.observed[reader]
        assert (_sum(counts, "left_out"), _sum(counts, "kept")) == (n - 4, 3), reader
        assert (_sum(counts, "accepted"), _sum(counts, "edited"), _sum(counts, "unproven")) \
            == (1, 2, 0), reader
    # The held-out entries' exports hold only unreviewed AI objects: partial truth has nothing to
    # score there, but every reader still counts their AI objects as left out.
    assert sim.no_truth == ex.test_ids
    # The reclassified object counts under its new class.
    ai = {o.id: o for o in preds[sim.entry_id]}
    old = ai[sim.actions["reclassified"][0]].classification
    new = CLASSES[(CLASSES.index(old) + 1) % len(CLASSES)]
    assert rnd.observed["import-project"][new]["edited"] >= 1
    n_own = sum(len(read_geojson(ex.folder / "qpseg" / "annotations_before_review" / name))
                for name in before)
    assert rnd.observed["edits"] == {
        "n_ai": n, "n_kept": n - 3, "n_accepted": 1, "n_left_out": n - 4, "n_reshaped": 1,
        "n_reclassified": 1, "n_deleted": 1, "n_added": 1, "n_existing": n_own,
        "n_other_ai": 0, "n_user_other": 0}


def test_review_round_export_is_what_qupath_writes(reviewed) -> None:
    import numpy as np

    ex, preds, _, rnd = reviewed
    sim = rnd.simulation
    path = ex.folder / "qpseg" / "annotations" / f"{sim.entry_id}.geojson"
    raw = json.loads(path.read_text(encoding="utf-8"))["features"]
    final = {o.id: o for o in read_geojson(path)}
    ai = {o.id: o for o in preds[sim.entry_id]}
    # Coordinates: float32 vertices written with 2 decimals.
    for f in raw:
        coords = np.array([c for ring in f["geometry"]["coordinates"] for c in ring]
                          if f["geometry"]["type"] == "Polygon" else
                          [c for poly in f["geometry"]["coordinates"] for ring in poly
                           for c in ring], dtype=np.float64)
        assert np.array_equal(coords, np.round(coords, 2)), f["id"]
    # Ids, metadata and classes kept; the deleted object gone; only the locked one is locked.
    assert set(ai) - set(final) == set(sim.actions["deleted"])
    for oid, o in ai.items():
        if oid in final:
            assert final[oid].metadata == o.metadata
            assert (final[oid].classification == o.classification) == (
                oid not in sim.actions["reclassified"])
    assert [f["id"] for f in raw if f["properties"].get("isLocked")] == sim.actions["locked"]
    reshaped = sim.actions["reshaped"][0]
    assert final[reshaped].geometry.area < ai[reshaped].geometry.area
    # The pathologist's earlier annotations and their new one carry no qpseg metadata.
    own = read_geojson(ex.folder / "qpseg" / "annotations_before_review" / path.name)
    assert {o.id for o in own} | set(sim.actions["added"]) == {
        oid for oid, o in final.items() if not o.metadata}
    added = final[sim.actions["added"][0]]
    assert added.classification in CLASSES and added.geometry.intersects(
        ai[sim.actions["deleted"][0]].geometry)


def test_review_round_is_undone_before_the_next_demo(reviewed, tmp_path) -> None:
    import shutil

    from qpseg.demo import Example, simulate_review, undo_review

    ex0, _, before, rnd = reviewed
    folder = tmp_path / "project"
    shutil.copytree(ex0.folder, folder)
    ex = Example(folder / "project.qpproj", ex0.train_ids, ex0.test_ids,
                 folder / "qpseg" / "ground_truth")
    ann = folder / "qpseg" / "annotations"
    assert {p.name for p in ann.iterdir()} == {"1.geojson", "2.geojson", "3.geojson"}
    assert undo_review(folder) is True
    assert {p.name: p.read_bytes() for p in ann.iterdir()} == before
    assert not (folder / "qpseg" / "annotations_before_review").exists()
    assert undo_review(folder) is False
    # Rounds run one after another (a rerun of the demo without the undo) each start from the
    # export before the review, so they expect the same counts.
    for _ in range(2):
        again = simulate_review(ex, folder / "qpseg" / "predictions")
        assert again.expected_ai == rnd.simulation.expected_ai
        assert again.expected_edits == rnd.simulation.expected_edits
        assert {p.name: p.read_bytes() for p in again.baseline.glob("*.geojson")} == before
    undo_review(folder)
    assert {p.name: p.read_bytes() for p in ann.iterdir()} == before


def test_review_round_catches_a_rule_that_misjudges(example, tmp_path, monkeypatch) -> None:
    """If what QuPath gives back moved objects by more than the rule allows, the untouched
    objects would be judged edited: the round must say its counts are wrong."""
    import shutil

    import shapely.affinity

    import qpseg.testing.projects
    from qpseg.demo import Example, run_review_round

    shutil.copytree(example.folder, tmp_path / "project")
    ex = Example(tmp_path / "project" / "project.qpproj", example.train_ids, example.test_ids,
                 tmp_path / "project" / "qpseg" / "ground_truth")
    _predict_truth(ex, ex.folder)
    monkeypatch.setattr(qpseg.testing.projects, "qupath_round",
                        lambda g: shapely.affinity.translate(g, 2.0, 0.0))
    rnd = run_review_round(ex, ex.folder / "qpseg" / "predictions", tmp_path / "review")
    assert not rnd.ok
    lines = rnd.mismatches()
    assert any(line.startswith("import-project: ") for line in lines)
    assert any(line.startswith("edits: n_left_out: expected 14, observed 0") for line in lines)


def _fake_demo(monkeypatch: pytest.MonkeyPatch, rnd) -> None:
    import qpseg.demo
    from qpseg.demo import DemoResult, Example

    def fake_run_demo(out_arg, **kwargs):
        out_arg = Path(out_arg)
        ex = Example(out_arg / "project" / "project.qpproj", (1,), (2,), out_arg / "truth")
        return DemoResult(example=ex, out=out_arg, scores=[
            {"slide": "test_01", "entry_id": "2", "role": "held-out", "dice_Tumor": 0.9}],
            paths={"predictions": out_arg / "p", "evaluation": out_arg / "e",
                   "model": out_arg / "m"}, review=rnd)

    monkeypatch.setattr(qpseg.demo, "run_demo", fake_run_demo)


def test_demo_prints_and_records_the_review_round(reviewed, tmp_path, monkeypatch,
                                                  capsys) -> None:
    rnd = reviewed[3]
    _fake_demo(monkeypatch, rnd)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    assert f"Review round (simulated in QuPath on entry {rnd.simulation.entry_id}" in text
    assert "Review round counts: as expected" in text
    left = rnd.observed["import-project"]["Tumor"]["left_out"]
    assert f"{left} / " in text
    summary = json.loads((tmp_path / "d" / "demo_summary.json").read_text())
    saved = summary["review_round"]
    assert saved["ok"] is True and saved["observed"] == saved["expected"] == json.loads(
        json.dumps(rnd.expected))
    assert saved["actions"]["deleted"] == 1 and saved["entries_without_truth"] == [3]


def test_demo_exits_1_when_the_review_counts_are_wrong(reviewed, tmp_path, monkeypatch,
                                                        capsys) -> None:
    import copy
    import dataclasses

    rnd = reviewed[3]
    observed = copy.deepcopy(rnd.observed)
    observed["evaluate"]["Stroma"]["left_out"] += 1
    _fake_demo(monkeypatch, dataclasses.replace(rnd, observed=observed))
    assert main(["demo", "--out", str(tmp_path / "d")]) == 1
    text = capsys.readouterr().out
    assert "review round: the counts are not the expected ones" in text
    assert "evaluate: Stroma: expected" in text
    saved = json.loads((tmp_path / "d" / "demo_summary.json").read_text())["review_round"]
    assert saved["ok"] is False and saved["mismatches"]


def test_examples_readme_runs_the_scripts_as_their_headers_say() -> None:
    import re

    text = (ROOT / "examples" / "README.md").read_text(encoding="utf-8")
    assert "QuPath 0.5–0.7" in text and "0.4–0.7" not in text
    assert "qpseg groovy --out groovy" in text
    lines = re.findall(r"QuPath script .*\.groovy", text)
    assert len(lines) == 2
    for line in lines:  # headless project mode, as the scripts' headers give it
        assert re.fullmatch(r"QuPath script --args \S+\.qpproj groovy/\w+\.groovy", line), line
    for name in ("export_annotations.groovy", "import_predictions.groovy"):
        header = (ROOT / "groovy" / name).read_text(encoding="utf-8").split("*/")[0]
        assert f"QuPath script --args /path/to/project.qpproj {name}" in header


# ============================================================================ review rounds


def test_simulated_pathologist_fixes_the_large_errors_only() -> None:
    from shapely.geometry import box

    from qpseg.demo import correct_from_truth
    from qpseg.qupath.classes import default_color
    from qpseg.qupath.geojson import QuPathObject

    def obj(geom, cls, i=None):
        meta = {"qpseg_model": "m"} if i is not None else {}
        return QuPathObject(geom, classification=cls, class_color=default_color(cls),
                            id=f"00000000-0000-4000-8000-{i or 0:012d}", metadata=meta)

    truth = [obj(box(0, 0, 1000, 1000), "Region*"),
             obj(box(100, 100, 300, 300), "Tumor"),      # found well: accepted
             obj(box(400, 100, 600, 300), "Tumor"),      # found half: redrawn
             obj(box(100, 400, 300, 600), "Stroma"),     # found as Tumor: reclassified
             obj(box(400, 400, 600, 600), "Necrosis")]   # missed: added
    ai = [obj(box(102, 102, 300, 300), "Tumor", 1),
          obj(box(400, 100, 500, 300), "Tumor", 2),
          obj(box(100, 400, 300, 600), "Tumor", 3),
          obj(box(700, 700, 800, 800), "Stroma", 4),     # 10,000 px² false positive: deleted
          obj(box(900, 900, 910, 910), "Stroma", 5)]     # 100 px²: not worth it, untouched
    # 1 µm/px: the pathologist fixes errors of 400 µm² and more
    corr = correct_from_truth(ai, truth, mpp=1.0)
    assert corr.counts == {"accepted": 1, "reshaped": 1, "reclassified": 1, "deleted": 1,
                           "added": 1, "untouched": 1}
    by_id = {o.id: o for o in corr.final}
    assert by_id[ai[0].id].is_locked and by_id[ai[0].id].geometry.area == 198 * 198
    assert by_id[ai[1].id].geometry.equals(box(400, 100, 600, 300))
    assert by_id[ai[2].id].classification == "Stroma"
    assert ai[3].id not in by_id and not by_id[ai[4].id].is_locked
    added = [o for o in corr.final if "qpseg_model" not in o.metadata
             and o.classification == "Necrosis"]
    assert len(added) == 1 and added[0].geometry.equals(box(400, 400, 600, 600))
    assert [o.classification for o in corr.final].count("Region*") == 1


def _outcome(k: int, before: float, after: float, corrections: int,
             held_out: tuple[float, float] = (5.0, 3.0)):
    from qpseg.demo import RoundOutcome
    from qpseg.rounds import RoundRecord

    rec = RoundRecord("ab" * 32, (str(2 * k), str(2 * k + 1)), n_ai=10, n_accepted=3,
                      n_reshaped=corrections, area_changed_um2=100.0 * corrections,
                      dice=0.9, round=k).row()
    return RoundOutcome(k, Path(f"/x/rounds/model_{k}"), "ab" * 32, [2 * k, 2 * k + 1], [],
                        {"reshaped": corrections}, rec, before, after,
                        {"suggest": 1.0, "fine-tune": 2.0}, *held_out)


def _ok_round(rnd):
    """The review round with its observed counts the expected ones (these tests are about
    the rounds, not about that round's counts)."""
    import dataclasses

    return dataclasses.replace(rnd, observed=rnd.expected)


def test_demo_rounds_are_printed_and_recorded(reviewed, tmp_path, monkeypatch, capsys) -> None:
    import qpseg.demo

    _fake_demo(monkeypatch, _ok_round(reviewed[3]))
    seen = {}

    def fake_rounds(out, n, **kwargs):
        seen["n"] = n
        return [_outcome(1, 0.80, 0.85, 9, (6.0, 4.5)), _outcome(2, 0.85, 0.90, 4, (4.5, 2.0))]

    monkeypatch.setattr(qpseg.demo, "run_rounds", fake_rounds)
    assert main(["demo", "--out", str(tmp_path / "d"), "--rounds", "2"]) == 0
    assert seen == {"n": 2}
    text = capsys.readouterr().out
    assert "Review rounds" in text
    # Effort per reviewed slide (2 slides a round), and on the same held-out slides.
    assert "corrections per reviewed slide per round: 4.5 -> 2.0" in text
    assert "per held-out slide: 6.0 -> 4.5 -> 2.0" in text
    rounds = json.loads((tmp_path / "d" / "demo_summary.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["held_out_tumor_dice"] for r in rounds] == [0.85, 0.90]
    assert rounds[0]["n_reshaped"] == 9 and rounds[1]["corrections"] == 4
    assert [r["corrections_per_slide"] for r in rounds] == [4.5, 2.0]
    assert [r["held_out_corrections_per_slide"] for r in rounds] == [4.5, 2.0]
    assert rounds[0]["held_out_corrections_per_slide_before"] == 6.0
    assert rounds[0]["round_seconds"] == 3.0


def test_demo_without_rounds_runs_none(reviewed, tmp_path, monkeypatch) -> None:
    import qpseg.demo

    _fake_demo(monkeypatch, _ok_round(reviewed[3]))

    def no_rounds(*args, **kwargs):
        raise AssertionError("rounds ran without --rounds")

    monkeypatch.setattr(qpseg.demo, "run_rounds", no_rounds)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert "rounds" not in json.loads((tmp_path / "d" / "demo_summary.json").read_text())


@pytest.mark.slow
def test_two_review_rounds_improve_the_model(tmp_path) -> None:
    """The loop for real (about a minute on one CPU core): suggest, correct, record, fine-tune."""
    import csv

    import torch

    from qpseg.demo import run_rounds
    from qpseg.qupath.project import QuPathProject
    from qpseg.suggest import RANK_KEY

    torch.set_num_threads(1)
    outcomes = run_rounds(tmp_path, 2, device="cpu")
    assert [o.round for o in outcomes] == [1, 2]
    assert outcomes[-1].held_out_tumor_dice > outcomes[0].held_out_tumor_dice
    assert outcomes[1].held_out_tumor_dice_before == outcomes[0].held_out_tumor_dice
    assert len({e for o in outcomes for e in o.reviewed}) == 4  # 2 new slides per round
    project = tmp_path / "rounds" / "project"
    with (project / "qpseg" / "rounds.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert [r["model_sha256"] for r in rows] == [o.model_sha256 for o in outcomes]
    for o, row in zip(outcomes, rows, strict=True):
        assert row["entries"] == ";".join(map(str, sorted(o.reviewed))) or set(
            row["entries"].split(";")) == set(map(str, o.reviewed))
        assert int(row["corrections"]) == o.to_json()["corrections"]
    ranked = {e.entry_id: e.metadata.get(RANK_KEY)
              for e in QuPathProject.load(project / "project.qpproj").entries}
    assert sorted(v for v in ranked.values() if v) == ["1", "2"]  # the last round's picks
    assert (tmp_path / "rounds" / "round_2" / "edits" / "rounds.html").is_file()
