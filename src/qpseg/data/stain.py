"""Stain matrices and colour normalisation: Macenko (2009), Reinhard (2001), stain augmentation.

* :func:`macenko_stain_matrix`: Macenko et al., "A method for normalizing histology slides for
  quantitative analysis", ISBI 2009: convert to optical density (OD), drop transparent pixels
  (OD below β = 0.15 in every channel; dropping pixels below β in *any* channel, as some ports
  do, also drops pure eosin, whose red OD is small, and biases the eosin vector), project onto
  the plane of the two largest eigenvectors of the OD
  covariance, take the angles at the α = 1st and 99th percentiles as the two stain vectors;
  haematoxylin is the one with the larger red OD (row 0), eosin row 1.
* :class:`MacenkoNormalizer`: concentrations by least squares, scaled so their 99th percentiles
  match the target's, recomposed with the target's stain matrix.
* :class:`VahadaneNormalizer`: Vahadane et al., "Structure-preserving color normalization and
  sparse stain separation for histological images", IEEE TMI 35:1962 (2016), the normalisation
  of lagree2021 (Methods, ref. 39), as StainTools implements it (Peter554/StainTools,
  ``staintools/stain_extraction/vahadane_stain_extractor.py`` and
  ``staintools/stain_normalizer.py``): tissue = CIE L* below 80 % (StainTools'
  ``LuminosityThresholdTissueLocator``, threshold 0.8), sparse non-negative matrix
  factorisation of the tissue's optical density ``OD ≈ C · W`` (two unit-norm, non-negative
  stain rows ``W``, non-negative concentrations ``C``, an L1 penalty λ = 0.1 on ``C``: spams
  ``trainDL(K=2, lambda1=0.1, mode=2, modeD=0, posAlpha=True, posD=True)``), then
  concentrations of every pixel by a non-negative lasso with λ = 0.01 (spams ``lasso(mode=2,
  lambda1=0.01, pos=True)``), scaled so their 99th percentiles match the target's and
  recomposed with the target's stains. spams is replaced by exact numpy code: with two stains
  the non-negative lasso of a pixel has a closed form (the best of the four active sets), and
  the dictionary step is block-coordinate descent with projection onto the non-negative unit
  ball (Mairal et al., JMLR 2010, the algorithm spams runs).
* :class:`ReinhardNormalizer`: Reinhard et al., "Color transfer between images", IEEE CG&A 2001:
  match the per-channel mean and standard deviation in Ruderman's lαβ space.
* :func:`macenko_augment`: pedersen2022 §3.4 (StainTools, σ1 = σ2 = 0.1): per image, every
  stain concentration becomes ``alpha * C + beta`` with ``alpha ~ U(1 - σ1, 1 + σ1)`` and
  ``beta ~ U(-σ2, σ2)``, on tissue pixels only (the OD residual outside the stain plane is
  kept, so ``alpha = 1, beta = 0`` changes nothing).

The core is torch (so augmentation runs on the GPU with the batch); the numpy entry points take
and return ``uint8`` RGB arrays. :data:`RUIFROK_HE` are Ruifrok & Johnston's (Anal. Quant.
Cytol. Histol. 2001) H&E OD vectors, the usual reference stain matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qpseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MACENKO_ALPHA",
    "MACENKO_BETA",
    "NORMALIZERS",
    "RUIFROK_DAB",
    "RUIFROK_HE",
    "VAHADANE_LAMBDA",
    "VAHADANE_LASSO_LAMBDA",
    "VAHADANE_LUMINOSITY",
    "MacenkoNormalizer",
    "ReinhardNormalizer",
    "StainError",
    "VahadaneNormalizer",
    "concentrations",
    "fit_normalizer",
    "lab_to_rgb",
    "luminosity",
    "macenko_augment",
    "macenko_stain_matrix",
    "normalizer_from_json",
    "od_to_rgb",
    "rgb_to_lab",
    "rgb_to_od",
    "vahadane_concentrations",
    "vahadane_stain_matrix",
]

#: Ruifrok & Johnston 2001, haematoxylin and eosin OD vectors (unit length), H first.
RUIFROK_HE = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]], dtype=np.float64)
RUIFROK_HE = RUIFROK_HE / np.linalg.norm(RUIFROK_HE, axis=1, keepdims=True)
#: Ruifrok & Johnston 2001, DAB.
RUIFROK_DAB = np.array([0.268, 0.570, 0.776]) / np.linalg.norm([0.268, 0.570, 0.776])
#: Macenko 2009: OD threshold for transparent pixels and the angle percentile.
MACENKO_BETA = 0.15
MACENKO_ALPHA = 1.0
# Fewest tissue pixels a stain matrix is estimated from.
_MIN_PIXELS = 16
#: Vahadane 2016 as StainTools runs it: dictionary-learning L1 penalty, the concentrations'
#: lasso penalty, and the luminosity (CIE L* / 100) below which a pixel is tissue.
VAHADANE_LAMBDA = 0.1
VAHADANE_LASSO_LAMBDA = 0.01
VAHADANE_LUMINOSITY = 0.8
# Dictionary learning: alternations, and the most tissue pixels a stain matrix is learnt from
# (an even, deterministic subsample beyond; the stains of a tile need far fewer).
# Measured on generated 256 px tiles: 8,192 pixels give the same atoms (within 0.1°) as all
# 65,536 in 0.4 of the time; the tile's concentrations still use every pixel.
_VAHADANE_ITERATIONS = 100
_VAHADANE_MAX_PIXELS = 1 << 13
# Concentration percentile used to scale (Macenko 2009: "robust maximum", the 99th).
_MAX_C_PERCENTILE = 99.0


class StainError(ConfigError):
    """A stain matrix cannot be estimated (e.g. an image with too little tissue)."""


# ---------------------------------------------------------------------- OD conversions
def rgb_to_od(rgb: Any) -> Any:
    """Optical density ``-ln((I + 1) / 256)`` of 8-bit intensities (numpy or torch, any shape);
    a torch float input in [0, 1] is taken as ``I / 255``."""
    try:
        import torch

        if isinstance(rgb, torch.Tensor):
            i = rgb * 255.0 if rgb.is_floating_point() else rgb.double()
            return -torch.log((i + 1.0) / 256.0)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / 256.0)


def od_to_rgb(od: Any) -> Any:
    """Inverse of :func:`rgb_to_od`: numpy -> uint8 intensities, torch -> floats in [0, 1]."""
    try:
        import torch

        if isinstance(od, torch.Tensor):
            return ((256.0 * torch.exp(-od) - 1.0) / 255.0).clamp(0, 1)
    except ImportError:  # pragma: no cover
        pass
    i = 256.0 * np.exp(-np.asarray(od, dtype=np.float64)) - 1.0
    return np.clip(np.rint(i), 0, 255).astype(np.uint8)


def _pixels(rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.ndim < 2 or arr.shape[-1] != 3:
        raise ConfigError(f"expected RGB pixels (..., 3), got shape {arr.shape}")
    return arr.reshape(-1, 3)


# -------------------------------------------------------------------------- torch core
def _stain_matrix_t(od: torch.Tensor, beta: float, alpha: float) -> torch.Tensor | None:
    """(P, 3) OD pixels -> (2, 3) unit stain vectors (H first), or None if too few pixels."""
    import torch

    keep = (od >= beta).any(dim=1)
    odh = od[keep].double()
    if odh.shape[0] < _MIN_PIXELS:
        return None
    centred = odh - odh.mean(0, keepdim=True)
    cov = centred.T @ centred / max(1, odh.shape[0] - 1)
    _, vecs = torch.linalg.eigh(cov)
    plane = vecs[:, 1:3].flip(1)  # the two largest, largest first
    if float(plane[:, 0].sum()) < 0:  # data must project to positive first component
        plane[:, 0] = -plane[:, 0]
    proj = odh @ plane
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    lo = torch.quantile(phi, alpha / 100.0)
    hi = torch.quantile(phi, 1 - alpha / 100.0)
    v_lo = plane @ torch.stack([torch.cos(lo), torch.sin(lo)])
    v_hi = plane @ torch.stack([torch.cos(hi), torch.sin(hi)])
    he = torch.stack([v_lo, v_hi]) if v_lo[0] > v_hi[0] else torch.stack([v_hi, v_lo])
    he = he / he.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if not bool(torch.isfinite(he).all()):
        return None
    return he


def _concentrations_t(od: torch.Tensor, he: torch.Tensor) -> torch.Tensor:
    """Least-squares stain concentrations (P, 2) of OD pixels (P, 3)."""
    import torch

    return od.double() @ torch.linalg.pinv(he.double())


def macenko_augment(
    images: torch.Tensor,
    *,
    sigma1: float = 0.1,
    sigma2: float = 0.1,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    od_threshold: float = MACENKO_BETA,
) -> torch.Tensor:
    """Macenko stain augmentation of ``(N, 3, H, W)`` images in [0, 1] (pedersen2022 §3.4).

    Per image: estimate its stain matrix, decompose tissue pixels (OD >= ``od_threshold`` in
    some channel) into concentrations, replace them by ``alpha * C + beta`` (not below 0) and
    recompose. ``alpha``/``beta`` ``(N, 2)`` default to draws from U(1 ± σ1) and U(±σ2).
    ``mask`` (N,) selects the images to change; images whose stain matrix cannot be estimated
    are returned unchanged.
    """
    import torch

    n = images.shape[0]
    if alpha is None:
        alpha = 1 + (torch.rand(n, 2, generator=generator) * 2 - 1) * sigma1
    if beta is None:
        beta = (torch.rand(n, 2, generator=generator) * 2 - 1) * sigma2
    sel = torch.ones(n, dtype=torch.bool) if mask is None else mask.cpu().bool()
    out = images.clone()
    for i in torch.nonzero(sel).flatten().tolist():
        img = images[i]
        od = rgb_to_od(img.clamp(0, 1)).permute(1, 2, 0).reshape(-1, 3)
        he = _stain_matrix_t(od, od_threshold, MACENKO_ALPHA)
        if he is None:
            continue
        tissue = (od >= od_threshold).any(dim=1)
        c = _concentrations_t(od[tissue], he)
        a = alpha[i].to(device=c.device, dtype=c.dtype)
        b = beta[i].to(device=c.device, dtype=c.dtype)
        # Concentrations do not go below zero (least squares gives slightly negative ones;
        # those are left as they are).
        changed = torch.maximum(c * a + b, c.clamp_max(0))
        new_od = od.double().clone()
        # Add the change only, so what the two stains do not explain (noise, a third stain)
        # is kept and alpha = 1, beta = 0 is exactly the identity.
        new_od[tissue] = new_od[tissue] + (changed - c) @ he
        rgb = od_to_rgb(new_od).reshape(img.shape[1], img.shape[2], 3).permute(2, 0, 1)
        out[i] = rgb.to(images.dtype)
    return out


# ------------------------------------------------------------------------ numpy entry points
def macenko_stain_matrix(rgb: np.ndarray, *, beta: float = MACENKO_BETA,
                         alpha: float = MACENKO_ALPHA) -> np.ndarray:
    """Macenko stain matrix ``(2, 3)`` (unit rows, haematoxylin first) of uint8 RGB pixels.

    Raises :class:`StainError` when fewer than 16 pixels have OD >= ``beta`` in some channel.
    """
    import torch

    od = torch.from_numpy(rgb_to_od(_pixels(rgb)))
    he = _stain_matrix_t(od, beta, alpha)
    if he is None:
        raise StainError("too little stained tissue to estimate a stain matrix")
    result: np.ndarray = he.numpy()
    return result


def concentrations(rgb: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Least-squares concentrations ``(P, 2)`` of uint8 RGB pixels for a ``(2, 3)`` matrix."""
    od = rgb_to_od(_pixels(rgb))
    result: np.ndarray = od @ np.linalg.pinv(np.asarray(stain_matrix, dtype=np.float64))
    return result


@dataclass
class MacenkoNormalizer:
    """Macenko normalisation to a target: ``fit(target)`` then ``transform(image)`` (uint8)."""

    stain_matrix: np.ndarray | None = None
    max_concentrations: np.ndarray | None = None
    beta: float = MACENKO_BETA
    alpha: float = MACENKO_ALPHA

    def fit(self, target: np.ndarray) -> MacenkoNormalizer:
        """Learn the target's stain matrix and robust maximum concentrations."""
        he = macenko_stain_matrix(target, beta=self.beta, alpha=self.alpha)
        c = concentrations(target, he)
        self.stain_matrix = he
        self.max_concentrations = np.percentile(c, _MAX_C_PERCENTILE, axis=0)
        return self

    def transform(self, image: np.ndarray) -> np.ndarray:
        """Normalise a uint8 RGB image ``(H, W, 3)``; an image with too little tissue to
        estimate its stains is returned unchanged."""
        if self.stain_matrix is None or self.max_concentrations is None:
            raise ConfigError("MacenkoNormalizer.transform called before fit")
        arr = np.asarray(image)
        try:
            he = macenko_stain_matrix(arr, beta=self.beta, alpha=self.alpha)
        except StainError:
            return arr.astype(np.uint8, copy=True)
        c = concentrations(arr, he)
        max_c = np.percentile(c, _MAX_C_PERCENTILE, axis=0)
        scale = np.divide(self.max_concentrations, max_c, out=np.ones(2), where=max_c > 1e-9)
        od = (c * scale) @ self.stain_matrix
        out: np.ndarray = od_to_rgb(od).reshape(arr.shape)
        return out

    __call__ = transform

    def to_json(self) -> dict[str, Any]:
        """JSON form (stored in a model package)."""
        if self.stain_matrix is None or self.max_concentrations is None:
            raise ConfigError("MacenkoNormalizer is not fitted")
        return {"method": "macenko", "stain_matrix": self.stain_matrix.tolist(),
                "max_concentrations": self.max_concentrations.tolist(),
                "beta": self.beta, "alpha": self.alpha}

    @classmethod
    def from_json(cls, data: Any) -> MacenkoNormalizer:
        """Inverse of :meth:`to_json`; raises ConfigError when malformed."""
        try:
            he = np.asarray(data["stain_matrix"], dtype=np.float64)
            mc = np.asarray(data["max_concentrations"], dtype=np.float64)
            if he.shape != (2, 3) or mc.shape != (2,) or not np.isfinite(he).all() \
                    or not np.isfinite(mc).all():
                raise ValueError("wrong shapes")
            return cls(he, mc, float(data.get("beta", MACENKO_BETA)),
                       float(data.get("alpha", MACENKO_ALPHA)))
        except (TypeError, KeyError, ValueError) as exc:
            raise ConfigError(f"malformed Macenko normaliser: {exc}") from None


# ------------------------------------------------------------------------------ Vahadane
def luminosity(rgb: np.ndarray) -> np.ndarray:
    """CIE L* / 100 of uint8 sRGB pixels ``(..., 3)`` (D65; what OpenCV's ``RGB2LAB`` gives as
    ``L / 255`` for 8-bit images, which StainTools' tissue mask thresholds)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    y = lin @ np.array([0.212671, 0.715160, 0.072169])
    f = np.where(y > 0.008856, np.cbrt(y), 7.787 * y + 16.0 / 116.0)
    result: np.ndarray = (116.0 * f - 16.0) / 100.0
    return result


def vahadane_concentrations(od: np.ndarray, stain_matrix: np.ndarray,
                            lam: float = VAHADANE_LASSO_LAMBDA) -> np.ndarray:
    """Non-negative lasso concentrations ``(P, 2)`` of OD pixels ``(P, 3)`` for a ``(2, 3)``
    stain matrix: ``argmin_{c >= 0} ½‖x - c W‖² + λ‖c‖₁`` per pixel (spams ``lasso`` with
    ``mode=2, pos=True``), solved exactly: with two stains the minimum lies on one of four
    faces (both stains, H only, E only, none); each face's minimiser is closed-form and the
    feasible one with the lowest objective is the global minimum of this convex problem."""
    x = np.asarray(od, dtype=np.float64).reshape(-1, 3)
    w = np.asarray(stain_matrix, dtype=np.float64)
    g = w @ w.T
    b = x @ w.T - lam  # (P, 2): the objective is -c·b + ½ c G cᵀ (+ const)

    def objective(c: np.ndarray) -> np.ndarray:
        out: np.ndarray = -(c * b).sum(1) + 0.5 * np.einsum("pi,ij,pj->p", c, g, c)
        return out

    cands = [np.zeros_like(b)]
    for k in (0, 1):
        c = np.zeros_like(b)
        if g[k, k] > 1e-12:
            c[:, k] = np.maximum(b[:, k], 0.0) / g[k, k]
        cands.append(c)
    det = float(np.linalg.det(g))
    if abs(det) > 1e-12:
        both = b @ np.linalg.inv(g)  # G is symmetric
        both = np.where((both >= 0).all(1, keepdims=True), both, 0.0)
        cands.append(both)
    objs = np.stack([objective(c) for c in cands], 1)
    best = objs.argmin(1)
    out: np.ndarray = np.stack(cands, 0)[best, np.arange(len(x))]
    return out


def _vahadane_tissue_od(rgb: np.ndarray, threshold: float) -> np.ndarray:
    px = _pixels(rgb)
    tissue = luminosity(px) < threshold
    od: np.ndarray = rgb_to_od(px[tissue])
    return od


def _initial_stains(od: np.ndarray) -> np.ndarray:
    """Two deterministic starting atoms: the mean OD directions of the pixels with the 1 %
    smallest and 1 % largest red share (the two ends of the stain mixture)."""
    norm = np.linalg.norm(od, axis=1)
    strong = od[norm >= np.median(norm)]
    dirs = strong / np.maximum(np.linalg.norm(strong, axis=1, keepdims=True), 1e-12)
    share = dirs[:, 0] / np.maximum(dirs.sum(1), 1e-12)
    lo, hi = np.percentile(share, [1.0, 99.0])
    atoms = np.stack([dirs[share >= hi].mean(0), dirs[share <= lo].mean(0)])
    atoms = np.maximum(atoms, 1e-3)
    result: np.ndarray = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    return result


def vahadane_stain_matrix(rgb: np.ndarray, *, lam: float = VAHADANE_LAMBDA,
                          luminosity_threshold: float = VAHADANE_LUMINOSITY,
                          iterations: int = _VAHADANE_ITERATIONS) -> np.ndarray:
    """Vahadane stain matrix ``(2, 3)`` (unit, non-negative rows, haematoxylin first) of uint8
    RGB pixels: sparse NMF of the tissue's optical density (see the module docstring).

    Alternates the exact non-negative lasso of every pixel (λ = ``lam``) with one block
    coordinate pass over the two atoms, each projected onto the non-negative unit ball
    (Mairal et al. 2010, Algorithm 2), until the atoms stop moving. Haematoxylin is the atom
    with the larger red OD (StainTools' order). Raises :class:`StainError` when fewer than 16
    pixels are tissue (L* below ``luminosity_threshold``).
    """
    od = _vahadane_tissue_od(rgb, luminosity_threshold)
    if od.shape[0] < _MIN_PIXELS:
        raise StainError("too little stained tissue to estimate a stain matrix")
    if od.shape[0] > _VAHADANE_MAX_PIXELS:
        od = od[np.linspace(0, od.shape[0] - 1, _VAHADANE_MAX_PIXELS).astype(np.int64)]
    w = _initial_stains(od)
    for _ in range(iterations):
        c = vahadane_concentrations(od, w, lam)
        a = c.T @ c  # (2, 2)
        bx = od.T @ c  # (3, 2)
        old = w.copy()
        for j in (0, 1):
            if a[j, j] <= 1e-12:  # an atom no pixel uses keeps its place
                continue
            u = (bx[:, j] - w.T @ a[:, j]) / a[j, j] + w[j]
            u = np.maximum(u, 0.0)
            w[j] = u / max(float(np.linalg.norm(u)), 1.0)
        if np.abs(w - old).max() < 1e-6:
            break
    if w[0, 0] < w[1, 0]:
        w = w[[1, 0]]
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    if not np.isfinite(w).all() or (norms < 1e-9).any():
        raise StainError("dictionary learning found no two stains")
    result: np.ndarray = w / norms
    return result


@dataclass
class VahadaneNormalizer:
    """Vahadane normalisation to a target (lagree2021): ``fit(target)`` then
    ``transform(image)`` (uint8), as StainTools' ``StainNormalizer('vahadane')``."""

    stain_matrix: np.ndarray | None = None
    max_concentrations: np.ndarray | None = None
    lam: float = VAHADANE_LAMBDA
    lasso_lam: float = VAHADANE_LASSO_LAMBDA
    luminosity_threshold: float = VAHADANE_LUMINOSITY

    def _stains(self, rgb: np.ndarray) -> np.ndarray:
        return vahadane_stain_matrix(rgb, lam=self.lam,
                                     luminosity_threshold=self.luminosity_threshold)

    def fit(self, target: np.ndarray) -> VahadaneNormalizer:
        """Learn the target's stain matrix and 99th-percentile concentrations."""
        w = self._stains(target)
        c = vahadane_concentrations(rgb_to_od(_pixels(target)), w, self.lasso_lam)
        self.stain_matrix = w
        self.max_concentrations = np.percentile(c, _MAX_C_PERCENTILE, axis=0)
        return self

    def transform(self, image: np.ndarray) -> np.ndarray:
        """Normalise a uint8 RGB image ``(H, W, 3)``; an image with too little tissue to
        estimate its stains is returned unchanged."""
        if self.stain_matrix is None or self.max_concentrations is None:
            raise ConfigError("VahadaneNormalizer.transform called before fit")
        arr = np.asarray(image)
        try:
            w = self._stains(arr)
        except StainError:
            return arr.astype(np.uint8, copy=True)
        c = vahadane_concentrations(rgb_to_od(_pixels(arr)), w, self.lasso_lam)
        max_c = np.percentile(c, _MAX_C_PERCENTILE, axis=0)
        scale = np.divide(self.max_concentrations, max_c, out=np.ones(2), where=max_c > 1e-9)
        out: np.ndarray = od_to_rgb((c * scale) @ self.stain_matrix).reshape(arr.shape)
        return out

    __call__ = transform

    def to_json(self) -> dict[str, Any]:
        """JSON form (stored in a model package): plain floats."""
        if self.stain_matrix is None or self.max_concentrations is None:
            raise ConfigError("VahadaneNormalizer is not fitted")
        return {"method": "vahadane", "stain_matrix": self.stain_matrix.tolist(),
                "max_concentrations": self.max_concentrations.tolist(), "lambda": self.lam,
                "lasso_lambda": self.lasso_lam,
                "luminosity_threshold": self.luminosity_threshold}

    @classmethod
    def from_json(cls, data: Any) -> VahadaneNormalizer:
        """Inverse of :meth:`to_json`; raises ConfigError when malformed."""
        try:
            w = np.asarray(data["stain_matrix"], dtype=np.float64)
            mc = np.asarray(data["max_concentrations"], dtype=np.float64)
            lam = float(data.get("lambda", VAHADANE_LAMBDA))
            lasso = float(data.get("lasso_lambda", VAHADANE_LASSO_LAMBDA))
            lum = float(data.get("luminosity_threshold", VAHADANE_LUMINOSITY))
            if w.shape != (2, 3) or mc.shape != (2,) or not np.isfinite(w).all() \
                    or not np.isfinite(mc).all() or (w < 0).any() or (mc < 0).any() \
                    or not all(math.isfinite(v) and v >= 0 for v in (lam, lasso, lum)):
                raise ValueError("wrong shapes or values")
            return cls(w, mc, lam, lasso, lum)
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ConfigError(f"malformed Vahadane normaliser: {exc}") from None


# Reinhard 2001: RGB -> LMS, then log10, then the decorrelating lαβ transform.
_RGB2LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782],
                     [0.0241, 0.1288, 0.8444]])
_LMS2LAB = np.diag([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)]) @ np.array(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]], dtype=np.float64)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(..., 3)`` -> Reinhard's lαβ (intensities ``(I + 1) / 256`` avoid log 0)."""
    f = (np.asarray(rgb, dtype=np.float64) + 1.0) / 256.0
    lms = np.maximum(f @ _RGB2LMS.T, 1e-6)
    result: np.ndarray = np.log10(lms) @ _LMS2LAB.T
    return result


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab` (rounded and clipped to uint8)."""
    lms = 10.0 ** (np.asarray(lab, dtype=np.float64) @ np.linalg.inv(_LMS2LAB).T)
    f = lms @ np.linalg.inv(_RGB2LMS).T
    return np.clip(np.rint(f * 256.0 - 1.0), 0, 255).astype(np.uint8)


@dataclass
class ReinhardNormalizer:
    """Reinhard colour transfer: match lαβ channel means and standard deviations (uint8)."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def fit(self, target: np.ndarray) -> ReinhardNormalizer:
        """Learn the target's lαβ statistics."""
        lab = rgb_to_lab(_pixels(target))
        self.mean, self.std = lab.mean(0), lab.std(0)
        return self

    def transform(self, image: np.ndarray) -> np.ndarray:
        """Normalise a uint8 RGB image ``(H, W, 3)``."""
        if self.mean is None or self.std is None:
            raise ConfigError("ReinhardNormalizer.transform called before fit")
        arr = np.asarray(image)
        lab = rgb_to_lab(_pixels(arr))
        mu, sd = lab.mean(0), lab.std(0)
        scale = np.divide(self.std, sd, out=np.ones(3), where=sd > 1e-9)
        out: np.ndarray = lab_to_rgb((lab - mu) * scale + self.mean).reshape(arr.shape)
        return out

    __call__ = transform

    def to_json(self) -> dict[str, Any]:
        """JSON form (stored in a model package)."""
        if self.mean is None or self.std is None:
            raise ConfigError("ReinhardNormalizer is not fitted")
        return {"method": "reinhard", "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_json(cls, data: Any) -> ReinhardNormalizer:
        """Inverse of :meth:`to_json`; raises ConfigError when malformed."""
        try:
            mean = np.asarray(data["mean"], dtype=np.float64)
            std = np.asarray(data["std"], dtype=np.float64)
            if mean.shape != (3,) or std.shape != (3,) or not np.isfinite(mean).all() \
                    or not np.isfinite(std).all() or (std < 0).any():
                raise ValueError("wrong shapes")
            return cls(mean, std)
        except (TypeError, KeyError, ValueError) as exc:
            raise ConfigError(f"malformed Reinhard normaliser: {exc}") from None


#: Colour normalisations by name (``data.stain_normalization``; ``method`` in their JSON).
NORMALIZERS: dict[str, Any] = {"macenko": MacenkoNormalizer, "reinhard": ReinhardNormalizer,
                               "vahadane": VahadaneNormalizer}


def fit_normalizer(method: str, target: np.ndarray) -> Any:
    """A normaliser of ``method`` (macenko | reinhard | vahadane) fitted on ``target``."""
    if method not in NORMALIZERS:
        raise ConfigError(f"unknown stain normalisation {method!r} (choose from "
                          f"{', '.join(NORMALIZERS)})")
    return NORMALIZERS[method]().fit(target)


def normalizer_from_json(data: Any) -> Any:
    """The fitted normaliser a model package stores (``{"method": ..., ...}``); ConfigError
    when the method is unknown or the values are malformed."""
    method = data.get("method") if isinstance(data, dict) else None
    if method not in NORMALIZERS:
        raise ConfigError(f"unknown stain normalisation {method!r} (choose from "
                          f"{', '.join(NORMALIZERS)})")
    return NORMALIZERS[method].from_json(data)
