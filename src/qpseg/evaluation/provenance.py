"""What made the predictions ``qpseg evaluate`` scores, as their files record it.

:class:`ModelInfo` (:func:`model_info`): the model package, weights SHA-256, run ids and
architecture the prediction objects record, and the training split of the package when it
is found; :func:`provenance_mpp`: the pixel size the predictions were made at, which sets the
default eval pixel size (:func:`_auto_eval_mpp`). Files are searched as text, not parsed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qpseg.evaluation.inputs import EvalInput, InputItem, _name_keys
from qpseg.evaluation.scoring import DEFAULT_EVAL_MPP

_PROVENANCE_KEYS = ("qpseg_model", "qpseg_model_sha256", "qpseg_run", "qpseg_architecture")
_PROVENANCE_TEXT = re.compile(
    rb'"(qpseg_model|qpseg_model_sha256|qpseg_run|qpseg_architecture)"\s*:\s*"([^"\\]{1,200})"')
_PROVENANCE_HEAD = 1 << 20   # provenance is in every object: the first MiB of a file has it


@dataclass
class ModelInfo:
    """What made the predictions: the provenance their objects record (model package name,
    weights SHA-256, run ids) and, when the package is found (``--model``, or the path the
    prediction folder's ``run_metadata.json`` records), its training split."""

    names: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()
    architecture: str | None = None
    package: str | None = None            # the package folder read, if any
    split: dict[str, tuple[str, ...]] = field(default_factory=dict)  # subset -> slide keys
    notes: list[str] = field(default_factory=list)

    def subset_of(self, slide: str) -> str | None:
        """``train`` / ``val`` / ``test`` when the package's split holds ``slide`` (its name
        with or without the image extension, case-insensitive), else None."""
        keys = set(_name_keys(slide))
        for subset in ("train", "val", "test"):
            if any(k in keys for s in self.split.get(subset, ()) for k in _name_keys(s)):
                return subset
        return None


def _file_provenance(path: Path) -> dict[str, set[str]]:
    import gzip

    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                head = fh.read(_PROVENANCE_HEAD)
        else:
            with open(path, "rb") as fh:
                head = fh.read(_PROVENANCE_HEAD)
    except (OSError, EOFError, gzip.BadGzipFile):
        return {}
    out: dict[str, set[str]] = {}
    for m in _PROVENANCE_TEXT.finditer(head):
        out.setdefault(m.group(1).decode(), set()).add(m.group(2).decode("utf-8", "replace"))
    return out


def model_info(preds: Sequence[InputItem], pred: EvalInput,
               model: str | os.PathLike[str] | None = None) -> ModelInfo | None:
    """The :class:`ModelInfo` of the matched prediction files; None when they record no
    provenance and no ``model`` is given. ``model``: a package folder (its ``config.json`` is
    read, not its weights: no torch); a folder that is not a package is a
    :class:`~qpseg.errors.ModelError`."""
    import json

    from qpseg.models.package import read_package_config

    found: dict[str, set[str]] = {}
    if pred.kind != "masks":
        for item in preds:
            if item.path is not None:
                for k, v in _file_provenance(item.path).items():
                    found.setdefault(k, set()).update(v)
    info = ModelInfo(names=tuple(sorted(found.get("qpseg_model", ()))),
                     sha256=tuple(sorted(found.get("qpseg_model_sha256", ()))),
                     runs=tuple(sorted(found.get("qpseg_run", ()))))
    archs = sorted(found.get("qpseg_architecture", ()))
    info.architecture = ", ".join(archs) or None
    package: Path | None = Path(model) if model is not None else None
    if package is None:
        folders = {i.path.parent for i in preds if i.path is not None}
        for folder in sorted(folders):
            try:
                meta = json.loads((folder / "run_metadata.json").read_text(encoding="utf-8"))
                recorded = meta["model"]["path"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(recorded, str) and (Path(recorded) / "config.json").is_file():
                package = Path(recorded)
                break
    if package is None:
        return info if found else None
    cfg = read_package_config(package)  # ModelError when it is no package
    info.package = str(package)
    info.architecture = info.architecture or cfg.architecture
    if not info.names:
        info.names = (package.name,)
    if cfg.weights_sha256 and info.sha256 and cfg.weights_sha256 not in info.sha256:
        info.notes.append(f"the package {package} holds other weights (SHA-256 "
                          f"{cfg.weights_sha256[:12]}…) than the predictions record "
                          f"({', '.join(s[:12] + '…' for s in info.sha256)}): its training "
                          "split may not be the one of the model scored")
    if not info.sha256 and cfg.weights_sha256:
        info.sha256 = (cfg.weights_sha256,)
    training = cfg.training if isinstance(cfg.training, dict) else {}
    for source in (training.get("split"), training.get("slides")):
        if isinstance(source, dict):
            for subset in ("train", "val", "test"):
                vals = source.get(subset)
                if isinstance(vals, list) and subset not in info.split:
                    info.split[subset] = tuple(str(v) for v in vals)
    if not info.split:
        info.notes.append(f"the package {package} records no training split")
    return info


_PROVENANCE_MPP = re.compile(rb'"qpseg_(map_)?mpp"\s*:\s*"?([0-9][0-9.eE+-]*)')


def provenance_mpp(path: str | os.PathLike[str]) -> float | None:
    """The finest pixel size (µm/px) a prediction file's objects record as made at:
    ``qpseg_map_mpp`` (the class map the objects were traced from), else ``qpseg_mpp``, as
    :func:`qpseg.objects.provenance` writes them; None when the file records neither.

    The file's text is searched for the two keys instead of parsed, so a large prediction is
    not read twice.
    """
    import gzip

    p = Path(path)
    try:
        if p.name.lower().endswith(".gz"):
            with gzip.open(p, "rb") as fh:
                data = fh.read()
        else:
            data = p.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None  # the slide's own scoring reports the unreadable file
    found: dict[bool, set[float]] = {True: set(), False: set()}
    for m in _PROVENANCE_MPP.finditer(data):
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        if math.isfinite(value) and value > 0:
            found[m.group(1) is not None].add(value)
    values = found[True] or found[False]
    return min(values) if values else None


def _auto_eval_mpp(pairs: Sequence[tuple[InputItem, InputItem]],
                   pred: EvalInput) -> tuple[float, str]:
    """``(eval mpp, where it came from)`` when ``--eval-mpp`` is not given: the finest pixel
    size among the matched predictions' provenance, else :data:`DEFAULT_EVAL_MPP`."""
    from qpseg.slide import mpp_problem

    values = []
    if pred.kind != "masks":
        for _, p in pairs:
            if p.path is not None and (v := provenance_mpp(p.path)) is not None \
                    and mpp_problem(v) is None:
                values.append(v)
    if values:
        return min(values), "the predictions' provenance (finest)"
    return DEFAULT_EVAL_MPP, "default (the predictions record no pixel size)"
