"""``qpseg suggest``: the uncertainty score, and a slide with an ambiguous region ranked above
a clean one, written into the QuPath project."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qpseg.cli import main
from qpseg.models._base import QpsegModule
from qpseg.models.contract import InputSpec, ModelContract
from qpseg.models.registry import register_model
from qpseg.suggest import MODEL_KEY, RANK_KEY, SCORE_KEY, reviewed_entries, score_probs


class ColourProbe(QpsegModule):
    """A fixed linear read-out of the pixel colour (inputs in [0, 1]): white glass is
    Background, red is Tumor, blue is Stroma, and purple (as much red as blue) is Tumor or
    Stroma with equal odds — the deliberately ambiguous tissue."""

    def __init__(self, num_classes: int, *, tile_px: int = 64) -> None:
        super().__init__()
        if num_classes != 3:
            raise ValueError("the probe has three classes")
        self.head = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(
                [[0.0, 10.0, 0.0], [10.0, 0.0, -10.0], [-10.0, 0.0, 10.0]])[:, :, None, None])
            self.head.bias.copy_(torch.tensor([-5.0, 0.0, 0.0]))
        self.contract = ModelContract(
            architecture="test_colour_probe", num_classes=3,
            inputs=(InputSpec("image", tile_px, 1.0, 3),), output="pixel", tile_px=tile_px,
            output_px=tile_px, size_multiple=1, margin_px=0, paper="test")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)  # type: ignore[no-any-return]


@register_model("test_colour_probe", paper="test", tiny={"tile_px": 64})
def colour_probe(num_classes: int, *, tile_px: int = 64) -> ColourProbe:
    """Fixed colour read-out (tests)."""
    return ColourProbe(num_classes, tile_px=tile_px)


# ------------------------------------------------------------------------------ the score


def test_score_is_mean_normalised_entropy_over_tissue() -> None:
    probs = np.zeros((3, 4, 4), dtype=np.uint8)  # all zero: no tile ran there
    probs[1, :2, :] = 255                         # 8 pixels certain
    probs[1, 2, :] = probs[2, 2, :] = 128         # 4 pixels split between two classes
    score, frac, low_um2, tissue_um2 = score_probs(probs, 2.0)
    assert score == pytest.approx(4 * math.log(2) / math.log(3) / 12)
    assert frac == pytest.approx(4 / 12)
    assert low_um2 == pytest.approx(4 * 4.0) and tissue_um2 == pytest.approx(12 * 4.0)
    assert score_probs(np.zeros((3, 2, 2), dtype=np.uint8), 1.0) == (0.0, 0.0, 0.0, 0.0)
    # float probabilities and band-wise reading give the same answer
    f = probs.astype(np.float64) / 255
    assert score_probs(f, 2.0, band=1)[0] == pytest.approx(score, rel=1e-3)


# ------------------------------------------------------------------- a project to rank


def _image(path: Path, ambiguous: bool) -> Path:
    import tifffile

    img = np.full((256, 256, 3), 245, dtype=np.uint8)     # glass
    img[32:224, 32:128] = (220, 20, 20)                    # red: Tumor
    img[32:224, 128:224] = (20, 20, 220)                   # blue: Stroma
    if ambiguous:
        img[96:160, 64:192] = (150, 20, 150)               # purple: either
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64),
                     resolution=(1e4, 1e4), resolutionunit="CENTIMETER")  # 1 µm/px
    return path


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    from qpseg.models import create_model, save_package
    from qpseg.qupath.classes import PathClass, default_color
    from qpseg.qupath.images import add_slide
    from qpseg.qupath.project import QuPathProject

    names = ["Background", "Tumor", "Stroma"]
    proj = QuPathProject.create(tmp_path / "proj", [PathClass(n, default_color(n))
                                                    for n in names[1:]])
    for name, amb in (("clean_a.tif", False), ("ambiguous.tif", True), ("clean_b.tif", False)):
        (tmp_path / "slides").mkdir(exist_ok=True)
        add_slide(proj, _image(tmp_path / "slides" / name, amb), mpp=1.0)
    proj.save()
    pkg = save_package(tmp_path / "probe", create_model("test_colour_probe", 3), mpp=1.0,
                       class_names=names, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return proj.path, pkg


def test_suggest_ranks_the_ambiguous_slide_first_and_tells_qupath(project, capsys) -> None:
    from qpseg.qupath.project import QuPathProject

    qpproj, pkg = project
    assert main(["suggest", str(qpproj), "--model", str(pkg), "-n", "1", "--device", "cpu",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ranked = [(r["rank"], r["image"]) for r in out["slides"]]
    assert ranked[0] == (1, "ambiguous.tif")
    scores = {r["image"]: r for r in out["slides"]}
    amb, clean = scores["ambiguous.tif"], scores["clean_a.tif"]
    assert amb["score"] > 2 * clean["score"]
    # the purple square (64 x 128 µm) is the low-confidence area, within a tile's margin
    assert amb["low_confidence_um2"] == pytest.approx(64 * 128, rel=0.3)
    assert clean["low_confidence_um2"] < 0.2 * amb["low_confidence_um2"]
    entries = {e.image_name: e for e in QuPathProject.load(qpproj).entries}
    assert entries["ambiguous.tif"].metadata[RANK_KEY] == "1"
    assert float(entries["ambiguous.tif"].metadata[SCORE_KEY]) == pytest.approx(amb["score"],
                                                                                 abs=1e-4)
    assert RANK_KEY not in entries["clean_a.tif"].metadata  # only the top -n
    with (qpproj.parent / "qpseg" / "suggestions.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["image"] == "ambiguous.tif" and len(rows) == 3
    # the model that ranked them: what the import script stores as qpseg_review_model
    assert {r["model_sha256"] for r in rows} == {out["model_sha256"]}
    assert entries["ambiguous.tif"].metadata[MODEL_KEY] == out["model_sha256"][:12]
    assert [r["suggested"] for r in rows] == ["True", "False", "False"]
    assert not (qpproj.parent / "qpseg" / "suggest" / "maps").exists()  # maps removed
    assert not (qpproj.parent / "qpseg" / "predictions").exists()  # the project's own: untouched


def test_reviewed_slides_are_not_suggested(project, capsys) -> None:
    from qpseg.qupath.project import QuPathProject
    from qpseg.rounds import RoundRecord, record_round

    qpproj, pkg = project
    amb = next(e for e in QuPathProject.load(qpproj).entries if e.image_name == "ambiguous.tif")
    record_round(qpproj, RoundRecord("aa" * 32, (str(amb.entry_id),)))
    assert reviewed_entries(qpproj) == {amb.entry_id}
    assert main(["suggest", str(qpproj), "--model", str(pkg), "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["image"] for r in out["slides"]} == {"clean_a.tif", "clean_b.tif"}
