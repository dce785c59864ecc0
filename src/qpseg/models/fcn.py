"""Modified FCN-32s of khalil2022 (Diagnostics 12:2044), Section 3.4, and an FCN-8s variant.

khalil2022 §3.4: "The modified FCN architecture has a padding layer, five convolutional blocks,
a rectified linear unit (ReLU) activation function after every convolutional layer, five
max-pooling layers, a deconvolutional layer, a softmax layer, and two dropout layers. The
modified FCN begins with a padding layer that is used to increase the input size from
512×512×3 to 712×712×3. [...] The first two convolutional blocks consist of two convolutional
layers with a filter size of 3×3 and a stride size of 1, and the remaining three convolutional
blocks consist of three convolutional layers [...] Each convolutional block is followed by a
maxpooling layer with a filter size of 2×2 and stride size of 2. After the convolutional blocks
and maxpooling layer, a deconvolutional layer with a filter size of 64×64 and stride size of 32
is applied [...] Cropping is performed after the deconvolution layer to restore the feature maps
to the same size as an input image. After cropping, softmax is used." §3.5: initialised from
VGG16, "dropout ratio of 0.5".

The two dropouts belong to FCN's fully convolutional head (Shelhamer et al. 2017, the paper's
ref. [17]): fc6 (7×7 conv, 4096) → ReLU → dropout → fc7 (1×1 conv, 4096) → ReLU → dropout →
score (1×1 conv to the classes) → 64×64/32 deconvolution (bilinear-initialised, learnable, no
bias) → crop. Pooling uses ``ceil_mode`` as in the Caffe FCN so every input size is covered.

Crop offsets follow from the geometry (input padded by 100, 3×3 convs with padding 1): an output
pixel ``o`` of the 32× deconvolution sits over input pixel ``o - 20``, so the crop starts at 20
(19 in Caffe, whose first conv pads by 100 itself). FCN-8s: score_pool4 crop 5, score_pool3
crop 9, final crop 32, as in the Caffe reference nets (shifted by the same one pixel).

With ``pad_mode="context"`` the 100-pixel padding is real image: the model reads
``tile_px + 200`` pixels and predicts the central ``tile_px`` (contract ``context_px = 100``),
which removes the zero-padding seams of tiled inference. ``"zeros"`` (default) is the paper.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qpseg.errors import ModelError
from qpseg.models._backbones import VGG16_CFG, check_full_width, make_vgg_features, scaled
from qpseg.models._base import NamedWeights, QpsegModule, check_fraction, check_positive_int
from qpseg.models._weights import check_state_dict
from qpseg.models.contract import InputSpec, ModelContract
from qpseg.models.registry import register_model

__all__ = ["FCN", "PAD_PX", "bilinear_kernel", "fcn8s_vgg16", "fcn32s_vgg16"]

PAPER = "khalil2022 (Diagnostics 12:2044), Section 3.4 'The Proposed Modified FCN'"
PAD_PX = 100  # 512 -> 712
_CROP_32S = PAD_PX - 80  # = 20, see module docstring
_CROP_8S = PAD_PX - 68  # = 32
_CROP_POOL4 = 5
_CROP_POOL3 = 9
# torchvision VGG16 indices: the max-pools closing blocks 3 and 4 (FCN-8s skip sources).
_POOL3_INDEX = 16
_POOL4_INDEX = 23


def bilinear_kernel(channels: int, size: int) -> torch.Tensor:
    """Weights of a ``size``×``size`` transposed conv that upsamples bilinearly per channel."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float32)
    filt = 1 - (og - center).abs() / factor
    kernel = filt[:, None] * filt[None, :]
    weight = torch.zeros(channels, channels, size, size)
    for c in range(channels):
        weight[c, c] = kernel
    return weight


def _deconv(channels: int, size: int, stride: int) -> nn.ConvTranspose2d:
    layer = nn.ConvTranspose2d(channels, channels, size, stride=stride, bias=False)
    with torch.no_grad():
        if layer.weight.device.type != "meta":
            layer.weight.copy_(bilinear_kernel(channels, size))
    return layer


def _score(in_ch: int, num_classes: int) -> nn.Conv2d:
    layer = nn.Conv2d(in_ch, num_classes, 1)
    nn.init.zeros_(layer.weight)  # FCN initialises score layers at zero
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _crop(x: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    return x[:, :, offset:offset + like.shape[2], offset:offset + like.shape[3]]


class FCN(QpsegModule):
    """VGG16 FCN (32s: single 32× deconvolution; 8s: fused with pool3/pool4 scores)."""

    def __init__(self, num_classes: int, *, variant: str = "32s", width_mult: float = 1.0,
                 dropout: float = 0.5, tile_px: int = 512, pad_mode: str = "zeros") -> None:
        super().__init__()
        if variant not in ("32s", "8s"):
            raise ValueError(f"variant must be '32s' or '8s', not {variant!r}")
        if pad_mode not in ("zeros", "context"):
            raise ValueError(f"pad_mode must be 'zeros' or 'context', not {pad_mode!r}")
        self.variant = variant
        self.pad_mode = pad_mode
        w = check_fraction("width_mult", width_mult, low=1e-3, high=4.0)
        self.width_mult = w
        fc = scaled(4096, w)
        self.features = make_vgg_features(VGG16_CFG, width_mult=w, ceil_mode=True)
        self.fc6 = nn.Conv2d(scaled(512, w), fc, 7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        self.score_fr = _score(fc, num_classes)
        if variant == "32s":
            self.upscore = _deconv(num_classes, 64, 32)
        else:
            self.score_pool4 = _score(scaled(512, w), num_classes)
            self.score_pool3 = _score(scaled(256, w), num_classes)
            self.upscore2 = _deconv(num_classes, 4, 2)
            self.upscore_pool4 = _deconv(num_classes, 4, 2)
            self.upscore8 = _deconv(num_classes, 16, 8)
        context = PAD_PX if pad_mode == "context" else 0
        name = f"fcn{variant}_vgg16"
        self.contract = ModelContract(
            architecture=name, num_classes=num_classes,
            inputs=(InputSpec("image", tile_px + 2 * context, 1.0, 3),), output="pixel",
            tile_px=tile_px, output_px=tile_px, context_px=context,
            margin_px=0 if context else 32, size_multiple=1,
            paper=PAPER if variant == "32s" else f"{PAPER} (FCN-8s, Fig. 4a)",
            notes=f"input padded by {PAD_PX} px (512 -> 712) "
                  + ("with real image context" if context else "with zeros, inside the model")
                  + f"; crop offset {_CROP_32S if variant == '32s' else _CROP_8S}")
        self._check_geometry(tile_px)

    def _check_geometry(self, tile_px: int) -> None:
        # Walk the sizes once (cheap integer arithmetic) so an impossible tile fails at build.
        size = tile_px + 2 * PAD_PX
        sizes = []
        for _ in range(5):
            size = -(-size // 2)
            sizes.append(size)
        fc = sizes[4] - 6
        if self.variant == "32s":
            ok = (fc - 1) * 32 + 64 >= _CROP_32S + tile_px
        else:
            up2 = (fc - 1) * 2 + 4
            up4 = (up2 - 1) * 2 + 4
            up8 = (up4 - 1) * 8 + 16
            ok = (sizes[3] >= _CROP_POOL4 + up2 and sizes[2] >= _CROP_POOL3 + up4
                  and up8 >= _CROP_8S + tile_px)
        if fc < 1 or not ok:
            raise ValueError(f"tile_px {tile_px} is too small for FCN-{self.variant}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_mode == "zeros":
            h, w = x.shape[-2:]
            x = F.pad(x, (PAD_PX, PAD_PX, PAD_PX, PAD_PX))  # the paper's padding layer
        else:
            h, w = x.shape[-2] - 2 * PAD_PX, x.shape[-1] - 2 * PAD_PX
        pool3 = pool4 = x
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == _POOL3_INDEX:
                pool3 = x
            elif i == _POOL4_INDEX:
                pool4 = x
        x = self.drop6(self.relu6(self.fc6(x)))
        x = self.drop7(self.relu7(self.fc7(x)))
        x = self.score_fr(x)
        if self.variant == "32s":
            x = self.upscore(x)
            return x[:, :, _CROP_32S:_CROP_32S + h, _CROP_32S:_CROP_32S + w]
        up2 = self.upscore2(x)
        up4 = self.upscore_pool4(up2 + _crop(self.score_pool4(pool4), _CROP_POOL4, up2))
        x = self.upscore8(up4 + _crop(self.score_pool3(pool3), _CROP_POOL3, up4))
        return x[:, :, _CROP_8S:_CROP_8S + h, _CROP_8S:_CROP_8S + w]

    def load_backbone_state_dict(self, state: Mapping[str, torch.Tensor],
                                 path: str | os.PathLike[str] | None) -> None:
        """Load a torchvision VGG16 state dict: ``features.*`` into the conv blocks and, when
        present, ``classifier.0``/``classifier.3`` (fc6/fc7) reshaped into 7×7 and 1×1
        convolutions as in FCN (the 1000-class ``classifier.6`` is ignored)."""
        mapped: dict[str, torch.Tensor] = {}
        stray = []
        for key, value in state.items():
            if key.startswith("features."):
                mapped[key] = value
            elif key.startswith(("classifier.0.", "classifier.3.")):
                layer = self.fc6 if key.startswith("classifier.0.") else self.fc7
                target = "fc6" if layer is self.fc6 else "fc7"
                attr = key.rsplit(".", 1)[1]
                want = getattr(layer, attr).shape
                if attr == "weight" and value.dim() == 2 and value.numel() == want.numel():
                    value = value.reshape(want)
                mapped[f"{target}.{attr}"] = value
            elif key.startswith(("fc6.", "fc7.")):
                mapped[key] = value
            elif not key.startswith("classifier.6."):
                stray.append(key)
        if stray:
            raise ModelError(f"weights do not fit the VGG16 backbone: unexpected key(s) "
                             f"{', '.join(repr(k) for k in stray[:3])}", path)
        own = self.state_dict()
        expected = {k: tuple(v.shape) for k, v in own.items() if k.startswith("features.")}
        for head in ("fc6", "fc7"):
            if any(k.startswith(head + ".") for k in mapped):
                expected.update({k: tuple(v.shape) for k, v in own.items()
                                 if k.startswith(head + ".")})
        check_state_dict(expected, mapped, path, what="VGG16 backbone")
        self.load_state_dict(mapped, strict=False)

    def pretrained_weights(self) -> NamedWeights:
        """torchvision's ImageNet VGG16 (conv blocks, and fc6/fc7 reshaped into convolutions):
        khalil2022 §3.5 "the model is initialized using the VGG16 model"."""
        check_full_width(self.width_mult, "VGG16 of FCN")
        return {"imagenet": [("VGG16_Weights.IMAGENET1K_V1", self.load_backbone_state_dict)]}


def _build(variant: str, num_classes: int, width_mult: float, dropout: float, tile_px: int,
           pad_mode: str) -> FCN:
    tile_px = check_positive_int("tile_px", tile_px, maximum=1 << 14)
    dropout = check_fraction("dropout", dropout, high=0.95)
    return FCN(num_classes, variant=variant, width_mult=width_mult, dropout=dropout,
               tile_px=tile_px, pad_mode=pad_mode)


_TINY: dict[str, Any] = {"width_mult": 0.0625, "tile_px": 64}


_INIT = ("imagenet", "khalil2022 §3.5 (\"initialized using the VGG16 model\")")


@register_model("fcn32s_vgg16", paper=PAPER, tiny=_TINY, paper_init=_INIT[0],
                paper_init_source=_INIT[1],
                summary="modified FCN-32s on VGG16 (khalil2022), 512 px tiles padded to 712")
def fcn32s_vgg16(num_classes: int, *, width_mult: float = 1.0, dropout: float = 0.5,
                 tile_px: int = 512, pad_mode: str = "zeros") -> FCN:
    """khalil2022's modified FCN-32s (VGG16 blocks, fc6/fc7 with dropout, 64/32 deconv, crop)."""
    return _build("32s", num_classes, width_mult, dropout, tile_px, pad_mode)


@register_model("fcn8s_vgg16", paper=f"{PAPER}, Fig. 4", tiny=_TINY, paper_init=_INIT[0],
                paper_init_source=_INIT[1],
                summary="FCN-8s on VGG16 (the comparison in khalil2022 Fig. 4)")
def fcn8s_vgg16(num_classes: int, *, width_mult: float = 1.0, dropout: float = 0.5,
                tile_px: int = 512, pad_mode: str = "zeros") -> FCN:
    """FCN-8s (Shelhamer et al.), the finer-stream variant khalil2022 compares in Fig. 4."""
    return _build("8s", num_classes, width_mult, dropout, tile_px, pad_mode)
