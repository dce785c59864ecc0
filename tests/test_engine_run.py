"""End-to-end whole-slide inference with a hand-weighted model whose answer is known.

See test_engine_support for the model: it marks the synthetic slides' tumour colour. The
slides are generated pyramidal TIFFs: one with power-of-4 levels at 0.5 µm/px, one at 0.4 µm/px
whose only other level has downsample 2.5 (the model's 1 µm/px is read from it), and the first
one again behind an OpenSlide handle that reports bounds.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
import torch

from qpseg.engine import (
    InferenceParams,
    ProgressEvent,
    SlideJob,
    jobs_from_paths,
    jobs_from_project,
    run_inference,
    slide_status,
)
from qpseg.engine.writers import sha256_file
from qpseg.errors import ConfigError, OutputError
from qpseg.objects import AREA, MAX_DIAMETER, PROBABILITY, SIZE_CATEGORY
from qpseg.qupath.geojson import read_geojson
from qpseg.testing.synthetic import SyntheticSlide, make_plain_image, make_slide
from test_engine_support import (
    bounds_opener,
    colour_package,
    colour_unet,
    dice,
    tumour_truth,
    union,
    whole_image_prediction,
)

MODEL_MPP = 1.0
BOUNDS = (200, 96, 1100, 800)


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)  # other jobs share the cores; results stay bit-reproducible


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("engine")
    a = make_slide(root / "slides" / "a.tif", width=1536, height=1024, mpp=0.5, seed=3)
    b = make_slide(root / "slides" / "b.tif", width=1000, height=760, mpp=0.4,
                   levels=(1, 2.5), seed=5)
    pkg = colour_package(root / "pkg", mpp=MODEL_MPP)
    out = root / "plain"
    res = run_inference(jobs_from_paths([a.path, b.path], out), pkg, out,
                        InferenceParams(keep_maps=True, min_area_um2=100, run_id="r1",
                                        heatmap=True, overlay=True))
    return {"root": root, "a": a, "b": b, "pkg": pkg, "out": out, "res": res}


def _normalised(path: Path) -> str:
    """A GeoJSON/metadata text without the run's date (which differs between runs)."""
    text = path.read_text("utf-8")
    return re.sub(r'"qpseg_date":\s*"[^"]*"', '"qpseg_date":""', text)


# ---------------------------------------------------------------------------- known answer

@pytest.mark.parametrize("name", ["a", "b"])
def test_polygons_match_the_known_tumour(data: dict[str, Any], name: str) -> None:
    slide: SyntheticSlide = data[name]
    res = {r.key: r for r in data["res"].results}[name]
    assert res.status == "done", res.reason
    objects = read_geojson(data["out"] / f"{name}.geojson")
    assert objects and all(o.classification == "Tumor" for o in objects)
    truth = tumour_truth(slide)
    pred = union(objects)
    assert dice(pred, truth) >= 0.95
    # object level: every true tumour region is found with Dice >= 0.95, at the right place
    ds = MODEL_MPP / slide.mpp  # level-0 px per map px
    for part in shapely.get_parts(truth):
        # regions that touch merge into one object: compare around each true region
        near = part.buffer(3 * ds)
        got = shapely.union_all([o.geometry for o in objects]).intersection(near)
        assert dice(got, part) >= 0.95
        dx = got.centroid.x - part.centroid.x
        dy = got.centroid.y - part.centroid.y
        assert math_hypot(dx, dy) <= ds  # within one output pixel
    for o in objects:
        m = o.measurements
        assert m[AREA] == pytest.approx(o.geometry.area * slide.mpp ** 2, rel=0.1)
        assert 0.5 <= m[PROBABILITY] <= 1.0
        assert SIZE_CATEGORY in m and m[MAX_DIAMETER] > 0  # Tumor is the lesion class
        assert o.metadata["qpseg_model"] == "pkg"
        assert o.metadata["qpseg_run"] == "r1"
        assert o.metadata["qpseg_mpp"] == "1.0"


def math_hypot(dx: float, dy: float) -> float:
    return float(np.hypot(dx, dy))


@pytest.mark.parametrize("name", ["a", "b"])
def test_stitched_map_equals_whole_image_prediction(data: dict[str, Any], name: str) -> None:
    slide: SyntheticSlide = data[name]
    maps = data["out"] / "maps" / name
    cls = np.load(maps / "classes.npy")
    ds = MODEL_MPP / slide.mpp
    assert cls.shape == (int(np.ceil(slide.height / ds)), int(np.ceil(slide.width / ds)))
    with slide.open() as s:
        ref = whole_image_prediction(s, colour_unet(), MODEL_MPP, cls.shape)
    # tiles without tissue are background in the map; the model says so there too
    assert (cls != ref).mean() < 1e-4
    probs = np.load(maps / "probs.npy")
    assert probs.shape == (2, *cls.shape)
    assert (probs.astype(int).sum(axis=0)[cls > 0] >= 254).all()  # softmax sums to 1


def test_run_files(data: dict[str, Any]) -> None:
    out: Path = data["out"]
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["model"]["sha256"] == sha256_file(data["pkg"] / "weights.pt")
    assert meta["model"]["architecture"] == "tiny_unet"
    assert meta["params"]["min_area_um2"] == 100 and meta["run_id"] == "r1"
    assert {"torch", "numpy", "python", "qpseg"} <= set(meta["versions"])
    assert meta["counts"] == {"done": 2, "skipped": 0, "failed": 0}
    for s in meta["slides"]:
        for item in s["outputs"].values():
            assert sha256_file(item["path"]) == item["sha256"]
        assert set(s["outputs"]) == {"geojson", "metadata", "heatmap", "overlay"}
    rows = (out / "summary.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 3 and {"status", "reason", "count_Tumor", "area_um2_Tumor",
                                "largest_lesion_um", "slide_category"} <= set(header)
    summary = json.loads((out / "a.metadata.json").read_text())
    assert all(isinstance(v, str) for v in summary.values())
    assert float(summary["qpseg_area_um2_Tumor"]) == pytest.approx(
        tumour_truth(data["a"]).area * 0.25, rel=0.05)
    assert summary["qpseg_slide_category"] in ("itc", "micro", "macro")
    # nothing half-written is left behind
    left = {p.name for p in out.iterdir()}
    assert not any(n.startswith(".") and n.endswith(".tmp") for n in left)
    assert not (out / ".qpseg_work").exists() or not any((out / ".qpseg_work").iterdir())


def test_bounds_offset_shifts_everything_exactly(data: dict[str, Any],
                                                 tmp_path: Path) -> None:
    a: SyntheticSlide = data["a"]
    bx, by, bw, bh = BOUNDS
    res = run_inference(jobs_from_paths([a.path], tmp_path), data["pkg"], tmp_path,
                        InferenceParams(keep_maps=True, min_area_um2=100),
                        opener=bounds_opener(BOUNDS))
    assert res.results[0].status == "done", res.results[0].reason
    cls = np.load(tmp_path / "maps" / "a" / "classes.npy")
    assert cls.shape == (bh // 2, bw // 2)
    plain = np.load(data["out"] / "maps" / "a" / "classes.npy")
    window = plain[by // 2:(by + bh) // 2, bx // 2:(bx + bw) // 2]
    assert (cls != window).mean() < 1e-4  # QuPath (0, 0) is level-0 (200, 96)
    pred = union(read_geojson(tmp_path / "a.geojson"))
    truth = tumour_truth(a, -bx, -by).intersection(shapely.box(0, 0, bw, bh))
    assert dice(pred, truth) >= 0.95


# ------------------------------------------------------------------------------ failures

def test_failed_slides_are_reported_and_others_go_on(data: dict[str, Any],
                                                     tmp_path: Path) -> None:
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + os.urandom(2000))
    nompp = make_plain_image(tmp_path / "nompp.png", width=200, height=150)
    coarse = make_slide(tmp_path / "coarse.tif", width=300, height=200, mpp=2.0, seed=1)
    jobs = jobs_from_paths([bad, nompp.path, coarse.path, data["b"].path], tmp_path / "out")
    jobs.append(SlideJob("gone", None, "gone.svs", tmp_path / "out" / "gone.geojson",
                         error="image not found (file:/nowhere/gone.svs)"))
    res = run_inference(jobs, data["pkg"], tmp_path / "out", InferenceParams())
    by = {r.key: r for r in res.results}
    assert by["b"].status == "done"
    assert {r.key for r in res.failed} == {"broken", "nompp", "coarse", "gone"}
    assert "pixel size unknown" in by["nompp"].reason
    assert "model needs 1 µm/px" in by["coarse"].reason
    assert "not found" in by["gone"].reason
    for r in res.failed:
        assert r.reason and "\n" not in r.reason
        assert not Path(r.output).exists()
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        rows = {r["key"]: r for r in csv.DictReader(fh)}
    assert [rows[k]["status"] for k in ("broken", "nompp", "coarse", "b", "gone")] == [
        "failed", "failed", "failed", "done", "failed"]
    assert rows["nompp"]["reason"] == by["nompp"].reason
    # --mpp rescues the image without a pixel size
    res = run_inference(jobs_from_paths([nompp.path], tmp_path / "o2"), data["pkg"],
                        tmp_path / "o2", InferenceParams(mpp=0.5))
    assert res.results[0].status == "done"


def test_skip_finished_and_overwrite_with_backup(data: dict[str, Any], tmp_path: Path) -> None:
    jobs = jobs_from_paths([data["b"].path], tmp_path)
    run_inference(jobs, data["pkg"], tmp_path, InferenceParams(run_id="first"))
    first = (tmp_path / "b.geojson").read_bytes()
    mtime = (tmp_path / "b.geojson").stat().st_mtime_ns
    res = run_inference(jobs, data["pkg"], tmp_path, InferenceParams(run_id="second"))
    assert res.results[0].status == "skipped" and res.results[0].n_objects > 0
    assert (tmp_path / "b.geojson").stat().st_mtime_ns == mtime
    assert "count_Tumor" in (tmp_path / "summary.csv").read_text()  # skipped rows keep data
    res = run_inference(jobs, data["pkg"], tmp_path,
                        InferenceParams(run_id="third", overwrite=True))
    assert res.results[0].status == "done"
    assert (tmp_path / "b.geojson.bak").read_bytes() == first
    assert {o.metadata["qpseg_run"] for o in read_geojson(tmp_path / "b.geojson")} == {"third"}


def test_resume_after_an_interrupted_run(data: dict[str, Any], tmp_path: Path) -> None:
    jobs = jobs_from_paths([data["a"].path, data["b"].path], tmp_path)

    def interrupt(ev: ProgressEvent) -> None:
        if ev.kind == "tiles" and ev.key == "b" and ev.tiles_done >= 2:
            raise KeyboardInterrupt

    params = InferenceParams(run_id="r1", min_area_um2=100, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        run_inference(jobs, data["pkg"], tmp_path, params, progress=interrupt)
    assert slide_status(jobs[0], tmp_path) == "finished"
    assert slide_status(jobs[1], tmp_path) == "interrupted"
    assert not (tmp_path / "b.geojson").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    seen: list[ProgressEvent] = []
    res = run_inference(jobs, data["pkg"], tmp_path, params, progress=seen.append)
    assert [r.status for r in res.results] == ["skipped", "done"]
    assert [e.key for e in seen if e.kind == "tiles"] and {
        e.key for e in seen if e.kind == "tiles"} == {"b"}
    for name in ("a", "b"):  # same result as the uninterrupted run
        assert _normalised(tmp_path / f"{name}.geojson") == _normalised(
            data["out"] / f"{name}.geojson")


_KILL_SCRIPT = """
import os, signal, sys
from qpseg.engine import InferenceParams, jobs_from_paths, run_inference
out, pkg, *slides = sys.argv[1:]
def kill(ev):
    if ev.kind == "tiles" and ev.key == "b":
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind
run_inference(jobs_from_paths(slides, out), pkg, out,
              InferenceParams(run_id="r1", min_area_um2=100, batch_size=2), progress=kill)
"""


def test_resume_after_sigkill(data: dict[str, Any], tmp_path: Path) -> None:
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(out), str(data["pkg"]),
                           str(data["a"].path), str(data["b"].path)], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (out / "a.geojson").exists() and not (out / "b.geojson").exists()
    jobs = jobs_from_paths([data["a"].path, data["b"].path], out)
    res = run_inference(jobs, data["pkg"], out,
                        InferenceParams(run_id="r1", min_area_um2=100))
    assert [r.status for r in res.results] == ["skipped", "done"]
    assert _normalised(out / "b.geojson") == _normalised(data["out"] / "b.geojson")
    assert not (out / ".qpseg_work" / "b").exists()


# ---------------------------------------------------------------------- modes and projects

def test_blend_and_worker_processes_agree_with_centre_crop(data: dict[str, Any],
                                                           tmp_path: Path) -> None:
    jobs = jobs_from_paths([data["b"].path], tmp_path / "blend")
    run_inference(jobs, data["pkg"], tmp_path / "blend",
                  InferenceParams(stitch="blend", keep_maps=True, min_area_um2=100))
    blend = np.load(tmp_path / "blend" / "maps" / "b" / "classes.npy")
    centre = np.load(data["out"] / "maps" / "b" / "classes.npy")
    assert (blend != centre).mean() < 1e-3
    jobs = jobs_from_paths([data["b"].path], tmp_path / "workers")
    run_inference(jobs, data["pkg"], tmp_path / "workers",
                  InferenceParams(workers=2, run_id="r1", min_area_um2=100))
    assert _normalised(tmp_path / "workers" / "b.geojson") == _normalised(
        data["out"] / "b.geojson")


def test_project_outputs_where_the_import_script_looks(data: dict[str, Any],
                                                       tmp_path: Path) -> None:
    from qpseg.testing.projects import make_project

    proj = make_project(tmp_path / "proj", n_slides=2, width=900, height=700, seed=7)
    jobs, out = jobs_from_project(proj.path, entries=[str(proj.entry_ids[1])])
    assert out == proj.folder / "qpseg" / "predictions" and len(jobs) == 1
    res = run_inference(jobs, data["pkg"], out, InferenceParams(min_area_um2=100))
    assert res.results[0].status == "done", res.results[0].reason
    eid = proj.entry_ids[1]
    objects = read_geojson(out / f"{eid}.geojson")
    truth = shapely.union_all([o.geometry for o in read_geojson(proj.annotation_files[1])
                               if o.classification == "Tumor"])
    assert dice(union(objects), truth) >= 0.95
    assert json.loads((out / f"{eid}.metadata.json").read_text())["qpseg_image"] == "slide_01.tif"
    assert not (out / f"{proj.entry_ids[0]}.geojson").exists()
    with pytest.raises(ConfigError, match="no entry"):
        jobs_from_project(proj.path, entries=["999"])


def test_instance_and_two_stage_models_run(tmp_path: Path) -> None:
    """Otsu nuclei (instances, cells) and a tiny H2G-Net (patch heatmap + refinement)."""
    from qpseg.models import create_model, get_entry, save_package

    slide = make_slide(tmp_path / "s.tif", width=512, height=384, mpp=0.5, seed=2)
    otsu = save_package(tmp_path / "otsu", create_model("otsu_threshold", 2, tile_px=64),
                        class_names=["Background", "Nucleus"], mpp=0.5)
    res = run_inference(jobs_from_paths([slide.path], tmp_path / "o"), otsu, tmp_path / "o",
                        InferenceParams(keep_maps=True, heatmap=True))
    r = res.results[0]
    assert r.status == "done", r.reason
    cells = read_geojson(tmp_path / "o" / "s.geojson")
    assert len(cells) > 20 and all(c.object_type == "cell" for c in cells)
    assert all(c.nucleus_geometry is not None for c in cells)
    inst = np.load(tmp_path / "o" / "maps" / "s" / "instances.npy")
    assert len(np.unique(inst)) - 1 >= len(cells)  # painted disjointly, one id each
    torch.manual_seed(0)
    h2g = create_model("h2g_net", 2, **get_entry("h2g_net").tiny)
    pkg = save_package(tmp_path / "h2g", h2g, class_names=["Background", "Tumor"], mpp=1.0)
    res = run_inference(jobs_from_paths([slide.path], tmp_path / "h"), pkg, tmp_path / "h",
                        InferenceParams(keep_maps=True))
    r = res.results[0]
    assert r.status == "done", r.reason
    cls = np.load(tmp_path / "h" / "maps" / "s" / "classes.npy")
    assert cls.shape == (48, 64)  # refinement output (64 px) resized to the slide's aspect
    assert r.map_mpp == pytest.approx(0.5 * 512 / 64)


# ------------------------------------------------- outputs: never destructive, stale or raced

def test_overwrite_never_writes_through_a_bak_link(data: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "precious.txt"
    marker.write_bytes(b"keep me\n")
    out = tmp_path / "out"
    jobs = jobs_from_paths([data["b"].path], out)
    run_inference(jobs, data["pkg"], out, InferenceParams(run_id="first", min_area_um2=100))
    first = (out / "b.geojson").read_bytes()
    (out / "b.geojson.bak").symlink_to(marker)
    (out / "b.metadata.json.bak").symlink_to(marker)
    res = run_inference(jobs, data["pkg"], out,
                        InferenceParams(run_id="second", overwrite=True, min_area_um2=100))
    assert res.results[0].status == "done", res.results[0].reason
    assert marker.read_bytes() == b"keep me\n"
    assert (out / "b.geojson.bak").is_symlink()
    assert (out / "b.geojson.bak.1").read_bytes() == first


def test_an_output_that_is_a_link_fails_the_slide_and_spares_the_target(
        data: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "precious.geojson"
    marker.write_bytes(b"keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.geojson").symlink_to(marker)
    res = run_inference(jobs_from_paths([data["b"].path], out), data["pkg"], out,
                        InferenceParams(overwrite=True, min_area_um2=100))
    r = res.results[0]
    assert r.status == "failed"
    assert r.reason.startswith(f"{out / 'b.geojson'}: ") and "symbolic link" in r.reason
    assert marker.read_bytes() == b"keep me\n" and (out / "b.geojson").is_symlink()


def test_repeated_overwrites_keep_the_users_own_file(data: dict[str, Any],
                                                     tmp_path: Path) -> None:
    """A file qpseg did not write keeps its backup however often the slide is redone."""
    out = tmp_path / "out"
    out.mkdir()
    user = b'{"type":"FeatureCollection","features":[]}\n'
    (out / "b.geojson").write_bytes(user)
    jobs = jobs_from_paths([data["b"].path], out)
    for run in ("r1", "r2", "r3"):
        res = run_inference(jobs, data["pkg"], out,
                            InferenceParams(run_id=run, overwrite=True, min_area_um2=100))
        assert res.results[0].status == "done"
    assert (out / "b.geojson.bak").read_bytes() == user
    assert {o.metadata["qpseg_run"] for o in read_geojson(out / "b.geojson.bak.1")} == {"r2"}
    assert not (out / "b.geojson.bak.2").exists()  # qpseg's own versions share one slot


def test_two_runs_at_once_do_each_slide_once(data: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    jobs = jobs_from_paths([data["b"].path], out)
    params = InferenceParams(min_area_um2=100)
    holding, second_done = threading.Event(), threading.Event()
    first: list[Any] = []

    def hold(ev: ProgressEvent) -> None:  # the first run stops mid-slide, holding its lock
        if ev.kind == "tiles" and not holding.is_set():
            holding.set()
            assert second_done.wait(120)

    thread = threading.Thread(target=lambda: first.append(
        run_inference(jobs, data["pkg"], out, params, progress=hold)))
    thread.start()
    try:
        assert holding.wait(120)
        second = run_inference(jobs, data["pkg"], out, params)
    finally:
        second_done.set()
        thread.join(300)
    r = second.results[0]
    assert r.status == "skipped" and r.reason.startswith("being processed by another run")
    assert f"{os.getpid()}@" in r.reason
    assert first and first[0].results[0].status == "done"
    assert not list(out.glob("b.*bak*"))  # nothing was done twice
    ids = [json.loads(p.read_text())["run_id"]
           for p in (out / "run_metadata.json", out / "run_metadata.json.bak")]
    assert ids[0] != ids[1]
    assert all(re.fullmatch(r"\d{8}T\d{6}Z-\d+-[0-9a-f]{6}", i) for i in ids)
    assert {o.metadata["qpseg_run"] for o in read_geojson(out / "b.geojson")} == {ids[0]}


def test_a_full_disk_fails_the_slide_naming_the_file(data: dict[str, Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real = os.replace
    full = {"b.heatmap.ome.tif"}

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(dst).name in full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    jobs = jobs_from_paths([data["b"].path], out)
    res = run_inference(jobs, data["pkg"], out, InferenceParams(min_area_um2=100, heatmap=True))
    r = res.results[0]
    assert r.status == "failed"
    assert r.reason == f"{out / 'b.heatmap.ome.tif'}: no space left on device"
    assert not (out / "b.geojson").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp.ome.tif")]
    full.add("summary.csv")
    with pytest.raises(OutputError) as info:
        run_inference(jobs, data["pkg"], out, InferenceParams(min_area_um2=100))
    assert info.value.one_line() == f"{out / 'summary.csv'}: no space left on device"


def test_a_new_model_or_new_options_redo_finished_slides(data: dict[str, Any],
                                                         tmp_path: Path) -> None:
    from qpseg.models import save_package
    from test_engine_support import THRESHOLD

    out = tmp_path / "out"
    jobs = jobs_from_paths([data["b"].path], out)
    params = InferenceParams(run_id="r1", min_area_um2=100)
    run_inference(jobs, data["pkg"], out, params)
    first = (out / "b.geojson").read_bytes()
    retrained = save_package(tmp_path / "pkg2", colour_unet(threshold=THRESHOLD - 0.05),
                             class_names=["Background", "Tumor"], mpp=MODEL_MPP,
                             mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    res = run_inference(jobs, retrained, out, replace(params, run_id="r2"))
    r = res.results[0]
    assert r.status == "done" and r.reason.startswith("model changed"), r.reason
    assert (out / "b.geojson.bak").read_bytes() == first
    sha = sha256_file(retrained / "weights.pt")
    assert {o.metadata["qpseg_model_sha256"] for o in read_geojson(out / "b.geojson")} == {sha}
    with open(out / "summary.csv", newline="") as fh:
        assert next(csv.DictReader(fh))["reason"] == r.reason
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["slides"][0]["reason"] == r.reason
    # same package, same options: finished
    res = run_inference(jobs, retrained, out, replace(params, run_id="r3"))
    assert res.results[0].status == "skipped"
    # other options: redone, saying which
    res = run_inference(jobs, retrained, out, replace(params, run_id="r4", tile_px=256,
                                                      min_area_um2=50))
    r = res.results[0]
    assert r.status == "done"
    assert r.reason == "parameters changed: tile_px 128 -> 256, min_area_um2 100 -> 50"
    # an execution detail is not an output option
    res = run_inference(jobs, retrained, out, replace(params, run_id="r5", tile_px=256,
                                                      min_area_um2=50, batch_size=3))
    assert res.results[0].status == "skipped"
    res = run_inference(jobs, retrained, out, replace(params, run_id="r6", tile_px=256,
                                                      min_area_um2=50, overlay=True))
    assert res.results[0].reason == "parameters changed: overlay off -> on"
    assert (out / "b.overlay.png").is_file()


def test_predictions_never_go_into_the_annotation_export_folder(data: dict[str, Any],
                                                                tmp_path: Path) -> None:
    ann = tmp_path / "proj" / "qpseg" / "annotations"
    ann.mkdir(parents=True)
    (ann / "b.geojson").write_bytes(b"pathologist\n")
    jobs = jobs_from_paths([data["b"].path], ann)
    for out in (ann, ann / "sub"):
        with pytest.raises(OutputError, match="annotation export folder") as info:
            run_inference(jobs, data["pkg"], out, InferenceParams(overwrite=True))
        assert info.value.path == out and "\n" not in info.value.one_line()
    link = tmp_path / "link"
    link.symlink_to(ann)
    with pytest.raises(OutputError, match="annotation export folder"):
        run_inference(jobs, data["pkg"], link, InferenceParams(overwrite=True))
    assert (ann / "b.geojson").read_bytes() == b"pathologist\n"
    assert sorted(p.name for p in ann.iterdir()) == ["b.geojson"]


def test_size_options_are_bounded_by_memory(data: dict[str, Any], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from qpseg.engine import params as params_module

    jobs = jobs_from_paths([data["b"].path], tmp_path / "o")
    for params in (InferenceParams(tile_px=1_000_000_000), InferenceParams(batch_size=10 ** 9),
                   InferenceParams(workers=10 ** 6)):
        with pytest.raises(ConfigError, match=r"GiB.*more than half of"):
            run_inference(jobs, data["pkg"], tmp_path / "o", params)
    monkeypatch.setattr(params_module, "_host_memory", lambda: (1 << 30, "test memory"))
    with pytest.raises(ConfigError) as info:
        run_inference(jobs, data["pkg"], tmp_path / "o",
                      InferenceParams(tile_px=2048, batch_size=16))
    msg = info.value.message
    m = re.search(r"use --batch-size (\d+) or less at 2048 px tiles", msg)
    assert m and "test memory (1.0 GiB" in msg, msg
    allowed = int(m.group(1))
    assert 1 <= allowed < 16
    with pytest.raises(ConfigError, match="or less with --batch-size 1"):
        run_inference(jobs, data["pkg"], tmp_path / "o", InferenceParams(tile_px=16384))
    assert not list((tmp_path / "o").glob("*.geojson"))  # refused before any slide
