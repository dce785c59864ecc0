"""Loading a model package: :func:`load_package` and the loaded :class:`ModelPackage`.

The weights are found inside the package folder only, hashed (SHA-256, checked against
``config.json``), read safely and checked against the architecture built on the meta device
before the model is allocated. :class:`ModelPackage` gives the model, its config, the input
normalisation, the stored stain normaliser and the provenance every predicted object records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ModelError
from qpseg.models.package_config import (
    CONFIG_NAME,
    PackageConfig,
    _check_config_against_contract,
    _check_inside,
    read_package_config,
)

if TYPE_CHECKING:  # pragma: no cover
    import os

    import numpy as np
    import torch
    from torch import nn

    from qpseg.models._base import QpsegModule
    from qpseg.models.contract import ModelContract

__all__ = ["ModelPackage", "load_package"]


@dataclass
class ModelPackage:
    """A loaded model package: the model (eval mode), its config and weights' SHA-256."""

    path: Path
    config: PackageConfig
    model: QpsegModule
    sha256: str
    weights_path: Path

    @property
    def contract(self) -> ModelContract:
        """The model's :class:`~qpseg.models.ModelContract`."""
        return self.model.contract

    @property
    def architecture(self) -> str:
        """Registry name of the architecture."""
        return self.config.architecture

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names, index ``i`` is output channel ``i``."""
        return self.config.class_names

    @property
    def class_colors(self) -> tuple[tuple[int, int, int], ...]:
        """QuPath colours (r, g, b) of the classes."""
        return self.config.class_colors

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.config.num_classes

    @property
    def ignore_index(self) -> int:
        """Label value that was ignored in training (unlabelled pixels)."""
        return self.config.ignore_index

    @property
    def mpp(self) -> float:
        """Pixel size (µm) of input 0."""
        return self.config.mpp

    @property
    def input_mpp(self) -> tuple[float | None, ...]:
        """Pixel size (µm) of every input (None: whole slide resized to the input size)."""
        return self.contract.input_mpp(self.config.mpp)

    @property
    def tile_px(self) -> int:
        """Tile side (base-mpp pixels) the model was trained with."""
        return self.config.tile_px

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean subtracted from [0, 1] images."""
        return self.config.mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation images are divided by."""
        return self.config.std

    def normalization(self, stage: int | None = None) -> tuple[tuple[float, ...],
                                                              tuple[float, ...]]:
        """(mean, std) for the model, or for one stage of a multi-stage pipeline."""
        if stage is not None and self.config.stage_normalization:
            return self.config.stage_normalization[stage]
        return self.config.mean, self.config.std

    def normalize(self, images: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        """``(N, C, H, W)`` uint8 (0-255) or float ([0, 1]) images → normalised float32."""
        import torch

        mean, std = self.normalization(stage)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - m) / s

    def stain_normalizer(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """The colour normaliser training applied to every tile (``uint8 (H, W, 3) ->
        uint8``), rebuilt from ``config.json``; None when the model was trained without one."""
        if not self.config.stain_normalization:
            return None
        from qpseg.data.stain import normalizer_from_json

        result: Callable[[np.ndarray], np.ndarray] = normalizer_from_json(
            self.config.stain_normalization)
        return result

    def provenance(self) -> dict[str, Any]:
        """What every predicted object records about the model that made it."""
        return {
            "model_architecture": self.config.architecture,
            "model_package": str(self.path),
            "model_sha256": self.sha256,
            "model_qpseg_version": self.config.qpseg_version,
        }



def _find_weights(directory: Path, cfg: PackageConfig, cfg_path: Path) -> Path:
    from qpseg.models._weights import WEIGHT_FILES

    if cfg.weights is not None:
        path = directory / cfg.weights
        if not path.is_file():
            raise ModelError(f"weights file {cfg.weights!r} named in config.json is missing",
                             cfg_path)
        _check_inside(directory, path)
        return path
    present = [directory / name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not present:
        raise ModelError(f"no weights file ({' or '.join(WEIGHT_FILES)})", directory)
    if len(present) > 1:
        raise ModelError("both weights.safetensors and weights.pt are present; name one in "
                         "config.json 'weights'", directory)
    _check_inside(directory, present[0])
    return present[0]



def _state_is_complete(model: nn.Module) -> bool:
    """True when the state dict holds every tensor the model owns, so a meta-device model can
    be materialised with ``to_empty`` + ``load_state_dict``. Non-persistent buffers and plain
    tensor attributes (torchvision's cached anchors) would stay uninitialised."""
    import torch

    keys = set(model.state_dict())
    if any(name not in keys for name, _ in model.named_buffers()):
        return False
    for module in model.modules():
        for value in vars(module).values():
            items = value if isinstance(value, list | tuple) else (value,)
            if any(isinstance(v, torch.Tensor) for v in items):
                return False
    return True


def load_package(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                 check_sha256: bool = True) -> ModelPackage:
    """Load a model package: validate ``config.json``, hash and read the weights, build the model.

    The architecture is first built on the meta device so a package whose weights do not fit
    (wrong shapes, missing or extra keys) fails fast without allocating the model. The model is
    returned in eval mode on ``device``. When ``config.json`` records ``weights_sha256`` and
    ``check_sha256`` is true, a different hash is an error (a corrupted or swapped file).
    """
    import torch

    from qpseg.models._weights import (
        check_state_dict,
        expected_shapes,
        read_state_dict,
        sha256_file,
    )
    from qpseg.models.registry import create_model, get_entry

    directory = Path(directory)
    cfg = read_package_config(directory)
    cfg_path = directory / CONFIG_NAME
    try:
        entry = get_entry(cfg.architecture)
    except ModelError as exc:
        raise ModelError(exc.message, cfg_path) from exc
    kwargs = {k: v for k, v in cfg.architecture_kwargs.items() if k not in entry.init_only}
    try:
        meta_model = create_model(cfg.architecture, cfg.num_classes, meta=True, **kwargs)
    except ModelError as exc:
        raise ModelError(exc.message, cfg_path) from exc
    _check_config_against_contract(cfg, meta_model.contract, cfg_path)

    weights_path = _find_weights(directory, cfg, cfg_path)
    sha = sha256_file(weights_path)
    if check_sha256 and cfg.weights_sha256 is not None and sha != cfg.weights_sha256:
        raise ModelError(f"SHA-256 {sha[:12]}… differs from weights_sha256 "
                         f"{cfg.weights_sha256[:12]}… in config.json (corrupted or replaced)",
                         weights_path)
    state = read_state_dict(weights_path)
    shapes = expected_shapes(meta_model)
    check_state_dict(shapes, state, weights_path, strict_counters=True)
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"tensor {name!r} holds NaN or infinite values", weights_path)

    if _state_is_complete(meta_model):  # every tensor comes from the file: skip random init
        model = meta_model.to_empty(device="cpu")
    else:
        model = create_model(cfg.architecture, cfg.num_classes, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"cannot load weights: {' '.join(str(exc).split())[:300]}",
                         weights_path) from exc
    model.qpseg_config = meta_model.qpseg_config
    model.to(device).eval()
    return ModelPackage(path=directory, config=cfg, model=model, sha256=sha,
                        weights_path=weights_path)
