"""Model packages on disk: a directory with ``config.json`` and the weights.

Layout::

    my_model/
      config.json          what the model is and how to feed it (below)
      MODEL_CARD.md        what it is, was trained on and is for (qpseg.models.card)
      weights.pt           state dict, read with torch.load(weights_only=True)
      (or weights.safetensors, when the optional 'safetensors' package is installed)

``config.json`` (format version 1)::

    {
      "format": "qpseg-model", "format_version": 1, "qpseg_version": "0.1.0",
      "architecture": "fcn32s_vgg16", "architecture_kwargs": {"tile_px": 512},
      "class_names": ["Background", "Tumor"], "class_colors": [[255, 255, 255], [200, 0, 0]],
      "ignore_index": 255,
      "mpp": 0.5,                        base pixel size (µm) of input 0
      "input_mpp": [0.5],                pixel size of every input (DMMN: [0.5, 1.0, 2.0])
      "tile_px": 512,
      "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
      "training": {...},                 free-form summary of the training data and run
      "inference": {"tissue": "hsv", "min_tissue": 0.25, "objects": "annotation", ...},
                                         how outputs become objects (optional; InferenceRules)
      "stain_normalization": {"method": "vahadane", "stain_matrix": [[...], [...]],
                              "max_concentrations": [...], ...},
                                         the colour normaliser fitted in training (optional;
                                         qpseg.data.stain), applied to every tile first
      "weights": "weights.pt", "weights_sha256": "..."
    }

Images are colour-normalised (when ``stain_normalization`` is present, per tile as training
did), scaled to [0, 1] and then normalised with ``mean``/``std`` before they reach the
model. The SHA-256 of the weights file is computed on every load (``ModelPackage.sha256``) and
goes into the provenance of every predicted object. ``config.json`` and the weights are read
only from inside the package folder: a link that leads out of it is refused. Anything malformed
gives a one-line :class:`~qpseg.errors.ModelError` naming ``config.json`` or the weights file.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError, ModelError, OutputError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from torch import nn

    from qpseg.models._base import QpsegModule
    from qpseg.models.contract import ModelContract

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "ModelPackage",
    "PackageConfig",
    "describe_package",
    "init_from_package",
    "load_package",
    "parse_config",
    "read_package_config",
    "save_package",
    "validate_package",
]

CONFIG_NAME = "config.json"
FORMAT = "qpseg-model"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_REQUIRED = ("format_version", "qpseg_version", "architecture", "architecture_kwargs",
             "class_names", "class_colors", "ignore_index", "mpp", "tile_px", "normalization")
_OPTIONAL = ("format", "input_mpp", "training", "weights", "weights_sha256",
             "stage_normalization", "inference", "stain_normalization")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
# Distinct QuPath-like default colours (r, g, b) for packages saved without colours.
_PALETTE = ((255, 255, 255), (200, 0, 0), (0, 150, 0), (0, 0, 200), (220, 160, 0),
            (150, 0, 150), (0, 160, 160), (120, 120, 120), (255, 120, 180), (100, 60, 20))


@dataclass(frozen=True)
class PackageConfig:
    """The validated content of a package's ``config.json``."""

    architecture: str
    architecture_kwargs: dict[str, Any]
    class_names: tuple[str, ...]
    class_colors: tuple[tuple[int, int, int], ...]
    ignore_index: int
    mpp: float
    tile_px: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    qpseg_version: str
    format_version: int = FORMAT_VERSION
    input_mpp: tuple[float | None, ...] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    weights_sha256: str | None = None
    stage_normalization: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...] = ()
    #: the "inference" object (qpseg.models.contract.InferenceRules); {}: not recorded
    inference: dict[str, Any] = field(default_factory=dict)
    #: the colour normaliser fitted in training ({"method": macenko | reinhard | vahadane,
    #: its target as plain floats}; qpseg.data.stain), applied to every tile before the
    #: model at inference too; {}: none
    stain_normalization: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes (one per class name)."""
        return len(self.class_names)

    def to_json(self) -> dict[str, Any]:
        """The ``config.json`` object."""
        data: dict[str, Any] = {
            "format": FORMAT,
            "format_version": self.format_version,
            "qpseg_version": self.qpseg_version,
            "architecture": self.architecture,
            "architecture_kwargs": _jsonable(self.architecture_kwargs),
            "class_names": list(self.class_names),
            "class_colors": [list(c) for c in self.class_colors],
            "ignore_index": self.ignore_index,
            "mpp": self.mpp,
            "input_mpp": None if self.input_mpp is None else list(self.input_mpp),
            "tile_px": self.tile_px,
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "training": _jsonable(self.training),
        }
        if self.stage_normalization:
            data["stage_normalization"] = [{"mean": list(m), "std": list(s)}
                                           for m, s in self.stage_normalization]
        if self.inference:
            data["inference"] = dict(self.inference)
        if self.stain_normalization:
            data["stain_normalization"] = dict(self.stain_normalization)
        if self.weights is not None:
            data["weights"] = self.weights
        if self.weights_sha256 is not None:
            data["weights_sha256"] = self.weights_sha256
        return data


def _jsonable(value: Any) -> Any:
    """Tuples to lists, paths to strings, numpy scalars to numbers, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, bool | int | float | str) and isinstance(value, numbers.Number):
        return int(value) if isinstance(value, numbers.Integral) else float(value)  # type: ignore[arg-type]
    return value


# --------------------------------------------------------------------------- parsing


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _floats(value: Any, key: str, path: Path, *, positive: bool = False) -> tuple[float, ...]:
    if not isinstance(value, list) or not value or not all(_is_number(v) for v in value):
        raise ModelError(f"{key} must be a non-empty list of finite numbers", path)
    if positive and any(v <= 0 for v in value):
        raise ModelError(f"{key} must be positive", path)
    return tuple(float(v) for v in value)


def _normalization(value: Any, key: str, path: Path) -> tuple[tuple[float, ...],
                                                               tuple[float, ...]]:
    if not isinstance(value, dict) or set(value) != {"mean", "std"}:
        raise ModelError(f"{key} must be an object with exactly 'mean' and 'std'", path)
    mean = _floats(value["mean"], f"{key}.mean", path)
    std = _floats(value["std"], f"{key}.std", path, positive=True)
    if len(mean) != len(std):
        raise ModelError(f"{key}.mean and {key}.std differ in length", path)
    return mean, std


def parse_config(data: Any, path: str | os.PathLike[str]) -> PackageConfig:
    """Validate a decoded ``config.json`` object (no torch needed); ModelError naming ``path``."""
    path = Path(path)
    if not isinstance(data, dict):
        raise ModelError(f"expected a JSON object, found {type(data).__name__}", path)
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ModelError(f"missing key(s) {', '.join(repr(k) for k in missing)}", path)
    unknown = sorted(k for k in data if k not in _REQUIRED and k not in _OPTIONAL)
    if unknown:
        raise ModelError(f"unknown key(s) {', '.join(repr(k) for k in unknown[:3])}", path)
    if "format" in data and data["format"] != FORMAT:
        raise ModelError(f"format must be {FORMAT!r}, not {data['format']!r}", path)
    version = data["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelError(f"format_version must be a positive integer, not {version!r}", path)
    if version > FORMAT_VERSION:
        raise ModelError(f"package format {version} is newer than this qpseg understands "
                         f"({FORMAT_VERSION}); upgrade qpseg", path)
    for key in ("qpseg_version", "architecture"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise ModelError(f"{key} must be a non-empty string", path)
    kwargs = data["architecture_kwargs"]
    if not isinstance(kwargs, dict):
        raise ModelError("architecture_kwargs must be an object", path)
    names = data["class_names"]
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, str) and n.strip() for n in names)):
        raise ModelError("class_names must be a non-empty list of non-empty strings", path)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ModelError(f"class name {dup!r} appears twice", path)
    colors = data["class_colors"]
    if not isinstance(colors, list) or len(colors) != len(names):
        raise ModelError(f"class_colors must list one [r, g, b] per class ({len(names)})", path)
    rgb: list[tuple[int, int, int]] = []
    for c in colors:
        if (not isinstance(c, list) or len(c) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                           for v in c)):
            raise ModelError(f"class colour {c!r} is not [r, g, b] with integers 0-255", path)
        rgb.append((c[0], c[1], c[2]))
    ignore = data["ignore_index"]
    if isinstance(ignore, bool) or not isinstance(ignore, int) or not -1 <= ignore <= 65535:
        raise ModelError(f"ignore_index must be an integer in [-1, 65535], not {ignore!r}", path)
    if 0 <= ignore < len(names):
        raise ModelError(f"ignore_index {ignore} is the index of class {names[ignore]!r}", path)
    mpp = data["mpp"]
    if not _is_number(mpp) or not 0 < mpp < 1000:
        raise ModelError(f"mpp must be a positive number of µm per pixel, not {mpp!r}", path)
    input_mpp = data.get("input_mpp")
    parsed_input_mpp: tuple[float | None, ...] | None = None
    if input_mpp is not None:
        if not isinstance(input_mpp, list) or not input_mpp or not all(
                v is None or (_is_number(v) and v > 0) for v in input_mpp):
            raise ModelError("input_mpp must be a list of positive numbers (or null)", path)
        parsed_input_mpp = tuple(None if v is None else float(v) for v in input_mpp)
    tile = data["tile_px"]
    if isinstance(tile, bool) or not isinstance(tile, int) or not 1 <= tile <= 1 << 16:
        raise ModelError(f"tile_px must be a positive integer, not {tile!r}", path)
    mean, std = _normalization(data["normalization"], "normalization", path)
    stage_norm: list[tuple[tuple[float, ...], tuple[float, ...]]] = []
    if data.get("stage_normalization") is not None:
        if not isinstance(data["stage_normalization"], list):
            raise ModelError("stage_normalization must be a list of {mean, std} objects", path)
        stage_norm = [_normalization(v, f"stage_normalization[{i}]", path)
                      for i, v in enumerate(data["stage_normalization"])]
    training = data.get("training")
    if training is None:
        training = {}
    if not isinstance(training, dict):
        raise ModelError("training must be an object (a summary of the training run)", path)
    weights = data.get("weights")
    if weights is not None and (
            not isinstance(weights, str) or not weights.endswith(_WEIGHT_SUFFIXES)
            or Path(weights).name != weights or weights.startswith(".")):
        raise ModelError(f"weights must be a file name ending in .pt, .pth or .safetensors "
                         f"inside the package, not {weights!r}", path)
    sha = data.get("weights_sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA_RE.match(sha)):
        raise ModelError("weights_sha256 must be 64 lowercase hex digits", path)
    inference: dict[str, Any] = {}
    if data.get("inference") is not None:
        from qpseg.models.contract import InferenceRules

        inference = InferenceRules.from_json(data["inference"], path).to_json()
    stain: dict[str, Any] = {}
    if data.get("stain_normalization") is not None:
        from qpseg.data.stain import normalizer_from_json

        try:
            stain = normalizer_from_json(data["stain_normalization"]).to_json()
        except ConfigError as exc:
            raise ModelError(f"stain_normalization: {exc.message}", path) from None
    return PackageConfig(
        architecture=data["architecture"], architecture_kwargs=dict(kwargs),
        class_names=tuple(names), class_colors=tuple(rgb), ignore_index=ignore,
        mpp=float(mpp), tile_px=tile, mean=mean, std=std, qpseg_version=data["qpseg_version"],
        format_version=version, input_mpp=parsed_input_mpp, training=dict(training),
        weights=weights, weights_sha256=sha, stage_normalization=tuple(stage_norm),
        inference=inference, stain_normalization=stain)


def read_package_config(directory: str | os.PathLike[str]) -> PackageConfig:
    """Read and validate ``DIR/config.json`` without building the model (no torch)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError("model package directory not found" if not directory.exists()
                         else "a model package is a directory (with config.json)", directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ModelError("missing config.json: not a qpseg model package", directory)
    _check_inside(directory, path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as exc:
        raise ModelError("config.json is not UTF-8 text", path) from exc
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"invalid JSON ({' '.join(str(exc).split())[:200]})", path) from exc
    except OSError as exc:
        raise ModelError(f"cannot read ({exc.strerror or exc})", path) from exc
    return parse_config(data, path)


# --------------------------------------------------------------------------- the package


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


def _check_inside(directory: Path, path: Path) -> None:
    """ModelError naming ``path`` when it is a link that leads outside the package ``directory``.

    A package is a folder someone may have sent; a ``weights.pt`` or ``config.json`` linking to
    e.g. ``/home/me/.ssh/id_rsa`` or another project's files must not be read (and hashed into
    provenance) as if it were part of the package.
    """
    try:
        target = path.resolve(strict=True)
        root = directory.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # a dangling link or a loop of links
        raise ModelError("is a link that cannot be followed", path) from exc
    if not target.is_relative_to(root):
        raise ModelError(f"is a link to {target}, outside the model package; qpseg reads only "
                         "files inside the package", path)


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


def _check_config_against_contract(cfg: PackageConfig, contract: ModelContract,
                                   path: Path) -> None:
    if contract.num_classes != cfg.num_classes:
        raise ModelError(f"{cfg.num_classes} class names but the model has "
                         f"{contract.num_classes} outputs", path)
    if cfg.tile_px != contract.tile_px:
        raise ModelError(f"tile_px {cfg.tile_px} does not match the architecture's tile "
                         f"({contract.tile_px}; set it in architecture_kwargs)", path)
    image_channels = contract.channels
    if len(cfg.mean) != image_channels:
        raise ModelError(f"normalization has {len(cfg.mean)} channel(s), the model reads "
                         f"{image_channels}", path)
    if cfg.input_mpp is not None:
        expected = contract.input_mpp(cfg.mpp)
        if len(cfg.input_mpp) != len(expected):
            raise ModelError(f"input_mpp lists {len(cfg.input_mpp)} input(s), the model has "
                             f"{len(expected)}", path)
        for got, want in zip(cfg.input_mpp, expected, strict=True):
            if (got is None) != (want is None) or (
                    got is not None and want is not None and not math.isclose(got, want,
                                                                              rel_tol=1e-6)):
                raise ModelError(f"input_mpp {list(cfg.input_mpp)} does not follow from mpp "
                                 f"{cfg.mpp} and the model's input scales {list(contract.scales)}",
                                 path)
    if cfg.stage_normalization and len(cfg.stage_normalization) != len(contract.stages):
        raise ModelError(f"stage_normalization lists {len(cfg.stage_normalization)} stage(s), "
                         f"the model has {len(contract.stages)}", path)


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


def save_package(directory: str | os.PathLike[str], model: nn.Module, *,
                 class_names: Sequence[str], mpp: float,
                 class_colors: Sequence[Sequence[int]] | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 ignore_index: int = 255, training: Mapping[str, Any] | None = None,
                 stage_normalization: Sequence[tuple[Sequence[float], Sequence[float]]]
                 | None = None,
                 weights_format: str = "pt", overwrite: bool = False,
                 inference: Mapping[str, Any] | None = None,
                 stain_normalization: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (built by :func:`create_model`) as a package in ``directory``.

    ``mpp`` is the pixel size of input 0 the model was trained at; the per-input pixel sizes are
    derived from the contract's scales. ``training`` is a free-form JSON summary (slides, class
    pixel counts, epochs, ...). ``weights_format`` is ``"pt"`` or ``"safetensors"`` (needs the
    optional safetensors package). ``inference``: the model's inference rules
    (:class:`~qpseg.models.contract.InferenceRules` as JSON; tissue rule, object type,
    post-processing), recorded as ``"inference"``. ``stain_normalization``: the fitted colour
    normaliser's ``to_json()`` (:mod:`qpseg.data.stain`), which inference applies to every
    tile as training did. The config is validated exactly as
    :func:`load_package` validates it, so whatever is saved loads again. ``MODEL_CARD.md``
    (:mod:`qpseg.models.card`) is written beside it. A file that cannot be written is an
    :class:`~qpseg.errors.OutputError` naming it. Returns the directory.
    """
    from qpseg import __version__
    from qpseg._io import atomic_write, write_json_atomic
    from qpseg.models._weights import sha256_file, write_state_dict
    from qpseg.models.card_text import MODEL_CARD_NAME, model_card
    from qpseg.models.contract import get_contract

    directory = Path(directory)
    qcfg = getattr(model, "qpseg_config", None)
    if not isinstance(qcfg, dict):
        raise ModelError("only models built with qpseg.models.create_model can be packaged",
                         directory)
    contract = get_contract(model)
    if weights_format not in ("pt", "safetensors"):
        raise ModelError(f"weights_format must be 'pt' or 'safetensors', not "
                         f"{weights_format!r}", directory)
    if (directory / CONFIG_NAME).exists() and not overwrite:
        raise ModelError("already holds a model package (pass overwrite=True to replace it)",
                         directory)
    if directory.exists() and not directory.is_dir():
        raise ModelError("exists and is not a directory", directory)
    names = list(class_names)
    colors = ([list(c) for c in class_colors] if class_colors is not None
              else [list(_PALETTE[i % len(_PALETTE)]) for i in range(len(names))])
    data: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qpseg_version": __version__,
        "architecture": qcfg["architecture"],
        "architecture_kwargs": _jsonable(qcfg["kwargs"]),
        "class_names": names,
        "class_colors": colors,
        "ignore_index": ignore_index,
        "mpp": mpp,
        "input_mpp": list(contract.input_mpp(float(mpp))) if _is_number(mpp) else None,
        "tile_px": contract.tile_px,
        "normalization": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
        "training": _jsonable(dict(training or {})),
    }
    if inference:
        data["inference"] = dict(inference)
    if stain_normalization:
        data["stain_normalization"] = dict(stain_normalization)
    if stage_normalization:
        data["stage_normalization"] = [{"mean": [float(v) for v in m], "std": [float(v) for v in s]}
                                       for m, s in stage_normalization]
    weights_name = f"weights.{weights_format}"
    data["weights"] = weights_name
    try:  # a config that does not survive a JSON round trip is refused before anything is written
        data = json.loads(json.dumps(data, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"package config is not JSON-serialisable ({exc})", directory) from exc
    cfg = parse_config(data, directory / CONFIG_NAME)
    _check_config_against_contract(cfg, contract, directory / CONFIG_NAME)

    weights_path = directory / weights_name
    current = directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_state_dict(model.state_dict(), weights_path)  # OutputError on a failed write
        for other in ("weights.pt", "weights.safetensors"):
            if other != weights_name:
                current = directory / other
                current.unlink(missing_ok=True)
        current = weights_path
        data["weights_sha256"] = sha256_file(weights_path)
        current = directory / CONFIG_NAME
        write_json_atomic(current, data, backup=False)
        current = directory / MODEL_CARD_NAME
        with atomic_write(current, "w", backup=False) as fh:
            fh.write(model_card(parse_config(data, directory / CONFIG_NAME), directory))
    except OSError as exc:
        raise OutputError.from_os_error(exc, current) from exc
    return directory


def validate_package(directory: str | os.PathLike[str], *, forward: bool = True) -> ModelPackage:
    """Load a package and, with ``forward``, run one synthetic batch through the model.

    The forward pass checks that the output matches the contract (shape, finite values), which
    catches weights that load but are broken. Returns the loaded package.
    """
    import torch

    from qpseg.models.contract import make_inputs, predict

    pkg = load_package(directory)
    if forward:
        contract = pkg.contract
        inputs = make_inputs(contract, batch=1)
        try:
            out = predict(pkg.model, *inputs)
        except ModelError:
            raise
        except Exception as exc:  # any failure inside the model is a broken package
            raise ModelError(f"forward pass failed: {' '.join(str(exc).split())[:300]}",
                             pkg.weights_path) from exc
        if contract.output == "instance":
            ok = isinstance(out, list) and len(out) == 1
        else:
            ok = (tuple(out.shape) == contract.output_shape(1)
                  and bool(torch.isfinite(out).all()))
        if not ok:
            raise ModelError("forward pass does not match the model contract "
                             f"(expected {contract.output_shape(1)})", pkg.weights_path)
    return pkg


def describe_package(package: ModelPackage | str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready summary of a package (what ``qpseg model-info`` prints)."""
    from qpseg.models._base import count_parameters

    pkg = package if isinstance(package, ModelPackage) else load_package(package)
    cfg = pkg.config
    return {
        "path": str(pkg.path),
        "architecture": cfg.architecture,
        "architecture_kwargs": cfg.architecture_kwargs,
        "parameters": count_parameters(pkg.model),
        "weights": pkg.weights_path.name,
        "sha256": pkg.sha256,
        "qpseg_version": cfg.qpseg_version,
        "classes": [{"index": i, "name": n, "color": list(c)}
                    for i, (n, c) in enumerate(zip(cfg.class_names, cfg.class_colors,
                                                   strict=True))],
        "ignore_index": cfg.ignore_index,
        "mpp": cfg.mpp,
        "input_mpp": list(pkg.input_mpp),
        "tile_px": cfg.tile_px,
        "normalization": {"mean": list(cfg.mean), "std": list(cfg.std)},
        "contract": pkg.contract.to_dict(),
        "training": cfg.training,
    }


# ------------------------------------------------------------------ starting from a package

def _class_axes(model: nn.Module) -> dict[str, dict[int, tuple[int, int]]]:
    """Which tensors of ``model`` grow with its number of classes, and how.

    Per tensor name: ``{axis: (offset, step)}`` where the axis holds ``offset + step * C``
    entries for ``C`` classes. Found by building the architecture with ``C`` and ``C + 1``
    classes on the meta device (no memory) and comparing shapes, so no architecture needs to
    list its heads.
    """
    from qpseg.models._weights import expected_shapes
    from qpseg.models.registry import create_model, get_entry

    cfg = getattr(model, "qpseg_config", None)
    if not isinstance(cfg, dict):
        raise ModelError("only models built with qpseg.models.create_model can start from a "
                         "package")
    arch, n = cfg["architecture"], int(cfg["num_classes"])
    init_only = get_entry(arch).init_only
    kwargs = {k: v for k, v in cfg.get("kwargs", {}).items() if k not in init_only}
    now = expected_shapes(create_model(arch, n, meta=True, **kwargs))
    more = expected_shapes(create_model(arch, n + 1, meta=True, **kwargs))
    axes: dict[str, dict[int, tuple[int, int]]] = {}
    for key, shape in now.items():
        other = more.get(key)
        if other is None or len(other) != len(shape):
            continue
        for d, (a, b) in enumerate(zip(shape, other, strict=True)):
            if a != b:
                axes.setdefault(key, {})[d] = (a - (b - a) * n, b - a)
    return axes


def init_from_package(model: nn.Module, directory: str | os.PathLike[str],
                      class_names: Sequence[str]) -> dict[str, Any]:
    """Start ``model`` from the weights of another qpseg model package.

    Tensors are matched by name and shape. Tensors whose size follows the number of classes
    (output heads, found by :func:`_class_axes`) are aligned by class name: rows of classes the
    package also has are copied from the package's rows of the same name, rows of new classes
    keep their fresh initialisation, and package classes this model lacks are dropped. A head
    whose class layout cannot be aligned that way (classes interleaved with other channels)
    keeps its fresh initialisation. ``class_names`` are this model's classes (Background
    first, as a package records them).

    Returns the record also stored as ``model.qpseg_init["init_from"]``: the package, its
    architecture and SHA-256, the classes matched, new and dropped, and every tensor loaded,
    aligned by class or not loaded (with the reason). A package of which no tensor fits is a
    ModelError naming it.
    """
    import torch

    directory = Path(directory)
    pkg = load_package(directory)
    target = list(class_names)
    own = model.state_dict()
    cfg = getattr(model, "qpseg_config", {})
    if len(target) != int(cfg.get("num_classes", len(target))):
        raise ModelError(f"{len(target)} class names for a model of {cfg.get('num_classes')} "
                         "classes")
    source = list(pkg.class_names)
    pairs = [(t, source.index(name)) for t, name in enumerate(target) if name in source]
    same = source == target
    axes = {} if same else _class_axes(model)
    src_state = pkg.model.state_dict()
    new: dict[str, torch.Tensor] = {}
    loaded: list[str] = []
    aligned: list[str] = []
    skipped: dict[str, str] = {}
    for key, value in own.items():
        src = src_state.get(key)
        if src is None:
            skipped[key] = "not in the package"
            continue
        ax = axes.get(key)
        if ax is None:
            if tuple(src.shape) == tuple(value.shape):
                new[key] = src
                loaded.append(key)
            else:
                skipped[key] = (f"shape {tuple(src.shape)} in the package, "
                                f"{tuple(value.shape)} here")
            continue
        fits = (src.dim() == value.dim()
                and all(off == 0 and src.shape[d] == k * len(source)
                        for d, (off, k) in ax.items())
                and all(src.shape[d] == value.shape[d] for d in range(value.dim())
                        if d not in ax))
        if not fits:
            skipped[key] = "its classes are interleaved with other channels (fresh init)"
            continue
        if not pairs:
            skipped[key] = "no class in common with the package (fresh init)"
            continue
        out = value.detach().clone()
        sub = src.to(out.dtype)
        tgt_index = []
        for d in range(value.dim()):
            if d in ax:
                k = ax[d][1]
                ti = [t * k + j for t, _ in pairs for j in range(k)]
                si = [s * k + j for _, s in pairs for j in range(k)]
                sub = sub.index_select(d, torch.tensor(si))
            else:
                ti = list(range(value.shape[d]))
            shape = [1] * value.dim()
            shape[d] = len(ti)
            tgt_index.append(torch.tensor(ti).view(shape))
        out[tuple(tgt_index)] = sub
        new[key] = out
        aligned.append(key)
    if not loaded and not aligned:
        raise ModelError(f"no tensor of the package ({pkg.architecture}) fits "
                         f"{cfg.get('architecture', type(model).__name__)} by name and shape",
                         directory)
    model.load_state_dict(new, strict=False)
    record = {
        "source": "package",
        "package": str(directory),
        "architecture": pkg.architecture,
        "sha256": pkg.sha256,
        "classes": {"matched": [target[t] for t, _ in pairs],
                    "new": [n for n in target if n not in source],
                    "dropped": [n for n in source if n not in target]},
        "tensors": len(own),
        "loaded": loaded,
        "aligned_by_class": aligned,
        "not_loaded": skipped,
    }
    init = getattr(model, "qpseg_init", None) or {}
    model.qpseg_init = {**init, "init_from": record}  # type: ignore[assignment]
    return record
