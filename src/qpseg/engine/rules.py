"""What a model package makes of an inference run: its classes as a ClassMap, the lesion
classes and the heatmap channel (from the run's options, else the package), the inference
rules (:func:`inference_rules`: the package's, with the run's options where given) and which
pipeline its contract needs (:func:`_check_supported`: tiles, instance or two-stage).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from qpseg.engine.tiling import InferenceWarning
from qpseg.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from qpseg.engine.params import InferenceParams
    from qpseg.labels import ClassMap
    from qpseg.models.contract import InferenceRules, ModelContract
    from qpseg.models.package import ModelPackage

_LESION_RE = re.compile(r"^(tumou?r|metasta|carcinoma|cancer|malignan)", re.IGNORECASE)


def package_class_map(pkg: ModelPackage) -> ClassMap:
    """The package's classes as a :class:`~qpseg.labels.ClassMap` (index 0 = Background)."""
    from qpseg.errors import LabelError
    from qpseg.labels import BACKGROUND, ClassInfo, ClassMap

    infos = [ClassInfo(i, BACKGROUND if i == 0 else name, tuple(color))  # type: ignore[arg-type]
             for i, (name, color) in enumerate(zip(pkg.class_names, pkg.class_colors,
                                                   strict=True))]
    try:
        return ClassMap(tuple(infos), ignore_index=255)
    except LabelError as exc:
        raise ModelError(f"class names cannot label objects: {exc.message}",
                         pkg.path / "config.json") from exc


def _lesion_classes(pkg: ModelPackage, params: InferenceParams) -> tuple[str, ...]:
    if params.lesion_classes is not None:
        known = {n.lower() for n in pkg.class_names[1:]}
        unknown = [c for c in params.lesion_classes if c.lower() not in known]
        if unknown:
            raise ConfigError(f"--lesion-classes: {', '.join(unknown)} not among the model's "
                              f"classes ({', '.join(pkg.class_names[1:])})")
        return tuple(params.lesion_classes)
    configured = pkg.config.training.get("lesion_classes")
    if isinstance(configured, list) and all(isinstance(c, str) for c in configured):
        return tuple(configured)
    return tuple(n for n in pkg.class_names[1:] if _LESION_RE.match(n.strip()))


def _heatmap_channel(pkg: ModelPackage, params: InferenceParams,
                     lesions: Sequence[str]) -> int:
    names = [n.lower() for n in pkg.class_names]
    if params.heatmap_class is not None:
        key = params.heatmap_class.strip()
        if key.isdigit() and int(key) < len(names):
            return int(key)
        if key.lower() in names:
            return names.index(key.lower())
        raise ConfigError(f"--heatmap-class {key!r} is not a class of the model "
                          f"({', '.join(pkg.class_names)})")
    if lesions and lesions[0].lower() in names:
        return names.index(lesions[0].lower())
    return 1 if len(names) > 1 else 0


def inference_rules(pkg: ModelPackage, params: InferenceParams) -> InferenceRules:
    """The rules a run follows: the package's recorded inference rules (a package without
    them: :func:`~qpseg.models.contract.default_inference_rules` of its output type and
    training summary), with the run's ``tissue``, ``min_tissue``, ``as_type``,
    ``min_area_um2`` and ``fill_holes_um2`` where given. Instance models always write cells.
    Warns when a nuclei model is asked for annotations: instance metrics (AJI) read
    detections and cells only, so such outputs score 0 there."""
    from qpseg.models.contract import InferenceRules, default_inference_rules

    stored = pkg.config.inference
    rules = InferenceRules.from_json(stored, pkg.path / "config.json") if stored else \
        default_inference_rules(pkg.contract, pkg.config.training)
    objects = rules.objects
    if pkg.contract.output == "instance":
        objects = "cell"
    elif params.as_type is not None:
        objects = params.as_type
    rules = replace(
        rules, objects=objects,
        tissue=rules.tissue if params.tissue is None else params.tissue,
        min_tissue=rules.min_tissue if params.min_tissue is None else params.min_tissue,
        min_area_um2=rules.min_area_um2 if params.min_area_um2 is None
        else params.min_area_um2,
        fill_holes_um2=rules.fill_holes_um2 if params.fill_holes_um2 is None
        else params.fill_holes_um2)
    if rules.nuclei and rules.objects == "annotation":
        warnings.warn(f"{pkg.path.name} segments nuclei: --as annotations writes them as "
                      "annotations, which instance metrics (AJI in qpseg evaluate) do not read; "
                      "leave out --as for one detection per nucleus", InferenceWarning,
                      stacklevel=3)
    return rules


def _check_supported(contract: ModelContract) -> str:
    """``"tiles"``, ``"instance"`` or ``"two_stage"``; ModelError for other contracts."""
    if contract.stages:
        if len(contract.stages) != 2:
            raise ModelError(f"{contract.architecture}: only two-stage (heatmap + refinement) "
                             "pipelines are supported")
        first, second = contract.stages
        if first.output not in ("patch", "pixel") or any(s.scale is None
                                                          for s in first.inputs):
            raise ModelError(f"{contract.architecture}: stage 0 must tile the slide")
        kinds = [s.kind for s in second.inputs]
        if kinds != ["image", "heatmap"] or any(s.scale is not None for s in second.inputs):
            raise ModelError(f"{contract.architecture}: stage 1 must read the whole slide "
                             "and the stage-0 heatmap")
        return "two_stage"
    if any(s.scale is None or s.kind != "image" for s in contract.inputs):
        raise ModelError(f"{contract.architecture} is one stage of a pipeline (it reads the "
                         "whole slide and a heatmap); package the full pipeline (h2g_net)")
    return "instance" if contract.output == "instance" else "tiles"
