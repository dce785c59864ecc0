"""khalil2022's recipe learns: FCN-32s with the paper's own optimiser (SGD at lr 1e-10,
momentum 0.99, weight decay 5e-4, batch 1, the summed cross-entropy that lr presupposes), its
boosting rounds T(h+1) and augmentation, from a pretrained start.

The network is narrowed (width 1/16, 256 px tiles at 1 µm/px) so a CPU runs it; the paper's
VGG16 ImageNet start is played by a stand-in (tests/data/standin/fcn32s_vgg16, made by
scripts/make_standin_weights.py: the same narrowed FCN trained on another generated project
whose classes have other names), so the Tumor head starts at FCN's zero initialisation and has
to be learnt by the recipe. The reference outlines are exhaustive as in the paper's data
(Camelyon-style: the tumour outlined, the rest of the slide normal), via a Region annotation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from statistics import mean

import pytest
import torch
from shapely.geometry import box

from qpseg.manifest import import_project
from qpseg.models import load_package
from qpseg.qupath.geojson import QuPathObject, read_geojson, write_geojson
from qpseg.testing.projects import make_project
from qpseg.training import train
from qpseg.training.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "configs" / "khalil2022_fcn32s.yaml"
STANDIN = ROOT / "tests" / "data" / "standin" / "fcn32s_vgg16"
SIZE = 1536
STEPS = 200


def _tumour_project(folder: Path) -> Path:
    """Four generated slides: Tumor outlined, the rest of each slide normal (Region)."""
    proj = make_project(folder / "p", n_slides=4, width=SIZE, height=SIZE, seed=3)
    for f in proj.annotation_files:
        objs = [o for o in read_geojson(f) if o.classification == "Tumor"]
        objs.append(QuPathObject(geometry=box(0, 0, SIZE, SIZE), object_type="annotation",
                                 classification="Region"))
        write_geojson(f, objs)
    return import_project(proj.path, folder / "m", use_paquo=False).path


@pytest.mark.slow
def test_khalil2022_recipe_learns_from_a_pretrained_start(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    manifest = _tumour_project(tmp_path)
    cfg = load_config_file(RECIPE)
    assert cfg.pop("pretrained") == "imagenet"  # ImageNet VGG16 fits no narrowed network
    start = time.perf_counter()
    result = train(manifest, tmp_path / "run", config=cfg, overrides={
        "model_kwargs": {"width_mult": 0.0625, "tile_px": 256},
        "classes": ["Tumor"], "init_from": str(STANDIN),
        "data": {"mpp": 1.0}, "split": {"val": 0.25},
        "train": {"steps": STEPS, "log_every": 1, "checkpoint_every": 0}})
    seconds = time.perf_counter() - start

    # The recipe ran as written: the package records the paper's optimiser, loss and sampler.
    training = load_package(tmp_path / "run").config.training
    run = training["config"]
    assert {k: run["optimizer"][k] for k in ("name", "lr", "momentum", "weight_decay")} == {
        "name": "sgd", "lr": 1e-10, "momentum": 0.99, "weight_decay": 5e-4}
    assert run["loss"]["name"] == "ce" and run["loss"]["reduction"] == "sum"
    assert run["sampler"]["name"] == "boosting" and run["sampler"]["gamma"] == 0.05
    assert run["augment"]["preset"] == "khalil2022" and run["scheduler"]["name"] == "constant"
    assert run["train"]["batch_size"] == 1
    init = training["initialisation"]["init_from"]
    assert init["classes"]["new"] == ["Tumor"]  # the Tumor head was not borrowed
    assert any(k.startswith("features.") for k in init["loaded"])

    log = [json.loads(line) for line in
           (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "step"]
    rounds = [r for r in log if r["kind"] == "boost"]
    first, last = mean(losses[:20]), mean(losses[-50:])
    dice = result.metrics["val_dice_tumor"]
    # Trivial predictors on the validation slide: all Background scores Dice 0; all Tumor
    # 2p / (1 + p) with p the tumour fraction of the labelled pixels.
    val = result.summary["val"]["classes"]
    p = val["Tumor"]["pixels"] / (val["Tumor"]["pixels"] + val["Background"]["pixels"])
    trivial = 2 * p / (1 + p)
    print(f"khalil2022: {STEPS} steps, {len(rounds)} boosting rounds, loss {first:.0f} -> "
          f"{last:.0f} (summed over 256 x 256 px), val tumour Dice {dice:.3f} (all-tumour "
          f"{trivial:.3f}), {seconds:.0f} s")
    assert len(rounds) >= 2  # T(h+1) was built more than once
    assert last < 0.5 * first
    assert dice > max(0.3, 2 * trivial)
