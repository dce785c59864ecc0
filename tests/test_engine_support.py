"""Helpers shared by the engine tests (no tests here): a hand-weighted ``tiny_unet`` with a
known answer, packages, ground truth, and an OpenSlide handle with bounds.

The model: ``tiny_unet`` (depth 3, 4 filters) whose only non-zero weights blur the green
channel four times with 3x3 box filters (two in the first encoder block, two in the last
decoder block; every deeper path is zero, batch norm is the identity) and whose head says
"Tumor" where the blurred green is below ``threshold``. The synthetic slides' tumour is dark
purple with dense dark nuclei (green ~ 0.3); every other tissue is lighter (green >= 0.5 after
blurring), so the answer is the generator's tumour geometry. The blur's receptive field
(4 px) is inside the model's margin (8 px), so tiled inference equals whole-image inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpseg.models import create_model, save_package
from qpseg.slide import OpenSlideSlide, Slide

THRESHOLD = 0.45
GAIN = 60.0


def colour_unet(tile_px: int = 128, threshold: float = THRESHOLD,
                gain: float = GAIN) -> torch.nn.Module:
    """The hand-weighted tiny_unet described in the module docstring."""
    m = create_model("tiny_unet", 2, base_filters=4, depth=3, tile_px=tile_px)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.zero_()
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0 - mod.eps)
        box = torch.full((3, 3), 1.0 / 9.0)
        m.down[0][0][0].weight[0, 1] = box  # green -> channel 0
        m.down[0][1][0].weight[0, 0] = box
        m.up[-1].conv[0][0].weight[0, 0] = box  # the skip's channel 0 comes first
        m.up[-1].conv[1][0].weight[0, 0] = box
        m.head.weight[1, 0, 0, 0] = -gain
        m.head.bias[1] = gain * threshold
    return m.eval()


def colour_package(folder: Path, *, mpp: float = 1.0, tile_px: int = 128,
                   class_names: Sequence[str] = ("Background", "Tumor"),
                   training: dict[str, Any] | None = None) -> Path:
    """Save the colour model as a package (images in [0, 1], no normalisation)."""
    return save_package(folder, colour_unet(tile_px), class_names=list(class_names), mpp=mpp,
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), training=training,
                        overwrite=True)


def tumour_truth(slide: Any, dx: float = 0.0, dy: float = 0.0) -> Any:
    """The slide's Tumor geometry (level-0 px), shifted by (dx, dy)."""
    import shapely

    geom = slide.class_geometry("Tumor")
    return shapely.affinity.translate(geom, dx, dy) if (dx or dy) else geom


def dice(a: Any, b: Any) -> float:
    """Dice of two shapely geometries."""
    total = a.area + b.area
    return 1.0 if total == 0 else 2.0 * a.intersection(b).area / total


def union(objects: Sequence[Any], cls: str = "Tumor") -> Any:
    """Union of the geometries of objects of one class."""
    from shapely import unary_union

    return unary_union([o.geometry for o in objects if o.classification == cls])


def whole_image_prediction(slide: Slide, model: torch.nn.Module, mpp: float, shape: tuple[int,
                           int], pad: int = 16) -> np.ndarray:
    """Class map of the QuPath image read at ``mpp`` in one piece (white around it)."""
    h, w = shape
    img = slide.read_region_mpp(0.0, 0.0, w, h, mpp)
    hp = -(-(h + 2 * pad) // 8) * 8
    wp = -(-(w + 2 * pad) // 8) * 8
    canvas = np.full((hp, wp, 3), 255, np.uint8)
    canvas[pad:pad + h, pad:pad + w] = img
    x = torch.from_numpy(canvas).permute(2, 0, 1)[None].float() / 255.0
    with torch.inference_mode():
        out = model(x)
    return out.argmax(1)[0, pad:pad + h, pad:pad + w].numpy().astype(np.uint8)


class BoundsHandle:
    """A real OpenSlide handle that reports ``openslide.bounds-*`` (like MIRAX/Hamamatsu)."""

    def __init__(self, path: Path, bounds: tuple[int, int, int, int]) -> None:
        import openslide

        self._h = openslide.OpenSlide(str(path))
        x, y, w, h = bounds
        self.properties = dict(self._h.properties) | {
            "openslide.bounds-x": str(x), "openslide.bounds-y": str(y),
            "openslide.bounds-width": str(w), "openslide.bounds-height": str(h)}
        self.level_dimensions = self._h.level_dimensions
        self.level_downsamples = self._h.level_downsamples

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        return self._h.read_region(location, level, size)

    def close(self) -> None:
        self._h.close()


def bounds_opener(bounds: tuple[int, int, int, int]) -> Any:
    """An ``opener(path, mpp)`` for the engine that adds ``bounds`` to every slide."""

    def opener(path: Path, mpp: float | None) -> Slide:
        return OpenSlideSlide(Path(path), BoundsHandle(Path(path), bounds), mpp=mpp,
                              vendor="generic-tiff")

    return opener
