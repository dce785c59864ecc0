"""The training loop of one stage: batches, augmentation, loss, optimizer steps, validation,
checkpoints, early stopping, boosting, logs.

One code path for one CPU, one GPU and ``torchrun`` (DDP): the model is wrapped in
``DistributedDataParallel`` when more than one process trains, samplers shard by slide, losses
and confusion matrices are summed over the processes, and only rank 0 writes files and reports
progress. What a batch is and how the model is fed (dense labels, patch labels, instance maps,
slide + heatmap) is a :class:`Task`, chosen from the model contract.

The loop itself (:func:`run_stage`: precision, DDP wrapping, resume, steps, validation, best
weights, early stopping, checkpoints) lives here; its parts beside it: :mod:`~qpseg.training.stage`
(StageSpec, TrainEvent, StageResult), :mod:`~qpseg.training.task` (Task),
:mod:`~qpseg.training.batches` (loaders), :mod:`~qpseg.training.sampling` (samplers, boosting),
:mod:`~qpseg.training.validation`, :mod:`~qpseg.training.logs` and
:mod:`~qpseg.training.threshold` (choose_threshold). This module is their entry point: import
from here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from qpseg.errors import ConfigError, QpsegError
from qpseg.training.batches import (
    _collate,
    _raise_worker_error,
    _SafeDataset,
    _SkipSampler,
    _val_indices,
    _workers,
)
from qpseg.training.logs import CURVES_NAME, TENSORBOARD_DIR, _Logger, tensorboard_writer
from qpseg.training.sampling import _boost, _sampler
from qpseg.training.stage import Callback, StageResult, StageSpec, TrainEvent
from qpseg.training.task import Task
from qpseg.training.threshold import choose_threshold
from qpseg.training.validation import _validate, metric_key

if TYPE_CHECKING:
    from qpseg.training.distributed import Dist

__all__ = ["CURVES_NAME", "TENSORBOARD_DIR", "Callback", "StageResult", "StageSpec", "Task",
           "TrainEvent", "choose_threshold", "metric_key", "run_stage", "tensorboard_writer"]


def _precision(name: str, device: Any) -> str:
    import torch

    if name != "auto":
        if name == "fp16" and device.type != "cuda":
            raise ConfigError("fp16 training needs a GPU (use bf16 or fp32 on CPU)")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


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
