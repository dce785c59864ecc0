"""The input/output contract every qpseg model declares, and the one ``predict`` interface.

Training and whole-slide inference read a model's :class:`ModelContract` and never special-case
a model by name. The contract says

* which images the model reads (:class:`InputSpec`: size in pixels, pixel size relative to the
  package's base mpp, channels; several for multi-magnification models such as DMMN, or a
  previous stage's heatmap for H2G-Net's refinement stage),
* what it predicts (``"pixel"``: a dense class map, ``"patch"``: one label per tile,
  ``"instance"``: one mask per object) and at which stride,
* where the predicted region lies inside the inputs (``tile_px`` centred in every input; input 0
  may carry ``context_px`` of extra image around it),
* whether it can be trained (the classical baselines cannot) and whether it is a multi-stage
  pipeline (``stages``).

Conventions shared by all models (see :func:`predict`):

* ``model(*inputs)`` takes one ``(N, C_i, S_i, S_i)`` float tensor per :class:`InputSpec`, in
  order. Pixel and patch models return *logits* (softmax gives probabilities); instance models
  follow torchvision's detection API (a list of dicts in eval mode, a dict of losses in train mode
  when called as ``model(images, targets)``).
* Images are normalised by the package's mean/std *outside* the model.

This module is torch-free at import time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "OBJECT_KINDS",
    "OUTPUT_TYPES",
    "InferenceRules",
    "InputSpec",
    "ModelContract",
    "default_inference_rules",
    "get_contract",
    "instance_targets_from_label_map",
    "make_inputs",
    "predict",
]

OutputType = Literal["pixel", "patch", "instance"]
OUTPUT_TYPES: tuple[str, ...] = ("pixel", "patch", "instance")
#: What the objects of a model's output are: ``regions`` (tissue classes, lesions: one
#: annotation per connected region) or ``nuclei`` (one detection or cell per nucleus).
OBJECT_KINDS: tuple[str, ...] = ("regions", "nuclei")
InputKind = Literal["image", "heatmap"]


@dataclass(frozen=True)
class InputSpec:
    """One input of a model.

    ``size_px`` is the side of the square input in its own pixels. ``scale`` is its pixel size
    relative to the base mpp of the package (1 = base, 2 = half the magnification, so DMMN's
    20x/10x/5x inputs are scales 1, 2, 4); ``None`` means the whole slide (or tissue region)
    resized to ``size_px`` (H2G-Net's refinement stage). All inputs are centred on the same point.
    ``kind="heatmap"`` is the stitched class-``heatmap_class`` probability of the previous stage.
    """

    name: str
    size_px: int
    scale: float | None = 1.0
    channels: int = 3
    kind: InputKind = "image"
    heatmap_class: int | None = None

    @property
    def field_px(self) -> float | None:
        """Side of the region this input covers, in base-mpp pixels (None for whole-slide)."""
        return None if self.scale is None else self.size_px * self.scale


@dataclass(frozen=True)
class ModelContract:
    """What a model reads and predicts; attached to every model as ``model.contract``.

    Attributes:
        architecture: registry name.
        num_classes: number of output classes (pixel/patch) or object classes incl. background.
        inputs: one :class:`InputSpec` per positional argument of ``forward``.
        output: ``"pixel"`` (``(N, C, output_px, output_px)`` logits), ``"patch"`` (``(N, C)``
            logits, one label per ``tile_px`` tile) or ``"instance"`` (torchvision detection API).
        tile_px: side of the region one call predicts, in base-mpp pixels, centred in the inputs.
        output_px: side of the dense output map (1 for patch models).
        output_stride: base-mpp pixels per output pixel (``tile_px`` for patch models).
        context_px: extra image pixels on each side of the tile that input 0 carries and the
            output does not cover (FCN-32s with ``pad_mode="context"``: 712 px in, 512 px out).
        margin_px: pixels at each border of the output that suffer from zero padding; tiled
            inference should overlap tiles by at least ``2 * margin_px`` and trim them.
        size_multiple: every input side must be a multiple of this (encoder downsampling).
        fixed_size: True when ``tile_px`` must not change between training and inference.
        trainable: False for the classical (non-learned) baselines.
        stages: contracts of the stages of a multi-stage pipeline (H2G-Net: patch classifier,
            then refinement); the model exposes them as ``model.stages`` in the same order.
        paper: the paper and section the architecture follows.
        default_mpp: the pixel size (µm) the paper worked at for input 0, if it says.
        objects: ``"regions"`` or ``"nuclei"`` (:data:`OBJECT_KINDS`): what the paper's
            model segments, which decides the default inference rules
            (:func:`default_inference_rules`) of a package that records none.
    """

    architecture: str
    num_classes: int
    inputs: tuple[InputSpec, ...]
    output: OutputType
    tile_px: int
    output_px: int
    output_stride: int = 1
    context_px: int = 0
    margin_px: int = 0
    size_multiple: int = 1
    fixed_size: bool = False
    trainable: bool = True
    stages: tuple[ModelContract, ...] = ()
    paper: str = ""
    default_mpp: float | None = None
    objects: str = "regions"
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_TYPES:
            raise ValueError(f"output must be one of {OUTPUT_TYPES}, not {self.output!r}")
        if self.objects not in OBJECT_KINDS:
            raise ValueError(f"objects must be one of {OBJECT_KINDS}, not {self.objects!r}")
        if not self.inputs:
            raise ValueError("a model needs at least one input")
        if self.num_classes < 1 or self.tile_px < 1 or self.output_px < 1:
            raise ValueError("num_classes, tile_px and output_px must be positive")

    @property
    def channels(self) -> int:
        """Channels of input 0 (the image)."""
        return self.inputs[0].channels

    @property
    def scales(self) -> tuple[float | None, ...]:
        """Pixel size of each input relative to the base mpp (DMMN: ``(1, 2, 4)``)."""
        return tuple(spec.scale for spec in self.inputs)

    def input_mpp(self, base_mpp: float) -> tuple[float | None, ...]:
        """Absolute pixel size (µm) of each input when input 0 is read at ``base_mpp``."""
        return tuple(None if s is None else base_mpp * s for s in self.scales)

    def input_shapes(self, batch: int = 1) -> tuple[tuple[int, int, int, int], ...]:
        """``(N, C, S, S)`` of every input."""
        return tuple((batch, s.channels, s.size_px, s.size_px) for s in self.inputs)

    def output_shape(self, batch: int = 1) -> tuple[int, ...] | None:
        """Shape of ``forward``'s output for pixel/patch models; None for instance models."""
        if self.output == "pixel":
            return (batch, self.num_classes, self.output_px, self.output_px)
        if self.output == "patch":
            return (batch, self.num_classes)
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (``model-info`` prints it)."""
        data = asdict(self)
        data["inputs"] = [asdict(s) for s in self.inputs]
        data["stages"] = [s.to_dict() for s in self.stages]
        return data


def get_contract(model: object) -> ModelContract:
    """The :class:`ModelContract` of a model built by :func:`qpseg.models.create_model`."""
    contract = getattr(model, "contract", None)
    if not isinstance(contract, ModelContract):
        from qpseg.errors import ModelError

        raise ModelError(f"{type(model).__name__} has no qpseg model contract")
    return contract


_RULE_OBJECTS: tuple[str, ...] = ("annotation", "detection", "cell")


@dataclass(frozen=True)
class InferenceRules:
    """How a model's output becomes QuPath objects: recorded in its package (``config.json``
    ``"inference"``), overridable per run (``qpseg infer --tissue/--min-tissue/--as``).

    Attributes:
        tissue: tissue detection run before tiling (:data:`qpseg.tissue.TISSUE_METHODS`) or
            ``"none"`` (every tile of the image runs).
        min_tissue: a tile runs only when its tissue fraction is above this
            (:func:`qpseg.tissue.enough_tissue`, the rule training selects patches with).
        objects: QuPath object type written: ``annotation``, ``detection`` or ``cell``
            (instance models always write cells).
        nuclei: objects are nuclei: the nucleus sizes of :data:`qpseg.objects.REVIEW_DEFAULTS`
            (small-object removal and hole filling) and 4-connected components, so nuclei
            that touch only at a corner stay apart.
        threshold: a pixel is foreground when ``1 - P(Background)`` is above this (its class
            is then the most probable other class); None: the most probable class (for two
            classes the same as 0.5). lagree2021 (Methods) chooses it for precision.
        min_area_um2, fill_holes_um2: None: the review defaults of the object kind.
    """

    tissue: str = "otsu_od"
    min_tissue: float = 0.0
    objects: str = "annotation"
    nuclei: bool = False
    threshold: float | None = None
    min_area_um2: float | None = None
    fill_holes_um2: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``"inference"`` object of ``config.json``."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, path: Any = None) -> InferenceRules:
        """Validate a package's ``"inference"`` object; ModelError naming ``path``."""
        from qpseg.errors import ModelError
        from qpseg.tissue import TISSUE_METHODS

        if not isinstance(data, dict):
            raise ModelError("inference must be an object (tissue, min_tissue, objects, ...)",
                             path)
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"inference: unknown key(s) {', '.join(map(repr, unknown[:3]))}",
                             path)
        out = cls(**data)
        if out.tissue not in (*TISSUE_METHODS, "none"):
            raise ModelError(f"inference.tissue must be one of {', '.join(TISSUE_METHODS)} or "
                             f"none, not {out.tissue!r}", path)
        if out.objects not in _RULE_OBJECTS:
            raise ModelError(f"inference.objects must be one of {', '.join(_RULE_OBJECTS)}, "
                             f"not {out.objects!r}", path)
        if not isinstance(out.nuclei, bool):
            raise ModelError("inference.nuclei must be true or false", path)

        def number(value: Any, what: str, lo: float, hi: float) -> None:
            ok = (isinstance(value, int | float) and not isinstance(value, bool)
                  and math.isfinite(value) and lo <= value < hi)
            if not ok:
                raise ModelError(f"inference.{what} must be a number in [{lo:g}, {hi:g}), "
                                 f"not {value!r}", path)

        number(out.min_tissue, "min_tissue", 0.0, 1.0)
        if out.threshold is not None:
            number(out.threshold, "threshold", 0.0, 1.0)
        for name in ("min_area_um2", "fill_holes_um2"):
            if getattr(out, name) is not None:
                number(getattr(out, name), name, 0.0, math.inf)
        return out


def default_inference_rules(contract: ModelContract,
                            training: Mapping[str, Any] | None = None) -> InferenceRules:
    """The inference rules of a model trained as ``training`` says (a package's training
    summary: ``tissue_method``, ``target``, ``config``), by output type.

    Training writes these into every package it saves; a package saved without them (older
    qpseg, or :func:`qpseg.models.save_package` without ``inference``) gets the same, so both
    follow one rule:

    * instance output: cells, no tissue detection (tissue masks on an 8 µm/px thumbnail cut
      nuclei out of densely packed nuclei tiles).
    * nuclei (a model trained on instance targets, else a nuclei architecture,
      ``contract.objects``): detections, one per nucleus, with lagree2021's post-processing
      (Methods: "morphological operations that filled missing pixels and removed small
      predicted artifacts"), no tissue detection.
    * patch output (or a pipeline whose first stage is a patch classifier): the tissue
      detection it was trained with (default HSV, pedersen2022 §2.2) and its least tissue
      fraction (pedersen2022 §2.2: "Only patches containing more than 25% tissue were
      included"; :data:`qpseg.data.grid.MIN_TISSUE`).
    * other pixel output: the tissue detection it was trained with, else ``otsu_od``; every
      tile with any tissue runs.

    A pixel model's ``threshold`` is the one training recorded (``training["threshold"]
    ["value"]``: chosen for precision on the validation tiles, or fixed by the config).
    """
    from qpseg.data.grid import MIN_TISSUE
    from qpseg.tissue import TISSUE_METHODS

    info = dict(training or {})
    method = info.get("tissue_method")
    method = method if isinstance(method, str) and method in TISSUE_METHODS else None
    target = info.get("target")
    if contract.output == "instance":
        return InferenceRules(tissue="none", objects="cell", nuclei=True)
    nuclei = target == "instance" if isinstance(target, str) else contract.objects == "nuclei"
    # the probability threshold training chose (lagree2021, Methods: "a threshold that
    # maximized precision"; qpseg.training.loop.choose_threshold) or the config fixed
    chosen = info.get("threshold")
    value = chosen.get("value") if isinstance(chosen, Mapping) else None
    threshold = (float(value) if isinstance(value, int | float) and not isinstance(value, bool)
                 and 0 < value < 1 and contract.output == "pixel" else None)
    if nuclei:
        return InferenceRules(tissue="none", objects="detection", nuclei=True,
                              threshold=threshold)
    first = contract.stages[0] if contract.stages else contract
    if first.output == "patch":
        def part(obj: Any, key: str) -> Mapping[str, Any]:
            value = obj.get(key) if isinstance(obj, Mapping) else None
            return value if isinstance(value, Mapping) else {}

        cfg = part(info, "config")
        stage = part(part(cfg, "stages"), "patch")  # two-stage: the patch stage's data
        least = part(stage or cfg, "data").get("min_tissue")
        if not (isinstance(least, int | float) and not isinstance(least, bool)
                and 0 <= least < 1):
            least = MIN_TISSUE
        return InferenceRules(tissue=method or "hsv", min_tissue=float(least))
    return InferenceRules(tissue=method or "otsu_od", threshold=threshold)


def make_inputs(contract: ModelContract, batch: int = 1, *, seed: int = 0,
                dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Synthetic inputs matching ``contract`` (standard normal images, [0, 1] heatmaps).

    Used by tests and benchmarks; deterministic for a given ``seed``.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in contract.inputs:
        shape = (batch, spec.channels, spec.size_px, spec.size_px)
        x = torch.rand(shape, generator=gen) if spec.kind == "heatmap" else torch.randn(
            shape, generator=gen)
        out.append(x.to(device=device, dtype=dtype or torch.float32))
    return tuple(out)


def _normalise_instances(raw: list[dict[str, torch.Tensor]],
                         height: int, width: int) -> list[dict[str, torch.Tensor]]:
    import torch

    result = []
    for det in raw:
        masks = det.get("masks")
        n = int(det["labels"].shape[0]) if "labels" in det else 0
        if masks is None:
            masks = torch.zeros((n, height, width))
        elif masks.dim() == 4:  # torchvision: (K, 1, H, W) soft masks
            masks = masks[:, 0]
        result.append({
            "boxes": det.get("boxes", torch.zeros((n, 4))).float(),
            "labels": det.get("labels", torch.zeros((n,), dtype=torch.int64)).long(),
            "scores": det.get("scores", torch.ones((n,))).float(),
            "masks": masks.float(),
        })
    return result


def predict(model: torch.nn.Module, *inputs: torch.Tensor) -> Any:
    """Inference with any qpseg model, the same way for all of them.

    Returns probabilities: ``(N, C, H, W)`` for pixel models, ``(N, C)`` for patch models, and
    for instance models a list (one per image) of dicts with ``boxes`` ``(K, 4)`` xyxy,
    ``labels`` ``(K,)`` int64, ``scores`` ``(K,)`` and ``masks`` ``(K, H, W)`` in [0, 1].
    The model is put in eval mode for the call and its previous mode restored.
    """
    import torch

    contract = get_contract(model)
    if len(inputs) != len(contract.inputs):
        from qpseg.errors import ModelError

        raise ModelError(f"{contract.architecture} takes {len(contract.inputs)} input(s), "
                         f"got {len(inputs)}")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(*inputs)
    finally:
        model.train(was_training)
    if contract.output == "instance":
        h, w = inputs[0].shape[-2:]
        return _normalise_instances(list(out), int(h), int(w))
    return torch.softmax(out.float(), dim=1)


def instance_targets_from_label_map(label_map: Any,
                                    classes: Mapping[int, int] | None = None) -> dict[str, Any]:
    """Torchvision detection targets from an instance label map (0 = background).

    ``label_map`` is an ``(H, W)`` integer array/tensor with one id per object; ``classes`` maps
    each id to its class index (default 1 for every object). Returns ``boxes`` (xyxy, float),
    ``labels`` (int64) and ``masks`` (``(K, H, W)`` uint8) for ``model(images, targets)``, in
    increasing id order.
    """
    import numpy as np
    import torch

    lab = np.asarray(label_map.cpu() if hasattr(label_map, "cpu") else label_map)
    ids = [int(i) for i in np.unique(lab) if i != 0]
    masks = np.stack([lab == i for i in ids]) if ids else np.zeros((0, *lab.shape), bool)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    labels = [1 if classes is None else int(classes[i]) for i in ids]
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(masks.astype(np.uint8)),
    }
