"""Validation during training: the validation loss and pixel (or patch) metrics of a model
over this rank's items, summed over the ranks, under metric names built by :func:`metric_key`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qpseg.training.batches import _loader, _raise_worker_error

if TYPE_CHECKING:
    from qpseg.training.distributed import Dist
    from qpseg.training.stage import StageSpec
    from qpseg.training.task import Task

__all__ = ["metric_key"]


def metric_key(name: str) -> str:
    """Class name -> metric suffix (``"Tumor cells"`` -> ``"tumor_cells"``)."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_") or "class"


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") and not hasattr(model, "contract") \
        else model


def _validate(model: Any, task: Task, spec: StageSpec, indices: Sequence[int], dist: Dist,
              batch_size: int, workers: int, amp_dtype: Any, device: Any) -> dict[str, Any]:
    """Validation loss and pixel (or patch) metrics over the rank's items, summed over ranks."""
    import numpy as np
    import torch

    from qpseg.metrics.pixel import PixelMetrics, confusion_matrix

    k = task.num_classes
    cm = np.zeros((k, k), dtype=np.int64)
    loss_sum, count = 0.0, 0
    model.eval()
    net = _unwrap(model)
    with torch.no_grad():
        for batch in _loader(spec.val_ds, indices, batch_size, workers, device.type == "cuda"):
            if "__error__" in batch:
                _raise_worker_error(batch["__error__"])
            prep = task.prepare(batch, train=False)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                if task.output == "instance":
                    pred = task.predict_labels(net, prep)
                    ls, n = math.nan, prep.n
                else:
                    ls, out, n = task.eval_loss(net, prep)
                    pred = out.argmax(1)
            loss_sum += ls
            count += n
            t = prep.target.cpu().numpy().astype(np.uint8)
            p = pred.cpu().numpy().astype(np.uint8)
            cm += confusion_matrix(t, p, k, task.ignore)
    model.train()
    totals = torch.tensor([loss_sum if math.isfinite(loss_sum) else 0.0, float(count)],
                          dtype=torch.float64)
    cmt = torch.from_numpy(cm)
    if dist.distributed:
        dev = device if device.type == "cuda" else torch.device("cpu")
        totals, cmt = totals.to(dev), cmt.to(dev)
        dist.all_reduce_sum(totals)
        dist.all_reduce_sum(cmt)
    cm = cmt.cpu().numpy()
    metrics = PixelMetrics(cm, tuple(task.class_map.names))
    result: dict[str, Any] = {
        "val_loss": float(totals[0] / totals[1]) if task.output != "instance"
        and float(totals[1]) > 0 else math.nan,
        "val_pixels": int(cm.sum()),
        "val_accuracy": metrics.accuracy,
        "val_miou": metrics.miou,
        "val_mdice": metrics.mf1,
    }
    for name, dice, iou in zip(task.class_map.names, metrics.f1, metrics.iou, strict=True):
        key = metric_key(name)
        result[f"val_dice_{key}"] = float(dice)
        result[f"val_iou_{key}"] = float(iou)
    return result
