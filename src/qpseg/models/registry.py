"""The model registry: ``@register_model``, :func:`create_model`, :func:`list_models`.

Like timm's: each architecture module registers builder functions under a name; the registry
imports those modules (and with them torch) when it is queried, so importing ``qpseg.models``
stays cheap. :func:`get_entry` imports only the module that registers the name it is asked
for (known from :func:`catalog`), so loading a U-Net does not import torchvision's detection
models; :func:`catalog` reads names, papers and summaries from the modules' source without
importing them (``qpseg models`` starts without torch). Builders never download anything:
every model starts from random initialisation. ``pretrained="imagenet"`` (or ``"coco"``)
then loads the torchvision weights the model names
(:meth:`~qpseg.models._base.QpsegModule.pretrained_weights`) through torch's cache,
downloading them once where there is a network; ``pretrained=PATH`` loads a local state dict
(an ImageNet VGG16 checkpoint with torchvision key names, a full qpseg state dict, ...). Either
way a one-line ModelError says what does not fit or where the missing file belongs.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qpseg.errors import ModelError, QpsegWarning

if TYPE_CHECKING:  # pragma: no cover
    from qpseg.models._base import QpsegModule

__all__ = [
    "NAMED_WEIGHTS",
    "CatalogEntry",
    "InitWarning",
    "ModelEntry",
    "catalog",
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


@dataclass(frozen=True)
class CatalogEntry:
    """What :func:`catalog` knows of an architecture without building it: its name, the
    module that registers it, and the ``paper`` / ``summary`` / ``heavy`` / ``paper_init`` of
    its :class:`ModelEntry`."""

    name: str
    module: str
    paper: str = ""
    summary: str = ""
    heavy: bool = False
    paper_init: str = ""


class _NotStatic(Exception):
    """An expression :func:`_static_value` cannot evaluate from the source alone."""


_OPAQUE = object()  # a dict value that is not a constant (iterating the dict needs keys only)


class _Env(dict[str, Any]):
    """Module-level constants of a module's source; names imported with ``from M import N``
    are looked up in M's source on first use."""

    def __init__(self) -> None:
        super().__init__()
        self.imports: dict[str, tuple[str, str]] = {}

    def __missing__(self, key: str) -> Any:
        if key not in self.imports:
            raise _NotStatic(key)
        module, name = self.imports.pop(key)
        value = _module_constants(module).get(name, _OPAQUE)
        if value is _OPAQUE:
            raise _NotStatic(f"{module}.{name}")
        self[key] = value
        return value


def _static_value(node: ast.AST, env: Mapping[str, Any]) -> Any:
    """The value of a constant expression of a module's source (literals, names of earlier
    module-level constants, f-strings, indexing, ``+``; dicts whose values are not constant
    keep their keys)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.Tuple | ast.List):
        return tuple(_static_value(e, env) for e in node.elts)
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if k is None:
                raise _NotStatic("**")
            try:
                out[_static_value(k, env)] = _static_value(v, env)
            except (_NotStatic, LookupError, TypeError):
                out[_static_value(k, env)] = _OPAQUE
        return out
    if isinstance(node, ast.Subscript):
        value = _static_value(node.value, env)[_static_value(node.slice, env)]
        if value is _OPAQUE:
            raise _NotStatic("subscript")
        return value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _static_value(node.left, env) + _static_value(node.right, env)
    if isinstance(node, ast.JoinedStr):
        out_s = []
        for part in node.values:
            if isinstance(part, ast.FormattedValue):
                if part.conversion != -1 or part.format_spec is not None:
                    raise _NotStatic("formatted value")
                out_s.append(str(_static_value(part.value, env)))
            else:
                out_s.append(str(_static_value(part, env)))
        return "".join(out_s)
    raise _NotStatic(type(node).__name__)


def _parse(module: str) -> ast.Module:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise _NotStatic(module)
    with open(spec.origin, encoding="utf-8") as fh:
        return ast.parse(fh.read(), filename=spec.origin)


def _assign(node: ast.stmt, env: _Env) -> None:
    """Record a module-level ``NAME = constant`` or ``from qpseg... import NAME``."""
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qpseg"):
        for alias in node.names:
            env.imports[alias.asname or alias.name] = (node.module, alias.name)
        return
    if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
        return
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    if len(targets) == 1 and isinstance(targets[0], ast.Name):
        env.imports.pop(targets[0].id, None)
        try:
            env[targets[0].id] = _static_value(node.value, env)
        except (_NotStatic, LookupError, TypeError):
            env.pop(targets[0].id, None)


@functools.cache
def _module_constants(module: str) -> _Env:
    env = _Env()
    for node in _parse(module).body:
        _assign(node, env)
    return env


def _entry(call: ast.Call, env: Mapping[str, Any], module: str,
           doc: str | None) -> CatalogEntry:
    """The entry of one ``register_model(...)`` call (``doc``: the builder's first docstring
    line, None where the builder is not known from the source)."""
    name = _static_value(call.args[0], env)
    kw = {k.arg: _static_value(k.value, env) for k in call.keywords
          if k.arg in ("paper", "summary", "heavy", "paper_init")}
    summary = kw.get("summary") or doc
    if summary is None:
        raise _NotStatic(f"{name}: summary")
    return CatalogEntry(str(name), module, str(kw.get("paper", "")), str(summary),
                        bool(kw.get("heavy")), str(kw.get("paper_init", "")))


def _is_register(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "register_model")


def _scan_module(module: str) -> list[CatalogEntry]:
    """The registrations of one family module, read from its source: ``@register_model(...)``
    on a function, and ``register_model(...)(builder)`` in a module-level ``for`` loop over a
    constant (e.g. the encoders' names). Any other use raises :class:`_NotStatic`."""
    tree = _parse(module)
    env = _Env()
    found: list[CatalogEntry] = []
    handled: set[int] = set()
    try:
        for node in tree.body:
            _assign(node, env)
            if isinstance(node, ast.FunctionDef):
                for dec in node.decorator_list:
                    if _is_register(dec):
                        assert isinstance(dec, ast.Call)
                        doc = (ast.get_docstring(node, clean=False) or "").strip()
                        found.append(_entry(dec, env, module, doc.split("\n")[0]))
                        handled.add(id(dec))
            elif isinstance(node, ast.For) and isinstance(node.target, ast.Name):
                calls = [c for c in ast.walk(node) if _is_register(c)]
                if not calls:
                    continue
                for value in _static_value(node.iter, env):
                    env[node.target.id] = value
                    for call in calls:
                        assert isinstance(call, ast.Call)
                        found.append(_entry(call, env, module, None))
                handled.update(id(c) for c in calls)
    except (LookupError, TypeError, ValueError) as exc:
        raise _NotStatic(f"{module}: {exc}") from exc
    if any(_is_register(c) and id(c) not in handled for c in ast.walk(tree)):
        raise _NotStatic(f"{module}: a registration this reader does not follow")
    return found


@functools.cache
def _static_catalog() -> tuple[CatalogEntry, ...] | None:
    try:
        return tuple(e for m in _FAMILY_MODULES for e in _scan_module(m))
    except (_NotStatic, OSError, SyntaxError, ValueError, ImportError):
        return None  # the source cannot be read as expected: import the modules instead


def catalog() -> list[CatalogEntry]:
    """Every architecture's name, module, paper and summary, sorted by name, read from the
    family modules' source without importing them (no torch); models registered at run time
    are included. Falls back to importing the modules when their source cannot be read."""
    entries = {e.name: e for e in (_static_catalog() or ())}
    if not entries:
        _ensure_registered()
    for name, entry in _REGISTRY.items():
        module = getattr(entry.builder, "__module__", "")
        entries[name] = CatalogEntry(name, module, entry.paper, entry.summary, entry.heavy,
                                     entry.paper_init)
    return [entries[n] for n in sorted(entries)]


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    _ensure_registered()
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; unknown names get a ModelError listing close names."""
    if isinstance(name, str) and name not in _REGISTRY and not _loaded:
        module = next((e.module for e in _static_catalog() or () if e.name == name), None)
        if module is not None:  # only the module that registers it (and what it imports)
            importlib.import_module(module)
    if not isinstance(name, str) or name not in _REGISTRY:
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
