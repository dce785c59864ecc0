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


# ------------------------------------------------------------------------------- start-up

ROOT = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> str:
    """stdout of ``code`` run in a new interpreter (nothing imported yet)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return out.stdout


def test_catalog_read_from_source_equals_the_registry() -> None:
    from qpseg.models.registry import _static_catalog, get_entry, list_models

    static = _static_catalog()
    assert static is not None  # the family modules' decorators were read without importing
    # the registry may also hold models other test modules register at import time
    ours = [n for n in list_models() if get_entry(n).builder.__module__.startswith("qpseg.")]
    assert sorted(e.name for e in static) == ours and len(ours) >= 20
    for e in static:
        entry = get_entry(e.name)
        assert (e.paper, e.summary, e.heavy, e.paper_init) == (
            entry.paper, entry.summary, entry.heavy, entry.paper_init), e.name
        assert e.module == entry.builder.__module__


def test_models_does_not_import_torch() -> None:
    out = _fresh("import sys, io, contextlib\n"
                 "from qpseg.cli import main\n"
                 "buf = io.StringIO()\n"
                 "with contextlib.redirect_stdout(buf):\n"
                 "    assert main(['models']) == 0\n"
                 "assert 'tiny_unet' in buf.getvalue() and 'dmmn_m3' in buf.getvalue()\n"
                 "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    assert out.strip() == "[]"


def test_loading_one_architecture_imports_only_its_module() -> None:
    out = _fresh("import sys\n"
                 "from qpseg.models import create_model\n"
                 "create_model('tiny_unet', 2, meta=True)\n"
                 "print('torchvision' in sys.modules, 'qpseg.models.nuclei' in sys.modules)")
    assert out.split() == ["False", "False"]


def test_model_info_prints_the_card_then_checks(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from qpseg.models import create_model, save_package

    pkg = save_package(tmp_path / "lung", create_model("tiny_unet", 2, tile_px=64),
                       class_names=["Background", "Tumor"], mpp=0.5)
    assert main(["model-info", str(pkg)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Model card: lung\n")
    assert out.index("## Intended use") < out.index("Checking the weights and a forward pass")
    assert out.rstrip().splitlines()[-1].startswith(
        f"{pkg}: config, weights and forward pass OK — tiny_unet")
    # a package saved before model cards: the card is made from config.json
    (pkg / "MODEL_CARD.md").unlink()
    assert main(["model-info", str(pkg), "--no-forward"]) == 0
    out2 = capsys.readouterr().out
    assert out2.startswith("# Model card: lung\n") and "| 1 | Tumor |" in out2
    assert main(["model-info", str(pkg), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_card"].startswith("# Model card: lung")
