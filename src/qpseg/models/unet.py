"""U-Net with an exchangeable encoder (lagree2021, Methods, "U-net").

lagree2021 built eight "U-Net like DCNNs" with the ``segmentation_models`` package, replacing
the encoder by VGG-16/19, ResNet-50/101/152, DenseNet-121/201 or Inception-v3: "All DCNN
decoders consisted of up-sampling, concatenation of the respective feature map from the encoding
path, followed by two blocks of 3×3 convolutions, batch normalization and ReLU activation. The
final layer of all DCNNs consisted of a 1×1 convolution with SoftMax activation."

:class:`EncoderUNet` is that network: an :class:`~qpseg.models._backbones.Encoder` (feature maps
at strides 1/2-32), a decoder of :class:`~qpseg.models._base.UpBlock` with ``segmentation_models``'
default filters (256, 128, 64, 32, 16), and a 1×1 convolution head (softmax in
:func:`~qpseg.models.predict`). As in ``segmentation_models``, VGG encoders (which end with a
pool) get a centre block of two conv-BN-ReLU before the decoder.

:class:`PlainEncoder` is the encoder of GB U-Net's second stage ("repeated blocks of 3×3
convolutions, batch normalization, ReLU activation, and Dropout layers").
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from qpseg.models._backbones import Encoder
from qpseg.models._base import DoubleConv, NamedWeights, QpsegModule, UpBlock, as_int_tuple
from qpseg.models.contract import InputSpec, ModelContract

__all__ = ["DEFAULT_DECODER_FILTERS", "EncoderUNet", "PlainEncoder"]

# segmentation_models' default decoder (the package lagree2021 used).
DEFAULT_DECODER_FILTERS: tuple[int, ...] = (256, 128, 64, 32, 16)


class PlainEncoder(Encoder):
    """Conv-BN-ReLU-Dropout blocks (two per level) with 2×2 max-pooling after every level.

    Returns the features before every pool (strides 1 ... 2**(L-1)) and the pooled bottom
    (stride 2**L), like a VGG encoder.
    """

    def __init__(self, in_channels: int, filters: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        prev = in_channels
        for f in filters:
            self.blocks.append(DoubleConv(prev, f, dropout=dropout))
            prev = f
        self.pool = nn.MaxPool2d(2)
        self.channels = [*filters, filters[-1]]
        self.strides = [1 << i for i in range(len(filters) + 1)]
        self.label = "GB U-Net encoder"
        self.body = self.blocks

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
            x = self.pool(x)
        feats.append(x)
        return feats


class EncoderUNet(QpsegModule):
    """U-Net decoder on any multi-scale encoder; output at full input resolution (logits)."""

    def __init__(self, num_classes: int, encoder: Encoder, *, name: str, tile_px: int,
                 decoder_filters: Sequence[int] = DEFAULT_DECODER_FILTERS,
                 center: bool = False, in_channels: int = 3, paper: str = "",
                 default_mpp: float | None = None) -> None:
        super().__init__()
        decoder_filters = as_int_tuple("decoder_filters", decoder_filters, maximum=4096)
        bottom_stride = encoder.strides[-1]
        n_up = int(math.log2(bottom_stride))
        if len(decoder_filters) != n_up:
            raise ValueError(f"decoder_filters needs {n_up} entries (the encoder downsamples by "
                             f"{bottom_stride}), not {len(decoder_filters)}")
        if tile_px % bottom_stride:
            raise ValueError(f"tile_px must be a multiple of {bottom_stride}, not {tile_px}")
        self.encoder = encoder
        bottom = encoder.channels[-1]
        self.center: nn.Module = DoubleConv(bottom, bottom) if center else nn.Identity()
        skips = list(reversed(encoder.channels[:-1]))
        blocks = []
        prev = bottom
        for i, f in enumerate(decoder_filters):
            blocks.append(UpBlock(prev, skips[i] if i < len(skips) else 0, f))
            prev = f
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(prev, num_classes, 1)
        self.contract = ModelContract(
            architecture=name, num_classes=num_classes,
            inputs=(InputSpec("image", tile_px, 1.0, in_channels),), output="pixel",
            tile_px=tile_px, output_px=tile_px, size_multiple=bottom_stride,
            # lagree2021 tiled test images "with a 50% overlap": trim a quarter tile per side.
            margin_px=tile_px // 4, paper=paper, default_mpp=default_mpp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        x = self.center(feats[-1])
        skips = feats[-2::-1]
        for i, block in enumerate(self.decoder):
            x = block(x, skips[i] if i < len(skips) else None)
        return self.head(x)

    def load_backbone_state_dict(self, state: Mapping[str, torch.Tensor],
                                 path: str | os.PathLike[str] | None) -> None:
        """Load torchvision ImageNet weights (e.g. ``resnet101().state_dict()``) into the
        encoder."""
        self.encoder.load_imagenet(state, path)

    def pretrained_weights(self) -> NamedWeights:
        """ImageNet weights of the encoder (lagree2021, Methods "U-net": "Weights pre-trained on
        the ImageNet dataset initialized each DCNN"); the decoder starts from random init."""
        if self.encoder.imagenet_weights is None:
            return {}
        return {"imagenet": [(self.encoder.imagenet_spec(), self.load_backbone_state_dict)]}
