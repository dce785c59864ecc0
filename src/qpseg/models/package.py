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

This module is the entry point (import from here); the code lives beside it, one job per
module: :mod:`~qpseg.models.package_config` (``config.json``: :class:`PackageConfig`,
validation, reading only from inside the package), :mod:`~qpseg.models.package_load`
(:func:`load_package`, :class:`ModelPackage`), :mod:`~qpseg.models.package_save`
(:func:`save_package`), :mod:`~qpseg.models.package_inspect` (:func:`validate_package`,
:func:`describe_package`) and :mod:`~qpseg.models.init_from` (:func:`init_from_package`).
"""

from __future__ import annotations

from qpseg.models.init_from import init_from_package
from qpseg.models.package_config import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    PackageConfig,
    parse_config,
    read_package_config,
)
from qpseg.models.package_inspect import describe_package, validate_package
from qpseg.models.package_load import ModelPackage, load_package
from qpseg.models.package_save import IMAGENET_MEAN as IMAGENET_MEAN
from qpseg.models.package_save import IMAGENET_STD as IMAGENET_STD
from qpseg.models.package_save import save_package

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
