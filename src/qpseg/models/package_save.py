"""Saving a model package: :func:`save_package` writes the weights, ``config.json`` (validated
exactly as loading validates it) and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ModelError, OutputError
from qpseg.models.package_config import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    _check_config_against_contract,
    _is_number,
    _jsonable,
    parse_config,
)

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "save_package"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Distinct QuPath-like default colours (r, g, b) for packages saved without colours.
_PALETTE = ((255, 255, 255), (200, 0, 0), (0, 150, 0), (0, 0, 200), (220, 160, 0),
            (150, 0, 150), (0, 160, 160), (120, 120, 120), (255, 120, 180), (100, 60, 20))



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
