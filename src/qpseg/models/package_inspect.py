"""Checking and describing a model package: :func:`validate_package` (load, then one
synthetic forward pass against the contract) and :func:`describe_package` (what
``qpseg model-info`` prints).
"""

from __future__ import annotations

import os
from typing import Any

from qpseg.errors import ModelError
from qpseg.models.package_load import ModelPackage, load_package

__all__ = ["describe_package", "validate_package"]


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
