"""A model's inference rules (tissue rule, object type, post-processing), stored in its package.

Known answers on generated images: a patch classifier on a slide with tissue slivers of known
size (exact tile counts), and a nuclei model on a tile of known nuclei (one detection each).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch

from qpseg.engine import InferenceParams, InferenceWarning, jobs_from_paths, run_inference
from qpseg.errors import ConfigError, ModelError
from qpseg.models import create_model, get_entry, save_package
from qpseg.models.contract import InferenceRules, default_inference_rules
from qpseg.models.package import read_package_config
from qpseg.qupath.geojson import read_geojson
from qpseg.tissue import enough_tissue
from test_engine_support import colour_package, colour_unet


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------ the one rule

def test_tissue_fraction_rule_is_more_than() -> None:
    # pedersen2022 §2.2: "more than 25% tissue"
    assert not enough_tissue(0.25, 0.25)
    assert enough_tissue(0.2500001, 0.25)
    assert not enough_tissue(0.0, 0.0) and enough_tissue(1e-9, 0.0)


def test_training_grid_follows_the_same_rule() -> None:
    from qpseg.data.grid import tile_grid
    from qpseg.labels import ClassMap
    from qpseg.tissue import TissueMask

    mask = np.zeros((4, 8), bool)
    mask[:, :5] = True  # tile 0: all tissue; tile 1: exactly 25 % (one of four columns)
    tiles = tile_grid([], ClassMap.from_names(["Background", "Tumor"]), image_size=(8, 4),
                      base_mpp=1.0, tile_px=4, mpp=1.0, select="tissue",
                      tissue=TissueMask(mask, 1.0, 1.0), min_tissue=0.25)
    assert [t.x for t in tiles] == [0.0]


# ------------------------------------------------------------------- defaults by output type

def test_defaults_by_output_type() -> None:
    patch = create_model("mobilenetv2_patch", 2, meta=True, **get_entry("mobilenetv2_patch").tiny)
    assert default_inference_rules(patch.contract) == InferenceRules(tissue="hsv",
                                                                     min_tissue=0.25)
    # the training's own method and least fraction win (two-stage: the patch stage's)
    trained = {"tissue_method": "otsu", "config": {"stages": {"patch": {"data": {
        "min_tissue": 0.4}}}}}
    assert default_inference_rules(patch.contract, trained) == InferenceRules("otsu", 0.4)
    otsu = create_model("otsu_watershed", 2, tile_px=64)
    assert default_inference_rules(otsu.contract) == InferenceRules(
        tissue="none", objects="cell", nuclei=True)
    unet = create_model("unet_resnet50", 2, meta=True)
    nuclei = InferenceRules(tissue="none", objects="detection", nuclei=True)
    assert default_inference_rules(unet.contract) == nuclei
    # the same U-Net trained on tissue regions (pixel targets) is a region model
    assert default_inference_rules(unet.contract, {"target": "pixel"}) == InferenceRules()
    tiny = create_model("tiny_unet", 2, tile_px=64)
    assert default_inference_rules(tiny.contract) == InferenceRules()  # today's rule: otsu_od
    assert default_inference_rules(tiny.contract, {"target": "instance"}) == nuclei
    assert default_inference_rules(tiny.contract, {"tissue_method": "hsv"}).tissue == "hsv"


def test_package_records_the_rules(tmp_path: Path) -> None:
    rules = InferenceRules(tissue="none", objects="detection", nuclei=True, threshold=0.6)
    pkg = save_package(tmp_path / "p", colour_unet(), class_names=["Background", "Nucleus"],
                       mpp=0.25, inference=rules.to_json())
    cfg = read_package_config(pkg)
    assert InferenceRules.from_json(cfg.inference) == rules
    data = json.loads((pkg / "config.json").read_text())
    for bad, what in [({"tissue": "magic"}, "inference.tissue"),
                      ({"min_tissue": 1.0}, "inference.min_tissue"),
                      ({"threshold": -0.1}, "inference.threshold"),
                      ({"objects": "polygon"}, "inference.objects"),
                      ({"colour": 1}, "unknown key")]:
        (pkg / "config.json").write_text(json.dumps({**data, "inference": bad}))
        with pytest.raises(ModelError, match=what):
            read_package_config(pkg)


# --------------------------------------------------------------- patch classifier: slivers

def _write(path: Path, rgb: np.ndarray) -> Path:
    tifffile.imwrite(path, rgb, photometric="rgb")
    return path


def _sliver_slide(path: Path) -> Path:
    """1024 x 768 white image; purple tissue in x < 400, y < 304. At 0.5 µm/px a 64 px tile
    at 1 µm/px is 128 px: tissue fills tile columns 0-2 and 16 px (12.5 %) of column 3, tile
    rows 0-1 and 48 px (37.5 %) of row 2. The 8 µm/px thumbnail has 16 px per mask pixel, so
    every boundary falls on a mask pixel edge and the fractions are exact."""
    rgb = np.full((768, 1024, 3), 255, np.uint8)
    rgb[:304, :400] = (150, 60, 140)
    return _write(path, rgb)


@pytest.fixture(scope="module")
def patch_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model("mobilenetv2_patch", 2, **get_entry("mobilenetv2_patch").tiny)
    # saved without inference rules, as packages were before they existed
    return save_package(tmp_path_factory.mktemp("patch") / "pkg", model,
                        class_names=["Background", "Tumor"], mpp=1.0)


def test_patch_classifier_skips_tissue_slivers(patch_pkg: Path, tmp_path: Path) -> None:
    slide = _sliver_slide(tmp_path / "s.tif")
    out = tmp_path / "out"
    params = InferenceParams(mpp=0.5, run_id="r")
    r = run_inference(jobs_from_paths([slide], out), patch_pkg, out, params).results[0]
    assert r.status == "done", r.reason
    # 3 x 3 tiles with > 25 % tissue run; column 3 (12.5 %, 12.5 % x 37.5 %) is skipped
    assert (r.tiles, r.tiles_low_tissue) == (9, 3)
    with open(out / "summary.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert (row["tiles"], row["tiles_low_tissue"]) == ("9", "3")
    meta = json.loads((out / "s.metadata.json").read_text())
    assert meta["qpseg_tiles_low_tissue"] == "3" and meta["qpseg_tissue_method"] == "hsv"
    run_meta = json.loads((out / "run_metadata.json").read_text())
    assert run_meta["resolved"]["inference"]["min_tissue"] == 0.25
    # the user overrides the rule: every tile with any tissue; the finished slide is redone
    r = run_inference(jobs_from_paths([slide], out), patch_pkg, out,
                      InferenceParams(mpp=0.5, run_id="r", min_tissue=0.0)).results[0]
    assert r.status == "done" and r.reason == "parameters changed: min_tissue 0.25 -> 0"
    assert (r.tiles, r.tiles_low_tissue) == (12, 0)
    r = run_inference(jobs_from_paths([slide], out), patch_pkg, out,
                      InferenceParams(mpp=0.5, run_id="r", min_tissue=0.0,
                                      tissue="none")).results[0]
    assert r.reason == "parameters changed: tissue hsv -> none"
    assert r.tiles == 8 * 6 and r.tissue_fraction is None


# ------------------------------------------------------------------------------ nuclei

CENTRES = [(48 + 96 * i, 48 + 96 * j) for j in range(4) for i in range(4)]
RADIUS = 12


def _nuclei_tile(path: Path) -> Path:
    """A 384 px nuclei tile at 0.25 µm/px: pale stroma everywhere (all tissue), 16 dark
    nuclei of radius 12 px (3 µm, 28 µm²) on a 96 px grid."""
    yy, xx = np.mgrid[:384, :384]
    rgb = np.empty((384, 384, 3), np.uint8)
    rgb[:] = (230, 160, 200)
    for cx, cy in CENTRES:
        rgb[(xx - cx) ** 2 + (yy - cy) ** 2 <= RADIUS ** 2] = (80, 40, 120)
    return _write(path, rgb)


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("nuclei")
    # a pixel model trained on instance targets, packaged before inference rules existed
    pkg = colour_package(root / "pkg", mpp=0.25, class_names=("Background", "Nucleus"),
                         training={"target": "instance"})
    return {"pkg": pkg, "slide": _nuclei_tile(root / "tile.tif")}


def _centres_found(objects: list[Any]) -> list[tuple[int, int]]:
    import shapely

    return sorted((cx, cy) for cx, cy in CENTRES
                  if any(o.geometry.contains(shapely.Point(cx, cy)) for o in objects))


def test_nuclei_model_writes_one_detection_per_nucleus(nuclei: dict[str, Any],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_inference(jobs_from_paths([nuclei["slide"]], out), nuclei["pkg"], out,
                      InferenceParams(mpp=0.25, run_id="r")).results[0]
    assert r.status == "done", r.reason
    objects = read_geojson(out / "tile.geojson")
    assert len(objects) == len(CENTRES) and {o.object_type for o in objects} == {"detection"}
    assert _centres_found(objects) == sorted(CENTRES)
    area = np.pi * (RADIUS * 0.25) ** 2
    for o in objects:  # nucleus-sized objects, not dropped as specks of tissue
        assert 0.6 * area <= o.measurements["Area µm^2"] <= 1.2 * area
        assert float(o.metadata["qpseg_min_area_um2"]) == 10.0
    assert r.tissue_fraction is None  # no tissue detection on nuclei tiles
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["resolved"]["inference"]["objects"] == "detection"


def test_nuclei_model_asked_for_annotations_warns(nuclei: dict[str, Any],
                                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.warns(InferenceWarning, match="instance metrics"):
        r = run_inference(jobs_from_paths([nuclei["slide"]], out), nuclei["pkg"], out,
                          InferenceParams(mpp=0.25, as_type="annotations")).results[0]
    objects = read_geojson(out / "tile.geojson")
    assert r.status == "done" and {o.object_type for o in objects} == {"annotation"}


def test_a_stored_threshold_decides_the_nuclei(tmp_path: Path) -> None:
    """The package's probability threshold (lagree2021 post-processing) rewrites the class
    map: foreground where 1 - P(Background) is above it, of the most probable other class."""
    from qpseg.engine.predict import _apply_threshold
    from qpseg.engine.stitch import MapSet

    maps = MapSet.create(tmp_path / "m", (1, 4), 3, "pixel")
    try:
        assert maps.probs is not None
        bg = np.array([[255, 100, 60, 0]], np.uint8)  # P(Background) 1, .39, .24, 0
        maps.probs.write_rows(0, bg, channel=0)
        maps.probs.write_rows(0, np.array([[0, 100, 95, 200]], np.uint8), channel=1)
        maps.probs.write_rows(0, np.array([[0, 55, 100, 55]], np.uint8), channel=2)
        _apply_threshold(0.7, maps)
        assert np.asarray(maps.classes[:, :]).tolist() == [[0, 0, 2, 1]]
        _apply_threshold(None, maps)  # no threshold: the map stays as it is
        assert np.asarray(maps.classes[:, :]).tolist() == [[0, 0, 2, 1]]
    finally:
        maps.close()


def test_bad_min_tissue_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--min-tissue"):
        InferenceParams(min_tissue=1.0).validate()
    assert InferenceParams(tissue="auto").validate().tissue is None
