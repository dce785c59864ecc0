"""The colour normalisation used in training travels in the model package and inference
applies it to every tile, so a tile reaches the model as it did in training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qpseg.data.augment import normalize
from qpseg.data.stain import VahadaneNormalizer
from qpseg.engine.runner import _Runner
from qpseg.errors import ModelError
from qpseg.manifest import import_project
from qpseg.models import load_package
from qpseg.models.package import read_package_config
from qpseg.slide import open_slide
from qpseg.testing.projects import make_project
from qpseg.training import train
from qpseg.training.data import open_manifest, prepare_data

torch.set_num_threads(1)

#: tiny_unet on 32 px tiles at 4 µm/px (as tests/test_train.py): a step takes milliseconds.
SMALL: dict[str, Any] = {
    "model_kwargs": {"tile_px": 32, "base_filters": 4, "depth": 2},
    "data": {"mpp": 4.0},
    "split": {"val": 0.25, "test": 0.0},
    "train": {"batch_size": 4, "steps": 2, "log_every": 1},
}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stainproj")
    proj = make_project(folder / "p", n_slides=4, width=1024, height=1024, seed=11)
    m = import_project(proj.path, folder / "m", use_paquo=False)
    assert m.path is not None
    return m.path


def _train(manifest: Path, out: Path, method: str | None) -> Path:
    cfg = json.loads(json.dumps(SMALL))
    cfg["data"]["stain_normalization"] = method
    train(manifest, out, model="tiny_unet", config=cfg)
    return out


def _cpu_runner(pkg: Any) -> _Runner:
    return _Runner(pkg.model, pkg, None, torch.device("cpu"), "fp32", False, False)


@pytest.mark.parametrize("method", ["vahadane", "macenko", "reinhard"])
def test_training_and_inference_give_the_model_the_same_input(manifest: Path, tmp_path: Path,
                                                               method: str) -> None:
    out = _train(manifest, tmp_path / "run", method)
    stored = json.loads((out / "config.json").read_text())["stain_normalization"]
    assert stored["method"] == method
    pkg = load_package(out)
    assert pkg.stain_normalizer() is not None
    # The training side, as the training run built it: its tiles with the fitted normaliser,
    # then mean/std (qpseg.training.loop).
    cfg = pkg.config.training["config"]
    m = open_manifest(manifest, None, classes=cfg.get("classes"), write=False)
    data = prepare_data(m, cfg, pkg.contract, seed=int(cfg["train"]["seed"]))
    assert data.train.normalizer is not None
    # The inference side: the raw tile the engine's loader reads, through _Runner.prepare.
    for index in range(3):
        sample = data.train[index]
        tile = data.train.tiles[sample["meta"]["tile"]]
        rec = data.train.slides[tile.slide]
        with open_slide(rec.path, mpp=rec.mpp) as slide:
            raw = slide.read_region_mpp(tile.x, tile.y, data.tile_px, data.tile_px, data.mpp)
        trained_on = normalize(sample["image"][None].float(), data.mean, data.std)
        x = torch.from_numpy(np.ascontiguousarray(raw))[None]
        inferred = _cpu_runner(pkg).prepare(x)
        assert torch.allclose(inferred, trained_on, atol=1e-6)
        # What inference fed the model before the package carried the normaliser:
        unnormalised = pkg.normalize(x.permute(0, 3, 1, 2))
        assert (unnormalised - trained_on).abs().max() > 0.05


def test_a_package_without_normaliser_behaves_as_before(manifest: Path, tmp_path: Path) -> None:
    out = _train(manifest, tmp_path / "plain", None)
    assert "stain_normalization" not in json.loads((out / "config.json").read_text())
    pkg = load_package(out)
    assert pkg.stain_normalizer() is None
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(_cpu_runner(pkg).prepare(x), pkg.normalize(x.permute(0, 3, 1, 2)))


def test_a_malformed_stored_normaliser_is_one_model_error(manifest: Path,
                                                          tmp_path: Path) -> None:
    out = _train(manifest, tmp_path / "bad", "vahadane")
    path = out / "config.json"
    data = json.loads(path.read_text())
    VahadaneNormalizer.from_json(data["stain_normalization"])  # well-formed as written
    data["stain_normalization"]["stain_matrix"] = [[1.0, 2.0]]
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="stain_normalization"):
        read_package_config(out)
    data["stain_normalization"] = {"method": "spams"}
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="unknown stain normalisation"):
        read_package_config(out)
