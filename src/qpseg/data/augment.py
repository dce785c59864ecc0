"""Batched augmentation in torch: runs wherever the batch is (GPU when present).

Geometry is applied jointly to every view of a sample (``inputs``: one ``(N, C, H, W)`` tensor
per magnification, each rotated/flipped about its own centre, which is the shared target centre)
and to its label ``(N, H, W)`` (and instance map): labels are resampled with nearest neighbour and
pixels that come from outside the tile become ``ignore_index``, images bilinearly with ``fill``.
Rotations by multiples of 90° use :func:`torch.rot90` and are exact.

Defaults and presets follow the papers (:meth:`AugmentConfig.preset`):

* khalil2022 §3.2.3: rotation in 5° steps and by multiples of 90°, horizontal and vertical
  mirroring, contrast ±20 %, saturation ±20 %, brightness ±12.5 %.
* pedersen2022 §3.4 (patch classifier): flips, 90° rotations, HSV shift in [-20, 20] (on the
  0-255 scale), multiplicative brightness [0.8, 1.2], each with a 50 % chance; (refinement
  network): flips, 90° rotations, zoom [0.8, 1.2], Macenko stain augmentation σ1 = σ2 = 0.1
  (StainTools), each with a 50 % chance.
* ho2021 §2.3/§2.5: elastic deformation on a 17 x 17 grid with σ = 4 px (bicubic), used to
  multiply patches of minor classes; random rotation, flips, brightness, contrast and colour
  jitter with the authors' code's values (DMMN training.py: quarter turns, brightness ±0.25,
  contrast [0.25, 1.75], saturation ±30/255, hue ±20/180, colour at 50 %).
* lagree2021 (Methods, U-Net): rotation, distortion (elastic), skew/shear and flips, no ranges
  given and no code (ours: any angle, Augmentor's README distortion of 4 x 4 cells by ±8 px,
  shear ±10°, each at 50 %; no skew).

Colour operations expect images in [0, 1] (``mean``/``std`` normalisation, if any, is the last
step of :class:`Augmenter`). Randomness is drawn on the CPU from an optional
:class:`torch.Generator`, so a seed gives the same augmentation on CPU and GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError
from qpseg.labels import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

__all__ = [
    "ELASTIC_GRID",
    "ELASTIC_SIGMA",
    "PRESETS",
    "ROTATION_STEP_DEG",
    "AugmentConfig",
    "Augmenter",
    "ElasticDeformation",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "affine",
    "elastic_deform",
    "flip",
    "hsv_shift",
    "hsv_to_rgb",
    "normalize",
    "rgb_to_hsv",
    "rotate90",
]

#: khalil2022 §3.2.3: "manipulating the rotation per 5°".
ROTATION_STEP_DEG = 5.0
#: ho2021 §2.3: "we empirically set the grid points by 17x17 and σ = 4".
ELASTIC_GRID = 17
ELASTIC_SIGMA = 4.0
PRESETS: tuple[str, ...] = ("khalil2022", "pedersen2022", "pedersen2022_refine", "ho2021",
                            "lagree2021", "none")

Tensors = list["torch.Tensor"]


def _rand(n: int, generator: torch.Generator | None) -> torch.Tensor:
    import torch

    return torch.rand(n, generator=generator)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) CPU values -> (N, 1, 1, 1) on ``like``'s device and dtype."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- colour spaces
def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of the circle)."""
    import torch

    r, g, b = rgb.unbind(1)
    maxc, _ = rgb.max(1)
    minc, _ = rgb.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                    torch.zeros_like(maxc))
    hr = ((g - b) / safe) % 6
    hg = (b - r) / safe + 2
    hb = (r - g) / safe + 4
    h = torch.where(maxc == r, hr, torch.where(maxc == g, hg, hb))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h)) % 1.0
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    import torch

    h, s, v = hsv.unbind(1)
    h6 = (h % 1.0) * 6
    i = torch.floor(h6)
    f = h6 - i
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    i = i.long() % 6
    r = torch.stack([v, q, p, p, t, v], 1).gather(1, i.unsqueeze(1)).squeeze(1)
    g = torch.stack([t, v, v, q, p, p], 1).gather(1, i.unsqueeze(1)).squeeze(1)
    b = torch.stack([p, p, t, v, v, q], 1).gather(1, i.unsqueeze(1)).squeeze(1)
    return torch.stack([r, g, b], 1)


def _grey(rgb: torch.Tensor) -> torch.Tensor:
    w = rgb.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (rgb * w).sum(1, keepdim=True)


# ------------------------------------------------------------------------ colour operations
def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply by a per-sample ``factor`` (N,) and clamp to [0, 1]."""
    return (x * _per_sample(factor, x)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its mean grey level: ``mean + factor * (x - mean)``."""
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    return (mean + _per_sample(factor, x) * (x - mean)).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each pixel with its grey level: ``grey + factor * (x - grey)``."""
    grey = _grey(x)
    return (grey + _per_sample(factor, x) * (x - grey)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by a per-sample ``shift`` (fraction of the circle)."""
    hsv = rgb_to_hsv(x.clamp(0, 1))
    h = (hsv[:, 0:1] + _per_sample(shift, x)) % 1.0
    return hsv_to_rgb(torch_cat([h, hsv[:, 1:]])).clamp(0, 1)


def hsv_shift(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Add per-sample ``shifts`` (N, 3) to H, S and V (all in [0, 1] units; hue wraps)."""
    import torch

    hsv = rgb_to_hsv(x.clamp(0, 1))
    s = shifts.to(device=x.device, dtype=x.dtype).view(-1, 3, 1, 1)
    out = hsv + s
    out = torch.stack([out[:, 0] % 1.0, out[:, 1].clamp(0, 1), out[:, 2].clamp(0, 1)], 1)
    return hsv_to_rgb(out).clamp(0, 1)


def torch_cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, dim=1)`` (keeps torch out of module import time)."""
    import torch

    return torch.cat(list(parts), 1)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel."""
    m = x.new_tensor(list(mean)).view(1, -1, 1, 1)
    s = x.new_tensor(list(std)).view(1, -1, 1, 1)
    return (x - m) / s


# -------------------------------------------------------------------------------- geometry
def rotate90(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate sample ``i`` of ``x`` (``(N, ..., H, W)``) by ``k[i]`` quarter turns, exactly
    (:func:`torch.rot90` on the last two dims; square images for odd ``k``)."""
    import torch

    ks = k.to(torch.int64) % 4
    if not bool((ks != 0).any()):
        return x
    out = x.clone()
    for q in (1, 2, 3):
        idx = torch.nonzero(ks == q).flatten()
        if len(idx):
            if q % 2 and x.shape[-1] != x.shape[-2]:
                raise ValueError("odd quarter turns need square images")
            dev_idx = idx.to(x.device)
            out[dev_idx] = torch.rot90(x[dev_idx], q, dims=(-2, -1))
    return out


def flip(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Flip the samples selected by ``mask`` (N,) along ``dim`` (-1: horizontal, -2: vertical)."""
    import torch

    if not bool(mask.any()):
        return x
    m = mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(m, torch.flip(x, dims=(dim,)), x)


def _theta(angle_deg: torch.Tensor, scale: torch.Tensor, shear_deg: torch.Tensor
           ) -> torch.Tensor:
    """(N, 2, 3) grid_sample matrices mapping output to input normalised coordinates.

    ``angle`` follows :func:`torch.rot90` (90° here equals ``k = 1``); ``scale > 1`` zooms in.
    """
    import torch

    a = angle_deg.double() * math.pi / 180
    sh = torch.tan(shear_deg.double() * math.pi / 180)
    cos, sin = torch.cos(a), torch.sin(a)
    inv = 1 / scale.double()
    theta = torch.zeros(len(a), 2, 3, dtype=torch.float64)
    # rotation @ shear (x' = x + sh * y), then zoom
    theta[:, 0, 0] = cos * inv
    theta[:, 0, 1] = (cos * sh - sin) * inv
    theta[:, 1, 0] = sin * inv
    theta[:, 1, 1] = (sin * sh + cos) * inv
    return theta


def _sample_labels(label: torch.Tensor, grid: torch.Tensor, fill: int | None,
                   padding: str = "zeros") -> torch.Tensor:
    """Nearest-neighbour resampling of an integer map ``(N, H, W)``; outside -> ``fill``."""
    import torch
    import torch.nn.functional as F

    # float32 holds integers exactly up to 2**24 (labels, most instance ids); beyond, float64.
    exact32 = label.numel() == 0 or (int(label.max()) < 2**24 and int(label.min()) > -(2**24))
    lab = label.unsqueeze(1).to(torch.float32 if exact32 else torch.float64)
    g = grid.to(lab.dtype)
    out = F.grid_sample(lab, g, mode="nearest", padding_mode=padding, align_corners=False)
    out = out.squeeze(1).round().to(label.dtype)
    if fill is not None and padding == "zeros":
        ones = torch.ones_like(lab)
        inside = F.grid_sample(ones, g, mode="nearest", padding_mode="zeros",
                               align_corners=False).squeeze(1) > 0.5
        out = torch.where(inside, out, torch.full_like(out, fill))
    return out


def _sample_image(img: torch.Tensor, grid: torch.Tensor, fill: float, mode: str = "bilinear"
                  ) -> torch.Tensor:
    """Resample ``(N, C, H, W)``; pixels from outside the image get ``fill``."""
    import torch.nn.functional as F

    g = grid.to(img.dtype)
    shifted = img - fill
    out = F.grid_sample(shifted, g, mode=mode, padding_mode="zeros", align_corners=False)
    return out + fill


def affine(
    inputs: Sequence[torch.Tensor],
    label: torch.Tensor | None,
    angle_deg: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    shear_deg: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    fill: float = 1.0,
    instances: torch.Tensor | None = None,
) -> tuple[Tensors, torch.Tensor | None, torch.Tensor | None]:
    """Rotate (degrees, per sample), zoom and shear every view and the label about their centres.

    Images are bilinear with ``fill`` outside (1.0: white glass); labels nearest with
    ``ignore_index`` outside; instance maps nearest with 0 outside.
    """
    import torch
    import torch.nn.functional as F

    n = angle_deg.shape[0]
    scale = torch.ones(n) if scale is None else scale
    shear_deg = torch.zeros(n) if shear_deg is None else shear_deg
    theta = _theta(angle_deg.cpu(), scale.cpu(), shear_deg.cpu())
    out_inputs = []
    for img in inputs:
        t = theta.to(device=img.device, dtype=img.dtype)
        grid = F.affine_grid(t, list(img.shape), align_corners=False)
        out_inputs.append(_sample_image(img, grid, fill))
    out_label = out_inst = None
    if label is not None or instances is not None:
        ref = label if label is not None else instances
        assert ref is not None
        t = theta.to(device=ref.device, dtype=torch.float32)
        grid = F.affine_grid(t, [ref.shape[0], 1, ref.shape[-2], ref.shape[-1]],
                             align_corners=False)
        if label is not None:
            out_label = _sample_labels(label, grid, ignore_index)
        if instances is not None:
            out_inst = _sample_labels(instances, grid, 0)
    return out_inputs, out_label, out_inst


def elastic_deform(
    inputs: Sequence[torch.Tensor],
    label: torch.Tensor | None,
    *,
    extents: Sequence[float] | None = None,
    grid: int = ELASTIC_GRID,
    sigma: float = ELASTIC_SIGMA,
    generator: torch.Generator | None = None,
    displacement: torch.Tensor | None = None,
    instances: torch.Tensor | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
) -> tuple[Tensors, torch.Tensor | None, torch.Tensor | None]:
    """ho2021 §2.3 elastic deformation: a ``grid`` x ``grid`` lattice of points displaced by
    N(0, σ²) pixels (of the label), interpolated bicubically to every pixel.

    One displacement field per sample spans the largest view; ``extents[k]`` is the physical
    side of view ``k`` relative to the label tile (DMMN: 1, 2, 4; default: the views' sizes
    divided by the label's, i.e. views at the label's pixel size), so all views and the label
    move together. Images are resampled bicubically (clamped to ``clamp``), labels and instance
    maps with nearest neighbour; borders reflect, so labels keep their original values.
    ``displacement`` ``(N, 2, grid, grid)`` (x, y in label pixels) overrides the random field.
    """
    import torch
    import torch.nn.functional as F

    ref = label if label is not None else (instances if instances is not None else inputs[0])
    n = ref.shape[0]
    label_side = float(label.shape[-1] if label is not None else (
        instances.shape[-1] if instances is not None else inputs[0].shape[-1]))
    # Default: views at the label's pixel size (context around it, not other magnifications).
    ext = [img.shape[-1] / label_side for img in inputs] if extents is None \
        else [float(e) for e in extents]
    if len(ext) != len(inputs):
        raise ValueError(f"got {len(ext)} extents for {len(inputs)} views")
    big = max([*ext, 1.0])
    if displacement is None:
        displacement = torch.randn(n, 2, grid, grid, generator=generator) * sigma

    def field_for(size_h: int, size_w: int, extent: float, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
        coarse = displacement.to(device=device, dtype=torch.float32)
        eye = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], device=device).expand(n, 2, 3)
        base = F.affine_grid(eye, [n, 1, size_h, size_w], align_corners=False)
        # Where the view's pixels lie on the (largest-extent) field, in its normalised units.
        disp = F.grid_sample(coarse, base * (extent / big), mode="bicubic",
                             padding_mode="border", align_corners=True)
        # Label pixels -> this view's normalised units (the view spans extent * label_side).
        disp = disp * (2.0 / (extent * label_side))
        return (base + disp.permute(0, 2, 3, 1)).to(dtype=dtype)

    out_inputs = []
    for img, e in zip(inputs, ext, strict=True):
        g = field_for(img.shape[-2], img.shape[-1], e, img.device, img.dtype)
        out = F.grid_sample(img, g, mode="bicubic", padding_mode="reflection",
                            align_corners=False)
        out_inputs.append(out.clamp(*clamp) if clamp is not None else out)
    out_label = out_inst = None
    for which, m in (("label", label), ("inst", instances)):
        if m is None:
            continue
        g = field_for(m.shape[-2], m.shape[-1], 1.0, m.device, torch.float32)
        res = _sample_labels(m, g, None, padding="reflection")
        if which == "label":
            out_label = res
        else:
            out_inst = res
    return out_inputs, out_label, out_inst


@dataclass(frozen=True)
class ElasticDeformation:
    """Callable form of :func:`elastic_deform` (what :class:`~qpseg.data.dataset.TileDataset`
    applies to ho2021 class-balancing copies)."""

    grid: int = ELASTIC_GRID
    sigma: float = ELASTIC_SIGMA

    def __call__(
        self,
        inputs: Sequence[torch.Tensor],
        label: torch.Tensor | None,
        *,
        extents: Sequence[float] | None = None,
        instances: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensors, torch.Tensor | None, torch.Tensor | None]:
        clamp = None if any(float(v.min()) < 0 or float(v.max()) > 1 for v in inputs) \
            else (0.0, 1.0)
        return elastic_deform(inputs, label, extents=extents, grid=self.grid, sigma=self.sigma,
                              generator=generator, instances=instances, clamp=clamp)


# ------------------------------------------------------------------------------ pipeline
@dataclass(frozen=True)
class AugmentConfig:
    """What :class:`Augmenter` does. Ranges are symmetric around "no change"; ``p`` is the
    chance of each operation per sample (1.0: always drawn, as khalil2022 describes)."""

    rot90: bool = True  # rotate by a random multiple of 90° (exact; khalil2022 §3.2.3)
    rotation_step_deg: float | None = ROTATION_STEP_DEG  # None: no fine rotation; 0: any angle
    hflip: bool = True  # mirror left-right with a 50 % chance (khalil2022 §3.2.3)
    vflip: bool = True  # mirror top-bottom with a 50 % chance (khalil2022 §3.2.3)
    # [low, high] scale factor drawn per sample, > 1 zooms in; null: none (pedersen2022
    # refinement §3.4: [0.8, 1.2])
    zoom: tuple[float, float] | None = None
    shear_deg: float = 0.0  # shear angle drawn in ±shear_deg degrees (lagree2021 preset: 10)
    brightness: float = 0.125  # multiply by a factor in 1 ± this (khalil2022 §3.2.3: ±12.5 %)
    contrast: float = 0.2  # contrast factor in 1 ± this, about the mean grey (khalil2022: ±20 %)
    saturation: float = 0.2  # saturation factor in 1 ± this (khalil2022 §3.2.3: ±20 %)
    hue: float = 0.0  # hue shift in ± this fraction of the colour circle, at most 0.5
    hsv_shift: float = 0.0  # on the 0-255 scale (pedersen2022: 20)
    stain_sigma: tuple[float, float] | None = None  # Macenko σ1, σ2 (pedersen2022: 0.1, 0.1)
    elastic: bool = False  # deform every sample (not only class-balancing copies)
    elastic_grid: int = ELASTIC_GRID  # control points per side of the elastic field (ho2021: 17)
    elastic_sigma: float = ELASTIC_SIGMA  # std of control-point shifts in px (ho2021 §2.3: 4)
    p: float = 1.0  # chance of each operation per sample (khalil2022: always; pedersen2022: 0.5)
    # label value of pixels that come from outside the tile (training sets the class map's
    # ignore index, 255)
    ignore_index: int = IGNORE_INDEX
    fill: float = 1.0  # image value (0-1) of pixels from outside the tile (1: white glass)
    # per-channel mean/std applied as the augmenter's last step; null: none (training
    # normalises with data.normalization instead, so leave these null there)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None  # see mean

    def __post_init__(self) -> None:
        if not 0 <= self.p <= 1:
            raise ConfigError(f"augmentation probability must be in [0, 1], got {self.p}")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ConfigError(f"{name} range must be in [0, 1), got {v}")
        if not 0 <= self.hue <= 0.5:
            raise ConfigError(f"hue range must be in [0, 0.5], got {self.hue}")
        if self.zoom is not None and not 0 < self.zoom[0] <= self.zoom[1]:
            raise ConfigError(f"zoom must be (low, high) with 0 < low <= high, got {self.zoom}")
        if self.rotation_step_deg is not None and self.rotation_step_deg < 0:
            raise ConfigError(f"rotation_step_deg must be >= 0, got {self.rotation_step_deg}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AugmentConfig:
        """The augmentation of one paper (see the module docstring), with ``overrides``."""
        presets: dict[str, AugmentConfig] = {
            "khalil2022": cls(),
            "pedersen2022": cls(rotation_step_deg=None, brightness=0.2, contrast=0.0,
                                saturation=0.0, hsv_shift=20.0, p=0.5),
            "pedersen2022_refine": cls(rotation_step_deg=None, brightness=0.0, contrast=0.0,
                                       saturation=0.0, zoom=(0.8, 1.2), stain_sigma=(0.1, 0.1),
                                       p=0.5),
            # ho2021 §2.5 names the operations, the authors' code gives the values
            # (MSKCC-Computational-Pathology/DMMN, training.py, train_transform: albumentations
            # RandomRotate90, Vertical/HorizontalFlip, HueSaturationValue(hue_shift_limit=20,
            # sat_shift_limit=30, val_shift_limit=0, p=0.5), RandomBrightnessContrast(
            # brightness_limit=(-0.25, 0.25), contrast_limit=(0.25, 1.75), p=0.5)).
            "ho2021": cls(
                rotation_step_deg=None,  # code: quarter turns only (RandomRotate90)
                brightness=0.25,  # code: ±0.25 (additive there, a factor 1 ± 0.25 here)
                # code: contrast_limit (0.25, 1.75) read as the factor range [0.25, 1.75];
                # albumentations adds 1 to the draw (a gain of 1.25-2.75 that whitens H&E)
                contrast=0.75,
                saturation=0.12,  # code: sat_shift_limit 30 of 255 (added there, factor here)
                hue=0.11,  # code: hue_shift_limit 20 of OpenCV's 180-step hue circle
                p=0.5,  # code: p=0.5 on each colour transform
            ),
            # lagree2021 (Methods, U-Net) names "rotation, distortion, skew, shear, and flip",
            # Augmentor's operations (Bloice et al. 2019), with no values and no code released.
            "lagree2021": cls(
                rotation_step_deg=0.0,  # assumption: any angle (histology has no "up")
                brightness=0.0, contrast=0.0, saturation=0.0,  # the paper lists no colour op
                shear_deg=10.0,  # assumption (Augmentor allows up to 25°); skew: no such op
                elastic=True,
                # "distortion": Augmentor README's random_distortion(grid_width=4,
                # grid_height=4, magnitude=8): 4 x 4 cells (5 x 5 points), shifts uniform in
                # ±8 px, i.e. a standard deviation of 8 / √3 px
                elastic_grid=5,
                elastic_sigma=4.62,
                p=0.5,  # "randomly applied" (Augmentor README's flips use 0.5)
            ),
            "none": cls(rot90=False, rotation_step_deg=None, hflip=False, vflip=False,
                        brightness=0.0, contrast=0.0, saturation=0.0),
        }
        if name not in presets:
            raise ConfigError(f"unknown augmentation preset {name!r} (choose from "
                              f"{', '.join(PRESETS)})")
        return replace(presets[name], **overrides)


@dataclass
class AugmentResult:
    """Augmented views, label and instance map; ``params`` records what was drawn."""

    inputs: Tensors
    label: torch.Tensor | None
    instances: torch.Tensor | None
    params: dict[str, torch.Tensor]

    @property
    def image(self) -> torch.Tensor:
        """The first view."""
        return self.inputs[0]


class Augmenter:
    """Apply an :class:`AugmentConfig` to a batch: ``aug(inputs, label)``.

    ``inputs``: a tensor ``(N, 3, H, W)`` or a list of them (one per view); ``label``:
    ``(N, H, W)`` integer map or None; ``elastic_mask``: (N,) bool of samples to deform
    elastically (ho2021 class-balancing copies, ``batch["meta"]["elastic"]``); ``extents``: the
    views' physical sides relative to the label (``TileDataset.view_extents``).
    """

    def __init__(self, config: AugmentConfig | None = None, *, seed: int | None = None) -> None:
        import torch

        self.config = config or AugmentConfig()
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def _apply_mask(self, n: int) -> torch.Tensor:
        return _rand(n, self.generator) < self.config.p

    def _uniform(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * _rand(n, self.generator)

    def __call__(
        self,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        label: torch.Tensor | None = None,
        *,
        instances: torch.Tensor | None = None,
        elastic_mask: torch.Tensor | None = None,
        extents: Sequence[float] | None = None,
    ) -> AugmentResult:
        import torch

        cfg = self.config
        views = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        n = views[0].shape[0]
        gen = self.generator
        params: dict[str, torch.Tensor] = {}

        # ho2021 elastic deformation: class-balancing copies, or every sample.
        emask = torch.zeros(n, dtype=torch.bool) if elastic_mask is None \
            else torch.as_tensor(elastic_mask, dtype=torch.bool).cpu().view(-1)
        if cfg.elastic:
            emask = emask | self._apply_mask(n)
        params["elastic"] = emask
        if bool(emask.any()):
            idx = torch.nonzero(emask).flatten()
            sub = [v[idx.to(v.device)] for v in views]
            sl = None if label is None else label[idx.to(label.device)]
            si = None if instances is None else instances[idx.to(instances.device)]
            disp = torch.randn(len(idx), 2, cfg.elastic_grid, cfg.elastic_grid,
                               generator=gen) * cfg.elastic_sigma
            dv, dl, di = elastic_deform(sub, sl, extents=extents, grid=cfg.elastic_grid,
                                        displacement=disp, instances=si)
            views = [v.index_copy(0, idx.to(v.device), d) for v, d in zip(views, dv,
                                                                            strict=True)]
            if label is not None and dl is not None:
                label = label.index_copy(0, idx.to(label.device), dl)
            if instances is not None and di is not None:
                instances = instances.index_copy(0, idx.to(instances.device), di)

        # Rotation: khalil2022 draws multiples of 5°; whole quarter turns are done exactly.
        angle = torch.zeros(n, dtype=torch.float64)
        if cfg.rot90:
            angle += 90.0 * torch.randint(0, 4, (n,), generator=gen)
        if cfg.rotation_step_deg is not None:
            if cfg.rotation_step_deg > 0:
                steps = max(1, round(90.0 / cfg.rotation_step_deg))
                fine = cfg.rotation_step_deg * torch.randint(0, steps, (n,), generator=gen)
            else:
                fine = 90.0 * _rand(n, gen).double()
            angle += torch.where(self._apply_mask(n), fine.double(), torch.zeros(n).double())
        params["angle"] = angle
        k = torch.div(angle, 90.0, rounding_mode="floor").long()
        rest = angle - 90.0 * k
        views = [rotate90(v, k) for v in views]
        label = None if label is None else rotate90(label, k)
        instances = None if instances is None else rotate90(instances, k)
        scale = torch.ones(n, dtype=torch.float64)
        if cfg.zoom is not None:
            z = self._uniform(n, *cfg.zoom).double()
            scale = torch.where(self._apply_mask(n), z, scale)
        shear = torch.zeros(n, dtype=torch.float64)
        if cfg.shear_deg:
            sh = self._uniform(n, -cfg.shear_deg, cfg.shear_deg).double()
            shear = torch.where(self._apply_mask(n), sh, shear)
        params["scale"], params["shear"] = scale, shear
        need = (rest.abs() > 1e-9) | ((scale - 1).abs() > 1e-12) | (shear.abs() > 1e-12)
        if bool(need.any()):
            idx = torch.nonzero(need).flatten()
            sub = [v[idx.to(v.device)] for v in views]
            sl = None if label is None else label[idx.to(label.device)]
            si = None if instances is None else instances[idx.to(instances.device)]
            av, al, ai = affine(sub, sl, rest[idx], scale=scale[idx], shear_deg=shear[idx],
                                ignore_index=cfg.ignore_index, fill=cfg.fill, instances=si)
            views = [v.index_copy(0, idx.to(v.device), a) for v, a in zip(views, av, strict=True)]
            if label is not None and al is not None:
                label = label.index_copy(0, idx.to(label.device), al)
            if instances is not None and ai is not None:
                instances = instances.index_copy(0, idx.to(instances.device), ai)

        # Flips (khalil2022: "mirror-flipping it along the horizontal and vertical axes").
        for name, enabled, dim in (("hflip", cfg.hflip, -1), ("vflip", cfg.vflip, -2)):
            mask = (_rand(n, gen) < 0.5) if enabled else torch.zeros(n, dtype=torch.bool)
            params[name] = mask
            views = [flip(v, mask, dim) for v in views]
            label = None if label is None else flip(label, mask, dim)
            instances = None if instances is None else flip(instances, mask, dim)

        # Colour: the same draw for every view of a sample.
        def factor(rng: float) -> torch.Tensor:
            f = self._uniform(n, 1 - rng, 1 + rng)
            return torch.where(self._apply_mask(n), f, torch.ones(n))

        if cfg.brightness:
            f = factor(cfg.brightness)
            params["brightness"] = f
            views = [adjust_brightness(v, f) for v in views]
        if cfg.contrast:
            f = factor(cfg.contrast)
            params["contrast"] = f
            views = [adjust_contrast(v, f) for v in views]
        if cfg.saturation:
            f = factor(cfg.saturation)
            params["saturation"] = f
            views = [adjust_saturation(v, f) for v in views]
        if cfg.hue:
            s = torch.where(self._apply_mask(n), self._uniform(n, -cfg.hue, cfg.hue),
                            torch.zeros(n))
            params["hue"] = s
            views = [adjust_hue(v, s) for v in views]
        if cfg.hsv_shift:
            r = cfg.hsv_shift / 255.0
            s3 = (torch.rand(n, 3, generator=gen) * 2 - 1) * r
            s3 = torch.where(self._apply_mask(n).view(-1, 1), s3, torch.zeros_like(s3))
            params["hsv_shift"] = s3
            views = [hsv_shift(v, s3) for v in views]
        if cfg.stain_sigma is not None:
            from qpseg.data.stain import macenko_augment

            mask = self._apply_mask(n)
            s1, s2 = cfg.stain_sigma
            # StainTools: alpha ~ U(1 - σ1, 1 + σ1), beta ~ U(-σ2, σ2) per stain; one draw per
            # sample, shared by its views.
            alpha = 1 + (torch.rand(n, 2, generator=gen) * 2 - 1) * s1
            beta = (torch.rand(n, 2, generator=gen) * 2 - 1) * s2
            params["stain"], params["stain_alpha"], params["stain_beta"] = mask, alpha, beta
            views = [macenko_augment(v, alpha=alpha, beta=beta, mask=mask) for v in views]
        if cfg.mean is not None and cfg.std is not None:
            views = [normalize(v, cfg.mean, cfg.std) for v in views]
        return AugmentResult(views, label, instances, params)
