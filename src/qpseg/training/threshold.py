"""The probability threshold a trained pixel model is packaged with (``train.
inference_threshold``): lagree2021's precision sweep over the validation tiles, or a fixed value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qpseg.training.batches import _loader, _raise_worker_error, _val_indices, _workers
from qpseg.training.validation import _unwrap

if TYPE_CHECKING:
    from qpseg.training.distributed import Dist
    from qpseg.training.stage import StageSpec

__all__ = ["choose_threshold"]


def choose_threshold(spec: StageSpec, model: Any, dist: Dist, *, seed: int,
                     target: str | None, mpp: float) -> dict[str, Any] | None:
    """lagree2021's probability threshold of a trained pixel model, as ``train.
    inference_threshold`` asks: the record the training summary keeps (``value`` goes into the
    package's inference rules), or None when no threshold applies.

    ``auto`` (default): models whose inference rules are the nuclei rules
    (:func:`qpseg.models.contract.default_inference_rules`: trained on instance targets, or a
    nuclei architecture) run ``model`` (the selected weights) over the validation tiles and
    take the threshold of :class:`qpseg.models.nuclei.PrecisionSweep` (lagree2021, Methods,
    "Testing datasets": "a threshold that maximized precision at a given intersections over
    union (IoU) threshold"), the sweep kept in the record; ``precision``: the same for any
    pixel model; ``none``: no threshold (the most probable class); a number: that threshold.
    ``mpp`` is the tiles' pixel size (µm), for the nucleus size limits.
    """
    import warnings

    from qpseg.models.contract import default_inference_rules

    tr = spec.cfg["train"]
    mode = tr.get("inference_threshold", "auto")
    contract = spec.task.contract
    if contract.output != "pixel" or spec.task.heatmap:
        return None
    if mode is None or mode is False or mode == "none":
        return None
    if not isinstance(mode, str):
        return {"source": "config", "value": float(mode)}
    if mode == "auto" and not default_inference_rules(contract, {"target": target}).nuclei:
        return None
    from qpseg.objects import REVIEW_DEFAULTS
    from qpseg.training.data import TrainingWarning

    iou = float(tr.get("threshold_iou", 0.5))
    rule = ("lagree2021 (Methods, 'Testing datasets'): the threshold of 1 - P(Background) that "
            f"maximises object precision at IoU > {iou:g} on the validation tiles")
    record: dict[str, Any] = {"source": "validation", "rule": rule, "iou": iou, "value": None}
    indices = _val_indices(spec, dist, seed)
    if indices is None:
        warnings.warn("no validation tiles to choose the nuclei probability threshold on "
                      "(lagree2021): the package keeps the most probable class",
                      TrainingWarning, stacklevel=2)
        record["reason"] = "no validation tiles"
        return record
    sweep = _sweep(spec, model, dist, indices, iou, REVIEW_DEFAULTS["nucleus"], mpp)
    record["value"] = sweep.choose()
    record["tiles"] = sweep.tiles
    record["sweep"] = sweep.rows()
    if record["value"] is None:
        warnings.warn(f"no probability threshold finds a nucleus (IoU > {iou:g}) on the "
                      f"{sweep.tiles} validation tile(s): the package keeps the most probable "
                      "class", TrainingWarning, stacklevel=2)
        record["reason"] = "no threshold matched a true nucleus"
    return record


def _sweep(spec: StageSpec, model: Any, dist: Dist, indices: Sequence[int], iou: float,
           sizes_um2: tuple[float, float], mpp: float) -> Any:
    """The :class:`~qpseg.models.nuclei.PrecisionSweep` of ``model`` over this rank's
    validation items, its counts summed over the ranks. Nuclei smaller than ``sizes_um2[0]``
    are dropped and holes below ``sizes_um2[1]`` filled, at the tiles' pixel size, as
    inference does with the nuclei rules."""
    import numpy as np
    import torch

    from qpseg.models.contract import predict
    from qpseg.models.nuclei import PrecisionSweep

    task = spec.task
    px_um2 = float(mpp) ** 2
    sweep = PrecisionSweep(iou=iou, min_area_px=sizes_um2[0] / px_um2,
                           max_hole_px=sizes_um2[1] / px_um2)
    net = _unwrap(model)
    device = task.device
    batch_size = int(spec.cfg["train"]["batch_size"])
    workers = _workers(spec.cfg["data"]["workers"], device, dist.world_size)
    for batch in _loader(spec.val_ds, indices, batch_size, workers, device.type == "cuda"):
        if "__error__" in batch:
            _raise_worker_error(batch["__error__"])
        prep = task.prepare(batch, train=False)
        p_bg = predict(net, *prep.inputs)[:, 0].float().cpu().numpy()
        label = prep.target.cpu().numpy()
        inst = None if prep.instances is None else prep.instances.cpu().numpy()
        for i in range(prep.n):
            unknown = label[i] == task.ignore
            if inst is not None:
                truth = inst[i]
            else:  # semantic labels: 4-connected pieces of the foreground
                from scipy import ndimage as ndi

                truth = ndi.label((label[i] != 0) & ~unknown)[0]
            sweep.add(p_bg[i], truth, ignore=unknown)
    if dist.distributed:
        dev = device if device.type == "cuda" else torch.device("cpu")
        counts = torch.from_numpy(np.concatenate([sweep.counts.ravel(), [sweep.tiles]]))
        counts = counts.to(dev)
        dist.all_reduce_sum(counts)
        flat = counts.cpu().numpy()
        sweep.counts = flat[:-1].reshape(sweep.counts.shape).astype(np.int64)
        sweep.tiles = int(flat[-1])
    return sweep
