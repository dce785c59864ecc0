"""What a person looks at after ``qpseg infer``: the heatmap, the overlay and summary.csv.

The slide is one flat pink rectangle on white glass, so the true probability is known
everywhere: the hand-weighted colour model of test_engine_support (green blurred, then a logit
of ``gain · (threshold − green)``) gives glass (green 1.0) the Tumor probability
``σ(2 · (0.45 − 1.0)) ≈ 0.25`` and the pink (green 77/255) ``σ(2 · (0.45 − 0.302))`` — one
constant over the whole rectangle, across every tile border.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qpseg.engine import InferenceParams, jobs_from_paths, run_inference
from qpseg.engine.writers import OVERLAY_GAP
from qpseg.models import save_package
from test_engine_support import colour_unet

SLIDE_MPP = 0.5
MODEL_MPP = 1.0
TILE = 128          # model output px per tile; margin 8, so tile borders every 112 map px
GAIN = 2.0
THRESHOLD = 0.45
PINK = (200, 77, 160)
BOX = (96, 96, 896, 704)  # tissue rectangle, level-0 px (x0, y0, x1, y1)
W, H = 1024, 768


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _q(p: float) -> int:
    return math.floor(p * 255 + 0.5)


GLASS_P = _sigmoid(GAIN * (THRESHOLD - 1.0))            # what the model says on glass
TISSUE_P = _sigmoid(GAIN * (THRESHOLD - PINK[1] / 255))  # and on the pink


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def _slide(path: Path) -> Path:
    import tifffile

    img = np.full((H, W, 3), 255, np.uint8)
    x0, y0, x1, y1 = BOX
    img[y0:y1, x0:x1] = PINK
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / SLIDE_MPP, 1e4 / SLIDE_MPP), resolutionunit="CENTIMETER")
    return path


def _package(folder: Path, names: tuple[str, ...], training: dict[str, Any] | None = None
             ) -> Path:
    model = colour_unet(TILE, threshold=THRESHOLD, gain=GAIN)
    return save_package(folder, model, class_names=list(names), mpp=MODEL_MPP,
                        class_colors=[(255, 255, 255), (200, 0, 0)],
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), training=training,
                        overwrite=True)


@pytest.fixture(scope="module", params=["center", "blend"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> dict[str, Any]:
    root = tmp_path_factory.mktemp(f"flat-{request.param}")
    slide = _slide(root / "flat.tif")
    pkg = _package(root / "pkg", ("Background", "Tumor"))
    out = root / "out"
    res = run_inference(jobs_from_paths([slide], out), pkg, out,
                        InferenceParams(heatmap=True, overlay=True, keep_maps=True,
                                        stitch=request.param))
    assert res.results[0].status == "done", res.results[0].reason
    return {"root": root, "out": out, "slide": slide, "pkg": pkg, "mode": request.param}


def _read_heatmap(path: Path) -> tuple[np.ndarray, str]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[0].asarray(), tif.ome_metadata or ""


def test_heatmap_is_exactly_zero_outside_tissue(run: dict[str, Any]) -> None:
    heat, _ = _read_heatmap(run["out"] / "flat.heatmap.ome.tif")
    ds = MODEL_MPP / SLIDE_MPP  # level-0 px per map px
    assert heat.shape == (math.ceil(H / ds), math.ceil(W / ds))
    # map pixel centres in level-0 px
    ys = (np.arange(heat.shape[0]) + 0.5) * ds
    xs = (np.arange(heat.shape[1]) + 0.5) * ds
    x0, y0, x1, y1 = BOX
    thumb = 16  # the tissue mask's pixel (8 µm) in level-0 px: its edge may be one pixel off
    far_x = (xs < x0 - thumb) | (xs >= x1 + thumb)
    far_y = (ys < y0 - thumb) | (ys >= y1 + thumb)
    glass = far_y[:, None] | far_x[None, :]
    # the model does say ~0.25 on that glass (tiles with tissue read it too) ...
    probs = np.load(run["out"] / "maps" / "flat" / "probs.npy")[1]
    assert (probs[glass] == _q(GLASS_P)).any()
    # ... the heatmap shows exactly 0 there
    assert int(heat[glass].max()) == 0
    assert int(heat[glass].min()) == 0


def test_heatmap_has_no_seam_across_tile_borders(run: dict[str, Any]) -> None:
    heat, _ = _read_heatmap(run["out"] / "flat.heatmap.ome.tif")
    ds = MODEL_MPP / SLIDE_MPP
    x0, y0, x1, y1 = BOX
    inner = 16  # beyond the blur's reach of the rectangle's edge and the mask's quantisation
    r0, r1 = math.ceil((y0 + inner) / ds), math.floor((y1 - inner) / ds)
    c0, c1 = math.ceil((x0 + inner) / ds), math.floor((x1 - inner) / ds)
    inside = heat[r0:r1, c0:c1].astype(int)
    valid = TILE - 2 * 8
    borders = [b for b in range(valid, heat.shape[1], valid // (2 if run["mode"] == "blend"
                                                                 else 1)) if c0 < b < c1]
    assert borders  # the rectangle spans tile borders in both directions
    assert np.abs(inside - _q(TISSUE_P)).max() <= 1
    for b in borders:  # columns on either side of a tile border hold the same value
        assert np.abs(heat[r0:r1, b - 1].astype(int) - heat[r0:r1, b].astype(int)).max() <= 1


def test_heatmap_names_the_class(run: dict[str, Any]) -> None:
    _, ome = _read_heatmap(run["out"] / "flat.heatmap.ome.tif")
    assert 'Name="Tumor"' in ome
    assert "Tumor probability" in ome


def test_overlay_has_raw_thumbnail_painted_thumbnail_and_legend(run: dict[str, Any]) -> None:
    from PIL import Image

    from qpseg.slide import open_slide

    img = np.asarray(Image.open(run["out"] / "flat.overlay.png").convert("RGB"))
    tw, th = W, H  # the slide is smaller than max_size: the thumbnail is level 0
    assert img.shape[1] == 2 * tw + OVERLAY_GAP and img.shape[0] > th
    with open_slide(run["slide"]) as s:
        raw = s.read_region_mpp(0.0, 0.0, tw, th, SLIDE_MPP)
    assert np.array_equal(img[:th, :tw], raw[..., :3])  # left: the slide itself
    painted = img[:th, tw + OVERLAY_GAP:]
    x0, y0, x1, y1 = BOX
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    # right: Tumor (the pink) painted 45 % towards its colour (200, 0, 0); glass untouched
    expect = np.rint(0.55 * np.array(PINK) + 0.45 * np.array((200, 0, 0))).astype(int)
    assert np.abs(painted[cy, cx].astype(int) - expect).max() <= 1
    assert (painted[5, 5] == 255).all()
    assert (img[:th, tw:tw + OVERLAY_GAP] == 255).all()
    legend = img[th:]
    red = np.all(legend == (200, 0, 0), axis=-1)
    assert red.sum() >= 100  # the Tumor swatch
    ys, xs = np.nonzero(red)
    right = legend[ys.min():ys.max() + 1, xs.max() + 2:xs.max() + 60]
    assert (right.sum(axis=-1) < 200).sum() >= 10  # its name is written beside it


def test_summary_says_nothing_about_lesions_without_lesion_classes(
        tmp_path: Path) -> None:
    slide = _slide(tmp_path / "flat.tif")
    out = tmp_path / "out"
    pkg = _package(tmp_path / "pkg", ("Background", "Stroma"))  # no lesion class
    run_inference(jobs_from_paths([slide], out), pkg, out, InferenceParams())
    with open(out / "summary.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["status"] == "done" and int(rows[0]["count_Stroma"]) >= 1
    assert not [k for k in rows[0] if "lesion" in k or k == "slide_category"]
    # a model with a lesion class still reports them
    out2 = tmp_path / "out2"
    pkg2 = _package(tmp_path / "pkg2", ("Background", "Tumor"))
    run_inference(jobs_from_paths([slide], out2), pkg2, out2, InferenceParams())
    with open(out2 / "summary.csv", newline="", encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    assert row["n_lesions"] == "1" and row["slide_category"] == "micro"  # 0.5 mm
