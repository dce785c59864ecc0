"""``qpseg infer`` through a local Typer app (the lead registers it in qpseg.cli)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

from qpseg.cli.infer import infer
from qpseg.errors import ConfigError
from qpseg.testing.projects import make_project
from qpseg.testing.synthetic import make_plain_image, make_slide
from test_engine_support import colour_package

app = typer.Typer()
app.command("infer")(infer)


@app.callback()
def _root() -> None:
    """Test app."""


def _run(*args: str) -> Any:
    runner = CliRunner()
    return runner.invoke(app, ["infer", *args], standalone_mode=False)


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    proj = make_project(root / "proj", n_slides=2, width=700, height=500, seed=11)
    return {"root": root, "project": proj.path, "pkg": colour_package(root / "pkg"),
            "ids": [str(i) for i in proj.entry_ids]}  # type: ignore[dict-item]


def test_project_run_then_skip(env: dict[str, Any]) -> None:
    res = _run(str(env["project"]), "--model", str(env["pkg"]), "--min-area-um2", "50",
               "--overlay")
    assert res.exception is None, res.output
    assert res.return_value == 0
    assert "2 done, 0 skipped, 0 failed" in res.output
    pred = env["project"].parent / "qpseg" / "predictions"
    for eid in env["ids"]:
        assert (pred / f"{eid}.geojson").is_file()
        assert (pred / f"{eid}.metadata.json").is_file()
        assert (pred / f"{eid}.overlay.png").is_file()
    # the same options (an overlay already there need not be asked for again): skipped
    res = _run(str(env["project"].parent), "--model", str(env["pkg"]), "--json",
               "--min-area-um2", "50")
    assert res.return_value == 0
    data = json.loads(res.stdout)
    assert data["counts"] == {"done": 0, "skipped": 2, "failed": 0}
    with open(pred / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert all(int(r["count_Tumor"]) >= 1 for r in rows)


def test_entries_and_detections(env: dict[str, Any], tmp_path: Path) -> None:
    eid = env["ids"][0]
    res = _run(str(env["project"]), "--model", str(env["pkg"]), "--entries", eid, "--out",
               str(tmp_path), "--as", "detections", "--lesion-classes", "none", "--quiet")
    assert res.return_value == 0 and res.output == ""
    text = (tmp_path / f"{eid}.geojson").read_text()
    assert '"objectType":"detection"' in text.replace(" ", "")
    assert "Size category" not in text and "Tumor" in text
    assert not (tmp_path / f"{env['ids'][1]}.geojson").exists()


def test_failures_give_exit_code_1_and_one_line_each(env: dict[str, Any],
                                                     tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    make_slide(slides / "good.tif", width=400, height=300, mpp=0.5, seed=4)
    make_plain_image(slides / "nompp.png", width=120, height=90)
    (slides / "junk.svs").write_bytes(b"not a slide at all")
    res = _run(str(slides), "--model", str(env["pkg"]), "--out", str(tmp_path / "out"),
               "--quiet")
    assert res.return_value == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("failed:")]
    assert len(lines) == 2 and any("pixel size unknown" in ln for ln in lines)
    assert (tmp_path / "out" / "good.geojson").is_file()


def test_shards_split_the_work(env: dict[str, Any], tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    for k in range(3):
        make_slide(slides / f"s{k}.tif", width=300, height=200, mpp=0.5, seed=k)
    done: list[str] = []
    for i in range(2):
        res = _run(str(slides), "--model", str(env["pkg"]), "--out", str(tmp_path / "out"),
                   "--shard", f"{i}/2", "--json")
        assert res.return_value == 0
        done += [s["key"] for s in json.loads(res.stdout)["slides"]]
        assert (tmp_path / "out" / f"summary.shard-{i}-of-2.csv").is_file()
    assert sorted(done) == ["s0", "s1", "s2"]


@pytest.mark.parametrize(("args", "message"), [
    (["--as", "polygons"], "--as"),
    (["--shard", "2/2"], "--shard"),
    (["--tissue", "magic"], "--tissue"),
    (["--min-tissue", "1"], "--min-tissue"),
    (["--min-tissue", "nan"], "--min-tissue"),
    (["--batch-size", "0"], "--batch-size"),
    (["--entries", "1"], "--entries"),
    (["--lesion-classes", "Stroma"], "--lesion-classes"),
    (["--tile-px", "100"], "--tile-px"),
])
def test_bad_options_are_config_errors(env: dict[str, Any], tmp_path: Path, args: list[str],
                                       message: str) -> None:
    slide = make_slide(tmp_path / "x.tif", width=64, height=64, mpp=0.5).path
    res = _run(str(slide), "--model", str(env["pkg"]), "--out", str(tmp_path / "o"), *args)
    assert isinstance(res.exception, ConfigError)
    assert message in str(res.exception)


def test_slides_need_out_and_projects_stand_alone(env: dict[str, Any], tmp_path: Path) -> None:
    slide = make_slide(tmp_path / "x.tif", width=64, height=64, mpp=0.5).path
    res = _run(str(slide), "--model", str(env["pkg"]))
    assert isinstance(res.exception, ConfigError) and "--out" in str(res.exception)
    res = _run(str(env["project"]), str(slide), "--model", str(env["pkg"]))
    assert isinstance(res.exception, ConfigError)


def test_command_module_imports_no_heavy_library() -> None:
    code = ("import sys, qpseg.cli.infer; "
            "sys.exit(any(m in sys.modules for m in ('torch', 'numpy', 'openslide')))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_write_to_project_needs_quPath_and_a_project(env: dict[str, Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from qpseg.qupath import paquo_backend

    monkeypatch.setattr(paquo_backend, "qupath_available", lambda: False)
    res = _run(str(env["project"]), "--model", str(tmp_path / "no-model"), "--out",
               str(tmp_path / "o"), "--write-to-project")
    assert isinstance(res.exception, ConfigError)
    assert "QuPath installation" in str(res.exception)
    assert not (tmp_path / "o").exists()  # refused before anything ran
    monkeypatch.setattr(paquo_backend, "qupath_available", lambda: True)
    slide = make_slide(tmp_path / "s.tif", width=300, height=200, seed=2)
    res = _run(str(slide.path), "--model", str(env["pkg"]), "--out", str(tmp_path / "o"),
               "--write-to-project")
    assert isinstance(res.exception, ConfigError) and "QuPath project" in str(res.exception)
    res = _run(str(env["project"]), "--model", str(env["pkg"]), "--out", str(tmp_path / "o"),
               "--write-to-project", "--shard", "1/4")
    assert isinstance(res.exception, ConfigError) and "--shard" in str(res.exception)
    assert not (tmp_path / "o").exists()


def test_write_to_project_puts_each_entry_in(env: dict[str, Any], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With QuPath found, each finished entry's objects, read back from its GeoJSON, go to
    the backend with the per-slide summary; a backend failure is listed and exits 1."""
    from qpseg.engine import project_writeback
    from qpseg.errors import ProjectError
    from qpseg.qupath import paquo_backend
    from qpseg.qupath.geojson import read_geojson

    calls: list[tuple[int, int, dict[str, str]]] = []
    fail_on: set[int] = set()

    def fake(session: Any, entry_id: int, objects: list[Any], metadata: dict[str, str],
             originals: list[Any] | None) -> paquo_backend.Replaced:
        assert session.path == env["project"].resolve()
        if entry_id in fail_on:
            raise ProjectError("QuPath could not store the objects", session.path)
        calls.append((entry_id, len(objects), metadata))
        return paquo_backend.Replaced(5, len(objects))

    monkeypatch.setattr(paquo_backend, "qupath_available", lambda: True)
    monkeypatch.setattr(project_writeback, "_paquo_replace", fake)
    out = tmp_path / "o"
    res = _run(str(env["project"]), "--model", str(env["pkg"]), "--out", str(out),
               "--write-to-project", "--min-area-um2", "50")
    assert res.exception is None and res.return_value == 0, res.output
    ids = [int(i) for i in env["ids"]]
    assert [c[0] for c in calls] == ids
    for eid, n, meta in calls:
        assert n == len(read_geojson(out / f"{eid}.geojson")) > 0
        assert meta == {k: v if isinstance(v, str) else json.dumps(v) for k, v in json.loads(
            (out / f"{eid}.metadata.json").read_text(encoding="utf-8")).items()}
    assert "5 earlier qpseg object(s)" in " ".join(res.output.split())
    # finished entries are skipped by inference but still written; one entry fails
    calls.clear()
    fail_on.add(ids[1])
    res = _run(str(env["project"]), "--model", str(env["pkg"]), "--out", str(out),
               "--write-to-project", "--json", "--min-area-um2", "50")
    assert res.return_value == 1
    data = json.loads(res.stdout)
    assert data["counts"]["skipped"] == 2 and [c[0] for c in calls] == [ids[0]]
    errors = [w["error"] for w in data["written_to_project"]]
    assert errors[0] == "" and "could not store" in errors[1]


def test_an_unwritable_out_fails_at_once_in_one_line(env: dict[str, Any],
                                                     tmp_path: Path) -> None:
    from qpseg.errors import OutputError

    slide = make_slide(tmp_path / "x.tif", width=64, height=64, mpp=0.5).path
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    for out, what in ((a_file, "is not a folder"), (a_file / "sub", "not a directory")):
        res = _run(str(slide), "--model", str(env["pkg"]), "--out", str(out))
        assert isinstance(res.exception, OutputError), res.output
        assert res.exception.one_line().startswith(f"{out}: ") and what in str(res.exception)
        assert res.exception.exit_code == 8
    assert a_file.read_text() == "not a folder"


def test_out_may_not_be_the_annotation_export_folder(env: dict[str, Any]) -> None:
    from qpseg.errors import OutputError

    ann = env["project"].parent / "qpseg" / "annotations"
    before = {p.name: p.read_bytes() for p in ann.iterdir()}
    res = _run(str(env["project"]), "--model", str(env["pkg"]), "--out", str(ann),
               "--overwrite")
    assert isinstance(res.exception, OutputError)
    assert "annotation export folder" in str(res.exception)
    assert {p.name: p.read_bytes() for p in ann.iterdir()} == before


@pytest.mark.parametrize("args", [["--tile-px", "1000000000"], ["--batch-size", "1000000000"]])
def test_absurd_sizes_are_refused_with_the_limit(env: dict[str, Any], tmp_path: Path,
                                                 args: list[str]) -> None:
    slide = make_slide(tmp_path / "x.tif", width=64, height=64, mpp=0.5).path
    res = _run(str(slide), "--model", str(env["pkg"]), "--out", str(tmp_path / "o"), *args)
    assert isinstance(res.exception, ConfigError)
    assert "GiB" in str(res.exception) and "more than half of" in str(res.exception)


def test_run_reports_polygonising_between_tiles_and_slide_end(env: dict[str, Any],
                                                              tmp_path: Path) -> None:
    from qpseg.engine import InferenceParams, ProgressEvent, jobs_from_paths, run_inference

    slide = make_slide(tmp_path / "s.tif", width=400, height=300, mpp=0.5, seed=3).path
    events: list[ProgressEvent] = []
    res = run_inference(jobs_from_paths([slide], tmp_path / "o"), env["pkg"], tmp_path / "o",
                        InferenceParams(min_area_um2=0), progress=events.append)
    kinds = [e.kind for e in events]
    first, last = kinds.index("polygonise"), len(kinds) - 1 - kinds[::-1].index("polygonise")
    assert set(kinds[first:last + 1]) == {"polygonise"}
    assert kinds[first - 1] == "tiles" and kinds[last + 1] == "slide_end"
    poly = events[first:last + 1]
    # a map of at most 2048 x 2048 px: one block
    assert [(e.blocks_done, e.blocks_total) for e in poly] == [(0, 1), (1, 1), (1, 1)]
    assert poly[0].objects == 0 and poly[-1].objects == res.results[0].n_objects > 0
    assert {(e.key, e.name) for e in poly} == {("s", "s.tif")}


def test_display_shows_polygonising_per_slide() -> None:
    from qpseg.cli.infer import _progress_display
    from qpseg.engine import ProgressEvent

    display = _progress_display(quiet=False)
    with display:
        display(ProgressEvent("run_start", 0, 1))
        display(ProgressEvent("slide_start", 0, 1, "a", "a.tif"))
        display(ProgressEvent("tiles", 0, 1, "a", "a.tif", 6, 6))
        for done, found in ((0, 0), (1, 40), (2, 1234), (2, 1000)):
            display(ProgressEvent("polygonise", key="a", name="a.tif", blocks_done=done,
                                  blocks_total=2, objects=found))
        tasks = {t.description.strip(): t for t in display.progress.tasks}
        poly = tasks["polygonising: 1,000 objects"]
        assert (poly.completed, poly.total) == (2, 2)
        assert (tasks["a.tif"].completed, tasks["a.tif"].total) == (6, 6)
        display(ProgressEvent("slide_end", 0, 1, "a", "a.tif", status="done"))
        assert [t.description for t in display.progress.tasks] == ["slides"]
