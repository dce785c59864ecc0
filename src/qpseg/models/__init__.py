"""The qpseg model zoo: every architecture of the four papers behind one registry.

``create_model(name, num_classes, **cfg)`` builds any registered architecture (random init; no
downloads), ``list_models()`` lists them, ``model_info(name)`` describes one, and model packages
(``config.json`` + ``weights.pt``/``weights.safetensors``) are written with :func:`save_package`
and read with :func:`load_package`; every package carries a model card (``MODEL_CARD.md``,
:mod:`qpseg.models.card`). Every model carries a :class:`ModelContract` that training and
inference read instead of special-casing models by name.

Importing this package does not import torch; building or loading a model does.
"""

from __future__ import annotations

from qpseg.models.card import model_card, write_model_card
from qpseg.models.contract import (
    InputSpec,
    ModelContract,
    get_contract,
    instance_targets_from_label_map,
    make_inputs,
    predict,
)
from qpseg.models.package import (
    ModelPackage,
    describe_package,
    load_package,
    read_package_config,
    save_package,
    validate_package,
)
from qpseg.models.registry import (
    ModelEntry,
    catalog,
    create_model,
    get_entry,
    list_models,
    load_pretrained,
    model_info,
    register_model,
)

__all__ = [
    "InputSpec",
    "ModelContract",
    "ModelEntry",
    "ModelPackage",
    "catalog",
    "create_model",
    "describe_package",
    "get_contract",
    "get_entry",
    "instance_targets_from_label_map",
    "list_models",
    "load_package",
    "load_pretrained",
    "make_inputs",
    "model_card",
    "model_info",
    "predict",
    "read_package_config",
    "register_model",
    "save_package",
    "validate_package",
    "write_model_card",
]
