"""pedersen2022's two-stage H2G-Net training: patch classifier, then refinement U-Net on the
heatmaps the trained patch classifier produces.

Stage ``patch`` (§2.2-2.3, §3.4) trains ``model.stages[0]`` on 256 px patches with patch labels
(:func:`qpseg.training.data.patch_labels`). Then, for every training and validation slide,
the trained classifier is slid over the slide's tile grid at its mpp (patches with less than
``data.min_tissue`` tissue get probability 0, as in inference), and its class-``heatmap_class``
softmax, one value per patch, is the heatmap (§2.5 steps 1-3). Stage ``refine`` (§2.5, §3.4)
trains ``model.stages[1]`` on (slide, heatmap) pairs prepared exactly as
:mod:`qpseg.engine.run` feeds them at inference: the slide read at the pixel size that makes its
longer side the refinement input, scaled to [0, 1], resized with the heatmap (bilinear) to
``tile_px`` x ``tile_px``; the label raster is resized with nearest neighbour.
Prepared pairs are stored in ``OUT/refine_data/<slide>.npz`` (uint8 image, float32 heatmap,
uint8 labels), made once, by slide over the ranks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from qpseg.errors import ConfigError, LabelError, OutputError, QpsegError, SlideError

if TYPE_CHECKING:
    import numpy as np

    from qpseg.data.grid import SlideRecord, Tile
    from qpseg.labels import ClassMap
    from qpseg.tissue import TissueMask
    from qpseg.training.distributed import Dist

from qpseg.engine.stitch import resample_map

__all__ = ["RefineDataset", "fit_refine_batch", "heatmap_for_slide", "prepare_refine_sample",
           "resample_map"]


def heatmap_for_slide(model: Any, rec: SlideRecord, class_map: ClassMap, *, mpp: float,
                      tile_px: int, heatmap_class: int, mean: Sequence[float],
                      std: Sequence[float], device: Any, batch_size: int = 32,
                      tissue_method: str | None = None, min_tissue: float = 0.25,
                      tissue: TissueMask | None = None) -> tuple[np.ndarray, float]:
    """The stage-0 heatmap of one slide: ``(ny, nx)`` float32 class-``heatmap_class``
    probabilities, one per ``tile_px`` patch of the grid from QuPath (0, 0), and the level-0
    pixels per heatmap pixel. ``tissue``: the slide's mask (else detected with
    ``tissue_method``)."""
    import numpy as np
    import torch

    from qpseg.data.augment import normalize
    from qpseg.data.dataset import TileDataset
    from qpseg.data.grid import tile_grid

    ds = mpp / rec.mpp
    tiles = tile_grid([], class_map, image_size=(rec.width, rec.height), base_mpp=rec.mpp,
                      tile_px=tile_px, mpp=mpp, select="all")
    nx = max(1, math.ceil(rec.width / (tile_px * ds) - 1e-9))
    ny = max(1, math.ceil(rec.height / (tile_px * ds) - 1e-9))
    heat = np.zeros((ny, nx), dtype=np.float32)
    keep = list(range(len(tiles)))
    if tissue is not None or tissue_method is not None:
        from qpseg.tissue import enough_tissue

        mask = tissue if tissue is not None else _detect(rec, str(tissue_method))
        side = tile_px * ds
        keep = [i for i, t in enumerate(tiles)
                if enough_tissue(mask.region_fraction(t.x, t.y, side, side), min_tissue)]
    if not keep:
        return heat, tile_px * ds
    ds_set = TileDataset([rec], [tiles[i] for i in keep], class_map, tile_px=tile_px, mpp=mpp)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(keep), batch_size):
            items = [ds_set[k] for k in range(start, min(len(keep), start + batch_size))]
            x = torch.stack([it["image"] for it in items]).to(device)
            prob = torch.softmax(model(normalize(x, mean, std)).float(), 1)[:, heatmap_class]
            for it, p in zip(items, prob.cpu().tolist(), strict=True):
                tile = ds_set.tiles[it["meta"]["tile"]]
                heat[round(tile.y / (tile_px * ds)), round(tile.x / (tile_px * ds))] = p
    ds_set.close()
    return heat, tile_px * ds


def _detect(rec: SlideRecord, method: str) -> TissueMask:
    from qpseg.slide import open_slide
    from qpseg.tissue import detect_tissue

    with open_slide(rec.path, mpp=rec.mpp) as slide:
        return detect_tissue(slide, method)


def prepare_refine_sample(rec: SlideRecord, heat: np.ndarray, heat_ds: float,
                          class_map: ClassMap, size: int, *, unlabelled: str = "ignore",
                          tissue: TissueMask | None = None) -> dict[str, np.ndarray]:
    """Image (uint8 ``(S, S, 3)``), heatmap (float32 ``(S, S)``) and labels (uint8 ``(S, S)``)
    of one slide for the refinement stage (see the module docstring). ``unlabelled`` /
    ``tissue``: :func:`qpseg.labels.rasterize_labels`'s ``unlabelled`` / ``within``
    (pedersen2022: all tissue outside the tumour outline is non-tumour)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from qpseg.labels import rasterize_labels
    from qpseg.slide import open_slide

    w_q, h_q = rec.width, rec.height
    ds_r = max(w_q, h_q) / size
    wr, hr = max(1, math.ceil(w_q / ds_r - 1e-9)), max(1, math.ceil(h_q / ds_r - 1e-9))
    with open_slide(rec.path, mpp=rec.mpp) as slide:
        img = slide.read_region_mpp(0.0, 0.0, wr, hr, rec.mpp * ds_r)
    lab = rasterize_labels(rec.annotations, (0.0, 0.0, wr, hr), rec.mpp * ds_r, class_map,
                           base_mpp=rec.mpp, unlabelled=cast(Any, unlabelled),
                           within=tissue if unlabelled == "background" else None)
    heat_r = resample_map(heat[None], heat_ds, (hr, wr), ds_r)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    hm = F.interpolate(torch.from_numpy(heat_r)[None], size=(size, size), mode="bilinear",
                       align_corners=False)
    lb = F.interpolate(torch.from_numpy(lab.astype(np.float32))[None, None], size=(size, size),
                       mode="nearest")
    return {
        "image": x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy(),
        "heatmap": hm[0, 0].numpy().astype(np.float32),
        "label": lb[0, 0].round().to(torch.uint8).numpy(),
    }


class RefineDataset:
    """(slide image, heatmap) -> labels samples stored as ``.npz`` files, one per slide, in
    the item layout of :class:`~qpseg.data.dataset.TileDataset` (``inputs`` = [image in
    [0, 1], heatmap], ``label``, ``meta``)."""

    def __init__(self, files: Sequence[Path], keys: Sequence[str] | None = None,
                 ignore_index: int = 255) -> None:
        self.files = [Path(f) for f in files]
        self.keys = list(keys) if keys is not None else [f.stem for f in self.files]
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np
        import torch

        try:
            with np.load(self.files[index]) as data:
                image = torch.from_numpy(data["image"]).permute(2, 0, 1).float().div_(255.0)
                heat = torch.from_numpy(data["heatmap"].astype(np.float32))[None]
                label = torch.from_numpy(data["label"].astype(np.int64))
        except (OSError, ValueError, KeyError) as exc:
            raise SlideError(f"cannot read prepared refinement sample: {exc}",
                             self.files[index]) from None
        return {"image": image, "inputs": [image, heat], "label": label,
                "meta": {"index": index, "tile": index, "slide": index, "x": 0.0, "y": 0.0,
                         "elastic": False, "skipped": False}}

    def pseudo_tiles(self) -> list[Tile]:
        """One :class:`~qpseg.data.grid.Tile` per slide (for the samplers)."""
        import numpy as np

        from qpseg.data.grid import Tile

        out = []
        for i, f in enumerate(self.files):
            with np.load(f) as data:
                lab = data["label"]
            n_cls = int(lab[lab != self.ignore_index].max(initial=0)) + 1
            hist = np.bincount(lab[lab != self.ignore_index].ravel(), minlength=n_cls)
            frac = float((lab != self.ignore_index).mean())
            out.append(Tile(i, 0.0, 0.0, frac, tuple(int(v) for v in hist), None))
        return out

    def summary(self) -> dict[str, Any]:
        """Number of prepared slides."""
        return {"slides": len(self.files), "items": len(self.files)}


@dataclass
class RefineData:
    """The refinement stage's datasets."""

    train: RefineDataset
    val: RefineDataset | None
    size: int


def build_refine_data(patch_model: Any, stage0: Any, refine_size: int, heat_class: int,
                      out_dir: Path, dist: Dist, *, batch_size: int, tissue_method: str | None,
                      min_tissue: float, on_error: str, unlabelled: str = "ignore"
                      ) -> RefineData:
    """Heatmaps and refinement samples of the train/val slides of ``stage0`` (a
    :class:`~qpseg.training.data.StageData`), computed by slide over the ranks."""
    import numpy as np

    from qpseg._io import atomic_write
    from qpseg.data.splits import Split
    from qpseg.training.data import TrainingWarning

    split: Split = stage0.split
    folder = out_dir / "refine_data"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError.from_os_error(exc, folder) from exc
    todo = list(stage0.train_slides) + list(stage0.val_slides)
    mine = todo[dist.rank::dist.world_size]
    failed: list[str] = []
    for rec in mine:
        target = folder / f"{_safe_name(rec.key)}.npz"
        if target.is_file():
            continue
        try:
            mask = _detect(rec, tissue_method) if tissue_method is not None else None
            heat, hds = heatmap_for_slide(
                patch_model, rec, stage0.class_map, mpp=stage0.mpp, tile_px=stage0.tile_px,
                heatmap_class=heat_class, mean=stage0.mean, std=stage0.std, device=dist.device,
                batch_size=batch_size, min_tissue=min_tissue, tissue=mask)
            sample = prepare_refine_sample(rec, heat, hds, stage0.class_map, refine_size,
                                           unlabelled=unlabelled, tissue=mask)
        except QpsegError as exc:
            if on_error == "raise":
                raise
            warnings.warn(f"{rec.path}: slide skipped for the refinement stage: {exc.message}",
                          TrainingWarning, stacklevel=2)
            failed.append(rec.key)
            continue
        try:  # atomic: a crash or a full disk leaves no half-written sample behind
            with atomic_write(target, "wb", backup=False) as fh:
                np.savez(fh, image=sample["image"], heatmap=sample["heatmap"],
                         label=sample["label"])
        except OSError as exc:
            raise OutputError.from_os_error(exc, target) from exc
    dist.barrier()
    failed_all = {k for part in dist.all_gather(failed) for k in part}

    def dataset(subset: str) -> RefineDataset | None:
        keys = [s.key for s in todo if split.subset_of(s.key) == subset
                and s.key not in failed_all]
        if not keys:
            return None
        return RefineDataset([folder / f"{_safe_name(k)}.npz" for k in keys], keys)

    train = dataset("train")
    if train is None:
        raise LabelError("no training slide left for the refinement stage")
    return RefineData(train, dataset("val"), refine_size)


def _safe_name(key: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:120] or "slide"


def check_two_stage(contract: Any) -> None:
    """Only heatmap + refinement pipelines (H2G-Net) are trained in two stages."""
    if len(contract.stages) != 2 or contract.stages[0].output != "patch" or [
            s.kind for s in contract.stages[1].inputs] != ["image", "heatmap"]:
        raise ConfigError(f"{contract.architecture}: only patch-classifier + refinement "
                          "pipelines (h2g_net) can be trained in stages")


def check_stages(cfg: Mapping[str, Any]) -> None:
    """A two-stage config has exactly ``stages.patch`` and ``stages.refine``."""
    if sorted((cfg.get("stages") or {}).keys()) != ["patch", "refine"]:
        raise ConfigError("h2g_net needs stages.patch and stages.refine (and no other stage) "
                          "in the config")


def fit_refine_batch(rcfg: dict[str, Any], n_slides: int, world_size: int = 1
                     ) -> dict[str, Any]:
    """The refinement stage's batch fitted to the training slides there are.

    An item of the refinement stage is a whole slide, and an epoch one pass over the training
    slides; pedersen2022 §3.4 accumulated 4 x 6 = 24 of them per step, more than a lab with 10
    slides has. With fewer slides per process than ``batch_size x accumulate`` the
    accumulation shrinks first (the batch size is what memory allows), then the batch, so one
    step takes at most every slide once; a :class:`~qpseg.data.DataWarning` says so and the
    stage's config (recorded in the package) holds the values used.
    """
    import warnings

    from qpseg.data import DataWarning

    tr = rcfg["train"]
    batch, accumulate = int(tr["batch_size"]), int(tr["accumulate"])
    per_process = n_slides // max(1, world_size)
    if per_process >= batch * accumulate or per_process < 1:
        return rcfg
    new_batch = min(batch, per_process)
    new_acc = max(1, per_process // new_batch)
    warnings.warn(f"refinement stage: {per_process} training slide(s) per process do not fill "
                  f"a step of {batch} x {accumulate} slides; training with batch_size "
                  f"{new_batch} x accumulate {new_acc} ({new_batch * new_acc} slides per step)",
                  DataWarning, stacklevel=2)
    return {**rcfg, "train": {**tr, "batch_size": new_batch, "accumulate": new_acc}}


def train_two_stage(manifest: Any, out: Path, cfg: Mapping[str, Any], arch: str, model: Any,
                    dist: Dist, *, resume: bool, dry_run: bool, callback: Any,
                    params: Mapping[str, Any]) -> Any:
    """Train both stages of ``model`` (H2G-Net) and write one package holding both."""
    from qpseg.data.weights import class_pixel_counts
    from qpseg.losses import build_loss
    from qpseg.training.config import stage_config
    from qpseg.training.data import (
        class_map_for,
        data_summary,
        normalization,
        prepare_data,
        weights_for_classes,
    )
    from qpseg.training.loop import StageSpec, Task, TrainEvent, run_stage
    from qpseg.training.run_record import (
        TrainResult,
        _finish_metadata,
        _save,
        _start_metadata,
        _training_summary,
    )
    from qpseg.training.stage_setup import _check_memory, _task_and_spec

    check_two_stage(model.contract)
    check_stages(cfg)
    pcfg, rcfg = stage_config(cfg, "patch"), stage_config(cfg, "refine")
    _check_memory(model.stages[0].contract, int(pcfg["train"]["batch_size"]), "patch")
    _check_memory(model.stages[1].contract, int(rcfg["train"]["batch_size"]), "refine")
    seed = int(cfg["train"]["seed"])
    started = __import__("time").time()
    patch, refine = model.stages[0], model.stages[1]
    heat_class = refine.contract.inputs[1].heatmap_class
    heat_class = 1 if heat_class is None else int(heat_class)
    cfg_hc = pcfg["data"]["heatmap_class"]
    if cfg_hc is not None:
        idx = cfg_hc if isinstance(cfg_hc, int) else class_map_for(
            manifest, cfg.get("classes")).index_of(str(cfg_hc))
        if idx != heat_class:
            raise ConfigError(f"data.heatmap_class {cfg_hc!r} is not the refinement network's "
                              f"heatmap_class ({heat_class}; set refine_kwargs.heatmap_class)")
    data0 = prepare_data(manifest, {**pcfg, "data": {**pcfg["data"], "heatmap_class":
                                                     heat_class}}, patch.contract, seed=seed)
    summary: dict[str, Any] = {
        "patch": data_summary(data0),
        "refine": {"train_slides": [s.key for s in data0.train_slides],
                   "val_slides": [s.key for s in data0.val_slides],
                   "tile_px": refine.contract.tile_px, "heatmap_class": heat_class},
        "model": {"architecture": arch, "kwargs": cfg.get("model_kwargs") or {},
                  "output": "pixel", "stages": ["patch", "refine"]},
    }
    if dry_run:
        return TrainResult(out, dict(cfg), summary, dry_run=True, rank=dist.rank,
                           world_size=dist.world_size)
    spec0, w0 = _task_and_spec("patch", pcfg, patch, data0, out, dist, seed,
                               out / "checkpoints" / "patch")
    meta = _start_metadata(out, cfg, arch, manifest, data0, dist, params, summary,
                           manifest.path, resume)
    if callback is not None and dist.is_main:
        callback(TrainEvent("stage", "patch", message="stage 1/2: patch classifier"))
    r0 = run_stage(spec0, dist, resume=resume, callback=callback, seed=seed)

    if callback is not None and dist.is_main:
        callback(TrainEvent("stage", "refine", message="stage 2/2: heatmaps, then the "
                            "refinement network"))
    rdata = build_refine_data(
        r0.model, data0, refine.contract.tile_px, heat_class, out, dist,
        batch_size=int(pcfg["train"]["batch_size"]), tissue_method=data0.tissue_method,
        min_tissue=float(pcfg["data"]["min_tissue"]), on_error=pcfg["data"]["on_error"],
        unlabelled=rcfg["data"]["unlabelled"])
    rcfg = fit_refine_batch(rcfg, len(rdata.train), dist.world_size)
    rmean, rstd = normalization(rcfg["data"]["normalization"])
    tiles = rdata.train.pseudo_tiles()
    n = len(data0.class_map)
    lo = dict(rcfg["loss"])
    if lo.get("dice_mode") is None:
        lo.pop("dice_mode")
    weights = weights_for_classes(lo.get("class_weights"), data0.class_map,
                                  class_pixel_counts(tiles, n))
    loss = build_loss(lo, output="pixel", num_classes=n, class_weights=weights,
                      ignore_index=data0.class_map.ignore_index)
    task = Task(output="pixel", contract=refine.contract, class_map=data0.class_map, loss=loss,
                mean=rmean, std=rstd, device=dist.device, augment=rcfg["augment"],
                seed=seed * 103 + dist.rank, patch_labels=None, val_patch_labels=None,
                extents=(1.0,), heatmap=True)
    groups_by_key = {s.key: s.group for s in data0.train_slides}
    spec1 = StageSpec(name="refine", cfg=rcfg, model=refine, task=task, train_ds=rdata.train,
                      val_ds=rdata.val, sampler_tiles=tiles,
                      slide_groups=[groups_by_key.get(k) for k in rdata.train.keys],
                      ckpt_dir=out / "checkpoints" / "refine", class_map=data0.class_map,
                      log_path=out / "train_log.jsonl", csv_path=out / "train_log.csv")
    r1 = run_stage(spec1, dist, resume=resume, callback=callback, seed=seed + 1)
    training = _training_summary(cfg, data0, [r0, r1], w0)
    training["heatmap_class"] = heat_class
    training["refine_batch"] = {"batch_size": int(rcfg["train"]["batch_size"]),
                                "accumulate": int(rcfg["train"]["accumulate"])}
    package = None
    if dist.is_main:
        package = _save(out, model, data0, training,
                        stage_normalization=[(data0.mean, data0.std), (rmean, rstd)],
                        mean=data0.mean, std=data0.std)
        _finish_metadata(out, meta, [r0, r1], started)
        if callback is not None:
            callback(TrainEvent("done", "refine", r1.epochs, r1.epochs, r1.steps, r1.steps,
                                metrics=r1.best.get("last_metrics", {}), message=str(out)))
    dist.barrier()
    return TrainResult(out, dict(cfg), summary, model=model, stages=[r0, r1], package=package,
                       metrics=r1.best.get("last_metrics", {}), rank=dist.rank,
                       world_size=dist.world_size)
