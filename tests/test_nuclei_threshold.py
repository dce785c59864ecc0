"""lagree2021's post-processing threshold: chosen at the end of training for precision on the
validation tiles (Methods, "Testing datasets": "a threshold that maximized precision at a given
intersections over union (IoU) threshold"), stored in the package, applied by inference.

Known answers: a stand-in model whose nucleus probabilities are set by hand on tiles of known
nuclei, so the precision at every threshold of the grid is counted by hand.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qpseg.errors import ConfigError
from qpseg.labels import ClassMap
from qpseg.losses import build_loss
from qpseg.models.contract import (
    InputSpec,
    ModelContract,
    default_inference_rules,
    get_contract,
)
from qpseg.models.nuclei import THRESHOLD_GRID, PrecisionSweep, foreground_at, nuclei_objects
from qpseg.training.config import resolve_config
from qpseg.training.data import TrainingWarning
from qpseg.training.distributed import Dist
from qpseg.training.loop import StageSpec, Task, choose_threshold


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


S = 48  # tile side


def _tile() -> tuple[np.ndarray, np.ndarray]:
    """P(nucleus) and true nuclei of the hand-made tile.

    A (p .88), B (p .62) and C (core p .78) are true 8x8 nuclei; F (p .52) is a false one; C sits
    in a 16x16 halo of p .32 that makes it four times too large (IoU .25) at thresholds <= .3.
    Stored P(Background) = 1 - p is rounded to 1/255: A is nucleus up to t = .85, C's core up
    to .75, B up to .6, F up to .5, the halo up to .3.
    """
    p = np.full((S, S), 0.02)
    truth = np.zeros((S, S), np.int64)
    p[24:40, 24:40] = 0.32  # halo of C
    for ident, (r, c, prob) in enumerate([(4, 4, 0.88), (4, 28, 0.62), (28, 28, 0.78)], 1):
        p[r:r + 8, c:c + 8] = prob
        truth[r:r + 8, c:c + 8] = ident
    p[30:38, 4:12] = 0.52  # F: no true nucleus there
    return p, truth


def _tile2() -> tuple[np.ndarray, np.ndarray]:
    """A second tile: one true nucleus D of p .58 (nucleus up to t = .55)."""
    p = np.full((S, S), 0.02)
    truth = np.zeros((S, S), np.int64)
    p[20:28, 20:28] = 0.58
    truth[20:28, 20:28] = 1
    return p, truth


#: (TP, predictions) per threshold of the grid over both tiles (4 true nuclei), by hand.
EXPECTED: dict[float, tuple[int, int]] = {
    **{t: (3, 5) for t in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)},  # C + halo is a false positive
    **{t: (4, 5) for t in (0.35, 0.4, 0.45, 0.5)},  # F is the one false positive
    0.55: (4, 4),  # every nucleus, nothing false: precision 1, recall 1
    0.6: (3, 3),  # D gone
    **{t: (2, 2) for t in (0.65, 0.7, 0.75)},  # B gone
    **{t: (1, 1) for t in (0.8, 0.85)},  # only A
    0.9: (0, 0), 0.95: (0, 0),
}


def test_sweep_counts_and_choice_by_hand() -> None:
    sweep = PrecisionSweep()
    for p, truth in (_tile(), _tile2()):
        sweep.add(1.0 - p, truth)
    rows = {r["threshold"]: r for r in sweep.rows()}
    assert tuple(rows) == THRESHOLD_GRID
    for t, (tp, n_pred) in EXPECTED.items():
        assert (rows[t]["tp"], rows[t]["tp"] + rows[t]["fp"]) == (tp, n_pred), t
        assert rows[t]["tp"] + rows[t]["fn"] == 4
    assert rows[0.5]["precision"] == 0.8 and rows[0.3]["precision"] == 0.6
    assert rows[0.9]["precision"] is None  # nothing predicted: undefined, never chosen
    # precision 1 from .55 to .85; the largest recall among them is at .55
    assert sweep.choose() == 0.55


def test_ties_go_to_recall_then_nearest_half() -> None:
    sweep = PrecisionSweep()
    p, truth = _tile()
    sweep.add(1.0 - p, truth)
    # one tile: precision 1 and recall 1 at both .55 and .6 (B survives to .6); .55 is nearer
    # to .5, the most probable class of two
    rows = {r["threshold"]: r for r in sweep.rows()}
    assert rows[0.55]["precision"] == rows[0.6]["precision"] == 1.0
    assert rows[0.55]["recall"] == rows[0.6]["recall"] == 1.0
    assert sweep.choose() == 0.55


def test_nothing_found_chooses_nothing() -> None:
    sweep = PrecisionSweep()
    _, truth = _tile()
    sweep.add(np.ones((S, S)), truth)  # a model that calls everything background
    assert sweep.choose() is None and all(r["precision"] is None for r in sweep.rows())


def test_predictions_in_unknown_area_are_not_counted() -> None:
    p, truth = _tile()
    ignore = np.zeros((S, S), bool)
    ignore[28:40, 0:14] = True  # F lies in unannotated tissue: nothing says it is false
    sweep = PrecisionSweep()
    sweep.add(1.0 - p, truth, ignore=ignore)
    rows = {r["threshold"]: r for r in sweep.rows()}
    assert (rows[0.5]["tp"], rows[0.5]["fp"]) == (3, 0)


def test_objects_as_inference_makes_them() -> None:
    fg = np.zeros((12, 12), bool)
    fg[1:6, 1:6] = True
    fg[3, 3] = False  # a one-pixel hole
    fg[6:8, 6:8] = True  # touches the first square at a corner only: another nucleus
    fg[10, 10] = True  # a speck
    lab = nuclei_objects(fg)
    assert lab.max() == 3 and lab[3, 3] == 0
    lab = nuclei_objects(fg, min_area_px=2, max_hole_px=2)
    assert sorted(np.bincount(lab.ravel())[1:].tolist()) == [4, 25]  # filled; speck dropped
    # a hole as large as the limit stays (holes *below* it are filled, as in qpseg.objects)
    assert nuclei_objects(fg, max_hole_px=1)[3, 3] == 0


def test_foreground_is_the_engines(tmp_path: Path) -> None:
    """The sweep calls nucleus exactly the pixels inference calls nucleus at that threshold."""
    from qpseg.engine.predict import _apply_threshold
    from qpseg.engine.stitch import MapSet

    rng = np.random.default_rng(3)
    p_bg = np.concatenate([rng.random(4000), np.arange(256) / 255.0,
                           (np.arange(256) + 0.5) / 255.0]).reshape(1, -1)
    q = np.clip(np.floor(p_bg * 255.0 + 0.5), 0, 255).astype(np.uint8)  # as stitch.py stores
    maps = MapSet.create(tmp_path / "m", q.shape, 2, "pixel")
    try:
        assert maps.probs is not None
        maps.probs.write_rows(0, q, channel=0)
        maps.probs.write_rows(0, 255 - q, channel=1)
        for t in THRESHOLD_GRID:
            _apply_threshold(t, maps)
            engine = np.asarray(maps.classes[:, :]) == 1
            assert np.array_equal(engine, foreground_at(p_bg, t)), t
    finally:
        maps.close()


# ------------------------------------------------------------------- at the end of training

class _StandIn(torch.nn.Module):
    """Predicts P(nucleus) = the image's first channel (its logits are log-probabilities)."""

    def __init__(self, objects: str = "nuclei") -> None:
        super().__init__()
        self.contract = ModelContract("stand_in", 2, (InputSpec("image", S),), "pixel", S, S,
                                      objects=objects)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, :1].clamp(1e-6, 1 - 1e-6)
        return torch.cat([torch.log1p(-p), torch.log(p)], dim=1)


def _items() -> list[dict[str, Any]]:
    out = []
    for i, (p, truth) in enumerate((_tile(), _tile2())):
        img = torch.from_numpy(np.repeat(p[None], 3, axis=0).astype(np.float32))
        out.append({"inputs": [img], "label": torch.from_numpy((truth > 0).astype(np.int64)),
                    "instances": torch.from_numpy(truth),
                    "meta": {"index": i, "tile": i}})
    return out


def _spec(tmp_path: Path, model: torch.nn.Module, mode: Any = "auto") -> StageSpec:
    class_map = ClassMap.from_names(["Background", "Nucleus"])
    cfg: dict[str, Any] = {"train": {"inference_threshold": mode, "threshold_iou": 0.5,
                                     "batch_size": 2},
                           "data": {"workers": 0}, "sampler": {"val_samples": None}}
    task = Task(output="pixel", contract=get_contract(model), class_map=class_map,
                loss=build_loss({"name": "ce"}, output="pixel", num_classes=2),
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), device=torch.device("cpu"),
                augment={"preset": "none"}, seed=0, patch_labels=None, val_patch_labels=None,
                extents=())
    items = _items()
    return StageSpec(name="train", cfg=cfg, model=model, task=task, train_ds=items,
                     val_ds=items, sampler_tiles=[], slide_groups=[], ckpt_dir=tmp_path,
                     class_map=class_map, log_path=tmp_path / "log.jsonl",
                     csv_path=tmp_path / "log.csv")


ONE = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_training_chooses_the_threshold_of_a_stand_in_model(tmp_path: Path) -> None:
    model = _StandIn()
    # 0.5 µm/px: nuclei under 10 µm² (40 px) are dropped; the 64 px nuclei stay
    record = choose_threshold(_spec(tmp_path, model), model, ONE, seed=0, target="instance",
                              mpp=0.5)
    assert record is not None and record["value"] == 0.55 and record["tiles"] == 2
    assert record["source"] == "validation" and record["iou"] == 0.5
    counts = {r["threshold"]: (r["tp"], r["tp"] + r["fp"]) for r in record["sweep"]}
    assert counts == EXPECTED
    # and the package's inference rules take it
    rules = default_inference_rules(model.contract, {"target": "instance", "threshold": record})
    assert rules.threshold == 0.55 and rules.nuclei


def test_small_objects_are_removed_before_counting(tmp_path: Path) -> None:
    model = _StandIn()
    # at 0.35 µm/px the 64 px nuclei are 7.8 µm², under QuPath's 10 µm² nucleus minimum that
    # inference applies: nothing is left to count
    with pytest.warns(TrainingWarning, match="no probability threshold finds a nucleus"):
        record = choose_threshold(_spec(tmp_path, model), model, ONE, seed=0,
                                  target="instance", mpp=0.35)
    assert record is not None and record["value"] is None
    assert default_inference_rules(model.contract, {"target": "instance",
                                                    "threshold": record}).threshold is None


def test_config_turns_it_off_or_fixes_it(tmp_path: Path) -> None:
    model = _StandIn()
    assert choose_threshold(_spec(tmp_path, model, "none"), model, ONE, seed=0,
                            target="instance", mpp=0.5) is None
    fixed = choose_threshold(_spec(tmp_path, model, 0.4), model, ONE, seed=0,
                             target="instance", mpp=0.5)
    assert fixed == {"source": "config", "value": 0.4}
    regions = _StandIn("regions")
    # a tissue-class model: no threshold unless asked for
    assert choose_threshold(_spec(tmp_path, regions), regions, ONE, seed=0,
                            target="semantic", mpp=0.5) is None
    asked = choose_threshold(_spec(tmp_path, regions, "precision"), regions, ONE, seed=0,
                             target="semantic", mpp=0.5)
    assert asked is not None and asked["value"] == 0.55


@pytest.mark.parametrize("value", ["sometimes", 0.0, 1.0, -0.2, True])
def test_bad_threshold_config_is_a_config_error(value: Any) -> None:
    with pytest.raises(ConfigError, match="inference_threshold"):
        resolve_config("unet_vgg16", {"train": {"inference_threshold": value}})


def test_good_threshold_configs() -> None:
    assert resolve_config("unet_vgg16", {})["train"]["inference_threshold"] == "auto"
    for value in ("none", "precision", 0.35):
        cfg = resolve_config("unet_vgg16", {"train": {"inference_threshold": value}})
        assert cfg["train"]["inference_threshold"] == value
    with pytest.raises(ConfigError, match="threshold_iou"):
        resolve_config("unet_vgg16", {"train": {"threshold_iou": 1.0}})


# ---------------------------------------------------------------------------- end to end

def _disc_project(folder: Path) -> list[Path]:
    """A QuPath project of two 256 px images (no pixel size) of dark nuclei (radius 5 px) on
    pale tissue, each nucleus a cell in its annotations inside one Region; returns the
    slides."""
    import tifffile
    from shapely.geometry import Point, box

    from qpseg.qupath.geojson import QuPathObject, write_geojson
    from qpseg.qupath.project_edit import create_project

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:256, :256]
    slides, centres = [], []
    for k in range(2):
        rgb = np.empty((256, 256, 3), np.uint8)
        rgb[:] = (230, 170, 205)
        pts: list[tuple[float, float]] = []
        while len(pts) < 60:
            c = (float(rng.uniform(12, 244)), float(rng.uniform(12, 244)))
            if all((c[0] - a) ** 2 + (c[1] - b) ** 2 > 16 ** 2 for a, b in pts):
                pts.append(c)
        for cx, cy in pts:
            rgb[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= 25] = (70, 35, 115)
        path = folder / "slides" / f"nuclei_{k}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, rgb, photometric="rgb")
        slides.append(path)
        centres.append(pts)
    project, added = create_project(folder / "project", slides)
    for res, pts in zip(added, centres, strict=True):
        assert res.entry is not None
        objs = [QuPathObject(box(0, 0, 256, 256), "annotation", "Region")]
        objs += [QuPathObject(Point(c).buffer(7), "cell", None,
                              nucleus_geometry=Point(c).buffer(5)) for c in pts]
        write_geojson(project.path.parent / "qpseg" / "annotations"
                      / f"{res.entry.entry_id}.geojson", objs)
    return slides


def test_training_writes_the_threshold_inference_reads(tmp_path: Path) -> None:
    from qpseg.engine import InferenceParams, jobs_from_paths, run_inference
    from qpseg.training import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the images record no pixel size (data.slide_mpp)
        slides = _disc_project(tmp_path / "n")
    cfg = {"classes": ["Nucleus"], "model_kwargs": {"tile_px": 64, "base_filters": 4,
                                                    "depth": 2},
           "data": {"mpp": 1.0, "slide_mpp": 1.0, "target": "instance", "min_labelled": 0.5},
           "optimizer": {"lr": 1e-2}, "split": {"val": 0.5, "test": 0.0},
           "train": {"batch_size": 4, "steps": 30, "checkpoint_every": 0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Nucleus not found in any annotation"
        result = train(tmp_path / "n" / "project" / "project.qpproj", tmp_path / "out",
                       model="tiny_unet", config=cfg)
    assert result.package is not None
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    chosen = config["training"]["threshold"]
    assert chosen["source"] == "validation" and len(chosen["sweep"]) == len(THRESHOLD_GRID)
    assert chosen["value"] in THRESHOLD_GRID
    best = max(r["precision"] for r in chosen["sweep"] if r["tp"])
    assert [r["precision"] for r in chosen["sweep"]
            if r["threshold"] == chosen["value"]] == [best]
    assert config["inference"]["threshold"] == chosen["value"]
    # inference reads it from the package
    slide = slides[0]
    out = tmp_path / "infer"
    r = run_inference(jobs_from_paths([slide], out), tmp_path / "out", out,
                      InferenceParams(mpp=1.0, run_id="r")).results[0]
    assert r.status == "done", r.reason
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["resolved"]["inference"]["threshold"] == chosen["value"]
