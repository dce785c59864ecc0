"""The width option of the ResNet and DenseNet encoders (``width_mult``): torchvision's networks
at width 1, every width scaled otherwise, torchvision's tensor names throughout, and ImageNet
weights refused for a narrowed encoder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from qpseg.errors import ModelError
from qpseg.models import create_model
from qpseg.models._backbones import make_encoder, make_resnet, scaled


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # the two CPU cores are shared


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_width_one_resnet_is_torchvision_resnet_from_the_same_seed() -> None:
    # Same modules built in the same order: same names, shapes and initial values.
    torch.manual_seed(3)
    ours = make_resnet(50).state_dict()
    torch.manual_seed(3)
    theirs = torchvision.models.resnet50(weights=None).state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_width_one_densenet_is_torchvision_densenet_from_the_same_seed() -> None:
    torch.manual_seed(3)
    ours = make_encoder("densenet121").body.state_dict()
    torch.manual_seed(3)
    tv = torchvision.models.densenet121(weights=None)
    del tv.classifier
    theirs = tv.state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("depth", [101, 152])
def test_width_one_deeper_resnets_have_torchvision_shapes(depth: int) -> None:
    with torch.device("meta"):
        ours = make_encoder(f"resnet{depth}").body.state_dict()
        theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict()
    assert _shapes(ours) == {k: s for k, s in _shapes(theirs).items() if not k.startswith("fc.")}


@pytest.mark.parametrize("width", [0.1, 0.25])
def test_narrow_resnet_keeps_names_and_scales_every_width(width: float) -> None:
    with torch.device("meta"):
        full = make_encoder("resnet101").body.state_dict()
        enc = make_encoder("resnet101", width)
    narrow = enc.body.state_dict()
    assert list(narrow) == list(full)  # ImageNet-style names, same number of blocks
    stem, p1, p2, p4 = (scaled(c, width) for c in (64, 64, 128, 512))
    shapes = _shapes(narrow)
    assert shapes["conv1.weight"] == (stem, 3, 7, 7)
    assert shapes["layer1.0.conv1.weight"] == (p1, stem, 1, 1)
    assert shapes["layer2.1.conv2.weight"] == (p2, p2, 3, 3)  # Bottleneck inner width
    assert shapes["layer4.2.conv3.weight"] == (4 * p4, p4, 1, 1)  # expansion 4 kept
    assert shapes["layer4.0.downsample.0.weight"] == (4 * p4, 4 * scaled(256, width), 1, 1)
    assert enc.channels == [stem, 4 * p1, 4 * p2, 4 * scaled(256, width), 4 * p4]
    assert enc.width_mult == width


@pytest.mark.parametrize("width", [0.1, 0.25])
def test_narrow_densenet_scales_growth_and_stem(width: float) -> None:
    with torch.device("meta"):
        full = make_encoder("densenet121").body.state_dict()
        enc = make_encoder("densenet121", width)
    narrow = enc.body.state_dict()
    assert list(narrow) == list(full)
    k, stem = scaled(32, width), scaled(64, width)
    shapes = _shapes(narrow)
    assert shapes["features.conv0.weight"] == (stem, 3, 7, 7)
    # bottleneck 4k channels, k new feature maps per layer (Huang et al. 2017)
    assert shapes["features.denseblock1.denselayer1.conv1.weight"] == (4 * k, stem, 1, 1)
    assert shapes["features.denseblock1.denselayer6.conv2.weight"] == (k, 4 * k, 3, 3)
    # blocks of 6, 12, 24, 16 layers, each transition halving the channels
    c1 = stem + 6 * k
    c2 = c1 // 2 + 12 * k
    c3 = c2 // 2 + 24 * k
    c4 = c3 // 2 + 16 * k
    assert enc.channels == [stem, c1, c2, c3, c4]
    assert shapes["features.norm5.weight"] == (c4,)


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "densenet121", "densenet201"])
def test_narrow_encoder_features_match_channels_and_strides(name: str) -> None:
    torch.manual_seed(0)
    enc = make_encoder(name, 0.125).eval()
    with torch.no_grad():
        feats = enc(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == enc.channels
    assert [64 // f.shape[-1] for f in feats] == enc.strides == [2, 4, 8, 16, 32]
    assert all(torch.isfinite(f).all() for f in feats)


def test_narrowing_cuts_parameters_about_quadratically() -> None:
    def count(name: str, w: float) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in make_encoder(name, w).parameters())

    for name in ("resnet101", "densenet121"):
        ratio = count(name, 0.5) / count(name, 1.0)
        assert 0.2 < ratio < 0.3, (name, ratio)  # convolutions scale with width², BN with width


@pytest.mark.parametrize("arch", ["unet_resnet101", "unet_densenet121"])
def test_narrow_unet_fits_a_tiny_tile_and_learns(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, 3, width_mult=0.1, decoder_filters=(16, 16, 8, 8, 8),
                         tile_px=64)
    x = torch.randn(2, 3, 64, 64)
    target = torch.ones(2, 64, 64, dtype=torch.long)  # top half 1, bottom quarters 0 and 2
    target[:, 32:, :32] = 0
    target[:, 32:, 32:] = 2
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert out.shape == (2, 3, 64, 64)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.95 * losses[0], losses
    assert model.qpseg_config["kwargs"]["width_mult"] == 0.1


@pytest.mark.parametrize("arch,label", [("unet_resnet101", "ResNet-101"),
                                        ("unet_densenet121", "DenseNet-121")])
def test_imagenet_weights_are_refused_for_a_narrow_encoder(
        arch: str, label: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(ModelError, match=rf"full-width {label} only.*width_mult 0\.1\b"):
        create_model(arch, 2, width_mult=0.1, tile_px=64, pretrained="imagenet")


def test_narrow_weights_from_a_file_load_by_torchvision_names(tmp_path: Path) -> None:
    # A narrowed encoder's weights saved under torchvision's names fill a fresh narrowed U-Net
    # (a local file is not ImageNet: no width check), every tensor by name.
    torch.manual_seed(1)
    donor = make_encoder("resnet50", 0.25)
    state = {k: v + 1.0 if v.is_floating_point() else v
             for k, v in donor.body.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 4 * scaled(512, 0.25))  # ignored, as ImageNet's fc
    path = tmp_path / "narrow_resnet50.pth"
    torch.save(state, path)
    unet = create_model("unet_resnet50", 2, width_mult=0.25, decoder_filters=(8, 8, 8, 8, 8),
                        tile_px=64, pretrained=path)
    body = unet.encoder.body.state_dict()
    for key, value in body.items():
        assert torch.equal(value, state[key]), key


def test_inception_has_still_no_width_option() -> None:
    with pytest.raises(ValueError, match="Inception-v3 encoder has no width option"):
        make_encoder("inception_v3", 0.5)
