"""The model registry: ``@register_model``, :func:`create_model`, :func:`list_models`.

Like timm's: each architecture module registers builder functions under a name; the registry
imports those modules (and with them torch) the first time it is queried, so importing
``qpseg.models`` stays cheap. Builders never download anything: every model starts from random
initialisation. ``pretrained="imagenet"`` (or ``"coco"``) then loads the torchvision weights the
model names (:meth:`~qpseg.models._base.QpsegModule.pretrained_weights`) through torch's cache,
downloading them once where there is a network; ``pretrained=PATH`` loads a local state dict
(an ImageNet VGG16 checkpoint with torchvision key names, a full qpseg state dict, ...). Either
way a one-line ModelError says what does not fit or where the missing file belongs.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qpseg.errors import ModelError, QpsegWarning

if TYPE_CHECKING:  # pragma: no cover
    from qpseg.models._base import QpsegModule

__all__ = [
    "NAMED_WEIGHTS",
    "InitWarning",
    "ModelEntry",
    "create_model",
    "get_entry",
    "list_models",
    "load_pretrained",
    "model_info",
    "random_init_note",
    "register_model",
]

#: Names ``pretrained`` accepts besides a file path.
NAMED_WEIGHTS: tuple[str, ...] = ("imagenet", "coco")


class InitWarning(QpsegWarning):
    """A paper architecture trains from random initialisation where its paper did not."""

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
    ``paper_init`` is what the paper started training from (``"imagenet"``, ``"coco"``; empty:
    random initialisation) and ``paper_init_source`` the passage that says so.
    """

    name: str
    builder: Callable[..., Any]
    paper: str = ""
    summary: str = ""
    tiny: Mapping[str, Any] = field(default_factory=dict)
    init_only: frozenset[str] = frozenset()
    heavy: bool = False
    paper_init: str = ""
    paper_init_source: str = ""


_REGISTRY: dict[str, ModelEntry] = {}
_loaded = False


def register_model(name: str, *, paper: str = "", summary: str = "",
                   tiny: Mapping[str, Any] | None = None, init_only: tuple[str, ...] = (),
                   heavy: bool = False, paper_init: str = "", paper_init_source: str = ""
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
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
            heavy=heavy, paper_init=paper_init, paper_init_source=paper_init_source)
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
    """Build a registered architecture with random initialisation, then load ``pretrained``.

    Args:
        name: registry name (see :func:`list_models`).
        num_classes: output classes (pixel/patch models) or object classes incl. background.
        pretrained: ``"imagenet"`` / ``"coco"`` (torchvision's weights for the model's
            backbone, from torch's cache or downloaded once into it), or a local state dict file
            (``.pt``/``.pth``/``.safetensors``) loaded into the model's backbone (e.g.
            torchvision ImageNet weights) or, for models without one, into the whole model.
            What was loaded is recorded in ``model.qpseg_init``.
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


def _is_named(source: str | os.PathLike[str]) -> bool:
    return isinstance(source, str) and source.strip().lower() in NAMED_WEIGHTS


def load_named_weights(model: QpsegModule, name: str) -> dict[str, Any]:
    """Load the torchvision weights ``model`` offers under ``name`` (``"imagenet"``, ...).

    Returns the record :func:`load_pretrained` stores: the name and, per weights file, the
    torchvision enum member, the cache file and its number of tensors.
    """
    from qpseg.models._weights import fetch_torchvision_state_dict

    arch = model.qpseg_config.get("architecture", type(model).__name__) \
        if isinstance(getattr(model, "qpseg_config", None), dict) else type(model).__name__
    offers = model.pretrained_weights()
    offer = offers.get(name)
    if offer is None:
        have = [k for k, v in offers.items() if isinstance(v, list)]
        raise ModelError(f"{arch} has no {name} weights (it can start from: "
                         f"{', '.join(have) or 'nothing published; random init'}); give "
                         "pretrained a local state-dict file instead")
    if isinstance(offer, str):
        raise ModelError(f"{arch} cannot start from {name} weights: {offer}")
    files = []
    for spec, loader in offer:
        state, path = fetch_torchvision_state_dict(spec)
        loader(state, path)
        files.append({"weights": spec, "file": str(path), "tensors": len(state)})
    record: dict[str, Any] = {"source": name, "files": files}
    if not offer:
        record["note"] = "nothing to load: every part with published weights is trained already"
    return record


def load_pretrained(model: QpsegModule, source: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``"imagenet"``/``"coco"`` weights or a local state dict into ``model``.

    Named weights go through :func:`load_named_weights`. A local file goes to the backbone of
    models that implement ``load_backbone_state_dict(state, path)`` (which maps torchvision key
    names onto the backbone, classifier heads ignored); others load it as a full state dict.
    Mismatched keys or shapes raise a one-line ModelError naming the file. The returned record
    is also stored as ``model.qpseg_init["pretrained"]``.
    """
    from qpseg.models._weights import load_checked, read_state_dict, sha256_file

    if _is_named(source):
        record = load_named_weights(model, str(source).strip().lower())
    else:
        state = read_state_dict(source)
        loader = getattr(model, "load_backbone_state_dict", None)
        if callable(loader):
            loader(state, source)
        else:
            load_checked(model, state, source)
        record = {"source": "file", "files": [{"file": str(source), "tensors": len(state),
                                               "sha256": sha256_file(source)}]}
    model.qpseg_init = {**(model.qpseg_init or {}), "pretrained": record}
    return record


def random_init_note(name: str) -> str | None:
    """What to tell the user who trains ``name`` from random init where its paper did not
    (None when the paper also started from random init)."""
    entry = get_entry(name)
    if not entry.paper_init:
        return None
    how = f"pretrained: {entry.paper_init}"
    if entry.paper_init == "coco":  # none published for every backbone (see the model's doc)
        how = "pretrained: PATH to converted COCO weights, or pretrained: imagenet"
    return (f"{name} starts from random initialisation, but {entry.paper_init_source} starts "
            f"from {entry.paper_init} weights; set {how} (or init_from: a qpseg model "
            "package) to follow the paper")


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
