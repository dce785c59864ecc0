"""Shared building blocks of the model zoo: the base module and small conv blocks.

Everything here imports torch; it is only imported when a model is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from qpseg.models.contract import ModelContract, predict

__all__ = [
    "ConvBNReLU",
    "DoubleConv",
    "NamedWeights",
    "QpsegModule",
    "UpBlock",
    "WeightLoader",
    "as_int_tuple",
    "check_fraction",
    "check_positive_int",
    "count_parameters",
]


class PredictMixin:
    """Adds :meth:`predict` (probabilities, eval mode) to any module with a ``contract``."""

    contract: ModelContract

    def predict(self, *inputs: torch.Tensor) -> Any:
        """Probabilities (pixel/patch) or instance dicts; see :func:`qpseg.models.predict`."""
        return predict(self, *inputs)  # type: ignore[arg-type]


#: Loads a state dict (torchvision key names) into part of a model; the path names the file.
WeightLoader = Callable[[Mapping[str, torch.Tensor], "str | os.PathLike[str] | None"], None]
#: Per initialisation name (``"imagenet"``, ``"coco"``): the torchvision weights enum members
#: and the loader each goes to, or a sentence saying why this model cannot start from them.
NamedWeights = dict[str, "list[tuple[str, WeightLoader]] | str"]


class QpsegModule(PredictMixin, nn.Module):
    """Base of every model the registry builds: an ``nn.Module`` with a ``contract``,
    ``predict`` and ``qpseg_config`` (architecture, num_classes and options, set by
    :func:`~qpseg.models.create_model` and recorded by model packages).

    ``qpseg_init`` (set by :func:`~qpseg.models.registry.load_pretrained` and
    :func:`~qpseg.models.package.init_from_package`) records what the weights started from.
    """

    contract: ModelContract
    qpseg_config: dict[str, Any]
    qpseg_init: dict[str, Any] | None = None

    def pretrained_weights(self) -> NamedWeights:
        """The named initialisations this model can start from (``pretrained: imagenet``):
        torchvision weights per name, loaded into the parts they fit. None by default."""
        return {}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def check_positive_int(name: str, value: Any, *, maximum: int = 1 << 16) -> int:
    """``value`` as an int in ``[1, maximum]``, else ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if not 1 <= int(value) <= maximum:
        raise ValueError(f"{name} must be between 1 and {maximum}, not {value!r}")
    return int(value)


def check_fraction(name: str, value: Any, *, low: float = 0.0, high: float = 1.0) -> float:
    """``value`` as a float in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, not {value!r}")
    if not low <= float(value) <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value!r}")
    return float(value)


def as_int_tuple(name: str, value: Any, *, maximum: int = 1 << 14) -> tuple[int, ...]:
    """A non-empty sequence of positive ints (JSON gives lists; tuples are kept)."""
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list of integers, not {value!r}")
    items = tuple(check_positive_int(name, v, maximum=maximum) for v in value)
    if not items:
        raise ValueError(f"{name} must not be empty")
    return items


class ConvBNReLU(nn.Sequential):
    """3×3 convolution (no bias when followed by batch norm), batch norm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, *, bn: bool = True, kernel_size: int = 3,
                 dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """Two :class:`ConvBNReLU` in series (the classic U-Net block)."""

    def __init__(self, in_ch: int, out_ch: int, *, bn: bool = True, dropout: float = 0.0) -> None:
        super().__init__(ConvBNReLU(in_ch, out_ch, bn=bn, dropout=dropout),
                         ConvBNReLU(out_ch, out_ch, bn=bn, dropout=dropout))


class UpBlock(nn.Module):
    """Decoder block: ×2 nearest upsampling, concatenation with the skip, two conv-BN-ReLU.

    This is the decoder of ``segmentation_models`` used by lagree2021 ("up-sampling,
    concatenation of the respective feature map from the encoding path, followed by two blocks of
    3×3 convolutions, batch normalization and ReLU") and of the H2G-Net refinement U-Net.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, *,
                 spatial_dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = DoubleConv(in_ch + skip_ch, out_ch, dropout=spatial_dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = torch.cat([skip, x], dim=1)
        else:
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)
