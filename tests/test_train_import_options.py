"""``train`` on a QuPath project imports it as ``import-project`` does: the truth rule for
objects qpseg wrote (``--ai-objects`` / ``data.ai_objects``) with its per-class counts printed
and recorded, and the one pixel-size rule (``data.slide_mpp`` fills a missing pixel size;
``data.slide_mpp_override`` replaces known ones)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
import torch
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from qpseg.cli import main
from qpseg.errors import ConfigError, QpsegWarning
from qpseg.manifest import import_project, read_manifest
from qpseg.models import load_package
from qpseg.objects import provenance
from qpseg.qupath.geojson import QuPathObject, write_geojson
from qpseg.testing.projects import SyntheticProject, make_project
from qpseg.training import data as training_data
from qpseg.training import train
from qpseg.training.config import resolve_config

torch.set_num_threads(1)  # predictable on shared CPUs

#: A tiny tiny_unet on 32 px tiles at 4 µm/px: a step takes milliseconds.
SMALL: dict[str, Any] = {
    "model_kwargs": {"tile_px": 32, "base_filters": 4, "depth": 2},
    "data": {"mpp": 4.0},
    "split": {"val": 0.0, "test": 0.0},
    "train": {"batch_size": 2, "log_every": 1, "checkpoint_every": 0},
}
PROV = provenance("tiny_unet", "ab" * 32, mpp=0.5, run="20250101T000000Z")
#: The review below, per class: AI objects left out and kept under each rule.
COUNTS = {
    "unreviewed-out": {"Stroma": (1, 2), "Tumor": (0, 1)},
    "all-out": {"Stroma": (3, 0), "Tumor": (1, 0)},
    "all-in": {"Stroma": (0, 3), "Tumor": (0, 1)},
}


def _ai(geom: BaseGeometry, cls: str) -> QuPathObject:
    return QuPathObject(geometry=geom, classification=cls, id=str(uuid.uuid4()),
                        metadata=dict(PROV))


def _exported(o: QuPathObject, geom: BaseGeometry | None = None, cls: str | None = None,
              locked: bool = False) -> QuPathObject:
    """The object as QuPath exports it after the review: same id and metadata, float32
    vertices written with 2 decimals."""
    g = shapely.transform(geom if geom is not None else o.geometry,
                          lambda c: np.round(c.astype(np.float32).astype(np.float64), 2))
    return dataclasses.replace(o, geometry=g, classification=cls or o.classification,
                               is_locked=locked)


def _user(geom: BaseGeometry, cls: str) -> QuPathObject:
    return QuPathObject(geometry=geom, classification=cls, id=str(uuid.uuid4()))


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with saved predictions and the export after a review: one Stroma prediction
    left alone (unreviewed), one reshaped, one Tumor reclassified to Stroma, one Tumor locked
    (accepted), one deleted; and two annotations of the pathologist's own."""
    base: SyntheticProject = make_project(tmp_path_factory.mktemp("rev") / "p", n_slides=1,
                                          width=800, height=400, mpp=0.5, seed=5,
                                          classes=("Tumor", "Stroma"), annotations=False)
    p1 = _ai(box(0, 0, 100, 100), "Stroma")
    p2 = _ai(box(200, 0, 300, 100), "Stroma")
    p3 = _ai(box(400, 0, 500, 100), "Tumor")
    p4 = _ai(box(0, 200, 100, 300), "Tumor")
    p5 = _ai(box(200, 200, 300, 300), "Tumor")
    eid = base.entry_ids[0]
    write_geojson(base.folder / "qpseg" / "predictions" / f"{eid}.geojson",
                  [p1, p2, p3, p4, p5])
    write_geojson(base.folder / "qpseg" / "annotations" / f"{eid}.geojson", [
        _exported(p1), _exported(p2, box(200, 0, 304, 100)), _exported(p3, cls="Stroma"),
        _exported(p4, locked=True),
        _user(box(400, 200, 500, 300), "Tumor"), _user(box(600, 0, 700, 100), "Stroma")])
    return base.path


def _counts(summary: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {r["class_name"]: (r["left_out"], r["kept"]) for r in summary["classes"]}


@pytest.mark.parametrize("policy", [None, "all-out", "all-in"])
def test_dry_run_follows_the_truth_rule(reviewed: Path, tmp_path: Path,
                                        policy: str | None) -> None:
    cfg: dict[str, Any] = json.loads(json.dumps(SMALL))
    if policy is not None:
        cfg["data"]["ai_objects"] = policy
    res = train(reviewed, tmp_path / "o", model="tiny_unet", config=cfg, dry_run=True)
    got = res.summary["ai_objects"]
    want = policy or "unreviewed-out"
    assert got["policy"] == want
    assert _counts(got) == COUNTS[want]
    # the labels follow: the same tiles hold the rule's Stroma pixels
    stroma = res.summary["train"]["classes"]["Stroma"]["pixels"]
    ref = train(reviewed, tmp_path / "r", model="tiny_unet", dry_run=True, config={
        **SMALL, "data": {**SMALL["data"], "ai_objects": "all-in"}})
    all_in = ref.summary["train"]["classes"]["Stroma"]["pixels"]
    assert (stroma < all_in) == (want != "all-in")


def test_cli_passes_ai_objects_and_slide_mpp_through(reviewed: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.json"
    # 1 µm/px replaces the slide's 0.5 (a 32 px tile at 4 µm/px is then 128 slide pixels)
    cfg.write_text(json.dumps({**SMALL, "data": {**SMALL["data"], "slide_mpp": 1.0,
                                                  "slide_mpp_override": True}}))
    out = tmp_path / "out"
    assert main(["train", str(reviewed), "--model", "tiny_unet", "--out", str(out),
                 "--config", str(cfg), "--steps", "1", "--ai-objects", "all-out"]) == 0
    printed = capsys.readouterr().out
    assert "AI objects (all-out): Stroma: 3 left out, 0 kept (1 unreviewed, 2 edited)" in printed
    assert "AI objects (all-out): Tumor: 1 left out, 0 kept (1 accepted)" in printed
    # the import inside train used both options
    m = read_manifest(out / "manifest.json")
    e = m.entries[0]
    assert e.ai_objects == "all-out" and _counts(m.review.to_json()) == COUNTS["all-out"]
    assert (e.mpp, e.mpp_source, e.mpp_replaced) == (1.0, "override", 0.5)
    # and the counts are in the run's metadata and the package's training summary
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["params"]["ai_objects"] == "all-out"
    assert _counts(meta["summary"]["ai_objects"]) == COUNTS["all-out"]
    assert meta["data"]["slides"][0]["mpp"] == 1.0
    training = load_package(out).config.training
    assert training["ai_objects"]["policy"] == "all-out"
    assert _counts(training["ai_objects"]) == COUNTS["all-out"]
    # an unknown rule is refused before any work
    assert main(["train", str(reviewed), "--model", "tiny_unet", "--out", str(tmp_path / "x"),
                 "--ai-objects", "some"]) == 2
    assert "--ai-objects must be one of unreviewed-out, all-out, all-in" in \
        capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_manifest_keeps_its_rule(reviewed: Path, tmp_path: Path) -> None:
    m = import_project(reviewed, tmp_path / "m", use_paquo=False)
    assert m.review.policy == "unreviewed-out"
    cfg = json.loads(json.dumps(SMALL))
    res = train(tmp_path / "m", tmp_path / "o", model="tiny_unet", config=cfg, dry_run=True)
    assert _counts(res.summary["ai_objects"]) == COUNTS["unreviewed-out"]
    # asking for another rule on a manifest would silently train on other labels: refused
    cfg["data"]["ai_objects"] = "all-in"
    with pytest.raises(ConfigError, match=r"imported with --ai-objects unreviewed-out and "
                                          r"holds 4 AI object.*import-project --ai-objects "
                                          r"all-in"):
        train(tmp_path / "m", tmp_path / "o", model="tiny_unet", config=cfg, dry_run=True)
    cfg["data"]["ai_objects"] = "unreviewed-out"
    train(tmp_path / "m", tmp_path / "o", model="tiny_unet", config=cfg, dry_run=True)


def test_slide_mpp_fills_a_missing_pixel_size_only(tmp_path: Path) -> None:
    proj = make_project(tmp_path / "p", n_slides=1, width=512, height=512, mpp=0.5, seed=3)
    cfg = {**SMALL, "data": {**SMALL["data"], "slide_mpp": 0.25}}
    with pytest.warns(QpsegWarning, match=r"0\.25 is not used for 1 slide.*0\.5 µm/px from "
                                          "the slide"):
        res = train(proj.path, tmp_path / "o", model="tiny_unet", config=cfg, dry_run=True)
    assert res.summary["train"]["slides"] == 1
    resolved = resolve_config("tiny_unet", cfg)
    with pytest.warns(QpsegWarning, match=r"0\.25 is not used"):
        m = training_data.open_manifest(
            proj.path, None, write=False, **training_data.import_options(resolved["data"]))
    e = m.entries[0]
    assert (e.mpp, e.mpp_source, e.mpp_replaced) == (0.5, "slide", None)
    resolved = resolve_config("tiny_unet", {"data": {"slide_mpp": 0.25,
                                                     "slide_mpp_override": True}})
    e = training_data.open_manifest(
        proj.path, None, write=False, **training_data.import_options(resolved["data"])
    ).entries[0]
    assert (e.mpp, e.mpp_source, e.mpp_replaced) == (0.25, "override", 0.5)


@pytest.mark.parametrize(("data", "message"), [
    ({"slide_mpp": 1e-9}, "data.slide_mpp: 1e-09 µm/px is not a plausible pixel size (it must "
                          "be from 0.01 to 100 µm/px)"),
    ({"slide_mpp": 352.8}, "data.slide_mpp: 352.8 µm/px is not a plausible pixel size"),
    ({"slide_mpp": True}, "data.slide_mpp: True is not a number"),
    ({"slide_mpp_override": True}, "data.slide_mpp_override needs data.slide_mpp"),
    ({"slide_mpp": 0.5, "slide_mpp_override": "yes"},
     "data.slide_mpp_override must be true or false, not 'yes'"),
    ({"ai_objects": "some"}, "data.ai_objects must be one of None, unreviewed-out, all-out, "
                             "all-in, not 'some'"),
])
def test_import_keys_are_checked_by_the_one_rule(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config("tiny_unet", {"data": data})
    assert message in info.value.one_line()
    assert resolve_config("tiny_unet", {"data": {"slide_mpp": 0.01}})["data"]["slide_mpp"] == 0.01
