"""Training losses of the four papers, ignore-aware (unlabelled pixels carry no gradient).

* :func:`cross_entropy`: pixel (``(N, C, H, W)``) or patch (``(N, C)``) cross-entropy with class
  weights, optional per-pixel weights and four normalisations (``reduction``):

  - ``"mean"``: ``Σ w·ce / Σ w`` over labelled pixels (torch's weighted mean);
  - ``"labelled"``: ``Σ w·ce / #labelled``, the per-pixel mean of the weighted loss (what a
    Keras weighted loss computes; lagree2021);
  - ``"pixels"``: ``Σ w·ce / N`` with N all pixels of the batch, ignored ones included: ho2021
    §2.5 eq. (1), ``-1/N Σ_p Σ_c w_c t_c log p_c`` where "unlabeled pixels do not contribute";
  - ``"sum"``: the unnormalised sum of Caffe's FCN, which khalil2022 §3.5's learning rate of
    1e-10 presupposes (Shelhamer et al. 2017 train FCN-32s with an unnormalised loss).

* :func:`soft_dice`: soft Dice coefficient (Milletari's squared denominator by default, as
  lagree2021 eq. (3)), per class and averaged (``"macro"``) or pooled over classes
  (``"global"``, eq. (3) as written). :func:`soft_dice_loss` is ``1 - soft_dice``.
* :func:`unet_weight_map`: Ronneberger et al. (2015) border weights that lagree2021 eq. (2)
  uses, ``w(x) = w_c(x) + w0 · exp(-(d1(x) + d2(x))² / 2σ²)`` with ``w0 = 10``, ``σ = 5`` px.
* :func:`lagree_loss`: lagree2021 eq. (1), ``L = L_WCE + (1 - L_Dice)``.
* :func:`instance_loss`: the sum of a torchvision detection model's losses (Mask R-CNN).
* :class:`LossSpec` / :func:`build_loss`: one callable ``loss(output, batch)`` per config.

Every function takes ``ignore_index`` (255): those target pixels contribute neither loss nor
gradient. torch is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError
from qpseg.labels import IGNORE_INDEX

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "LOSSES",
    "REDUCTIONS",
    "UNET_SIGMA",
    "UNET_W0",
    "LossSpec",
    "build_loss",
    "cross_entropy",
    "instance_loss",
    "lagree_loss",
    "soft_dice",
    "soft_dice_loss",
    "tile_class_balance_weights",
    "unet_weight_map",
]

#: Ronneberger et al. 2015 (the U-Net paper lagree2021 cites for its weighted map): "we set
#: w0 = 10 and σ ≈ 5 pixels".
UNET_W0 = 10.0
UNET_SIGMA = 5.0
REDUCTIONS: tuple[str, ...] = ("mean", "labelled", "pixels", "sum")
LOSSES: tuple[str, ...] = ("ce", "dice", "ce+dice", "lagree2021", "cwce", "instance")


def _valid_mask(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return target != ignore_index


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | Sequence[float] | None = None,
    pixel_weights: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (``(N, C, ...)``) against class indices ``target``
    (``(N, ...)``); ``weight`` per class, ``pixel_weights`` per target element (same shape as
    ``target``). See the module docstring for ``reduction``. A batch without a labelled pixel
    gives a zero loss that still depends on ``logits`` (so backward works)."""
    import torch

    if reduction not in REDUCTIONS:
        raise ConfigError(f"loss reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.dim() != target.dim() + 1 or logits.shape[0] != target.shape[0] \
            or logits.shape[2:] != target.shape[1:]:
        raise ConfigError(f"logits {tuple(logits.shape)} do not match target "
                          f"{tuple(target.shape)}")
    valid = _valid_mask(target, ignore_index)
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    if bool((safe >= logits.shape[1]).any()) or bool((safe < 0).any()):
        bad = int(safe[(safe >= logits.shape[1]) | (safe < 0)][0])
        raise ConfigError(f"target holds class {bad}, but the model has {logits.shape[1]} "
                          "outputs")
    # Zero the logits of ignored elements first: nothing there (not even NaN) reaches the
    # loss, and where() passes them an exact zero gradient.
    x = torch.where(valid.unsqueeze(1), logits.float(), torch.zeros((), device=logits.device))
    logp = torch.log_softmax(x, dim=1)
    nll = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    w = valid.to(nll.dtype)
    if weight is not None:
        wt = torch.as_tensor(weight, dtype=nll.dtype, device=nll.device)
        w = w * wt[safe]
    if pixel_weights is not None:
        w = w * pixel_weights.to(device=nll.device, dtype=nll.dtype)
    # where() rather than a product: a NaN/inf logit at an ignored pixel must not leak.
    total = torch.where(valid, w * nll, torch.zeros_like(nll)).sum()
    if reduction == "sum":
        return total
    if reduction == "pixels":
        return total / max(1, target.numel())
    if reduction == "labelled":
        return total / valid.sum().clamp(min=1)
    return total / w.sum().clamp(min=torch.finfo(nll.dtype).tiny)


def soft_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    squared: bool = True,
    mode: str = "macro",
    classes: Sequence[int] | None = None,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Soft Dice coefficient of softmax(``logits``) against one-hot ``target``, over labelled
    pixels only. ``squared``: denominator ``Σp² + Σg²`` (lagree2021 eq. 3; Milletari et al.),
    else ``Σp + Σg``. ``mode="macro"`` averages the per-class coefficients of ``classes``
    (default all) present in the target or prediction; ``"global"`` pools every class into
    one ratio (eq. 3 as written). ``smooth`` keeps empty classes finite."""
    import torch

    if mode not in ("macro", "global"):
        raise ConfigError(f"dice mode must be 'macro' or 'global', got {mode!r}")
    n_classes = logits.shape[1]
    valid = _valid_mask(target, ignore_index)
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    x = torch.where(valid.unsqueeze(1), logits.float(), torch.zeros((), device=logits.device))
    prob = torch.softmax(x, dim=1)
    onehot = torch.nn.functional.one_hot(safe, n_classes).movedim(-1, 1).to(prob.dtype)
    m = valid.unsqueeze(1)
    prob = torch.where(m, prob, torch.zeros_like(prob))
    onehot = torch.where(m, onehot, torch.zeros_like(onehot))
    dims = [0, *range(2, prob.dim())]
    inter = (prob * onehot).sum(dims)
    if squared:
        denom = (prob * prob).sum(dims) + (onehot * onehot).sum(dims)
    else:
        denom = prob.sum(dims) + onehot.sum(dims)
    idx = list(range(n_classes)) if classes is None else [int(c) for c in classes]
    if mode == "global":
        return (2 * inter[idx].sum() + smooth) / (denom[idx].sum() + smooth)
    dice = (2 * inter[idx] + smooth) / (denom[idx] + smooth)
    # Classes absent from target and prediction give 1 and would dilute the mean.
    present = onehot[:, idx].sum(dims) > 0
    if bool(present.any()):
        return dice[present].mean()
    return dice.mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``1 - soft_dice(logits, target, **kwargs)``."""
    return 1.0 - soft_dice(logits, target, **kwargs)


def tile_class_balance_weights(label: np.ndarray, n_classes: int,
                               ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Per-class weights of one tile that balance its class frequencies (Ronneberger's
    ``w_c``): ``n_labelled / (K · n_c)`` for the ``K`` classes present, 1 for absent ones, so a
    tile with equal class areas gets 1 everywhere."""
    import numpy as np

    lab = np.asarray(label)
    valid = lab != ignore_index
    counts = np.bincount(lab[valid].astype(np.int64).ravel(), minlength=n_classes)[:n_classes]
    present = counts > 0
    w = np.ones(n_classes, dtype=np.float64)
    if present.any():
        w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def unet_weight_map(
    instances: np.ndarray,
    label: np.ndarray | None = None,
    *,
    class_weights: Sequence[float] | np.ndarray | None = None,
    n_classes: int | None = None,
    w0: float = UNET_W0,
    sigma: float = UNET_SIGMA,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Ronneberger's weight map ``w(x) = w_c(x) + w0 · exp(-(d1 + d2)² / 2σ²)`` (float32).

    ``instances``: ``(H, W)`` object ids (0 = background); ``d1``/``d2`` are the distances to
    the nearest and second-nearest object, and the border term applies to background pixels
    (those between objects), as in Ronneberger et al. 2015 and its common implementations; it
    needs at least two objects. ``label`` gives the class of every pixel for ``w_c`` (default:
    object pixels class 1, the rest 0); ``class_weights`` defaults to
    :func:`tile_class_balance_weights`. Ignored pixels get weight 0. Distances are computed in a
    window around each object (the border term is below 1e-6·w0 beyond it).
    """
    import numpy as np
    from scipy import ndimage as ndi

    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ConfigError(f"instance map must be 2-D, got shape {inst.shape}")
    if not (sigma > 0 and math.isfinite(sigma)) or not math.isfinite(w0):
        raise ConfigError(f"border weights need sigma > 0 and a finite w0, got {sigma}, {w0}")
    lab = (inst > 0).astype(np.int64) if label is None else np.asarray(label).astype(np.int64)
    if lab.shape != inst.shape:
        raise ConfigError(f"label {lab.shape} and instances {inst.shape} differ in shape")
    valid = lab != ignore_index
    k = int(n_classes if n_classes is not None else max(2, int(lab[valid].max(initial=0)) + 1))
    cw = (tile_class_balance_weights(lab, k, ignore_index) if class_weights is None
          else np.asarray(class_weights, dtype=np.float64))
    safe = np.where(valid, lab, 0).clip(0, len(cw) - 1)
    w = cw[safe].astype(np.float64)
    ids = np.unique(inst)
    ids = ids[ids != 0]
    if len(ids) >= 2 and w0 != 0:
        h, wd = inst.shape
        reach = math.ceil(sigma * math.sqrt(2 * math.log(1e6))) + 1  # exp term < 1e-6
        d1 = np.full(inst.shape, np.inf)
        d2 = np.full(inst.shape, np.inf)
        objs = ndi.find_objects(inst.astype(np.int64))
        for i in ids:
            sl = objs[int(i) - 1] if int(i) - 1 < len(objs) else None
            if sl is None:
                continue
            r0, r1 = max(0, sl[0].start - reach), min(h, sl[0].stop + reach)
            c0, c1 = max(0, sl[1].start - reach), min(wd, sl[1].stop + reach)
            dk = ndi.distance_transform_edt(inst[r0:r1, c0:c1] != i)
            a1, a2 = d1[r0:r1, c0:c1], d2[r0:r1, c0:c1]
            a2[:] = np.minimum(a2, np.maximum(a1, dk))
            a1[:] = np.minimum(a1, dk)
        border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
        w += np.where(inst == 0, border, 0.0)
    w[~valid] = 0.0
    return w.astype(np.float32)


def lagree_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight_map: torch.Tensor | None,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "labelled",
    dice_mode: str = "global",
    squared: bool = True,
) -> torch.Tensor:
    """lagree2021 eq. (1): weighted cross-entropy with the border ``weight_map`` (eq. 2) plus
    ``1 - `` soft Dice (eq. 3). Eq. (2) is a sum over pixels; normalised per labelled pixel
    here (``reduction="labelled"``), otherwise the Dice term would not count at all."""
    wce = cross_entropy(logits, target, pixel_weights=weight_map, ignore_index=ignore_index,
                        reduction=reduction)
    return wce + (1.0 - soft_dice(logits, target, ignore_index=ignore_index, mode=dice_mode,
                                  squared=squared))


def instance_loss(losses: Mapping[str, torch.Tensor],
                  weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """Sum of a detection model's loss dict (torchvision Mask R-CNN: classifier, box
    regression, mask, RPN objectness and box losses), optionally weighted per key."""
    if not losses:
        raise ConfigError("the instance model returned no losses (is it in train mode?)")
    total: torch.Tensor | None = None
    for key, value in losses.items():
        term = value * float((weights or {}).get(key, 1.0))
        total = term if total is None else total + term
    assert total is not None
    return total


@dataclass(frozen=True)
class LossSpec:
    """A configured loss: ``spec(output, target, weight_map=None, clusters=None)``.

    ``name``: ``ce``, ``dice``, ``ce+dice``, ``lagree2021``, ``cwce`` (pedersen2022 §2.4 for
    patch classifiers; needs ``clusters``) or ``instance``. ``class_weights`` are the CE class
    weights (None: unweighted).
    """

    name: str = "ce"
    class_weights: tuple[float, ...] | None = None
    reduction: str = "mean"
    ignore_index: int = IGNORE_INDEX
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    dice_mode: str = "macro"
    dice_squared: bool = True
    dice_classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ConfigError(f"unknown loss {self.name!r} (choose from {', '.join(LOSSES)})")
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"loss reduction must be one of {REDUCTIONS}, got "
                              f"{self.reduction!r}")
        if self.dice_mode not in ("macro", "global"):
            raise ConfigError(f"dice mode must be 'macro' or 'global', got {self.dice_mode!r}")

    @property
    def needs_weight_map(self) -> bool:
        """True for the lagree2021 loss (border weight maps)."""
        return self.name == "lagree2021"

    def __call__(self, output: Any, target: torch.Tensor, *,
                 weight_map: torch.Tensor | None = None,
                 clusters: torch.Tensor | None = None) -> torch.Tensor:
        if self.name == "instance":
            return instance_loss(output)
        dice_kw: dict[str, Any] = {"ignore_index": self.ignore_index, "mode": self.dice_mode,
                                   "squared": self.dice_squared, "classes": self.dice_classes}
        if self.name == "dice":
            return soft_dice_loss(output, target, **dice_kw)
        if self.name == "lagree2021":
            return lagree_loss(output, target, weight_map, ignore_index=self.ignore_index,
                               reduction=self.reduction, dice_mode=self.dice_mode,
                               squared=self.dice_squared)
        if self.name == "cwce":
            if clusters is None:
                raise ConfigError("the cluster-weighted loss needs cluster assignments")
            return _cwce(output, target, clusters, self.ignore_index, self.class_weights)
        ce = cross_entropy(output, target, weight=self.class_weights,
                           ignore_index=self.ignore_index, reduction=self.reduction)
        if self.name == "ce":
            return ce
        return self.ce_weight * ce + self.dice_weight * soft_dice_loss(output, target, **dice_kw)


def _cwce(logits: torch.Tensor, target: torch.Tensor, clusters: torch.Tensor, ignore_index: int,
          weight: Sequence[float] | None) -> torch.Tensor:
    """pedersen2022 §2.4 eq. (1) on the labelled samples of a batch (ignored ones dropped):
    the cross-entropy of each cluster in the batch, macro-averaged over the clusters."""
    import torch.nn.functional as F

    from qpseg.data.weights import cluster_weights

    keep = target != ignore_index
    if not bool(keep.any()):
        return logits.sum() * 0.0
    per = F.cross_entropy(logits[keep].float(), target[keep].long(), reduction="none",
                          weight=None if weight is None else logits.new_tensor(list(weight)))
    w = cluster_weights(clusters[keep]).to(device=per.device, dtype=per.dtype)
    return (per * w).sum()


def build_loss(config: Mapping[str, Any], *, output: str, num_classes: int,
               class_weights: Sequence[float] | None = None,
               ignore_index: int = IGNORE_INDEX) -> LossSpec:
    """A :class:`LossSpec` from a loss config section (``name``, ``reduction``, ...).

    ``name: auto`` picks ``instance`` for instance models and ``ce`` otherwise; an instance
    model accepts only ``instance``.
    """
    name = str(config.get("name", "auto"))
    if name == "auto":
        name = "instance" if output == "instance" else "ce"
    if output == "instance" and name != "instance":
        raise ConfigError(f"instance models train on their own losses; loss {name!r} does not "
                          "apply (use name: auto)")
    if output != "instance" and name == "instance":
        raise ConfigError("loss 'instance' is only for instance models (Mask R-CNN)")
    if output == "patch" and name in ("dice", "ce+dice", "lagree2021"):
        raise ConfigError(f"loss {name!r} needs a dense output; patch classifiers use ce or cwce")
    if output != "patch" and name == "cwce":
        raise ConfigError("the cluster-weighted loss (cwce) is for patch classifiers")
    dice_classes = config.get("dice_classes")
    if dice_classes == "foreground":
        dice_classes = tuple(range(1, num_classes))
    elif dice_classes in (None, "all"):
        dice_classes = None
    else:
        dice_classes = tuple(int(c) for c in dice_classes)
    return LossSpec(
        name=name,
        class_weights=None if class_weights is None else tuple(float(w) for w in class_weights),
        reduction=str(config.get("reduction", "mean")),
        ignore_index=ignore_index,
        ce_weight=float(config.get("ce_weight", 1.0)),
        dice_weight=float(config.get("dice_weight", 1.0)),
        dice_mode=str(config.get("dice_mode", "global" if name == "lagree2021" else "macro")),
        dice_squared=bool(config.get("dice_squared", True)),
        dice_classes=dice_classes,
    )
