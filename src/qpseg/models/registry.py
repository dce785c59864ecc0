"""The model registry: ``@register_model``, :func:`create_model`, :func:`list_models`.

Like timm's: each architecture module registers builder functions under a name; the registry
imports those modules (and with them torch) the first time it is queried, so importing
``qpseg.models`` stays cheap. Builders never download anything: every model starts from random
initialisation, and ``pretrained=PATH`` loads a local state dict (an ImageNet VGG16 checkpoint
with torchvision key names, a full qpseg state dict, ...) with a one-line ModelError when the
keys or shapes do not fit.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qpseg.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from qpseg.models._base import QpsegModule

__all__ = [
    "ModelEntry",
    "create_model",
    "get_entry",
    "list_models",
    "load_pretrained",
    "model_info",
    "register_model",
]

# Modules holding the architectures of the four papers (imported on first registry query).
_FAMILY_MODULES: tuple[str, ...] = (
    "qpseg.models.tiny",
    "qpseg.models.fcn",
    "qpseg.models.h2g",
    "qpseg.models.nuclei",
    "qpseg.models.dmmn",
)

# Keyword arguments every builder accepts that only matter while building (file paths), so a
# model package does not record them.
_ALWAYS_INIT_ONLY = frozenset({"pretrained"})


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture.

    ``tiny`` holds keyword arguments that make a small, fast instance (narrow width, small tile)
    for tests and CPU benchmarks; ``init_only`` names keyword arguments that are used while
    building only (paths to member packages) and are not stored in a model package.
    """

    name: str
    builder: Callable[..., Any]
    paper: str = ""
    summary: str = ""
    tiny: Mapping[str, Any] = field(default_factory=dict)
    init_only: frozenset[str] = frozenset()
    heavy: bool = False


_REGISTRY: dict[str, ModelEntry] = {}
_loaded = False


def register_model(name: str, *, paper: str = "", summary: str = "",
                   tiny: Mapping[str, Any] | None = None, init_only: tuple[str, ...] = (),
                   heavy: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``builder(num_classes, **cfg) -> nn.Module`` under ``name``.

    The builder must return a module with a ``contract`` (:class:`ModelContract`) whose
    ``architecture`` is ``name``. ``heavy`` marks models that are slow even at ``tiny`` size
    (tests may mark them slow).
    """

    def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(
            name=name, builder=builder, paper=paper,
            summary=summary or (builder.__doc__ or "").strip().split("\n")[0],
            tiny=dict(tiny or {}), init_only=frozenset(init_only) | _ALWAYS_INIT_ONLY,
            heavy=heavy)
        return builder

    return decorator


def _ensure_registered() -> None:
    global _loaded
    if _loaded:
        return
    for module in _FAMILY_MODULES:
        importlib.import_module(module)
    _loaded = True


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    _ensure_registered()
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; unknown names get a ModelError listing close names."""
    _ensure_registered()
    if not isinstance(name, str) or name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown architecture {name!r}{hint} ('qpseg models' lists them)")
    return _REGISTRY[name]


def _build(entry: ModelEntry, num_classes: int, cfg: Mapping[str, Any]) -> Any:
    try:
        return entry.builder(num_classes=num_classes, **cfg)
    except ModelError:
        raise
    except TypeError as exc:
        raise ModelError(f"cannot build {entry.name}: {' '.join(str(exc).split())}") from exc
    except (ValueError, RuntimeError, OverflowError, ZeroDivisionError, KeyError,
            IndexError, AttributeError, MemoryError) as exc:
        raise ModelError(f"cannot build {entry.name} with {dict(cfg)}: "
                         f"{' '.join(str(exc).split())[:300]}") from exc


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not (
            1 <= num_classes <= 100_000):
        raise ModelError(f"num_classes must be a positive integer, not {num_classes!r}")
    return num_classes


def create_model(name: str, num_classes: int, *, pretrained: str | os.PathLike[str] | None = None,
                 meta: bool = False, **cfg: Any) -> QpsegModule:
    """Build a registered architecture with random initialisation.

    Args:
        name: registry name (see :func:`list_models`).
        num_classes: output classes (pixel/patch models) or object classes incl. background.
        pretrained: optional local state dict file (``.pt``/``.pth``/``.safetensors``) loaded
            into the model's backbone (e.g. torchvision ImageNet weights) or, for models without
            one, into the whole model.
        meta: build on the meta device (no memory, no init; for parameter counts and shape
            checks).
        **cfg: architecture options (width, tile size, ...; see each builder).

    Returns:
        an ``nn.Module`` with ``.contract`` (:class:`ModelContract`), ``.predict(*inputs)`` and
        ``.qpseg_config`` (the name, num_classes and options a model package records).
    """
    import torch

    from qpseg.models._base import QpsegModule

    entry = get_entry(name)
    num_classes = _check_num_classes(num_classes)
    if meta:
        with torch.device("meta"):
            model = _build(entry, num_classes, cfg)
    else:
        model = _build(entry, num_classes, cfg)
    contract = getattr(model, "contract", None)
    if not isinstance(model, QpsegModule) or getattr(contract, "architecture", None) != name:
        raise ModelError(f"builder of {name} returned a model without a matching contract")
    model.qpseg_config = {
        "architecture": name,
        "num_classes": num_classes,
        "kwargs": {k: v for k, v in cfg.items() if k not in entry.init_only},
    }
    if pretrained is not None:
        if meta:
            raise ModelError("pretrained weights cannot be loaded into a meta-device model")
        load_pretrained(model, pretrained)
    return model


def load_pretrained(model: QpsegModule, path: str | os.PathLike[str]) -> None:
    """Load a local state dict into ``model``'s backbone, or into the whole model.

    Models with an ImageNet backbone implement ``load_backbone_state_dict(state, path)`` which
    maps torchvision key names onto the backbone (classifier heads are ignored); others load a
    full state dict. Mismatched keys or shapes raise a one-line ModelError naming the file.
    """
    from qpseg.models._weights import load_checked, read_state_dict

    state = read_state_dict(path)
    loader = getattr(model, "load_backbone_state_dict", None)
    if callable(loader):
        loader(state, path)
    else:
        load_checked(model, state, path)


def model_info(name: str, num_classes: int = 2, **cfg: Any) -> dict[str, Any]:
    """Contract, parameter count and paper of an architecture, built on the meta device.

    Cheap even for Mask R-CNN or DenseNet-201: no memory is allocated and nothing initialised.
    """
    from qpseg.models._base import count_parameters

    entry = get_entry(name)
    model = create_model(name, num_classes, meta=True, **cfg)
    return {
        "name": name,
        "paper": entry.paper,
        "summary": entry.summary,
        "parameters": count_parameters(model),
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "kwargs": dict(cfg),
        "contract": model.contract.to_dict(),
    }
