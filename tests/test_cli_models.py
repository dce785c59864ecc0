"""`qpseg models` and `qpseg model-info` on real and corrupt packages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpseg.cli import main


def test_models_lists_every_paper(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in rows}
    assert {"fcn32s_vgg16", "mobilenetv2_patch", "h2g_refine_unet", "unet_resnet50", "gb_unet",
            "maskrcnn_resnet101", "dmmn_m3", "dmmn_s1", "tiny_unet"} <= names
    assert main(["models"]) == 0
    assert "tiny_unet" in capsys.readouterr().out


def test_model_info_valid_and_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qpseg.models import create_model, save_package

    model = create_model("tiny_unet", 3)
    pkg = save_package(tmp_path / "pkg", model, class_names=["Background", "Tumor", "Stroma"],
                       mpp=1.0, mean=[0.5] * 3, std=[0.25] * 3)
    assert main(["model-info", str(pkg), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "tiny_unet" and len(info["sha256"]) == 64
    assert [c["name"] for c in info["classes"]] == ["Background", "Tumor", "Stroma"]

    cfg = pkg / "config.json"
    cfg.write_text(cfg.read_text()[:-20], encoding="utf-8")
    assert main(["model-info", str(pkg)]) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "config.json" in err[0]
