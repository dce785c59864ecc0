"""Starting a model from another model package (``--init-from``): :func:`init_from_package`.

Tensors are matched by name and shape; output heads (found by ``_class_axes``) are aligned by
class name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ModelError
from qpseg.models.package_load import load_package

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["init_from_package"]


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
