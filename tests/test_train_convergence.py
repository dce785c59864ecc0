"""tiny_unet trained for a few hundred steps on CPU reaches a validation
Dice >= 0.9 on the tumour class of generated slides with known tumour regions."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from qpseg.manifest import import_project
from qpseg.models import load_package
from qpseg.testing.projects import make_project
from qpseg.training import train
from qpseg.training.config import load_config_file

DEMO = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tiny_unet_demo.yaml"


def test_tiny_unet_reaches_tumour_dice_0_9(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    proj = make_project(tmp_path / "p", n_slides=4, width=1536, height=1536, seed=3)
    manifest = import_project(proj.path, tmp_path / "m", use_paquo=False)
    cfg = load_config_file(DEMO)  # 64 px tiles at 2 µm/px, batch 8, Adam 3e-3
    start = time.perf_counter()
    result = train(manifest.path, tmp_path / "run", config=cfg,
                   overrides={"train": {"steps": 120, "log_every": 40, "val_every": 1000}})
    seconds = time.perf_counter() - start
    dice = result.metrics["val_dice_tumor"]
    print(f"tumour Dice {dice:.4f} after {result.stages[0].steps} steps in {seconds:.1f} s")
    assert result.stages[0].steps == 120
    assert dice >= 0.9
    assert result.metrics["val_pixels"] > 10_000
    assert load_package(tmp_path / "run").config.training["stages"]["train"]["steps"] == 120
