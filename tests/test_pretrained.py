"""``pretrained: imagenet`` / ``coco``: torchvision's weights through torch's own cache.

No test downloads anything: ``TORCH_HOME`` points at a temporary folder, generated state dicts
(from the real torchvision architectures) are written under the file names torchvision uses,
the download function is replaced by one that records the call and fails, and sockets refuse
to connect.
"""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from qpseg.errors import ModelError
from qpseg.models import create_model
from qpseg.models._backbones import densenet_legacy_keys
from qpseg.models._weights import torchvision_weights

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_URL = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """A private torch cache and no network: returns the downloads that were attempted."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls: list[tuple[str, str]] = []

    def no_download(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        calls.append((url, dst))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    def no_connect(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    return calls


def _cache(tmp_path: Path) -> Path:
    return tmp_path / "torch" / "hub" / "checkpoints"


def _mobilenet_file(tmp_path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    state = torchvision.models.mobilenet_v2(weights=None).state_dict()
    _cache(tmp_path).mkdir(parents=True, exist_ok=True)
    torch.save(state, _cache(tmp_path) / MOBILENET_FILE)
    return state


def test_cache_file_names_are_torchvisions(offline: list[Any], tmp_path: Path) -> None:
    url, path = torchvision_weights("MobileNet_V2_Weights.IMAGENET1K_V1")
    assert url == MOBILENET_URL
    assert path == _cache(tmp_path) / MOBILENET_FILE
    assert torchvision_weights("VGG16_Weights.IMAGENET1K_V1")[1].name == "vgg16-397923af.pth"
    assert torchvision_weights("ResNet101_Weights.IMAGENET1K_V1")[1].name == \
        "resnet101-63fe2227.pth"
    assert torchvision_weights("DenseNet121_Weights.IMAGENET1K_V1")[1].name == \
        "densenet121-a639ec97.pth"
    assert torchvision_weights("Inception_V3_Weights.IMAGENET1K_V1")[1].name == \
        "inception_v3_google-0cc3c7bd.pth"


def test_imagenet_weights_come_from_the_torch_cache(offline: list[Any], tmp_path: Path) -> None:
    state = _mobilenet_file(tmp_path)
    model = create_model("mobilenetv2_patch", 2, pretrained="imagenet")
    feats: Any = model.features
    assert torch.equal(feats[0][0].weight, state["features.0.0.weight"])
    assert torch.equal(feats[18][1].running_var, state["features.18.1.running_var"])
    assert offline == []  # the cached file was read, nothing was downloaded
    rec = model.qpseg_init["pretrained"]  # type: ignore[index]
    assert rec["source"] == "imagenet"
    assert rec["files"] == [{"weights": "MobileNet_V2_Weights.IMAGENET1K_V1",
                             "file": str(_cache(tmp_path) / MOBILENET_FILE),
                             "tensors": len(state)}]
    # The two-stage H2G-Net takes them into its patch classifier; the refinement U-Net stays.
    h2g = create_model("h2g_net", 2, pretrained="IMAGENET",
                       refine_kwargs={"filters": [4, 8], "tile_px": 64})
    stage0: Any = h2g.stages[0]
    assert torch.equal(stage0.features[0][0].weight, state["features.0.0.weight"])


def test_offline_without_the_file_is_one_line_naming_it(offline: list[Any],
                                                        tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        create_model("mobilenetv2_patch", 2, pretrained="imagenet")
    path = _cache(tmp_path) / MOBILENET_FILE
    assert err.value.path == path
    text = str(err.value)
    assert "\n" not in text
    assert "pretrained weights not found and could not be downloaded" in text
    assert "Temporary failure in name resolution" in text
    assert f"download {MOBILENET_URL} on a machine with internet and put it at {path}" in text
    assert offline == [(MOBILENET_URL, str(path))]
    assert not path.exists()


def test_a_download_lands_in_the_cache_once(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(4)
    served = torchvision.models.mobilenet_v2(weights=None).state_dict()
    calls = []

    def fake_download(url: str, dst: str, hash_prefix: str | None = None,
                      progress: bool = True) -> None:
        calls.append((url, hash_prefix))
        torch.save(served, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    a = create_model("mobilenetv2_patch", 2, pretrained="imagenet")
    b = create_model("mobilenetv2_patch", 2, pretrained="imagenet")
    assert calls == [(MOBILENET_URL, "b0353104")]  # hash checked as torchvision does; once
    for m in (a, b):
        assert torch.equal(m.features[1].conv[0][0].weight,  # type: ignore[index]
                           served["features.1.conv.0.0.weight"])


def test_local_paths_keep_working(offline: list[Any], tmp_path: Path) -> None:
    state = _mobilenet_file(tmp_path)
    model = create_model("mobilenetv2_patch", 2, pretrained=_cache(tmp_path) / MOBILENET_FILE)
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])  # type: ignore[index]
    assert model.qpseg_init["pretrained"]["source"] == "file"  # type: ignore[index]
    assert offline == []


def test_models_without_such_weights_say_so(offline: list[Any]) -> None:
    with pytest.raises(ModelError, match="tiny_unet has no imagenet weights"):
        create_model("tiny_unet", 2, pretrained="imagenet")
    with pytest.raises(ModelError, match=r"full-width VGG-16 only.*width_mult 0\.125"):
        create_model("unet_vgg16", 2, width_mult=0.125, tile_px=64, pretrained="imagenet")
    with pytest.raises(ModelError, match="full-width VGG16 of FCN"):
        create_model("fcn32s_vgg16", 2, width_mult=0.0625, tile_px=64, pretrained="imagenet")
    with pytest.raises(ModelError, match="COCO Mask R-CNN weights for a ResNet-50 FPN only"):
        create_model("maskrcnn_resnet101", 2, tile_px=64, pretrained="coco")
    assert offline == []


# Each architecture's torchvision weights, checked by key names and shapes on the meta device
# (no memory, no file): the state dict of the real torchvision model, as the file holds it.
_TORCHVISION = {
    "VGG16_Weights.IMAGENET1K_V1": lambda: torchvision.models.vgg16(),
    "VGG19_Weights.IMAGENET1K_V1": lambda: torchvision.models.vgg19(),
    "ResNet50_Weights.IMAGENET1K_V1": lambda: torchvision.models.resnet50(),
    "ResNet101_Weights.IMAGENET1K_V1": lambda: torchvision.models.resnet101(),
    "ResNet152_Weights.IMAGENET1K_V1": lambda: torchvision.models.resnet152(),
    "DenseNet121_Weights.IMAGENET1K_V1": lambda: torchvision.models.densenet121(),
    "DenseNet201_Weights.IMAGENET1K_V1": lambda: torchvision.models.densenet201(),
    "Inception_V3_Weights.IMAGENET1K_V1": lambda: torchvision.models.inception_v3(
        aux_logits=True, init_weights=False),
    "MobileNet_V2_Weights.IMAGENET1K_V1": lambda: torchvision.models.mobilenet_v2(),
}
_LEGACY = {"DenseNet121_Weights.IMAGENET1K_V1", "DenseNet201_Weights.IMAGENET1K_V1"}


def _as_in_file(spec: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        state = _TORCHVISION[spec]().state_dict()
    if spec in _LEGACY:  # torchvision's DenseNet files keep "norm.1" for "norm1"
        import re

        current = {k for k in state if not k.endswith("num_batches_tracked")}
        # ... and, being older than torch 0.4.1, no batch-norm counters
        state = {re.sub(r"\.(norm|relu|conv)([12])\.", r".\1.\2.", k): v
                 for k, v in state.items() if not k.endswith("num_batches_tracked")}
        assert any(".norm.1." in k for k in state)
        assert set(densenet_legacy_keys(state)) == current
    return state


@pytest.mark.filterwarnings("ignore:.*meta parameter:UserWarning")
@pytest.mark.parametrize("arch", [
    "fcn32s_vgg16", "fcn8s_vgg16", "mobilenetv2_patch", "h2g_net", "unet_vgg16", "unet_vgg19",
    "unet_resnet50", "unet_resnet101", "unet_resnet152", "unet_densenet121", "unet_densenet201",
    "unet_inception_v3", "maskrcnn_resnet101", "unet_ensemble", "gb_unet"])
def test_every_backbone_takes_its_torchvision_file(arch: str) -> None:
    model = create_model(arch, 2, meta=True)
    offer = model.pretrained_weights()["imagenet"]
    assert isinstance(offer, list) and offer
    for spec, loader in offer:
        loader(_as_in_file(spec), None)  # raises on any missing, surplus or misshapen key


def test_fcn_takes_vgg16_classifier_as_fc6_fc7() -> None:
    model: Any = create_model("fcn32s_vgg16", 2, meta=True)
    seen: dict[str, tuple[int, ...]] = {}
    real = model.load_state_dict

    def spy(state: Any, strict: bool = True) -> Any:
        seen.update({k: tuple(v.shape) for k, v in state.items()})
        return real(state, strict=strict)

    model.load_state_dict = spy
    model.load_backbone_state_dict(_as_in_file("VGG16_Weights.IMAGENET1K_V1"), None)
    assert seen["fc6.weight"] == (4096, 512, 7, 7) and seen["fc7.weight"] == (4096, 4096, 1, 1)
    assert not any(k.startswith("classifier.6") for k in seen)
