"""The training loop of one stage: batches, augmentation, loss, optimizer steps, validation,
checkpoints, early stopping, boosting, logs.

One code path for one CPU, one GPU and ``torchrun`` (DDP): the model is wrapped in
``DistributedDataParallel`` when more than one process trains, samplers shard by slide, losses
and confusion matrices are summed over the processes, and only rank 0 writes files and reports
progress. What a batch is and how the model is fed (dense labels, patch labels, instance maps,
slide + heatmap) is a :class:`Task`, chosen from the model contract.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from qpseg.errors import ConfigError, OutputError, QpsegError

if TYPE_CHECKING:
    import torch

    from qpseg.data.grid import Tile
    from qpseg.labels import ClassMap
    from qpseg.losses import LossSpec
    from qpseg.models.contract import ModelContract
    from qpseg.training.distributed import Dist

__all__ = ["CURVES_NAME", "TENSORBOARD_DIR", "StageResult", "StageSpec", "Task", "TrainEvent",
           "choose_threshold", "metric_key", "run_stage", "tensorboard_writer"]

Callback = Callable[["TrainEvent"], None]


@dataclass
class TrainEvent:
    """Progress of a run (what the CLI renders): ``kind`` is ``start``, ``step``, ``epoch``,
    ``checkpoint``, ``stage`` (a stage begins), ``resumed``, ``stopped`` (early stopping) or
    ``done``. An exception raised by the callback aborts the run (the last checkpoint stays).

    ``step`` events come after every optimizer step: ``loss`` is that step's loss on this
    process (averaged over all processes on the steps written to ``train_log.jsonl``, every
    ``train.log_every``), ``eta_s`` the seconds left at the average pace of this stage so far
    (validation and checkpoints included)."""

    kind: str
    stage: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    tiles_per_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    eta_s: float | None = None


@dataclass
class StageResult:
    """What a stage produced: the trained module (best weights when selected), counters and
    the per-epoch history."""

    name: str
    model: Any
    steps: int
    epochs: int
    history: list[dict[str, Any]]
    best: dict[str, Any]
    stopped_early: bool
    finished: bool


def metric_key(name: str) -> str:
    """Class name -> metric suffix (``"Tumor cells"`` -> ``"tumor_cells"``)."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_") or "class"


# ================================================================================= datasets
class _SafeDataset:
    """Turns a qpseg error in a loader worker into a marker the main process re-raises as the
    same one-line error (DataLoader would re-raise it wrapped in the worker's traceback)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except QpsegError as exc:
            return {"__error__": (type(exc).__name__, exc.message,
                                  None if exc.path is None else str(exc.path))}


def _collate(items: list[Any]) -> Any:
    from torch.utils.data import default_collate

    for it in items:
        if isinstance(it, dict) and "__error__" in it:
            return {"__error__": it["__error__"]}
    return default_collate(items)


def _raise_worker_error(info: tuple[str, str, str | None]) -> None:
    import qpseg.errors as errors

    cls = getattr(errors, info[0], None)
    if not (isinstance(cls, type) and issubclass(cls, QpsegError)):
        cls = QpsegError
    raise cls(info[1], info[2])


class _SkipSampler:
    """Yields ``inner``'s indices after skipping the first ``skip`` (resuming mid-epoch without
    reading the tiles already trained on); ``limit`` caps how many are yielded."""

    def __init__(self, inner: Any, limit: int) -> None:
        self.inner = inner
        self.skip = 0
        self.limit = limit

    def __len__(self) -> int:
        return max(0, self.limit - self.skip)

    def __iter__(self) -> Any:
        import itertools

        return itertools.islice(iter(self.inner), self.skip, self.limit)


# ==================================================================================== tasks
@dataclass
class Prepared:
    """One batch ready for the model: its inputs, target and extras."""

    inputs: list[Any]
    target: Any
    n: int
    weight_map: Any = None
    clusters: Any = None
    instances: Any = None
    positions: Any = None


class Task:
    """How batches of a stage become model inputs and targets.

    ``output`` is the contract's (``pixel``, ``patch`` or ``instance``); ``heatmap`` marks the
    refinement stage of a two-stage model (inputs: slide image and heatmap, the latter
    augmented geometrically only).
    """

    def __init__(self, *, output: str, contract: ModelContract, class_map: ClassMap,
                 loss: LossSpec, mean: Sequence[float], std: Sequence[float], device: Any,
                 augment: Mapping[str, Any], seed: int, patch_labels: Sequence[int] | None,
                 val_patch_labels: Sequence[int] | None, extents: Sequence[float],
                 border: tuple[float, float] = (10.0, 5.0), heatmap: bool = False,
                 channels_last: bool = False) -> None:
        import torch

        from qpseg.data.augment import AugmentConfig, Augmenter

        self.output = output
        self.contract = contract
        self.class_map = class_map
        self.num_classes = len(class_map)
        self.ignore = class_map.ignore_index
        self.loss = loss
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.device = device
        self.heatmap = heatmap
        self.extents = tuple(extents)
        self.border = border
        self.channels_last = channels_last
        aug = dict(augment)
        preset = aug.pop("preset", "none")
        for key in ("zoom",):
            if isinstance(aug.get(key), list):
                aug[key] = tuple(aug[key])
        for key in ("stain_sigma",):
            if isinstance(aug.get(key), list):
                aug[key] = tuple(aug[key])
        self.aug_config = AugmentConfig.preset(preset, ignore_index=self.ignore, **aug)
        self.augmenter = Augmenter(self.aug_config, seed=seed)
        self.patch_labels = None if patch_labels is None else torch.as_tensor(
            list(patch_labels), dtype=torch.long)
        self.val_patch_labels = None if val_patch_labels is None else torch.as_tensor(
            list(val_patch_labels), dtype=torch.long)
        self.cluster_model: Any = None
        self.cluster_features: Any = None

    # ----------------------------------------------------------------------------- helpers
    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        from qpseg.data.augment import normalize

        if x.shape[1] == len(self.mean):
            x = normalize(x, self.mean, self.std)
        if self.channels_last and x.dim() == 4:
            import torch

            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _patch_target(self, batch: Mapping[str, Any], train: bool) -> torch.Tensor:
        labels = self.patch_labels if train else self.val_patch_labels
        assert labels is not None
        return labels[batch["meta"]["tile"].long()].to(self.device)

    def _geometry_only(self, state: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
        """Replay the augmenter's geometric draws on the heatmap (fill 0, no colour)."""
        from dataclasses import replace

        from qpseg.data.augment import Augmenter

        cfg = replace(self.aug_config, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
                      hsv_shift=0.0, stain_sigma=None, fill=0.0, mean=None, std=None)
        geo = Augmenter(cfg, seed=0)
        geo.generator.set_state(state)
        return geo(heat).inputs[0]

    # ---------------------------------------------------------------------------- prepare
    def prepare(self, batch: Mapping[str, Any], *, train: bool) -> Prepared:
        """Move a collated batch to the device, augment it (training) and normalise it."""

        views = [v.to(self.device, non_blocking=True).float() for v in batch["inputs"]]
        label = batch["label"].to(self.device, non_blocking=True).long()
        inst = batch.get("instances")
        inst = None if inst is None else inst.to(self.device, non_blocking=True).long()
        n = int(views[0].shape[0])
        positions = batch["meta"]["index"]
        if self.heatmap:
            image, heat = views[0], views[1]
            if train:
                state = self.augmenter.generator.get_state()
                res = self.augmenter(image, label)
                image, label = res.inputs[0], res.label
                heat = self._geometry_only(state, heat)
            return Prepared([self._norm(image), heat], label, n, positions=positions)
        if train:
            elastic = batch["meta"].get("elastic")
            res = self.augmenter(views, None if self.output == "patch" else label,
                                 instances=inst, elastic_mask=elastic, extents=self.extents)
            views = res.inputs
            if self.output != "patch":
                label = res.label if res.label is not None else label
            inst = res.instances if inst is not None else None
        views = [self._norm(v) for v in views]
        if self.output == "patch":
            target = self._patch_target(batch, train)
            clusters = None
            if self.cluster_model is not None and train:
                clusters = self.cluster_model.predict(self.cluster_features(views[0]))
            return Prepared(views, target, n, clusters=clusters, positions=positions)
        wmap = None
        if self.loss.needs_weight_map and train:
            wmap = self._weight_maps(label, inst)
        return Prepared(views, label, n, weight_map=wmap, instances=inst, positions=positions)

    def _weight_maps(self, label: torch.Tensor, inst: torch.Tensor | None) -> torch.Tensor:
        """lagree2021 eq. (2) border weight maps (Ronneberger), one per sample, on the CPU."""
        import numpy as np
        import torch
        from scipy import ndimage as ndi

        from qpseg.losses import unet_weight_map

        lab = label.cpu().numpy()
        ins = None if inst is None else inst.cpu().numpy()
        out = []
        for i in range(lab.shape[0]):
            if ins is not None:
                objects = ins[i]
            else:  # semantic labels: connected components of each foreground class
                objects = np.zeros(lab[i].shape, np.int64)
                nxt = 0
                for c in range(1, self.num_classes):
                    comp, k = ndi.label(lab[i] == c)
                    objects[comp > 0] = comp[comp > 0] + nxt
                    nxt += k
            out.append(unet_weight_map(objects, lab[i], n_classes=self.num_classes,
                                       w0=self.border[0], sigma=self.border[1],
                                       ignore_index=self.ignore))
        return torch.from_numpy(np.stack(out)).to(self.device)

    # ------------------------------------------------------------------------------ model
    def _instance_targets(self, p: Prepared) -> list[dict[str, torch.Tensor]]:
        import torch

        from qpseg.models.contract import instance_targets_from_label_map

        targets = []
        inst = p.instances.cpu()
        lab = p.target.cpu()
        for i in range(p.n):
            ids = inst[i]
            classes: dict[int, int] = {}
            if bool((ids > 0).any()):
                m = ids > 0
                pairs = torch.stack([ids[m], lab[i][m]], 1)
                uniq, counts = torch.unique(pairs, dim=0, return_counts=True)
                # Each object's class is its most frequent label (ascending counts: last wins).
                for (k, c), _n in sorted(zip(uniq.tolist(), counts.tolist(), strict=True),
                                         key=lambda t: t[1]):
                    classes[int(k)] = max(1, min(self.num_classes - 1, int(c)))
            t = instance_targets_from_label_map(ids, classes)
            targets.append({k: v.to(self.device) for k, v in t.items()})
        return targets

    def forward_loss(self, model: Any, p: Prepared) -> tuple[torch.Tensor, Any]:
        """Training loss of a prepared batch and the model output (None for instance)."""
        if self.output == "instance":
            losses = model(p.inputs[0], self._instance_targets(p))
            return self.loss(losses, p.target), None
        out = model(*p.inputs)
        return self.loss(out, p.target, weight_map=p.weight_map, clusters=p.clusters), out

    def predict_labels(self, model: Any, p: Prepared) -> torch.Tensor:
        """Class predictions ``(N, H, W)`` (``(N,)`` for patch models) in eval mode."""
        import torch

        if self.output == "instance":
            dets = model(p.inputs[0])
            h, w = p.target.shape[-2:]
            pred = torch.zeros((p.n, h, w), dtype=torch.long, device=p.target.device)
            for i, det in enumerate(dets):
                masks = det.get("masks")
                if masks is None or masks.shape[0] == 0:
                    continue
                order = torch.argsort(det["scores"])  # best painted last
                for j in order.tolist():
                    pred[i][masks[j, 0] > 0.5] = int(det["labels"][j])
            return pred
        return model(*p.inputs).argmax(1)

    def eval_loss(self, model: Any, p: Prepared) -> tuple[float, Any, int]:
        """(summed loss, output, count) of a validation batch (no augmentation; the lagree2021
        loss without its border term, which needs instance maps of augmented tiles)."""
        out = model(*p.inputs)
        spec = self.loss if self.loss.name != "cwce" else replace(self.loss, name="ce")
        loss = spec(out, p.target, weight_map=None, clusters=None)
        return float(loss) * p.n, out, p.n


# ================================================================================ the stage
@dataclass
class StageSpec:
    """One stage to train (a single-stage model has one)."""

    name: str
    cfg: Mapping[str, Any]
    model: Any  # the module trained (a stage of a pipeline, or the whole model)
    task: Task
    train_ds: Any
    val_ds: Any
    sampler_tiles: Sequence[Tile]
    slide_groups: Sequence[str | None]
    ckpt_dir: Path
    class_map: ClassMap
    log_path: Path
    csv_path: Path


def _sampler(spec: StageSpec, dist: Dist, seed: int) -> tuple[Any, Any]:
    """(sampler, boosting weights or None) of a stage, sharded by slide over the ranks."""
    import numpy as np

    from qpseg.data.samplers import (
        BoostedSetSampler,
        BoostingWeights,
        DistributedSlideSampler,
        FocusingSampler,
        HierarchicalSampler,
        UniformTileSampler,
        rank_indices,
    )

    sa = spec.cfg["sampler"]
    tiles = spec.sampler_tiles
    name = sa["name"]
    per_epoch = sa["samples_per_epoch"]
    world, rank = dist.world_size, dist.rank
    subsets: list[list[int] | None] = [None]
    if world > 1:
        subsets = [rank_indices(tiles, world, r) for r in range(world)]
    mine = subsets[rank] if world > 1 else None
    frac = np.array([t.labelled_fraction for t in tiles])

    def eligible(sub: list[int] | None, low: float) -> int:
        idx = np.arange(len(tiles)) if sub is None else np.asarray(sub, dtype=np.int64)
        return int(((frac[idx] >= low) & (frac[idx] > 0)).sum()) if len(idx) else 0

    def count(low: float) -> int | None:
        if per_epoch is not None:
            return max(1, int(per_epoch) // world)
        if world == 1:
            return None
        return max(eligible(s, low) for s in subsets)

    boost = None
    if name == "uniform":
        if world > 1 and per_epoch is None:
            return DistributedSlideSampler(tiles, num_replicas=world, rank=rank, seed=seed), None
        return UniformTileSampler(tiles, num_samples=count(0.0), seed=seed, subset=mine), None
    if name == "focusing":
        return FocusingSampler(tiles, gamma=float(sa["gamma"]), num_samples=count(sa["gamma"]),
                               seed=seed, subset=mine), None
    if name == "boosting":
        if spec.task.output != "pixel":
            raise ConfigError("boosting (khalil2022) needs a dense (pixel) model")
        boost = BoostingWeights(tiles, gamma=float(sa["gamma"]), chi=float(sa["chi"]))
        # §3.2.3: an epoch is the enlarged training set T_h, every tile l_e times.
        shards = [s for s in subsets if s is not None] if world > 1 else None
        return BoostedSetSampler(boost, seed=seed, subsets=shards, rank=rank), boost
    # hierarchical (pedersen2022 §2.3)
    n = count(0.0)
    if n is None:
        n = len(tiles)
    return HierarchicalSampler(tiles, list(spec.slide_groups), num_samples=n, seed=seed,
                               subset=mine, min_class_pixels=int(sa["min_class_pixels"])), None


def _workers(value: Any, device: Any, world: int) -> int:
    """``data.workers``: an int, or ``auto``: 0 on CPU (decoding in the training process is
    fastest when the CPU also runs the model), else up to 8 per GPU process (pedersen2022
    §3.4 generated batches with eight workers)."""
    if value != "auto":
        return int(value)
    if device.type != "cuda":
        return 0
    import os

    return max(1, min(8, (os.cpu_count() or 2) // max(1, world) - 1))


def _precision(name: str, device: Any) -> str:
    import torch

    if name != "auto":
        if name == "fp16" and device.type != "cuda":
            raise ConfigError("fp16 training needs a GPU (use bf16 or fp32 on CPU)")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


#: Beside ``train_log.csv``: the loss and validation scores per epoch (qpseg.training.curves).
CURVES_NAME = "training_curves.png"
#: Under the run folder, one subfolder per stage: TensorBoard event files (train.tensorboard).
TENSORBOARD_DIR = "tensorboard"


def tensorboard_writer(log_dir: Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` writing into ``log_dir``; ConfigError when
    the optional ``tensorboard`` package is missing (``pip install 'qpseg[tensorboard]'``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard (--tensorboard) needs the tensorboard package: "
                          "pip install 'qpseg[tensorboard]'") from None
    try:
        return SummaryWriter(log_dir=str(log_dir))
    except OSError as exc:
        raise OutputError.from_os_error(exc, log_dir) from exc


class _Logger:
    """train_log.jsonl (every record), train_log.csv (one row per epoch) and
    training_curves.png beside it (redrawn every epoch), rank 0 only; with ``tensorboard`` (a
    SummaryWriter) the same numbers as TensorBoard scalars."""

    def __init__(self, spec: StageSpec, enabled: bool, tensorboard: Any = None) -> None:
        self.spec = spec
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self.others: list[dict[str, Any]] = []  # epoch records of the run's other stages
        self.tensorboard = tensorboard if enabled else None

    def truncate(self, step: int, epoch: int) -> None:
        """Drop records a resumed run will write again (after checkpoint ``step``/``epoch``)."""
        if not self.enabled or not self.spec.log_path.is_file():
            return
        kept = []
        for line in self.spec.log_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("stage") != self.spec.name:
                kept.append(line)
                if rec.get("kind") == "epoch":
                    self.others.append(rec)
                continue
            if rec.get("kind") == "step" and int(rec.get("step", 0)) > step:
                continue
            if rec.get("kind") in ("epoch", "boost") and int(rec.get("epoch", 0)) >= epoch:
                continue
            kept.append(line)
            if rec.get("kind") == "epoch":
                self.history.append(rec)
        try:
            self.spec.log_path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        except OSError as exc:
            raise OutputError.from_os_error(exc, self.spec.log_path) from exc

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = _finite(record)
        try:
            self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spec.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(clean, allow_nan=False) + "\n")
        except OSError as exc:  # disk full, folder made read-only mid-run, ...
            raise OutputError.from_os_error(exc, self.spec.log_path) from exc
        if self.tensorboard is not None:
            self._scalars(clean)
        if record.get("kind") == "epoch":
            self.history.append(clean)
            self._write_csv()
            self._write_curves()

    def _scalars(self, record: Mapping[str, Any]) -> None:
        """A step record's loss, lr and speed, an epoch record's losses and validation
        scores, as TensorBoard scalars at the record's optimizer step."""
        board = self.tensorboard
        if board is None:
            return
        step = int(record.get("step", 0))
        if record.get("kind") == "step":
            tags = {"loss": "train/loss_step", "lr": "train/lr", "tiles_per_s": "train/tiles_per_s"}
        elif record.get("kind") == "epoch":
            tags = {"train_loss": "train/loss_epoch"}
            tags.update({k: "val/" + k[4:] for k in record if str(k).startswith("val_")
                         and k != "val_pixels"})
        else:
            return
        for key, tag in tags.items():
            value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                board.add_scalar(tag, float(value), step)
        board.flush()

    def close(self) -> None:
        """Close the TensorBoard writer (when there is one)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def _write_curves(self) -> None:
        from qpseg.training.curves import draw_training_curves

        path = self.spec.csv_path.with_name(CURVES_NAME)
        try:
            draw_training_curves([*self.others, *self.history], path)
        except OSError as exc:
            raise OutputError.from_os_error(exc, path) from exc

    def _write_csv(self) -> None:
        import csv
        import io

        rows = [r for r in self.history if r.get("stage") == self.spec.name]
        cols: list[str] = []
        for r in rows:
            for k in r:
                if k not in cols and k != "kind":
                    cols.append(k)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        from qpseg._io import atomic_write

        try:
            with atomic_write(self.spec.csv_path, "w", backup=False) as fh:
                fh.write(buf.getvalue())
        except OSError as exc:
            raise OutputError.from_os_error(exc, self.spec.csv_path) from exc


def _finite(record: Mapping[str, Any]) -> dict[str, Any]:
    """NaN/inf -> None so the JSON log stays standard JSON."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") and not hasattr(model, "contract") \
        else model


def _better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def run_stage(spec: StageSpec, dist: Dist, *, resume: bool, callback: Callback | None,
              seed: int) -> StageResult:
    """Train one stage; see the module docstring. Returns the trained module with the selected
    (best or last) weights loaded."""
    import torch

    from qpseg.data.samplers import error_fractions
    from qpseg.training.checkpoint import (
        find_checkpoint,
        get_rng_state,
        prune_checkpoints,
        save_best,
        save_checkpoint,
        seed_everything,
        set_rng_state,
    )
    from qpseg.training.optim import build_optimizer, build_scheduler, current_lr

    cfg = spec.cfg
    tr = cfg["train"]
    device = dist.device
    task = spec.task
    emit = callback if (callback is not None and dist.is_main) else None
    ckpt_dir = spec.ckpt_dir
    best_path = ckpt_dir / "best.pt"
    precision = _precision(tr["precision"], device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.type == "cuda")
    if tr["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    module = spec.model.to(device)
    if tr["channels_last"]:
        module = module.to(memory_format=torch.channels_last)
    if dist.distributed and tr["sync_bn"]:
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    model: Any = module
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=bool(tr["find_unused_parameters"]))

    sampler, boost = _sampler(spec, dist, seed)
    batch_size = int(tr["batch_size"])
    accumulate = int(tr["accumulate"])

    def epoch_steps() -> int:
        """Optimizer steps of the current epoch (boosting: of T_h, which grows by round)."""
        n = (len(sampler) // batch_size) // accumulate
        if n < 1:
            raise ConfigError(f"stage {spec.name}: {len(sampler)} training tile(s) per epoch and "
                              f"process do not fill one step of {batch_size} x {accumulate}; "
                              "lower train.batch_size or add data")
        return n

    steps_per_epoch = epoch_steps()
    epochs = int(tr["epochs"])
    round_epochs = int(cfg["sampler"]["round_epochs"])
    if boost is not None and cfg["sampler"]["rounds"] is not None:
        epochs = int(cfg["sampler"]["rounds"]) * round_epochs  # H rounds of round_epochs
    # Boosting: T_h grows, so the step total is known only as rounds go by; schedules and
    # progress count T_1's size, the run ends after its epochs (or train.steps).
    max_steps = epochs * steps_per_epoch
    step_cap = max_steps if boost is None else 1 << 62
    if tr["steps"] is not None:  # --steps overrides --epochs
        max_steps = step_cap = int(tr["steps"])
        # T_h never shrinks, so T_1's step count bounds the epochs needed from above.
        epochs = math.ceil(max_steps / steps_per_epoch)
    wrapped = _SkipSampler(sampler, steps_per_epoch * accumulate * batch_size)
    workers = _workers(cfg["data"]["workers"], device, dist.world_size)
    pin = device.type == "cuda"
    loader: Any = torch.utils.data.DataLoader(
        cast(Any, _SafeDataset(spec.train_ds)), batch_size=batch_size, sampler=wrapped,
        num_workers=workers, collate_fn=_collate, pin_memory=pin, drop_last=True,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))

    optimizer = build_optimizer(module.parameters(), cfg["optimizer"])
    scheduler = build_scheduler(optimizer, cfg["scheduler"], max_steps)
    es_cfg = tr["early_stopping"]
    sel = tr["select"]
    sel_mode = sel.get("mode", "min")
    sel_metric = sel.get("metric", "val_loss")

    state: dict[str, Any] = {"epoch": 0, "batches_done": 0, "step": 0, "loss_sum": 0.0,
                             "loss_n": 0, "tiles": 0, "es_best": None, "es_bad": 0,
                             "best_value": None, "best_step": None, "best_epoch": None,
                             "stopped_early": False, "finished": False, "boost_pos": [],
                             "boost_err": [], "last_metrics": {}}
    board = None
    if tr["tensorboard"] and dist.is_main:
        board = tensorboard_writer(spec.log_path.parent / TENSORBOARD_DIR / spec.name)
    logger = _Logger(spec, dist.is_main, board)
    seed_everything(seed + 7919 * dist.rank + 1)
    found = find_checkpoint(ckpt_dir) if resume else None
    if found is not None:
        path, ck = found
        if ck.get("stage") != spec.name:
            raise ConfigError(f"checkpoint is for stage {ck.get('stage')!r}, not {spec.name!r}",
                              path)
        try:
            module.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"checkpoint does not fit this model/config: "
                              f"{' '.join(str(exc).split())[:200]}", path) from None
        # The rest comes from a file that may have been edited or sent by someone: anything
        # that does not fit is a ConfigError naming the file, not a traceback.
        try:
            scheduler.load_state_dict(ck["scheduler"])
            if ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            sampler.load_state_dict(ck["sampler"])
            if boost is not None and ck.get("boosting"):
                boost.load_state_dict(ck["boosting"])
            loop_state = ck["loop"]
            if not isinstance(loop_state, Mapping) or set(loop_state) - set(state) or any(
                    v is not None and state[k] is not None and type(v) is not type(state[k])
                    for k, v in loop_state.items()):
                raise ValueError("the loop state holds unknown or mistyped entries")
            state.update(loop_state)
            rngs = ck["rng"]
            if not isinstance(rngs, list | tuple):
                raise ValueError("the random states are not a list")
            if len(rngs) != dist.world_size:
                raise ConfigError(f"checkpoint was written by {len(rngs)} process(es), this run "
                                  f"has {dist.world_size}", path)
            set_rng_state(rngs[dist.rank], task.augmenter.generator)
        except ConfigError as exc:
            raise ConfigError(exc.message, path) from None
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError,
                IndexError) as exc:
            raise ConfigError(f"checkpoint does not fit this model/config: "
                              f"{' '.join(str(exc).split())[:200]}", path) from None
        logger.truncate(int(state["step"]), int(state["epoch"]))
        if emit:
            emit(TrainEvent("resumed", spec.name, state["epoch"], epochs, state["step"],
                            max_steps, message=str(path)))
    elif dist.is_main and spec.log_path.exists():
        logger.truncate(-1, -1)  # a fresh stage: forget an older run's records

    def checkpoint() -> None:
        rng = dist.all_gather(get_rng_state(task.augmenter.generator))
        if dist.is_main:
            save_checkpoint(ckpt_dir, int(state["step"]), {
                "stage": spec.name,
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "sampler": sampler.state_dict(),
                "boosting": boost.state_dict() if boost is not None else None,
                "loop": dict(state),
                "rng": rng,
                "config": json.loads(json.dumps(cfg, default=str)),
            })
            prune_checkpoints(ckpt_dir, int(tr["keep_checkpoints"]))
            if emit:
                emit(TrainEvent("checkpoint", spec.name, state["epoch"], epochs, state["step"],
                                max_steps))
        dist.barrier()

    if state["finished"]:
        return _finish(spec, module, state, logger, best_path, sel_mode, dist)

    val_indices = _val_indices(spec, dist, seed)

    def validate() -> dict[str, Any]:
        assert val_indices is not None
        return _validate(model, task, spec, val_indices, dist, batch_size, workers, amp_dtype,
                         device)

    def select_best(metrics: Mapping[str, Any]) -> None:
        if sel_mode == "last":
            return
        value = metrics.get(sel_metric)
        if value is None:
            return
        if _better(float(value), state["best_value"], sel_mode):
            state["best_value"] = float(value)
            state["best_step"] = int(state["step"])
            state["best_epoch"] = int(state["epoch"])
            if dist.is_main:
                save_best(best_path, {"model": module.state_dict(), "metric": sel_metric,
                                      "value": float(value), "step": int(state["step"])})

    def early_stop(metrics: Mapping[str, Any]) -> bool:
        if not es_cfg:
            return False
        value = metrics.get(es_cfg.get("metric", "val_loss"))
        if value is None or not math.isfinite(float(value)):
            return False
        if _better(float(value), state["es_best"], es_cfg.get("mode", "min"),
                   float(es_cfg.get("min_delta", 0.0))):
            state["es_best"] = float(value)
            state["es_bad"] = 0
            return False
        state["es_bad"] += 1
        return bool(state["es_bad"] >= int(es_cfg.get("patience", 10)))

    if emit:
        emit(TrainEvent("start", spec.name, state["epoch"], epochs, state["step"], max_steps,
                        message=f"{steps_per_epoch} steps/epoch, {len(spec.train_ds)} items"))
    t_last = time.perf_counter()
    tiles_last = int(state["tiles"]) * dist.world_size
    # The pace of this stage in this process (after a resume: since the resume), for the ETA.
    t_start, step_start, tiles_start = t_last, int(state["step"]), tiles_last
    rate_shown: float | None = None
    log_every = int(tr["log_every"])
    ckpt_every = int(tr["checkpoint_every"])
    val_every = int(tr["val_every"])
    max_norm = tr["max_grad_norm"]
    stop = False
    while not stop and state["epoch"] < epochs and state["step"] < step_cap:
        epoch = int(state["epoch"])
        sampler.set_epoch(epoch)
        if boost is not None:
            steps_per_epoch = epoch_steps()
            wrapped.limit = steps_per_epoch * accumulate * batch_size
        wrapped.skip = int(state["batches_done"]) * batch_size
        loader.generator.manual_seed(seed * 1009 + epoch)
        model.train()
        micro = int(state["batches_done"]) % accumulate
        step_losses: list[Any] = []
        for batch in loader:
            if "__error__" in batch:
                _raise_worker_error(batch["__error__"])
            prep = task.prepare(batch, train=True)
            if micro == 0:
                optimizer.zero_grad(set_to_none=True)
            last_micro = micro == accumulate - 1
            sync = model.no_sync() if (dist.distributed and not last_micro) else _nullcontext()
            with sync, torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                      enabled=amp_dtype is not None):
                loss, out = task.forward_loss(model, prep)
            if not torch.isfinite(loss):
                raise QpsegError(f"stage {spec.name}: the loss became {float(loss)} at step "
                                 f"{state['step'] + 1} (lower the learning rate?)")
            with sync:
                scaler.scale(loss / accumulate).backward()
            step_losses.append(loss.detach())
            if boost is not None and spec.cfg["sampler"]["boost_eval"] == "batches" \
                    and out is not None:
                err = error_fractions(out.detach().argmax(1), prep.target, task.ignore)
                state["boost_pos"].extend(int(i) for i in prep.positions)
                state["boost_err"].extend(float(e) for e in err)
            state["batches_done"] += 1
            state["tiles"] += prep.n
            micro = (micro + 1) % accumulate
            if micro:
                continue
            if max_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(module.parameters(), float(max_norm))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state["step"] += 1
            step_loss = float(torch.stack(step_losses).float().mean())
            step_losses = []
            state["loss_sum"] += step_loss
            state["loss_n"] += 1
            shown_loss = step_loss
            if state["step"] % log_every == 0 or state["step"] == step_cap:
                t = torch.tensor([step_loss, float(prep.n * accumulate)], dtype=torch.float64,
                                 device=device if device.type == "cuda" else "cpu")
                dist.all_reduce_sum(t)
                now = time.perf_counter()
                tiles_now = int(state["tiles"]) * dist.world_size
                rate = (tiles_now - tiles_last) / max(1e-9, now - t_last)
                t_last, tiles_last = now, tiles_now
                shown_loss = mean_loss = float(t[0]) / dist.world_size
                rate_shown = rate
                logger.write({"kind": "step", "stage": spec.name, "epoch": epoch,
                              "step": int(state["step"]), "loss": mean_loss,
                              "lr": current_lr(optimizer), "tiles_per_s": round(rate, 2),
                              "time": round(time.time(), 3)})
            if emit:  # every step: the bar moves and the ETA follows the pace so far
                elapsed = max(1e-9, time.perf_counter() - t_start)
                done = int(state["step"]) - step_start
                if rate_shown is None:
                    rate_shown = (int(state["tiles"]) * dist.world_size - tiles_start) / elapsed
                eta = elapsed / done * max(0, max_steps - int(state["step"])) if done else None
                emit(TrainEvent("step", spec.name, epoch, epochs, int(state["step"]),
                                max_steps, loss=shown_loss, lr=current_lr(optimizer),
                                tiles_per_s=rate_shown, eta_s=eta))
            if state["step"] >= step_cap:
                stop = True
            if ckpt_every and state["step"] % ckpt_every == 0 and not stop:
                checkpoint()
            if stop:
                break
        epoch_complete = not stop or state["batches_done"] >= steps_per_epoch * accumulate
        metrics: dict[str, Any] = {}
        last_epoch = stop or epoch + 1 >= epochs
        if val_indices is not None and val_every and (
                (epoch + 1) % val_every == 0 or last_epoch):
            metrics = validate()
            scheduler.step_metric(float(metrics.get("val_loss", math.nan)))
        if boost is not None and epoch_complete and not last_epoch \
                and (epoch + 1) % round_epochs == 0:  # end of round h: eq. (2), then T_{h+1}
            hard = _boost(boost, spec, task, model, dist, state, batch_size, workers, amp_dtype,
                          device)
            logger.write({"kind": "boost", "stage": spec.name, "epoch": epoch,
                          "round": (epoch + 1) // round_epochs, "hard_tiles": hard,
                          "set_size": int(boost.weights.round().sum()),
                          "time": round(time.time(), 3)})
        record = {"kind": "epoch", "stage": spec.name, "epoch": epoch,
                  "step": int(state["step"]),
                  "train_loss": state["loss_sum"] / max(1, state["loss_n"]),
                  "lr": current_lr(optimizer), "time": round(time.time(), 3), **metrics}
        logger.write(record)
        state["last_metrics"] = metrics
        if metrics:
            select_best(metrics)
            if early_stop(metrics):
                state["stopped_early"] = True
                stop = True
                if emit:
                    emit(TrainEvent("stopped", spec.name, epoch, epochs, int(state["step"]),
                                    max_steps, metrics=metrics,
                                    message=f"no improvement of {es_cfg.get('metric')} in "
                                            f"{es_cfg.get('patience')} validations"))
        if emit:
            emit(TrainEvent("epoch", spec.name, epoch, epochs, int(state["step"]), max_steps,
                            loss=record["train_loss"], lr=record["lr"], metrics=metrics))
        state["epoch"] = epoch + 1
        state["batches_done"] = 0
        state["loss_sum"], state["loss_n"] = 0.0, 0
        if stop or state["epoch"] >= epochs or state["step"] >= step_cap:
            state["finished"] = True
        checkpoint()
    state["finished"] = True
    return _finish(spec, module, state, logger, best_path, sel_mode, dist)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None


def _finish(spec: StageSpec, module: Any, state: Mapping[str, Any], logger: _Logger,
            best_path: Path, sel_mode: str, dist: Dist) -> StageResult:
    from qpseg.training.checkpoint import load_best

    best: dict[str, Any] = {"metric": spec.cfg["train"]["select"].get("metric"),
                            "mode": sel_mode, "value": state["best_value"],
                            "step": state["best_step"], "epoch": state["best_epoch"]}
    dist.barrier()
    if sel_mode != "last" and best_path.is_file():
        data = load_best(best_path)
        try:
            module.load_state_dict(data["model"])
        except RuntimeError as exc:
            raise ConfigError("best weights do not fit this model: "
                              f"{' '.join(str(exc).split())[:200]}", best_path) from None
        best["weights"] = "best"
    else:
        best["weights"] = "last"
    logger.close()
    history = [r for r in logger.history if r.get("stage") == spec.name]
    if not history and spec.log_path.is_file():
        for line in spec.log_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("stage") == spec.name and rec.get("kind") == "epoch":
                history.append(rec)
    best["last_metrics"] = dict(state.get("last_metrics") or {})
    return StageResult(spec.name, module, int(state["step"]), int(state["epoch"]), history,
                       best, bool(state["stopped_early"]), bool(state["finished"]))


def _val_indices(spec: StageSpec, dist: Dist, seed: int) -> list[int] | None:
    """This rank's validation items (a fixed subset when ``sampler.val_samples`` is set)."""
    import numpy as np

    if spec.val_ds is None or len(spec.val_ds) == 0:
        return None
    n = len(spec.val_ds)
    idx = np.arange(n)
    cap = spec.cfg["sampler"]["val_samples"]
    if cap is not None and cap < n:
        idx = np.sort(np.random.default_rng([seed, 7]).permutation(n)[: int(cap)])
    return [int(i) for i in idx[dist.rank::dist.world_size]]


def _loader(ds: Any, indices: Sequence[int], batch_size: int, workers: int, pin: bool) -> Any:
    import torch

    return torch.utils.data.DataLoader(
        cast(Any, _SafeDataset(ds)), batch_size=batch_size, sampler=list(indices),
        num_workers=workers,
        collate_fn=_collate, pin_memory=pin, drop_last=False,
        generator=torch.Generator().manual_seed(0))


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


def _boost(boost: Any, spec: StageSpec, task: Task, model: Any, dist: Dist,
           state: dict[str, Any], batch_size: int, workers: int, amp_dtype: Any,
           device: Any) -> int:
    """khalil2022 eq. (2) after round h: error fractions of θ_h on the tiles (re-predicted, or
    recorded from the training batches), gathered over ranks, then ``l_e += χ``; returns how
    many tiles were hard."""
    import numpy as np
    import torch

    from qpseg.data.samplers import error_fractions

    if spec.cfg["sampler"]["boost_eval"] == "batches":
        pos, err = list(state["boost_pos"]), list(state["boost_err"])
        state["boost_pos"], state["boost_err"] = [], []
    else:
        eligible = [int(i) for i in np.nonzero(boost.weights > 0)[0]]
        mine = eligible[dist.rank::dist.world_size]
        pos, err = [], []
        net = _unwrap(model)
        net.eval()
        with torch.no_grad():
            for batch in _loader(spec.train_ds, mine, batch_size, workers, device.type == "cuda"):
                if "__error__" in batch:
                    _raise_worker_error(batch["__error__"])
                prep = task.prepare(batch, train=False)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    pred = net(*prep.inputs).argmax(1)
                pos.extend(int(i) for i in prep.positions)
                err.extend(float(e) for e in error_fractions(pred, prep.target, task.ignore))
        net.train()
    gathered = dist.all_gather((pos, err))
    all_pos = [p for g in gathered for p in g[0]]
    all_err = [e for g in gathered for e in g[1]]
    return int(boost.update(all_pos, all_err)) if all_pos else 0


# ======================================================================= post-processing
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
