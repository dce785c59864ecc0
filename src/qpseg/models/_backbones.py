"""torchvision backbones as multi-scale encoders, with ImageNet weight loading by key name.

Every encoder keeps the torchvision module (minus its classifier) under ``body`` so that a
state dict saved from ``torchvision.models.<name>(weights=...)`` loads by its own key names
(:meth:`Encoder.load_imagenet`). Building downloads nothing: torchvision is always called with
``weights=None``; ``imagenet_weights`` names the torchvision weights enum member whose file
``pretrained: imagenet`` loads (through torch's cache, :mod:`qpseg.models._weights`). The
original ImageNet weights (``IMAGENET1K_V1``) are chosen throughout: the weights the papers'
Keras/Caffe models were initialised with came from that same original training, not from
torchvision's later ``V2`` recipe.

Encoders return their feature maps from fine to coarse; ``channels[i]`` and ``strides[i]``
describe ``features[i]`` and the last one is the bottom of the U-Net.

VGG, ResNet and DenseNet encoders take ``width_mult`` (every width scaled, tensor names kept:
narrowed networks for CPU-sized runs and tests); ImageNet weights fit width 1 only
(:func:`check_full_width`). Inception-v3 has no width option.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from qpseg.errors import ModelError
from qpseg.models._weights import load_subset

__all__ = [
    "DENSENET_BLOCKS",
    "ENCODERS",
    "RESNET_LAYERS",
    "VGG16_CFG",
    "VGG19_CFG",
    "Encoder",
    "check_full_width",
    "densenet_legacy_keys",
    "make_encoder",
    "make_resnet",
    "make_vgg_features",
    "scaled",
]

# VGG configurations (Simonyan & Zisserman 2015): channels per 3×3 conv, "M" = 2×2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")
VGG19_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                    512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def check_full_width(width_mult: float, label: str) -> None:
    """ModelError unless ``width_mult`` is 1: published weights fit the full-width network."""
    if float(width_mult) != 1.0:
        raise ModelError(f"ImageNet weights fit the full-width {label} only (width_mult 1.0), "
                         f"not width_mult {width_mult:g}")


def scaled(channels: int, width_mult: float) -> int:
    """``channels * width_mult`` rounded, at least 1."""
    return max(1, round(channels * width_mult))


def make_vgg_features(cfg: Sequence[int | str], *, width_mult: float = 1.0,
                      in_channels: int = 3, ceil_mode: bool = False) -> nn.Sequential:
    """VGG conv layers with torchvision's indices (``features.0`` is conv1_1, ...).

    Each 3×3 convolution (stride 1, padding 1) is followed by ReLU; ``"M"`` is a 2×2 stride-2
    max-pool (``ceil_mode`` as in the Caffe FCN). Initialised like torchvision's VGG.
    """
    layers: list[nn.Module] = []
    prev = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=ceil_mode))
        else:
            out = scaled(int(item), width_mult)
            conv = nn.Conv2d(prev, out, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            prev = out
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """A backbone returning feature maps at increasing strides (the last is the bottom)."""

    channels: list[int]
    strides: list[int]
    imagenet_ignore: tuple[str, ...] = ()
    label: str = "backbone"
    #: torchvision weights enum member of this backbone's ImageNet weights (None: there are none)
    imagenet_weights: str | None = None
    width_mult: float = 1.0

    def load_imagenet(self, state: Mapping[str, torch.Tensor],
                      path: str | os.PathLike[str] | None) -> None:
        """Load a torchvision-named state dict into ``body`` (classifier keys ignored)."""
        load_subset(self.body, state, path, ignore=self.imagenet_ignore, what=self.label)

    def imagenet_spec(self) -> str:
        """``imagenet_weights``, or a ModelError when this encoder cannot take them."""
        if self.imagenet_weights is None:
            raise ModelError(f"the {self.label} has no ImageNet weights")
        check_full_width(self.width_mult, self.label)
        return self.imagenet_weights

    body: nn.Module


class _VGGBody(nn.Module):
    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features


class VGGEncoder(Encoder):
    """VGG16/19 conv blocks; skips taken before every pool (strides 1-16), bottom after pool 5.

    These are the skip layers ``segmentation_models`` uses for VGG (block1_conv2 ...
    block5_conv3), the package lagree2021 built its U-Nets with.
    """

    imagenet_ignore = ("classifier.",)

    def __init__(self, cfg: Sequence[int | str], width_mult: float = 1.0,
                 label: str = "VGG") -> None:
        super().__init__()
        self.body = _VGGBody(make_vgg_features(cfg, width_mult=width_mult))
        self.label = label
        self.width_mult = float(width_mult)
        depth = sum(1 for c in cfg if c != "M") + 3
        self.imagenet_weights = f"VGG{depth}_Weights.IMAGENET1K_V1"
        convs = [scaled(int(c), width_mult) for c in cfg if c != "M"]
        last_before_pool = [scaled(int(cfg[i - 1]), width_mult)
                            for i, c in enumerate(cfg) if c == "M"]
        self.channels = [*last_before_pool, convs[-1]]
        self.strides = [1, 2, 4, 8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in cast(nn.Sequential, self.body.features):
            if isinstance(layer, nn.MaxPool2d):
                feats.append(x)
            x = layer(x)
        feats.append(x)
        return feats


#: Blocks per stage of torchvision's Bottleneck ResNets (He et al. 2016, Table 1).
RESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                                                       152: (3, 8, 36, 3)}


def make_resnet(depth: int, width_mult: float = 1.0) -> nn.Module:
    """torchvision's Bottleneck ResNet-``depth`` with every width multiplied by ``width_mult``.

    The stem (64 channels) and the planes of ``layer1``-``layer4`` (64, 128, 256, 512; outputs
    4x that) are :func:`scaled`; block counts, strides and tensor names are torchvision's, so at
    width 1 this is ``torchvision.models.resnet<depth>(weights=None)`` exactly (same shapes, same
    initialisation from the same seed) and ImageNet weights load by name.
    """
    from torchvision.models.resnet import Bottleneck, ResNet

    layers = RESNET_LAYERS[depth]

    class _ScaledResNet(ResNet):
        def __init__(self) -> None:
            # torchvision's ResNet.__init__ with widths scaled (same modules, same order).
            nn.Module.__init__(self)
            self._norm_layer = nn.BatchNorm2d
            self.inplanes = scaled(64, width_mult)
            self.dilation = 1
            self.groups = 1
            self.base_width = 64
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3,
                                   bias=False)
            self.bn1 = nn.BatchNorm2d(self.inplanes)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            planes = [scaled(c, width_mult) for c in (64, 128, 256, 512)]
            self.layer1 = self._make_layer(Bottleneck, planes[0], layers[0])
            self.layer2 = self._make_layer(Bottleneck, planes[1], layers[1], stride=2)
            self.layer3 = self._make_layer(Bottleneck, planes[2], layers[2], stride=2)
            self.layer4 = self._make_layer(Bottleneck, planes[3], layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(planes[3] * Bottleneck.expansion, 1000)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

    return _ScaledResNet()


class ResNetEncoder(Encoder):
    """torchvision ResNet: stem (stride 2), layer1-4 (strides 4-32); ``width_mult`` scales
    every width (:func:`make_resnet`)."""

    imagenet_ignore = ("fc.",)

    def __init__(self, depth: int, width_mult: float = 1.0) -> None:
        super().__init__()
        body = make_resnet(depth, width_mult)
        del body.fc
        self.body = body
        self.label = f"ResNet-{depth}"
        self.width_mult = float(width_mult)
        self.imagenet_weights = f"ResNet{depth}_Weights.IMAGENET1K_V1"
        b: Any = body
        self.channels = [b.conv1.out_channels] + [
            getattr(b, f"layer{i}")[-1].conv3.out_channels for i in range(1, 5)]
        self.strides = [2, 4, 8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b: Any = self.body
        x0 = b.relu(b.bn1(b.conv1(x)))
        x1 = b.layer1(b.maxpool(x0))
        x2 = b.layer2(x1)
        x3 = b.layer3(x2)
        x4 = b.layer4(x3)
        return [x0, x1, x2, x3, x4]


#: Dense layers per block of torchvision's DenseNets (Huang et al. 2017, Table 1).
DENSENET_BLOCKS: dict[int, tuple[int, int, int, int]] = {121: (6, 12, 24, 16),
                                                         201: (6, 12, 48, 32)}


class DenseNetEncoder(Encoder):
    """torchvision DenseNet: skips are the BN-ReLU outputs that open each transition;
    ``width_mult`` scales the growth rate and the stem (at 1: torchvision's network)."""

    imagenet_ignore = ("classifier.",)

    def __init__(self, depth: int, width_mult: float = 1.0) -> None:
        super().__init__()
        from torchvision.models import DenseNet

        # torchvision's densenet<depth>(weights=None) is DenseNet(32, blocks, 64): growth rate
        # and stem width scale with width_mult (the bottleneck is bn_size 4 x growth rate).
        body = DenseNet(growth_rate=scaled(32, width_mult), block_config=DENSENET_BLOCKS[depth],
                        num_init_features=scaled(64, width_mult))
        del body.classifier
        self.body = body
        self.label = f"DenseNet-{depth}"
        self.width_mult = float(width_mult)
        self.imagenet_weights = f"DenseNet{depth}_Weights.IMAGENET1K_V1"
        f: Any = body.features
        self.channels = [
            f.conv0.out_channels,
            f.transition1.norm.num_features,
            f.transition2.norm.num_features,
            f.transition3.norm.num_features,
            f.norm5.num_features,
        ]
        self.strides = [2, 4, 8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f: Any = self.body.features
        s2 = f.relu0(f.norm0(f.conv0(x)))
        x = f.pool0(s2)
        feats = [s2]
        for block, trans in ((f.denseblock1, f.transition1), (f.denseblock2, f.transition2),
                             (f.denseblock3, f.transition3)):
            x = block(x)
            skip = trans.relu(trans.norm(x))
            feats.append(skip)
            x = trans.pool(trans.conv(skip))
        x = f.denseblock4(x)
        feats.append(F.relu(f.norm5(x)))
        return feats

    def load_imagenet(self, state: Mapping[str, torch.Tensor],
                      path: str | os.PathLike[str] | None) -> None:
        """Load DenseNet ImageNet weights, renaming the legacy keys of torchvision's files."""
        super().load_imagenet(densenet_legacy_keys(state), path)


# torchvision's DenseNet files keep the pre-0.4 names "denselayer1.norm.1.weight" for what the
# module calls "denselayer1.norm1.weight"; torchvision renames them on load with this pattern
# (torchvision/models/densenet.py, _load_state_dict).
_DENSENET_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                              r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def densenet_legacy_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with torchvision's legacy DenseNet key names made current (others kept)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _DENSENET_LEGACY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def _same_pad(conv_module: Any) -> None:
    conv = conv_module.conv
    kh, kw = conv.kernel_size
    conv.padding = (kh // 2, kw // 2)


class InceptionV3Encoder(Encoder):
    """torchvision Inception-v3 with "same" padding, so feature maps halve exactly.

    The valid (unpadded) 3×3 convolutions and pools of Inception-v3 are given padding, as the
    ``segmentation_models`` Inception-v3 used by lagree2021 does; weight shapes are unchanged,
    so ImageNet weights still load. Features: stride 2 (64), 4 (192), 8 (288), 16 (768),
    32 (2048).
    """

    imagenet_ignore = ("fc.", "AuxLogits.")

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        body: Any = torchvision.models.inception_v3(weights=None, aux_logits=False,
                                                     init_weights=True, transform_input=False)
        del body.fc
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_4a_3x3"):
            _same_pad(getattr(body, name))
        _same_pad(body.Mixed_6a.branch3x3)
        _same_pad(body.Mixed_6a.branch3x3dbl_3)
        _same_pad(body.Mixed_7a.branch3x3_2)
        _same_pad(body.Mixed_7a.branch7x7x3_4)
        body.maxpool1.padding = 1
        body.maxpool2.padding = 1
        self.body = body
        self.label = "Inception-v3"
        self.imagenet_weights = "Inception_V3_Weights.IMAGENET1K_V1"
        self.channels = [64, 192, 288, 768, 2048]
        self.strides = [2, 4, 8, 16, 32]

    @staticmethod
    def _mixed_6a(m: Any, x: torch.Tensor) -> torch.Tensor:
        b3 = m.branch3x3(x)
        bd = m.branch3x3dbl_3(m.branch3x3dbl_2(m.branch3x3dbl_1(x)))
        pool = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return torch.cat([b3, bd, pool], 1)

    @staticmethod
    def _mixed_7a(m: Any, x: torch.Tensor) -> torch.Tensor:
        b3 = m.branch3x3_2(m.branch3x3_1(x))
        b7 = m.branch7x7x3_4(m.branch7x7x3_3(m.branch7x7x3_2(m.branch7x7x3_1(x))))
        pool = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return torch.cat([b3, b7, pool], 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b: Any = self.body
        x = b.Conv2d_1a_3x3(x)
        x = b.Conv2d_2a_3x3(x)
        s2 = b.Conv2d_2b_3x3(x)
        x = b.maxpool1(s2)
        x = b.Conv2d_3b_1x1(x)
        s4 = b.Conv2d_4a_3x3(x)
        x = b.maxpool2(s4)
        s8 = b.Mixed_5d(b.Mixed_5c(b.Mixed_5b(x)))
        x = self._mixed_6a(b.Mixed_6a, s8)
        s16 = b.Mixed_6e(b.Mixed_6d(b.Mixed_6c(b.Mixed_6b(x))))
        x = self._mixed_7a(b.Mixed_7a, s16)
        s32 = b.Mixed_7c(b.Mixed_7b(x))
        return [s2, s4, s8, s16, s32]


def _vgg(cfg: Sequence[int | str], label: str) -> Callable[..., Encoder]:
    def build(width_mult: float = 1.0) -> Encoder:
        return VGGEncoder(cfg, width_mult, label)

    return build


def _no_width(factory: Callable[[], Encoder], label: str) -> Callable[..., Encoder]:
    def build(width_mult: float = 1.0) -> Encoder:
        if width_mult != 1.0:
            raise ValueError(f"the {label} encoder has no width option (torchvision's fixed "
                             "architecture); use a smaller tile for quick runs")
        return factory()

    return build


# Encoders of lagree2021 ("U-net": VGG-16, VGG-19, ResNet-50/101/152, DenseNet-121/201,
# Inception-v3).
ENCODERS: dict[str, Callable[..., Encoder]] = {
    "vgg16": _vgg(VGG16_CFG, "VGG-16"),
    "vgg19": _vgg(VGG19_CFG, "VGG-19"),
    "resnet50": partial(ResNetEncoder, 50),
    "resnet101": partial(ResNetEncoder, 101),
    "resnet152": partial(ResNetEncoder, 152),
    "densenet121": partial(DenseNetEncoder, 121),
    "densenet201": partial(DenseNetEncoder, 201),
    "inception_v3": _no_width(InceptionV3Encoder, "Inception-v3"),
}


def make_encoder(name: str, width_mult: float = 1.0) -> Encoder:
    """Build one of :data:`ENCODERS` (random init)."""
    return ENCODERS[name](width_mult)
