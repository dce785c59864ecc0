"""``init_from``: start a model from another qpseg model package (khalil2022 §3.2.1, Fig. 3:
the breast model starts from the lung model; a lab fine-tunes last month's model)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from qpseg.errors import ModelError
from qpseg.manifest import import_project
from qpseg.models import create_model, save_package
from qpseg.models.init_from import _class_axes, init_from_package
from qpseg.models.registry import InitWarning
from qpseg.testing.projects import make_project
from qpseg.training import TrainEvent, train

FCN = {"width_mult": 0.0625, "tile_px": 64}


def _package(tmp_path: Path, classes: list[str]) -> tuple[Path, Any]:
    torch.manual_seed(1)
    src = create_model("fcn32s_vgg16", len(classes), **FCN)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    save_package(tmp_path / "pkg", src, class_names=classes, mpp=1.0)
    return tmp_path / "pkg", src


def test_classes_are_aligned_by_name(tmp_path: Path) -> None:
    pkg, src = _package(tmp_path, ["Background", "Tumor", "Normal"])
    torch.manual_seed(2)
    dst: Any = create_model("fcn32s_vgg16", 3, **FCN)
    fresh = dst.score_fr.weight.detach().clone()
    rec = init_from_package(dst, pkg, ["Background", "Normal", "Lymph"])
    assert torch.equal(dst.features[0].weight, src.features[0].weight)  # plain tensors by name
    assert torch.equal(dst.fc7.weight, src.fc7.weight)
    assert torch.equal(dst.score_fr.weight[0], src.score_fr.weight[0])  # Background
    assert torch.equal(dst.score_fr.weight[1], src.score_fr.weight[2])  # Normal: row 2 -> 1
    assert torch.equal(dst.score_fr.weight[2], fresh[2])  # Lymph: new, fresh head
    assert torch.equal(dst.upscore.weight[1, 0], src.upscore.weight[2, 0])  # both class axes
    assert rec["classes"] == {"matched": ["Background", "Normal"], "new": ["Lymph"],
                              "dropped": ["Tumor"]}
    assert set(rec["aligned_by_class"]) == {"score_fr.weight", "score_fr.bias",
                                            "upscore.weight"}
    assert rec["not_loaded"] == {} and len(rec["loaded"]) == rec["tensors"] - 3
    assert dst.qpseg_init["init_from"] is rec


def test_shape_mismatches_and_foreign_packages(tmp_path: Path) -> None:
    pkg, _ = _package(tmp_path, ["Background", "Tumor"])
    wide: Any = create_model("fcn32s_vgg16", 2, width_mult=0.125, tile_px=64)
    rec = init_from_package(wide, pkg, ["Background", "Tumor"])
    assert rec["loaded"] == ["score_fr.bias", "upscore.weight"]  # the width-free tensors
    assert rec["not_loaded"]["features.0.weight"] == "shape (4, 3, 3, 3) in the package, " \
        "(8, 3, 3, 3) here"
    tiny = create_model("tiny_unet", 2, tile_px=64)
    with pytest.raises(ModelError, match="no tensor of the package"):
        init_from_package(tiny, pkg, ["Background", "Tumor"])


def test_class_axes_found_without_listing_heads() -> None:
    m = create_model("maskrcnn_resnet101", 3, meta=True, tile_px=64)
    axes = _class_axes(m)
    assert axes["roi_heads.box_predictor.bbox_pred.weight"] == {0: (0, 4)}
    assert axes["roi_heads.mask_predictor.mask_fcn_logits.weight"] == {0: (0, 1)}
    assert len(axes) == 6
    gb = create_model("gb_unet", 3, meta=True, members=["tiny_unet"] * 3,
                      member_kwargs={"base_filters": 4}, encoder_filters=[4, 8, 8, 16, 16],
                      decoder_filters=[8, 8, 8, 4, 4], tile_px=64)
    # image (3) + 3 members x C maps: interleaved, so not alignable by class
    assert _class_axes(gb)["second.encoder.blocks.0.0.0.weight"] == {1: (3, 3)}


SMALL: dict[str, Any] = {
    "model_kwargs": {"tile_px": 32, "base_filters": 4, "depth": 2},
    "data": {"mpp": 4.0},
    "split": {"val": 0.25, "test": 0.0},
    "train": {"batch_size": 4, "steps": 2, "log_every": 1, "checkpoint_every": 3},
}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("initproj")
    proj = make_project(folder / "p", n_slides=4, width=1024, height=1024, seed=11)
    m = import_project(proj.path, folder / "m", use_paquo=False)
    assert m.path is not None
    return m.path


def test_training_starts_from_a_package_and_says_so(manifest: Path, tmp_path: Path) -> None:
    first = train(manifest, tmp_path / "a", model="tiny_unet", config=SMALL)
    events: list[TrainEvent] = []
    second = train(manifest, tmp_path / "b", model="tiny_unet",
                   config={**SMALL, "init_from": str(tmp_path / "a")}, callback=events.append)
    lines = [e.message for e in events if e.stage == "init"]
    assert len(lines) == 1 and lines[0].startswith(
        f"weights: started from model package {tmp_path / 'a'} (tiny_unet):")
    assert first.model is not None
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    init = cfg["training"]["initialisation"]["init_from"]
    assert init["package"] == str(tmp_path / "a") and init["not_loaded"] == {}
    assert second.model is not None


def test_paper_architecture_from_random_init_warns_and_records(manifest: Path,
                                                               tmp_path: Path) -> None:
    cfg = {**SMALL, "model_kwargs": {"tile_px": 64, "width_mult": 0.0625}}
    events: list[TrainEvent] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(manifest, tmp_path / "f", model="fcn32s_vgg16", config=cfg,
              callback=events.append)
    mine = [w for w in caught if issubclass(w.category, InitWarning)]
    assert len(mine) == 1 and "khalil2022 §3.5" in str(mine[0].message)
    assert [e.message for e in events if e.stage == "init"] == [
        "weights: random initialisation (the paper started from pretrained weights; see the "
        "warning)"]
    init = json.loads((tmp_path / "f" / "config.json").read_text())["training"]["initialisation"]
    assert init["random"] is True and "pretrained: imagenet" in init["warning"]
    with warnings.catch_warnings(record=True) as caught:  # tiny_unet: no paper weights
        warnings.simplefilter("always")
        train(manifest, tmp_path / "t", model="tiny_unet", config=SMALL)
    assert not [w for w in caught if issubclass(w.category, InitWarning)]


def test_cli_init_from_prints_the_starting_weights(manifest: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qpseg.cli import app

    train(manifest, tmp_path / "a", model="tiny_unet", config=SMALL)
    (tmp_path / "c.json").write_text(json.dumps(SMALL))
    res = CliRunner().invoke(app, ["train", str(manifest), "--out", str(tmp_path / "b"),
                                   "--model", "tiny_unet", "--config", str(tmp_path / "c.json"),
                                   "--init-from", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "weights: started from model package" in res.output
    saved = json.loads((tmp_path / "b" / "train_config.json").read_text())
    assert saved["init_from"] == str(tmp_path / "a")
