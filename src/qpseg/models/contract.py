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

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "OUTPUT_TYPES",
    "InputSpec",
    "ModelContract",
    "get_contract",
    "instance_targets_from_label_map",
    "make_inputs",
    "predict",
]

OutputType = Literal["pixel", "patch", "instance"]
OUTPUT_TYPES: tuple[str, ...] = ("pixel", "patch", "instance")
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
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_TYPES:
            raise ValueError(f"output must be one of {OUTPUT_TYPES}, not {self.output!r}")
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
