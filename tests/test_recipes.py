"""The papers' recipes as their papers describe them: pedersen2022's exhaustive tumour
annotation in the refinement stage, ho2021's and lagree2021's augmentation and lagree2021's
Vahadane normalisation (khalil2022 boosting, lagree2021's GB U-Net workflow and the H2G-Net
refinement batch are tested in test_train.py and test_data_samplers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qpseg.data.grid import slides_from_manifest
from qpseg.errors import ConfigError
from qpseg.labels import ClassMap
from qpseg.manifest import import_project
from qpseg.qupath.geojson import read_geojson, write_geojson
from qpseg.slide import open_slide
from qpseg.testing.projects import make_project
from qpseg.tissue import detect_tissue
from qpseg.training.config import (
    load_config_file,
    paper_defaults,
    resolve_config,
    stage_config,
)
from qpseg.training.data import open_manifest

torch.set_num_threads(1)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"


def test_h2g_refinement_labels_are_exhaustive_inside_tissue(tmp_path: Path) -> None:
    # pedersen2022 §2.1: the tumour is outlined and the rest is non-tumour. With only the Tumor
    # outline annotated, qpseg used to ignore every other pixel (no Region* annotation).
    from qpseg.training.h2g import prepare_refine_sample

    proj = make_project(tmp_path / "p", n_slides=1, width=1024, height=1024, seed=4)
    f = proj.annotation_files[0]
    write_geojson(f, [o for o in read_geojson(f) if o.classification == "Tumor"])
    manifest = import_project(proj.path, tmp_path / "m", use_paquo=False)
    opened = open_manifest(manifest.path, None, classes=["Tumor"], write=False)
    rec = slides_from_manifest(opened)[0]
    cmap = ClassMap.from_names(["Tumor"])
    with open_slide(rec.path, mpp=rec.mpp) as slide:
        mask = detect_tissue(slide, "hsv")
    heat = np.zeros((4, 4), np.float32)
    partial = prepare_refine_sample(rec, heat, 256.0, cmap, 64)["label"]
    full = prepare_refine_sample(rec, heat, 256.0, cmap, 64, unlabelled="background",
                                 tissue=mask)["label"]
    tumour = partial == 1
    assert tumour.any() and (full[tumour] == 1).all()  # the outline keeps its class
    assert (partial[~tumour] == 255).all()  # partial: nothing else is labelled
    # Exhaustive: unannotated tissue is Background; glass outside the tissue stays ignored.
    assert (full[~tumour] != 1).all()
    assert (full == 0).sum() > 0.2 * full.size and (full == 255).any()


def test_pedersen_recipe_is_exhaustive_and_dense_models_refuse_it() -> None:
    p = paper_defaults("h2g_net")
    assert stage_config(p, "patch")["data"]["unlabelled"] == "background"
    assert stage_config(p, "refine")["data"]["unlabelled"] == "background"
    assert paper_defaults("fcn32s_vgg16")["data"]["unlabelled"] == "ignore"
    with pytest.raises(ConfigError, match=r"data\.unlabelled must be one of"):
        resolve_config("tiny_unet", {"data": {"unlabelled": "bg"}})


def test_ho2021_augmentation_is_the_authors_code() -> None:
    # ho2021 §2.5 names the operations without values; the authors' DMMN training.py
    # (train_transform) gives them. The preset used to be ±10 % colour at any angle, always.
    from qpseg.data.augment import AugmentConfig

    a = AugmentConfig.preset("ho2021")
    assert (a.rot90, a.rotation_step_deg, a.hflip, a.vflip) == (True, None, True, True)
    assert (a.brightness, a.contrast, a.saturation, a.hue, a.p) == (0.25, 0.75, 0.12, 0.11, 0.5)
    assert not a.elastic and (a.elastic_grid, a.elastic_sigma) == (17, 4.0)  # §2.3 copies only
    cfg = resolve_config("dmmn_m3", load_config_file(EXAMPLES / "ho2021_dmmn_m3.yaml"))
    aug = dict(cfg["augment"])
    assert AugmentConfig.preset(aug.pop("preset"), **aug) == a  # the example's spelt-out values


def test_lagree2021_augmentation_and_vahadane_normalisation() -> None:
    # "rotation, distortion, skew, shear, and flip" (Augmentor's names); "distortion" is
    # Augmentor's documented random_distortion (4 x 4 cells, ±8 px); colour normalised with
    # Vahadane (ref. 39), for the U-Nets and Mask R-CNN alike.
    from qpseg.data.augment import AugmentConfig

    a = AugmentConfig.preset("lagree2021")
    assert a.elastic and (a.elastic_grid, a.elastic_sigma, a.shear_deg, a.p) == (5, 4.62, 10.0,
                                                                                 0.5)
    assert a.brightness == a.contrast == a.saturation == a.hue == 0.0
    for arch in ("unet_vgg19", "gb_unet", "maskrcnn_resnet101"):
        assert paper_defaults(arch)["data"]["stain_normalization"] == "vahadane"
    cfg = resolve_config("gb_unet", load_config_file(EXAMPLES / "lagree2021_gb_unet.yaml"))
    assert cfg["data"]["stain_normalization"] == "vahadane"
    aug = dict(cfg["augment"])
    assert AugmentConfig.preset(aug.pop("preset"), **aug) == a
    assert paper_defaults("dmmn_m3")["data"]["stain_normalization"] is None
