"""Losses: known values, ignore pixels without gradient, U-Net border weights, builders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qpseg.errors import ConfigError, QpsegError
from qpseg.losses import (
    LossSpec,
    build_loss,
    cross_entropy,
    instance_loss,
    lagree_loss,
    soft_dice,
    soft_dice_loss,
    tile_class_balance_weights,
    unet_weight_map,
)

IGN = 255


def _batch(seed: int = 0, n: int = 2, c: int = 3, s: int = 8, ignore_frac: float = 0.4
           ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, s, s, generator=g)
    target = torch.randint(0, c, (n, s, s), generator=g)
    target[torch.rand(n, s, s, generator=g) < ignore_frac] = IGN
    return logits, target


def test_cross_entropy_matches_torch() -> None:
    logits, target = _batch()
    w = torch.tensor([0.2, 1.0, 3.0])
    ours = cross_entropy(logits, target, weight=w, ignore_index=IGN, reduction="mean")
    ref = F.cross_entropy(logits, target, weight=w, ignore_index=IGN)
    assert torch.allclose(ours, ref, atol=1e-6)
    ours_sum = cross_entropy(logits, target, weight=w, reduction="sum")
    ref_sum = F.cross_entropy(logits, target, weight=w, ignore_index=IGN, reduction="sum")
    assert torch.allclose(ours_sum, ref_sum, atol=1e-5)


def test_reductions_known_values() -> None:
    # One labelled pixel with logits (0, 0): -log(1/2); three ignored.
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.full((1, 2, 2), IGN)
    target[0, 0, 0] = 1
    ln2 = math.log(2)
    w = [1.0, 4.0]
    assert float(cross_entropy(logits, target, weight=w, reduction="sum")) == pytest.approx(
        4 * ln2)
    assert float(cross_entropy(logits, target, weight=w, reduction="mean")) == pytest.approx(ln2)
    assert float(cross_entropy(logits, target, weight=w, reduction="labelled")) == \
        pytest.approx(4 * ln2)
    # ho2021 eq. (1): divided by all N = 4 pixels of the patch.
    assert float(cross_entropy(logits, target, weight=w, reduction="pixels")) == pytest.approx(
        ln2)
    assert float(cross_entropy(logits, torch.full((1, 2, 2), IGN))) == 0.0


def test_patch_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]])
    target = torch.tensor([0, 1, IGN])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    assert float(cross_entropy(logits, target)) == pytest.approx(expected)


@pytest.mark.parametrize("spec", [
    LossSpec("ce", reduction="mean"), LossSpec("ce", reduction="sum"),
    LossSpec("ce", reduction="pixels", class_weights=(0.5, 1.0, 2.0)),
    LossSpec("ce", reduction="labelled"), LossSpec("dice"),
    LossSpec("dice", dice_mode="global"), LossSpec("ce+dice"),
    LossSpec("lagree2021", reduction="labelled", dice_mode="global"),
])
def test_ignored_pixels_have_zero_gradient(spec: LossSpec) -> None:
    logits, target = _batch(seed=3)
    ignored = target == IGN
    # Garbage at ignored pixels must neither leak into the loss nor get a gradient.
    logits = logits.clone()
    logits[:, 0][ignored] = float("nan")
    logits[:, 1][ignored] = float("inf")
    logits.requires_grad_(True)
    wmap = torch.rand(target.shape) + 0.5 if spec.name == "lagree2021" else None
    loss = spec(logits, target, weight_map=wmap)
    assert torch.isfinite(loss)
    loss.backward()
    grad = logits.grad
    assert grad is not None
    assert bool((grad.permute(0, 2, 3, 1)[ignored] == 0).all())
    assert bool(grad.permute(0, 2, 3, 1)[~ignored].abs().sum() > 0)


def test_loss_does_not_depend_on_ignored_logits() -> None:
    logits, target = _batch(seed=5)
    other = logits.clone()
    other.permute(0, 2, 3, 1)[target == IGN] = 100.0
    for spec in (LossSpec("ce"), LossSpec("ce+dice"), LossSpec("lagree2021")):
        assert float(spec(logits, target)) == pytest.approx(float(spec(other, target)), abs=1e-6)


def test_soft_dice_known_values() -> None:
    # Perfect, confident prediction: Dice -> 1.
    target = torch.tensor([[[0, 1], [1, IGN]]])
    logits = F.one_hot(torch.tensor([[[0, 1], [1, 0]]]), 2).permute(0, 3, 1, 2).float() * 50
    assert float(soft_dice(logits, target)) == pytest.approx(1.0, abs=1e-6)
    # Uniform probabilities (0.5) on 3 labelled pixels, squared denominator:
    # class 0: 2*0.5 / (3*0.25 + 1) ; class 1: 2*1.0 / (3*0.25 + 2).
    flat = torch.zeros(1, 2, 2, 2)
    d0, d1 = 1.0 / 1.75, 2.0 / 2.75
    assert float(soft_dice(flat, target, smooth=0.0)) == pytest.approx((d0 + d1) / 2)
    assert float(soft_dice(flat, target, smooth=0.0, mode="global")) == pytest.approx(
        3.0 / 4.5)
    assert float(soft_dice(flat, target, smooth=0.0, squared=False)) == pytest.approx(
        (1.0 / 2.5 + 2.0 / 3.5) / 2)
    assert float(soft_dice_loss(flat, target, smooth=0.0, classes=[1])) == pytest.approx(1 - d1)


def test_lagree_loss_is_wce_plus_one_minus_dice() -> None:
    logits, target = _batch(seed=9)
    wmap = torch.rand(target.shape) * 3
    wce = cross_entropy(logits, target, pixel_weights=wmap, reduction="labelled")
    dice = soft_dice(logits, target, mode="global")
    assert float(lagree_loss(logits, target, wmap)) == pytest.approx(float(wce + 1 - dice))


def _brute_weight_map(inst: np.ndarray, w0: float, sigma: float, cw: np.ndarray) -> np.ndarray:
    ids = [i for i in np.unique(inst) if i]
    ys, xs = np.mgrid[0:inst.shape[0], 0:inst.shape[1]]
    dists = []
    for i in ids:
        py, px = np.nonzero(inst == i)
        d = np.sqrt((ys[..., None] - py) ** 2 + (xs[..., None] - px) ** 2).min(-1)
        dists.append(d)
    d = np.sort(np.stack(dists), axis=0)
    lab = (inst > 0).astype(int)
    border = w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
    return cw[lab] + np.where(inst == 0, border, 0.0)


def test_unet_weight_map_matches_definition() -> None:
    inst = np.zeros((24, 40), np.int32)
    inst[8:16, 4:14] = 1
    inst[8:16, 20:30] = 2  # gap of 6 px between the two objects
    inst[1:3, 36:39] = 3
    cw = np.array([1.0, 2.0])
    got = unet_weight_map(inst, class_weights=cw, w0=10.0, sigma=5.0)
    want = _brute_weight_map(inst, 10.0, 5.0, cw)
    assert np.allclose(got, want, atol=1e-4)
    # Half-way between the two objects d1 = d2 = 3.5 px: w = 1 + 10 exp(-49 / 50).
    assert got[12, 16] == pytest.approx(1 + 10 * math.exp(-(3.5 + 3.5) ** 2 / 50), rel=1e-5)
    assert got[12, 8] == pytest.approx(2.0)  # inside an object: w_c only


def test_unet_weight_map_single_object_and_ignore() -> None:
    inst = np.zeros((10, 10), np.int32)
    inst[2:5, 2:5] = 1
    label = (inst > 0).astype(np.int64)
    label[9, 9] = IGN
    w = unet_weight_map(inst, label, w0=10.0, sigma=5.0)
    assert w[9, 9] == 0.0
    balance = tile_class_balance_weights(label, 2)
    assert w[0, 0] == pytest.approx(balance[0])  # one object: no border term
    assert w[3, 3] == pytest.approx(balance[1])


def test_tile_class_balance_weights() -> None:
    lab = np.array([[0, 0, 0, 1], [IGN, IGN, 0, 0]])
    w = tile_class_balance_weights(lab, 3)
    # 6 labelled pixels, 5 of class 0 and 1 of class 1, two classes present.
    assert w.tolist() == pytest.approx([6 / 10, 6 / 2, 1.0])


def test_instance_loss_sums() -> None:
    losses = {"loss_classifier": torch.tensor(0.5), "loss_mask": torch.tensor(1.5)}
    assert float(instance_loss(losses)) == pytest.approx(2.0)
    assert float(instance_loss(losses, {"loss_mask": 2.0})) == pytest.approx(3.5)
    assert float(LossSpec("instance")(losses, torch.zeros(1))) == pytest.approx(2.0)
    with pytest.raises(ConfigError):
        instance_loss({})


def test_cwce_matches_data_weights_definition() -> None:
    from qpseg.data.weights import cluster_weighted_cross_entropy

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 2, generator=g)
    target = torch.randint(0, 2, (8,), generator=g)
    clusters = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    spec = LossSpec("cwce")
    assert float(spec(logits, target, clusters=clusters)) == pytest.approx(
        float(cluster_weighted_cross_entropy(logits, target, clusters)), rel=1e-6)
    with pytest.raises(ConfigError):
        spec(logits, target)


def test_build_loss_checks() -> None:
    assert build_loss({"name": "auto"}, output="instance", num_classes=2).name == "instance"
    assert build_loss({"name": "auto"}, output="pixel", num_classes=2).name == "ce"
    spec = build_loss({"name": "ce+dice", "dice_classes": "foreground"}, output="pixel",
                      num_classes=3, class_weights=[1, 2, 3])
    assert spec.dice_classes == (1, 2) and spec.class_weights == (1.0, 2.0, 3.0)
    assert build_loss({"name": "lagree2021"}, output="pixel", num_classes=2).dice_mode == "global"
    for cfg, out in (({"name": "dice"}, "patch"), ({"name": "ce"}, "instance"),
                     ({"name": "instance"}, "pixel"), ({"name": "cwce"}, "pixel"),
                     ({"name": "nope"}, "pixel"), ({"name": "ce", "reduction": "x"}, "pixel")):
        with pytest.raises(ConfigError):
            build_loss(cfg, output=out, num_classes=2)


def test_target_class_out_of_range() -> None:
    with pytest.raises(ConfigError, match="class 5"):
        cross_entropy(torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2), 5))
    with pytest.raises(ConfigError):
        cross_entropy(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 3, dtype=torch.long))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0), st.integers(1, 4),
       st.sampled_from(["ce", "dice", "ce+dice", "lagree2021"]))
def test_fuzz_losses_finite_and_zero_grad_on_ignored(seed: int, frac: float, n: int,
                                                     name: str) -> None:
    logits, target = _batch(seed=seed, n=n, ignore_frac=frac)
    logits.requires_grad_(True)
    try:
        loss = LossSpec(name)(logits, target)
    except QpsegError:  # pragma: no cover - no input here is invalid
        raise
    assert torch.isfinite(loss)
    loss.backward()
    assert bool((logits.grad.permute(0, 2, 3, 1)[target == IGN] == 0).all())
