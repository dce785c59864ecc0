"""MODEL_CARD.md: written with every package, made on the fly for older ones, safe to print."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from qpseg.models import create_model, read_package_config, save_package
from qpseg.models.card import MODEL_CARD_NAME, model_card, read_model_card, write_model_card

ROOT = Path(__file__).resolve().parents[1]

# What training records in config.json's "training" (qpseg.training.run_record._training_summary)
TRAINING: dict[str, Any] = {
    "split": {"split_version": 1, "seed": 0, "train": ["s1.svs", "s2.svs"], "val": ["s3.svs"],
              "test": []},
    "slides": {"train": ["s1.svs", "s2.svs"], "val": ["s3.svs"]},
    "tissue_method": "otsu_od",
    "target": "semantic",
    "stages": {"train": {"steps": 150, "epochs": 8, "stopped_early": False,
                         "best": {"metric": "val_loss", "mode": "min", "value": 0.42,
                                  "step": 150, "epoch": 7, "weights": "best",
                                  "last_metrics": {"val_loss": 0.4195, "val_mdice": 0.9821,
                                                   "val_dice_tumor": 0.9927}}}},
    "initialisation": {"init_from": {"package": "/models/lung", "architecture": "tiny_unet",
                                     "sha256": "ab" * 32}},
}
# ... and in the run_metadata.json it leaves in the package folder before saving
RUN_METADATA = {"summary": {"train": {"classes": {"Background": {"pixels": 211808},
                                                  "Tumor": {"pixels": 65600}}},
                            "val": {"classes": {"Background": {"pixels": 92944},
                                                "Tumor": {"pixels": 46704}}}}}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _package(folder: Path, training: dict[str, Any] | None = TRAINING) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run_metadata.json").write_text(json.dumps(RUN_METADATA), encoding="utf-8")
    model = create_model("tiny_unet", 2, tile_px=64)
    return save_package(folder, model, class_names=["Background", "Tumor"], mpp=0.5,
                        class_colors=[(255, 255, 255), (200, 0, 0)], training=training,
                        overwrite=True)


def test_saved_package_has_a_model_card(tmp_path: Path) -> None:
    pkg = _package(tmp_path / "lung")
    text = (pkg / MODEL_CARD_NAME).read_text(encoding="utf-8")
    cfg = read_package_config(pkg)
    assert text.startswith("# Model card: lung\n")
    assert "`tiny_unet`: small U-Net" in text  # the architecture and what it is
    assert "**Paper:** qpseg" in text
    assert "| 1 | Tumor | #c80000 (rgb 200, 0, 0) |" in text  # classes and QuPath colours
    assert "**Pixel size:** 0.5 µm/px; tile 64 px" in text
    assert "**Training slides (2):** s1.svs, s2.svs" in text
    assert "**Validation slides (1):** s3.svs" in text
    assert "| Tumor | 65,600 | 46,704 |" in text  # labelled pixels, train and val
    assert "started from the model package /models/lung (tiny_unet, SHA-256 abababab" in text
    assert "weights chosen by val_loss (min) at epoch 7, step 150" in text
    assert "| val_dice_tumor | 0.9927 |" in text
    assert "## Intended use" in text and "segmenting Tumor" in text and "2 slides" in text
    assert f"SHA-256 `{cfg.weights_sha256}`" in text
    assert text == model_card(cfg, pkg)  # what model-info makes for a package without one


def test_card_of_a_package_without_training_record(tmp_path: Path) -> None:
    pkg = _package(tmp_path / "bare", training=None)
    (pkg / "run_metadata.json").unlink()
    text = model_card(read_package_config(pkg), pkg)
    assert "Slides: not recorded in this package" in text
    assert "## Validation scores\n\nNot recorded in this package." in text
    assert "- not recorded in this package" in text  # initialisation
    assert "Labelled pixels" not in text


def test_card_links_the_training_curves_when_present(tmp_path: Path) -> None:
    pkg = _package(tmp_path / "p")
    assert "training_curves.png" not in (pkg / MODEL_CARD_NAME).read_text(encoding="utf-8")
    (pkg / "training_curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    write_model_card(pkg)
    assert "![training curves](training_curves.png)" in \
        (pkg / MODEL_CARD_NAME).read_text(encoding="utf-8")


def test_printed_card_is_stripped_of_terminal_escapes(tmp_path: Path) -> None:
    pkg = _package(tmp_path / "p")
    (pkg / MODEL_CARD_NAME).write_text("# card\n\x1b]0;pwned\x07\x1b[2Jtext\tok\n",
                                       encoding="utf-8")
    assert read_model_card(pkg) == "# card\n]0;pwned[2Jtext\tok\n"


def test_card_link_out_of_the_package_is_not_read(tmp_path: Path) -> None:
    pkg = _package(tmp_path / "p")
    secret = tmp_path / "secret.md"
    secret.write_text("private", encoding="utf-8")
    (pkg / MODEL_CARD_NAME).unlink()
    os.symlink(secret, pkg / MODEL_CARD_NAME)
    assert read_model_card(pkg) is None
    (pkg / "run_metadata.json").unlink()
    os.symlink(tmp_path / "elsewhere.json", pkg / "run_metadata.json")
    (tmp_path / "elsewhere.json").write_text(json.dumps(RUN_METADATA), encoding="utf-8")
    assert "Labelled pixels" not in model_card(read_package_config(pkg), pkg)


def test_card_needs_no_torch(tmp_path: Path) -> None:
    pkg = _package(tmp_path / "p")
    code = ("import sys; from qpseg.models.card import model_card; "
            "from qpseg.models.package import read_package_config; "
            f"t = model_card(read_package_config({str(pkg)!r}), {str(pkg)!r}); "
            "assert 'Tumor' in t; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
