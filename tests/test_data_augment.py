"""Batched augmentation: exact geometry on labels, colour never touches labels, elastic moves."""

from __future__ import annotations

import colorsys
import math

import pytest
import torch

from qpseg.data.augment import (
    ELASTIC_GRID,
    ELASTIC_SIGMA,
    ROTATION_STEP_DEG,
    AugmentConfig,
    Augmenter,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    affine,
    elastic_deform,
    hsv_shift,
    hsv_to_rgb,
    rgb_to_hsv,
    rotate90,
)
from qpseg.errors import ConfigError
from qpseg.labels import IGNORE_INDEX

torch.set_num_threads(1)

GEOMETRY_ONLY = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0)
COLOUR_ONLY = AugmentConfig(rot90=False, rotation_step_deg=None, hflip=False, vflip=False,
                            brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1,
                            hsv_shift=20.0)


def batch(n: int = 6, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 4, (n, size, size), generator=g)
    label[:, :4, :4] = IGNORE_INDEX
    # The image encodes the label, so geometry can be checked on both.
    image = (label.float() / 255.0).unsqueeze(1).repeat(1, 3, 1, 1)
    return image, label


def test_paper_constants() -> None:
    assert ROTATION_STEP_DEG == 5.0  # khalil2022 §3.2.3
    assert (ELASTIC_GRID, ELASTIC_SIGMA) == (17, 4.0)  # ho2021 §2.3
    k = AugmentConfig.preset("khalil2022")
    assert (k.brightness, k.contrast, k.saturation) == (0.125, 0.2, 0.2)
    p = AugmentConfig.preset("pedersen2022")
    assert (p.hsv_shift, p.brightness, p.p, p.rotation_step_deg) == (20.0, 0.2, 0.5, None)
    r = AugmentConfig.preset("pedersen2022_refine")
    assert r.zoom == (0.8, 1.2) and r.stain_sigma == (0.1, 0.1)
    assert AugmentConfig.preset("khalil2022", p=0.5).p == 0.5
    with pytest.raises(ConfigError):
        AugmentConfig.preset("nobody2020")
    for bad in ({"p": 1.5}, {"brightness": 1.0}, {"hue": 0.7}, {"zoom": (1.2, 0.8)},
                {"rotation_step_deg": -5.0}):
        with pytest.raises(ConfigError):
            AugmentConfig(**bad)  # type: ignore[arg-type]


def test_rotate90_is_torch_rot90_per_sample() -> None:
    _, label = batch(4)
    k = torch.tensor([0, 1, 2, 3])
    out = rotate90(label, k)
    for i in range(4):
        assert torch.equal(out[i], torch.rot90(label[i], i, dims=(-2, -1)))


def test_affine_quarter_turns_equal_rot90() -> None:
    image, label = batch(3)
    angles = torch.tensor([90.0, 180.0, 270.0])
    k = torch.tensor([1, 2, 3])
    views, lab, _ = affine([image], label, angles)
    assert torch.equal(lab, rotate90(label, k))  # nearest, no ignore at the corners
    assert torch.allclose(views[0], rotate90(image, k), atol=1e-5)


def test_rotation_by_90_of_label_equals_rotated_target() -> None:
    image, label = batch(8)
    aug = Augmenter(AugmentConfig(rotation_step_deg=None, hflip=False, vflip=False,
                                  brightness=0.0, contrast=0.0, saturation=0.0), seed=3)
    res = aug(image, label)
    k = (res.params["angle"] / 90).long()
    assert set(k.tolist()) > {0}  # something rotated
    assert torch.equal(res.label, rotate90(label, k))
    assert torch.equal(res.image, rotate90(image, k))
    # The image still encodes the label pixel for pixel.
    assert torch.equal((res.image[:, 0] * 255).round().long(), res.label)


def test_flips() -> None:
    image, label = batch(8)
    aug = Augmenter(AugmentConfig(rot90=False, rotation_step_deg=None, brightness=0.0,
                                  contrast=0.0, saturation=0.0), seed=5)
    res = aug(image, label)
    h, v = res.params["hflip"], res.params["vflip"]
    assert h.any() and v.any() and not h.all()
    expected = label.clone()
    expected[h] = expected[h].flip(-1)
    expected[v] = expected[v].flip(-2)
    assert torch.equal(res.label, expected)
    assert torch.equal((res.image[:, 0] * 255).round().long(), res.label)


def test_five_degree_steps_and_ignore_corners() -> None:
    image, label = batch(32)
    res = Augmenter(GEOMETRY_ONLY, seed=11)(image, label)
    angles = res.params["angle"]
    assert torch.equal(angles % 5, torch.zeros_like(angles))
    assert ((angles % 90) != 0).any()
    original = set(label.unique().tolist())
    assert set(res.label.unique().tolist()) <= original | {IGNORE_INDEX}
    # A constant map rotated by 45°: the corners come from outside the tile and are ignored,
    # 1 - (area of the octagon = 8 (√2 - 1)) / 4 = 0.172 of the tile.
    const = torch.ones(1, 64, 64, dtype=torch.long)
    _, lab, _ = affine([torch.rand(1, 3, 64, 64)], const, torch.tensor([45.0]))
    assert lab is not None
    frac = (lab == IGNORE_INDEX).float().mean().item()
    assert frac == pytest.approx(1 - 2 * (math.sqrt(2) - 1), abs=0.02)
    assert lab[0, 32, 32] == 1 and lab[0, 0, 0] == IGNORE_INDEX
    assert set(lab.unique().tolist()) == {1, IGNORE_INDEX}
    # Images get white (fill 1.0) where labels are ignored.
    views, _, _ = affine([torch.zeros(1, 3, 64, 64)], None, torch.tensor([45.0]))
    assert torch.equal(views[0][0, 0] == 1.0, lab[0] == IGNORE_INDEX)


def test_colour_jitter_leaves_labels_unchanged() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(6, 3, 24, 24, generator=g)
    _, label = batch(6, 24)
    inst = torch.randint(0, 9, (6, 24, 24), generator=g)
    res = Augmenter(COLOUR_ONLY, seed=2)(image, label, instances=inst)
    assert torch.equal(res.label, label) and torch.equal(res.instances, inst)
    assert not torch.allclose(res.image, image)
    assert float(res.image.min()) >= 0 and float(res.image.max()) <= 1
    assert set(res.params) >= {"brightness", "contrast", "saturation", "hue", "hsv_shift"}


def test_colour_operations_known_answers() -> None:
    x = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1).repeat(2, 1, 2, 2)
    out = adjust_brightness(x, torch.tensor([1.125, 0.5]))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.225, 0.45, 0.675]))
    assert torch.allclose(out[1, :, 0, 0], torch.tensor([0.1, 0.2, 0.3]))
    grey = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6
    sat0 = adjust_saturation(x, torch.tensor([0.0, 1.0]))
    assert torch.allclose(sat0[0], torch.full((3, 2, 2), grey)) and torch.allclose(sat0[1], x[1])
    con = adjust_contrast(x, torch.tensor([0.0, 1.0]))
    assert torch.allclose(con[0], torch.full((3, 2, 2), grey))
    # Pedersen's HSV shift: +20 on V (0-255 scale) raises the largest channel by 20/255.
    sh = hsv_shift(x[:1], torch.tensor([[0.0, 0.0, 20 / 255]]))
    assert sh[0, 2, 0, 0].item() == pytest.approx(0.6 + 20 / 255, abs=1e-6)


def test_hsv_matches_colorsys() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 8, 8, generator=g)
    x[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.5])  # grey: hue 0, saturation 0
    hsv = rgb_to_hsv(x)
    for r in range(8):
        for c in range(8):
            exp = colorsys.rgb_to_hsv(*x[0, :, r, c].tolist())
            assert hsv[0, :, r, c].tolist() == pytest.approx(list(exp), abs=1e-5)
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=1e-6)


def test_elastic_keeps_label_values_and_moves_pixels() -> None:
    image, label = batch(4, 48)
    views, lab, _ = elastic_deform([image], label, generator=torch.Generator().manual_seed(0))
    assert lab is not None
    assert set(lab.unique().tolist()) <= set(label.unique().tolist())  # nearest + reflection
    assert not torch.equal(lab, label)
    assert (lab != label).float().mean() < 0.9  # a deformation, not a reshuffle
    assert float(views[0].min()) >= 0 and float(views[0].max()) <= 1


def test_elastic_constant_displacement_is_a_shift() -> None:
    image, label = batch(2, 32)
    zero = torch.zeros(2, 2, ELASTIC_GRID, ELASTIC_GRID)
    views, lab, _ = elastic_deform([image], label, displacement=zero)
    assert torch.equal(lab, label) and torch.allclose(views[0], image, atol=1e-5)
    shift = zero.clone()
    shift[:, 0] = 3.0  # x displacement of 3 label pixels: output(x) = input(x + 3)
    _, lab, _ = elastic_deform([image], label, displacement=shift)
    assert lab is not None
    assert torch.equal(lab[:, :, :-3], label[:, :, 3:])
    # Views with twice the extent (same pixel count) move by half as many of their pixels.
    wide = torch.rand(2, 3, 32, 32)
    shift[:, 0] = 4.0
    views, _, _ = elastic_deform([image, wide], label, displacement=shift, extents=(1, 2))
    assert torch.allclose(views[1][..., :-2], wide[..., 2:], atol=1e-5)


def test_elastic_mask_only_deforms_copies() -> None:
    image, label = batch(4, 32)
    cfg = AugmentConfig(rot90=False, rotation_step_deg=None, hflip=False, vflip=False,
                        brightness=0.0, contrast=0.0, saturation=0.0)
    res = Augmenter(cfg, seed=0)(image, label, elastic_mask=torch.tensor([False, True, False,
                                                                          True]))
    assert torch.equal(res.label[[0, 2]], label[[0, 2]])
    assert not torch.equal(res.label[1], label[1]) and not torch.equal(res.label[3], label[3])


def test_multiple_views_move_together() -> None:
    image, label = batch(6, 32)
    wide = image.clone()  # a second view; with equal content it must transform identically
    res = Augmenter(GEOMETRY_ONLY, seed=4)([image, wide], label, extents=(1, 1))
    assert torch.allclose(res.inputs[0], res.inputs[1])
    res2 = Augmenter(GEOMETRY_ONLY, seed=4)(image, label)
    assert torch.equal(res2.label, res.label) and torch.allclose(res2.image, res.image)


def test_seeded_and_normalised() -> None:
    image, label = batch(4)
    a = Augmenter(AugmentConfig(), seed=9)(image, label)
    b = Augmenter(AugmentConfig(), seed=9)(image, label)
    c = Augmenter(AugmentConfig(), seed=10)(image, label)
    assert torch.equal(a.label, b.label) and torch.equal(a.image, b.image)
    assert not torch.equal(a.params["angle"], c.params["angle"])
    n = Augmenter(AugmentConfig.preset("none", mean=(0.5,) * 3, std=(0.25,) * 3), seed=0)(
        image, label)
    assert torch.allclose(n.image, (image - 0.5) / 0.25) and torch.equal(n.label, label)


def test_zoom_shear_and_stain_presets() -> None:
    g = torch.Generator().manual_seed(0)
    # H&E-like colours so the stain augmentation has something to work on.
    image = torch.rand(4, 3, 32, 32, generator=g) * torch.tensor([0.5, 0.3, 0.4]).view(
        1, 3, 1, 1) + torch.tensor([0.4, 0.2, 0.5]).view(1, 3, 1, 1)
    _, label = batch(4, 32)
    res = Augmenter(AugmentConfig.preset("pedersen2022_refine", p=1.0), seed=1)(image, label)
    assert set(res.params["scale"].tolist()) != {1.0}
    assert res.params["stain"].all()
    assert set(res.label.unique().tolist()) <= set(label.unique().tolist()) | {IGNORE_INDEX}
    res = Augmenter(AugmentConfig.preset("lagree2021", p=1.0), seed=1)(image, label)
    assert (res.params["shear"].abs() > 0).all() and res.params["elastic"].all()


@pytest.mark.gpu
def test_same_result_on_gpu() -> None:
    image, label = batch(4, 32)
    cpu = Augmenter(AugmentConfig(), seed=7)(image, label)
    gpu = Augmenter(AugmentConfig(), seed=7)(image.cuda(), label.cuda())
    assert torch.equal(gpu.label.cpu(), cpu.label)
    assert torch.allclose(gpu.image.cpu(), cpu.image, atol=1e-4)
