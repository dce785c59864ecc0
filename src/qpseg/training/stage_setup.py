"""How a tile-based training stage is set up: the check that one batch fits in memory, and
the stage's :class:`~qpseg.training.loop.Task` and :class:`~qpseg.training.loop.StageSpec`
(loss with class weights, cluster guide, sampler tiles, checkpoint and log paths).

Shared by the one-stage run (:mod:`qpseg.training.run`) and the patch stage of the two-stage
H2G-Net run (:mod:`qpseg.training.h2g`); it imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qpseg.training.data import StageData
    from qpseg.training.distributed import Dist

__all__: list[str] = []


def _check_memory(contract: Any, batch_size: int, stage: str = "") -> None:
    """ConfigError when one batch of the model's inputs cannot fit in this machine's memory
    (see :func:`qpseg.training.config.check_batch_memory`): the model's tile size may come from
    its defaults rather than from an option the config validation saw."""
    from qpseg.training.config import check_batch_memory

    inputs = [(int(spec.channels), int(spec.size_px)) for spec in contract.inputs]
    pre = f"stages.{stage}." if stage else ""
    check_batch_memory(batch_size, inputs, f"{contract.architecture} (tile_px "
                       f"{contract.tile_px}) with {pre}train.batch_size")


def _task_and_spec(name: str, cfg: Mapping[str, Any], module: Any, data: StageData,
                   out: Path, dist: Dist, seed: int, ckpt_dir: Path) -> Any:
    """The Task and StageSpec of a tile-based stage."""
    import numpy as np

    from qpseg.data.weights import class_pixel_counts
    from qpseg.losses import build_loss
    from qpseg.training.data import tiles_with_hist, weights_for_classes
    from qpseg.training.loop import StageSpec, Task

    contract = module.contract
    n = data.num_classes
    item_tiles = data.train.item_tiles
    if data.train_patch_labels is not None:
        counts = np.bincount(np.asarray(data.train_patch_labels), minlength=n).astype(float)
    else:
        counts = class_pixel_counts(item_tiles, n)
    lo = dict(cfg["loss"])
    if lo.get("dice_mode") is None:
        lo.pop("dice_mode")
    weights = weights_for_classes(lo.get("class_weights"), data.class_map, counts)
    spec_loss = build_loss(lo, output=contract.output, num_classes=n, class_weights=weights,
                           ignore_index=data.class_map.ignore_index)
    task = Task(output=contract.output, contract=contract, class_map=data.class_map,
                loss=spec_loss, mean=data.mean, std=data.std, device=dist.device,
                augment=cfg["augment"], seed=seed * 101 + dist.rank,
                patch_labels=data.train_patch_labels, val_patch_labels=data.val_patch_labels,
                extents=data.train.view_extents,
                border=(float(lo["border_w0"]), float(lo["border_sigma"])),
                channels_last=bool(cfg["train"]["channels_last"]))
    if spec_loss.name == "cwce":
        from qpseg.training.clusters import fit_cluster_guide

        task.cluster_model, task.cluster_features = fit_cluster_guide(
            data, cfg["loss"].get("clusters") or {}, dist, seed)
    sampler_tiles = item_tiles
    if data.train_patch_labels is not None:
        # The hierarchical sampler's class level follows the patch labels.
        items = data.train.items
        labels = [data.train_patch_labels[t] for t, _ in items]
        sampler_tiles = tiles_with_hist(item_tiles, labels, n)
    groups = [s.group for s in data.train_slides]
    spec = StageSpec(name=name, cfg=cfg, model=module, task=task, train_ds=data.train,
                     val_ds=data.val, sampler_tiles=sampler_tiles, slide_groups=groups,
                     ckpt_dir=ckpt_dir, class_map=data.class_map,
                     log_path=out / "train_log.jsonl", csv_path=out / "train_log.csv")
    return spec, weights
