"""A model package's ``config.json``: :class:`PackageConfig`, its validation and reading.

:func:`parse_config` validates a decoded ``config.json`` object (the format is described in
:mod:`qpseg.models.package`), :func:`read_package_config` reads it from a package folder, only
from inside it (``_check_inside`` refuses a link that leads out, for the weights too), and
``_check_config_against_contract`` checks a config against the model it describes. Nothing
here imports torch.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from qpseg.models.contract import ModelContract

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "PackageConfig",
    "parse_config",
    "read_package_config",
]

CONFIG_NAME = "config.json"
FORMAT = "qpseg-model"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "qpseg_version", "architecture", "architecture_kwargs",
             "class_names", "class_colors", "ignore_index", "mpp", "tile_px", "normalization")
_OPTIONAL = ("format", "input_mpp", "training", "weights", "weights_sha256",
             "stage_normalization", "inference", "stain_normalization")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")


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

