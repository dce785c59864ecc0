"""``tiny_unet``: a small, fast U-Net for tests, the embedded demo and CPU smoke runs.

Not from the papers: a plain U-Net (Ronneberger et al. 2015, the common ancestor of the
architectures in lagree2021 §Methods "U-net", pedersen2022 §3.2 and ho2021 §2.4) with
``base_filters`` doubling over ``depth`` poolings, conv-BN-ReLU blocks, nearest upsampling and
skip concatenation. The defaults (8 filters, depth 4) give 0.49 M parameters and cost about
27 kFLOPs per pixel (narrow full-resolution layers, a 16× deep bottom for context), so a CPU
run over a small slide takes seconds.
"""

from __future__ import annotations

import torch
from torch import nn

from qpseg.models._base import DoubleConv, QpsegModule, UpBlock, check_positive_int
from qpseg.models.contract import InputSpec, ModelContract
from qpseg.models.registry import register_model

__all__ = ["TinyUNet", "tiny_unet"]


class TinyUNet(QpsegModule):
    """A small U-Net: ``depth`` poolings, ``base_filters * 2**i`` channels at level ``i``."""

    def __init__(self, num_classes: int, *, in_channels: int = 3, base_filters: int = 8,
                 depth: int = 4, tile_px: int = 256, name: str = "tiny_unet") -> None:
        super().__init__()
        base_filters = check_positive_int("base_filters", base_filters, maximum=256)
        depth = check_positive_int("depth", depth, maximum=6)
        in_channels = check_positive_int("in_channels", in_channels, maximum=64)
        tile_px = check_positive_int("tile_px", tile_px, maximum=1 << 14)
        if tile_px % (1 << depth):
            raise ValueError(f"tile_px must be a multiple of {1 << depth}, not {tile_px}")
        widths = [base_filters << i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        prev = in_channels
        for w in widths[:-1]:
            self.down.append(DoubleConv(prev, w))
            prev = w
        self.pool = nn.MaxPool2d(2)
        self.bottom = DoubleConv(prev, widths[-1])
        self.up = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.contract = ModelContract(
            architecture=name, num_classes=num_classes,
            inputs=(InputSpec("image", tile_px, 1.0, in_channels),), output="pixel",
            tile_px=tile_px, output_px=tile_px, size_multiple=1 << depth,
            margin_px=1 << depth, paper="qpseg (small U-Net after Ronneberger et al. 2015)",
            notes="test/demo model; any tile size that is a multiple of size_multiple works")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for block, skip in zip(self.up, reversed(skips), strict=True):
            x = block(x, skip)
        return self.head(x)


@register_model("tiny_unet", paper="qpseg", tiny={"tile_px": 64},
                summary="small U-Net (0.49 M params) for tests and the demo")
def tiny_unet(num_classes: int, *, in_channels: int = 3, base_filters: int = 8, depth: int = 4,
              tile_px: int = 256) -> TinyUNet:
    """Small U-Net (0.49 M parameters, ~27 kFLOPs/pixel) for tests, the demo and CPU runs."""
    return TinyUNet(num_classes, in_channels=in_channels, base_filters=base_filters, depth=depth,
                    tile_px=tile_px)
