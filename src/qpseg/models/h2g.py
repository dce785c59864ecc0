"""H2G-Net of pedersen2022 (Front. Med. 9:971873): patch classifier, refinement U-Net, pipeline.

* ``mobilenetv2_patch`` — §2.3 (last paragraph): "The MobileNetV2 architecture was used for the
  patch-wise CNN classification [...] The updated classifier contained a global average pooling
  layer, followed by a dense layer of 100 hidden neurons, dropout with a 50% drop rate, ReLU
  activation function, batch normalization, and finally a dense layer with softmax activation".
  Input: 256×256 patches "at ×100 magnification" (≈1 µm/px), §2.2. ≈2.39 M parameters (§3.2)
  counting batch-norm statistics as Keras does.
* ``h2g_refine_unet`` — §2.5 and §3.2: a U-Net taking "the concatenated low-resolution
  three-channel WSI and predicted heatmap" resized to 1024×1024, "nine encoder and decoder
  blocks, with the following filters (from top to bottom): {8, 16, 32, 64, 128, 128, 256, 256,
  512}. The encoder block used the following operations (Convolution-BatchNormalization-ReLU)
  ×2-MaxPooling", softmax output; ≈11.58 M parameters. Decoder blocks upsample ×2, concatenate
  the skip and apply (conv-BN-ReLU)×2 with the encoder widths in reverse and spatial dropout
  0.1, as in the authors' code (AICAN-Research/H2G-Net, ``architectures/UNet.py``).
* ``h2g_net`` — §2.5, Fig. 3: the two-stage pipeline. Inference slides the patch classifier over
  the tissue, stitches the class-``heatmap_class`` softmax into a heatmap, resizes slide image
  and heatmap to 1024×1024 and refines. The wrapper's contract lists both stages; its
  ``forward(image, heatmap)`` is the refinement stage, ``stages[0]`` the patch classifier.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from qpseg.models._backbones import check_full_width
from qpseg.models._base import (
    NamedWeights,
    QpsegModule,
    as_int_tuple,
    check_fraction,
    check_positive_int,
)
from qpseg.models._weights import load_subset
from qpseg.models.contract import InputSpec, ModelContract
from qpseg.models.registry import register_model

__all__ = ["H2GNet", "MobileNetV2Patch", "RefineUNet", "h2g_net", "h2g_refine_unet",
           "mobilenetv2_patch"]

PAPER = "pedersen2022 (Front. Med. 9:971873)"
PATCH_MPP = 1.0  # "×100" of ×400 (≈0.25 µm/px) scans
REFINE_FILTERS: tuple[int, ...] = (8, 16, 32, 64, 128, 128, 256, 256, 512)


class MobileNetV2Patch(QpsegModule):
    """MobileNetV2 features → GAP → dense 100 → dropout 0.5 → ReLU → BN → dense (logits)."""

    def __init__(self, num_classes: int, *, width_mult: float = 1.0, hidden: int = 100,
                 dropout: float = 0.5, tile_px: int = 256) -> None:
        super().__init__()
        import torchvision

        width_mult = check_fraction("width_mult", width_mult, low=0.05, high=4.0)
        hidden = check_positive_int("hidden", hidden, maximum=1 << 14)
        dropout = check_fraction("dropout", dropout, high=0.95)
        tile_px = check_positive_int("tile_px", tile_px, maximum=1 << 14)
        self.width_mult = width_mult
        backbone = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult)
        self.features = backbone.features
        last = backbone.last_channel
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, hidden), nn.Dropout(dropout),
            nn.ReLU(inplace=True), nn.BatchNorm1d(hidden), nn.Linear(hidden, num_classes))
        self.contract = ModelContract(
            architecture="mobilenetv2_patch", num_classes=num_classes,
            inputs=(InputSpec("image", tile_px, 1.0, 3),), output="patch", tile_px=tile_px,
            output_px=1, output_stride=tile_px, size_multiple=32, fixed_size=True,
            paper=f"{PAPER}, Section 2.3 (patch-wise classifier)", default_mpp=PATCH_MPP,
            notes="train with batches of >= 2 (batch norm in the head)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def load_backbone_state_dict(self, state: Mapping[str, torch.Tensor],
                                 path: str | os.PathLike[str] | None) -> None:
        """Load torchvision ``mobilenet_v2`` ImageNet weights (``features.*``; classifier
        ignored)."""
        load_subset(self.features, state, path, prefix="features.", ignore=("classifier.",),
                    what="MobileNetV2 backbone")

    def pretrained_weights(self) -> NamedWeights:
        """torchvision's ImageNet MobileNetV2 for the features (pedersen2022 §3.4: "we
        fine-tuned the respective pretrained backbones"); the new head starts at random."""
        check_full_width(self.width_mult, "MobileNetV2")
        return {"imagenet": [("MobileNet_V2_Weights.IMAGENET1K_V1",
                              self.load_backbone_state_dict)]}


class _ConvBlock(nn.Sequential):
    """(Conv 3×3 with bias - BN - ReLU [- spatial dropout]) × 2, as the authors' Keras code."""

    def __init__(self, in_ch: int, out_ch: int, spatial_dropout: float) -> None:
        layers: list[nn.Module] = []
        for i in range(2):
            layers += [nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1),
                       nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            if spatial_dropout > 0:
                layers.append(nn.Dropout2d(spatial_dropout))
        super().__init__(*layers)


class RefineUNet(QpsegModule):
    """H2G-Net refinement U-Net: (image ⊕ heatmap) → refined segmentation logits."""

    def __init__(self, num_classes: int, *, filters: Sequence[int] = REFINE_FILTERS,
                 decoder_dropout: float = 0.1, tile_px: int = 1024, image_channels: int = 3,
                 heatmap_class: int = 1, name: str = "h2g_refine_unet") -> None:
        super().__init__()
        filters = as_int_tuple("filters", filters, maximum=4096)
        if len(filters) < 2:
            raise ValueError("filters needs at least two levels")
        decoder_dropout = check_fraction("decoder_dropout", decoder_dropout, high=0.95)
        tile_px = check_positive_int("tile_px", tile_px, maximum=1 << 14)
        multiple = 1 << (len(filters) - 1)
        if tile_px % multiple:
            raise ValueError(f"tile_px must be a multiple of {multiple}, not {tile_px}")
        heatmap_class = int(heatmap_class)
        if not 0 <= heatmap_class < max(num_classes, 2):
            raise ValueError(f"heatmap_class {heatmap_class} is not a class index")
        self.encoder = nn.ModuleList()
        prev = image_channels + 1
        for f in filters[:-1]:
            self.encoder.append(_ConvBlock(prev, f, 0.0))
            prev = f
        self.pool = nn.MaxPool2d(2)
        self.bottom = _ConvBlock(prev, filters[-1], 0.0)
        self.decoder = nn.ModuleList()
        prev = filters[-1]
        for f in reversed(filters[:-1]):
            self.decoder.append(_ConvBlock(prev + f, f, decoder_dropout))
            prev = f
        self.head = nn.Conv2d(prev, num_classes, 1)
        self.contract = ModelContract(
            architecture=name, num_classes=num_classes,
            inputs=(InputSpec("image", tile_px, None, image_channels),
                    InputSpec("heatmap", tile_px, None, 1, kind="heatmap",
                              heatmap_class=heatmap_class)),
            output="pixel", tile_px=tile_px, output_px=tile_px, size_multiple=multiple,
            paper=f"{PAPER}, Sections 2.5 and 3.2 (refinement U-Net)",
            notes="inputs are the whole slide and the stitched patch heatmap, each resized to "
                  "tile_px x tile_px (bilinear); the image is scaled to [0, 1]")

    def forward(self, image: torch.Tensor, heatmap: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image, heatmap], dim=1)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for block, skip in zip(self.decoder, reversed(skips), strict=True):
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([skip, x], dim=1))
        return self.head(x)


class H2GNet(QpsegModule):
    """The two-stage H2G-Net; ``stages = [patch classifier, refinement U-Net]``."""

    def __init__(self, num_classes: int, patch: MobileNetV2Patch, refine: RefineUNet) -> None:
        super().__init__()
        self.stages = nn.ModuleList([patch, refine])
        rc = refine.contract
        self.contract = ModelContract(
            architecture="h2g_net", num_classes=num_classes, inputs=rc.inputs, output="pixel",
            tile_px=rc.tile_px, output_px=rc.output_px, size_multiple=rc.size_multiple,
            stages=(patch.contract, rc), paper=f"{PAPER}, Section 2.5 and Fig. 3 (H2G-Net)",
            default_mpp=PATCH_MPP,
            notes="stage 0 runs over the slide at the package mpp; its class-heatmap_class "
                  "probabilities, stitched, feed stage 1 with the resized slide")

    def forward(self, image: torch.Tensor, heatmap: torch.Tensor) -> torch.Tensor:
        return self.stages[1](image, heatmap)

    def load_backbone_state_dict(self, state: Mapping[str, torch.Tensor],
                                 path: str | os.PathLike[str] | None) -> None:
        """ImageNet MobileNetV2 weights go to the patch classifier's backbone."""
        cast(MobileNetV2Patch, self.stages[0]).load_backbone_state_dict(state, path)

    def pretrained_weights(self) -> NamedWeights:
        """The patch classifier's ImageNet MobileNetV2; the refinement U-Net was "trained from
        scratch" (pedersen2022 §3.4) and stays at random init."""
        return cast(MobileNetV2Patch, self.stages[0]).pretrained_weights()


_INIT = ("imagenet", "pedersen2022 §3.4 (\"we fine-tuned the respective pretrained backbones\")")


@register_model("mobilenetv2_patch", paper=f"{PAPER}, Section 2.3", paper_init=_INIT[0],
                paper_init_source=_INIT[1],
                tiny={"width_mult": 0.25, "tile_px": 64},
                summary="MobileNetV2 patch classifier with H2G-Net's simplified head")
def mobilenetv2_patch(num_classes: int, *, width_mult: float = 1.0, hidden: int = 100,
                      dropout: float = 0.5, tile_px: int = 256) -> MobileNetV2Patch:
    """H2G-Net stage 1: MobileNetV2 patch classifier (256 px patches at ≈1 µm/px)."""
    return MobileNetV2Patch(num_classes, width_mult=width_mult, hidden=hidden, dropout=dropout,
                            tile_px=tile_px)


@register_model("h2g_refine_unet", paper=f"{PAPER}, Sections 2.5, 3.2",
                tiny={"filters": [4, 8, 8, 16], "tile_px": 64},
                summary="H2G-Net refinement U-Net (1024 px slide + heatmap)")
def h2g_refine_unet(num_classes: int, *, filters: Sequence[int] = REFINE_FILTERS,
                    decoder_dropout: float = 0.1, tile_px: int = 1024,
                    heatmap_class: int = 1) -> RefineUNet:
    """H2G-Net stage 2: U-Net refining the heatmap with the low-resolution slide."""
    return RefineUNet(num_classes, filters=filters, decoder_dropout=decoder_dropout,
                      tile_px=tile_px, heatmap_class=heatmap_class)


@register_model("h2g_net", paper=f"{PAPER}, Section 2.5, Fig. 3", paper_init=_INIT[0],
                paper_init_source=_INIT[1],
                tiny={"patch_kwargs": {"width_mult": 0.25, "tile_px": 64},
                      "refine_kwargs": {"filters": [4, 8, 8, 16], "tile_px": 64}},
                summary="two-stage H2G-Net: MobileNetV2 patch heatmap + refinement U-Net")
def h2g_net(num_classes: int, *, patch_kwargs: Mapping[str, Any] | None = None,
            refine_kwargs: Mapping[str, Any] | None = None) -> H2GNet:
    """H2G-Net pipeline: ``mobilenetv2_patch`` then ``h2g_refine_unet`` (options per stage)."""
    for label, value in (("patch_kwargs", patch_kwargs), ("refine_kwargs", refine_kwargs)):
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"{label} must be an object of keyword arguments")
    patch = MobileNetV2Patch(num_classes, **dict(patch_kwargs or {}))
    refine = RefineUNet(num_classes, **dict(refine_kwargs or {}))
    return H2GNet(num_classes, patch, refine)
