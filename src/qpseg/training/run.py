"""``train()``: a manifest or QuPath project + an architecture -> a trained model package.

What ``OUT`` holds afterwards::

    config.json, weights.pt   the model package (qpseg.models.save_package); its "training"
                              summary records the split, classes, mpp, best metric, config
    manifest.json             when the input was a QuPath project (imported first)
    split.json                the slide split (qpseg.data.splits)
    train_config.json         the resolved configuration (what --resume reuses)
    train_log.jsonl           one record per logged step and per epoch (loss, lr, tiles/s,
                              validation loss, Dice and IoU per class)
    train_log.csv             one row per epoch
    training_curves.png       loss and validation scores per epoch (redrawn every epoch; the
                              model card links it and tabulates the same values)
    tensorboard/<stage>/      TensorBoard event files, with train.tensorboard (--tensorboard)
    run_metadata.json         versions, parameters, config, data checksums, split, result
    checkpoints/              step-<8-digit step>.pt (+ best.pt), per stage for two-stage models

Runs under ``torchrun`` unchanged (see :mod:`qpseg.training.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError, ModelError, OutputError, QpsegWarning

if TYPE_CHECKING:
    from qpseg.manifest import Manifest
    from qpseg.training.data import StageData
    from qpseg.training.distributed import Dist
    from qpseg.training.loop import Callback, StageResult

__all__ = ["ChangedAnnotationsWarning", "TrainResult", "annotation_changes", "train"]

_RUN_FILES = ("train_config.json", "run_metadata.json", "train_log.jsonl", "train_log.csv",
              "split.json")


class ChangedAnnotationsWarning(QpsegWarning):
    """A run resumed (``--allow-changed-annotations``) on annotations that changed since it
    started."""


@dataclass
class TrainResult:
    """What :func:`train` did. ``summary`` is the dataset summary (all that a dry run
    returns); ``model`` the trained module (None for a dry run)."""

    out_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    dry_run: bool = False
    model: Any = None
    stages: list[StageResult] = field(default_factory=list)
    package: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1


# ------------------------------------------------------------------------------ metadata
def _sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if limit is None:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(fh.read(limit))
            size = path.stat().st_size
            if size > 2 * limit:
                fh.seek(size - limit)
                h.update(fh.read(limit))
    return h.hexdigest()


def _slide_fingerprint(path: str) -> dict[str, Any]:
    """Size and SHA-256 of the first and last MiB of a slide (hashing whole multi-GB slides
    at every run would cost minutes; this catches a swapped or re-scanned file)."""
    p = Path(path)
    try:
        return {"size": p.stat().st_size, "sha256_head_tail": _sha256(p, 1 << 20)}
    except OSError as exc:
        return {"error": str(exc)}


def _versions() -> dict[str, Any]:
    import numpy as np
    import torch

    from qpseg import __version__

    out: dict[str, Any] = {"qpseg": __version__, "python": sys.version.split()[0],
                           "platform": platform.platform(), "torch": torch.__version__,
                           "numpy": np.__version__,
                           "cuda": torch.version.cuda if torch.cuda.is_available() else None}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        out["torchvision"] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def _data_record(manifest: Manifest, data: StageData) -> dict[str, Any]:
    slides = []
    for subset, recs in (("train", data.train_slides), ("val", data.val_slides)):
        for rec in recs:
            ann = rec.annotation_file
            slides.append({
                "key": rec.key, "subset": subset, "path": rec.path, "mpp": rec.mpp,
                "size": [rec.width, rec.height], **_slide_fingerprint(rec.path),
                "annotation_file": ann,
                "annotation_sha256": _sha256(Path(ann)) if ann and Path(ann).is_file() else None,
            })
    mpath = manifest.path
    return {
        "manifest": str(mpath) if mpath else None,
        "manifest_sha256": _sha256(mpath) if mpath and mpath.is_file() else None,
        "project": manifest.project,
        "classes": data.class_map.to_json(),
        "slides": slides,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def annotation_changes(out: Path, manifest: Manifest) -> list[str]:
    """How the annotations of the run in ``out`` differ from what it started on: per slide
    it trained or validated on, an annotation file whose SHA-256 changed, that is gone, or a
    slide no longer in the manifest. The reference is ``run_metadata.json`` (its ``data``
    record, written when the run started or was last resumed), else the SHA-256 each manifest
    entry recorded at import. Empty when nothing changed or nothing was recorded."""
    reference: list[tuple[str, str | None, str | None, str]] = []  # key, file, sha, subset
    try:
        meta = json.loads((out / "run_metadata.json").read_text(encoding="utf-8"))
        recorded = meta["data"]["slides"]
        reference = [(str(r["key"]), r.get("annotation_file"), r.get("annotation_sha256"),
                      str(r.get("subset", "train"))) for r in recorded]
    except (OSError, ValueError, KeyError, TypeError):
        reference = [(e.image_name, e.annotation_file, e.annotation_sha256, "train")
                     for e in manifest.usable_entries if e.annotation_sha256]
    current = {e.image_name: e for e in manifest.entries}
    out_lines: list[str] = []
    for key, file, sha, subset in reference:
        if sha is None:
            continue
        entry = current.get(key)
        if entry is None or not entry.usable:
            out_lines.append(f"{key} ({subset}): no longer a usable slide of the manifest")
            continue
        path = Path(entry.annotation_file or file or "")
        if not entry.annotation_file or not path.is_file():
            out_lines.append(f"{key} ({subset}): annotation file {path} is gone")
            continue
        now = _sha256(path)
        if now != sha:
            out_lines.append(f"{key} ({subset}): {path.name} changed (SHA-256 {sha[:12]}... "
                             f"-> {now[:12]}...)")
    return out_lines


# ---------------------------------------------------------------------------- the command
def _load_layers(config: str | os.PathLike[str] | Mapping[str, Any] | None
                 ) -> tuple[dict[str, Any], Path | None]:
    from qpseg.training.config import load_config_file

    if config is None:
        return {}, None
    if isinstance(config, Mapping):
        return dict(config), None
    return load_config_file(config), Path(config)


def _check_out(out: Path, resume: bool, dry_run: bool) -> None:
    """Refuse an ``--out`` that cannot take this run before any work starts: an earlier run
    without ``--resume``, nothing to resume, or a folder that cannot be written (a file, a
    read-only folder, a full disk: OutputError naming it)."""
    from qpseg._io import ensure_writable_dir

    if dry_run:
        return
    if out.exists() and not out.is_dir():
        raise OutputError("is not a folder (--out must be a folder)", out)
    if resume:
        if not (out / "train_config.json").is_file():
            raise ConfigError("nothing to resume here (no train_config.json from an earlier "
                              "run)", out)
    else:
        leftovers = [n for n in ("config.json", *_RUN_FILES) if (out / n).exists()]
        if leftovers or (out / "checkpoints").is_dir():
            raise ConfigError("holds an earlier training run; pass --resume to continue it or "
                              "choose another --out", out)
    ensure_writable_dir(out)


def train(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model: str | None = None,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    resume: bool = False,
    dry_run: bool = False,
    device: str | None = None,
    callback: Callback | None = None,
    params: Mapping[str, Any] | None = None,
    allow_changed_annotations: bool = False,
) -> TrainResult:
    """Train ``model`` (a registry name; else the config's ``model``) on a manifest or QuPath
    project and write the package and run files into ``out_dir``.

    ``config``: a YAML/JSON file or a mapping; ``overrides``: config layered on top (what the
    CLI's ``--epochs``, ``--batch-size``, ... set). ``resume`` continues the run in
    ``out_dir`` from its newest checkpoint with the configuration it was started with (plus
    ``overrides``). ``dry_run`` builds the datasets, writes nothing and returns their summary.
    ``callback`` receives :class:`~qpseg.training.loop.TrainEvent` objects on rank 0; an
    exception it raises aborts the run. ``params`` is recorded in run_metadata.json.
    ``resume`` refuses (ConfigError saying what changed) when an annotation file of a slide
    the run trains or validates on changed since it started, unless
    ``allow_changed_annotations`` (then a warning says what changed).
    """
    from qpseg.training.config import resolve_config
    from qpseg.training.distributed import setup

    out = Path(out_dir)
    file_cfg, cfg_path = _load_layers(config)
    _check_out(out, resume, dry_run)
    saved: dict[str, Any] = {}
    if resume:
        try:
            saved = json.loads((out / "train_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the saved configuration: {exc}",
                              out / "train_config.json") from None
    recipe: dict[str, Any] = {}
    init_pkg = (overrides or {}).get("init_from")
    if init_pkg and not resume and model is None and not file_cfg:
        recipe = finetune_recipe(init_pkg)  # fine-tuning: the package's own recipe, shorter
        params = {**(params or {}), "recipe_from": str(init_pkg),
                  "recipe_schedule": FINETUNE_SCHEDULE}
    arch = model or file_cfg.get("model") or saved.get("model") or recipe.get("model")
    if not arch or not isinstance(arch, str):
        raise ConfigError("no model: pass --model NAME or set model: in the config")
    file_cfg = _member_layer(file_cfg, arch, cfg_path)
    if saved and saved.get("model") != arch:
        raise ConfigError(f"the run in {out} trains {saved.get('model')}, not {arch}")
    base_layers: list[Mapping[str, Any]] = []
    if saved:
        base_layers.append({k: v for k, v in saved.items() if k != "model"})
    if recipe:
        base_layers.append({k: v for k, v in recipe.items() if k != "model"})
    cfg = resolve_config(arch, *base_layers, {k: v for k, v in file_cfg.items() if k != "model"},
                         overrides or {}, path=cfg_path)
    if device is not None:
        cfg["train"]["device"] = device
    if arch == "gb_unet" and not dry_run:
        _train_gb_members(source, out, cfg, file_cfg, overrides, device=device,
                          callback=callback, params=params,
                          allow_changed_annotations=allow_changed_annotations)
    dist = setup(cfg["train"]["device"])
    try:
        return _train(source, out, cfg, arch, dist, resume=resume, dry_run=dry_run,
                      callback=callback, params=params or {},
                      allow_changed_annotations=allow_changed_annotations)
    finally:
        dist.close()


#: model_kwargs of gb_unet that configure the ensemble, not a member U-Net.
_GB_ONLY = ("members", "member_kwargs", "member_packages", "freeze_members", "encoder_filters",
            "decoder_filters", "dropout")


def _member_layer(file_cfg: dict[str, Any], arch: str, path: Path | None) -> dict[str, Any]:
    """The config file as it applies to one GB U-Net member: ``qpseg train --model
    unet_vgg19 --config lagree2021_gb_unet.yaml`` trains that member with the file's data,
    loss, optimiser and augmentation, and the member's own model options (``tile_px`` and
    ``member_kwargs``) instead of the ensemble's."""
    kwargs = file_cfg.get("model_kwargs")
    if file_cfg.get("model") != "gb_unet" or arch == "gb_unet" or not isinstance(kwargs, Mapping):
        return file_cfg
    from qpseg.models.nuclei import ENSEMBLE_MEMBERS

    members = list(kwargs.get("members") or ENSEMBLE_MEMBERS)
    if arch not in members:
        raise ConfigError(f"this GB U-Net config trains the members {', '.join(members)}, not "
                          f"{arch}", path)
    member = {k: v for k, v in kwargs.items() if k == "tile_px"}
    member.update(dict(kwargs.get("member_kwargs") or {}))
    return {**file_cfg, "model": arch, "model_kwargs": member}


def _train_gb_members(source: str | os.PathLike[str], out: Path, cfg: dict[str, Any],
                      file_cfg: Mapping[str, Any], overrides: Mapping[str, Any] | None, *,
                      device: str | None, callback: Callback | None,
                      params: Mapping[str, Any] | None,
                      allow_changed_annotations: bool = False) -> None:
    """lagree2021 GB U-Net in one command (Methods, "Ensemble networks": the second U-Net
    learns from the pre-softmax maps of U-Nets trained beforehand). Frozen members without
    ``member_packages`` are trained first, each into ``OUT/members/<i>-<name>`` with the same
    config (a finished member package is reused; an interrupted one resumes when the command
    runs again), and the second stage then loads them."""
    kwargs = cfg["model_kwargs"]
    if not kwargs.get("freeze_members", True) or kwargs.get("member_packages") is not None:
        return
    from qpseg.models.nuclei import ENSEMBLE_MEMBERS

    members = list(kwargs.get("members") or ENSEMBLE_MEMBERS)
    layer = {k: v for k, v in file_cfg.items() if k not in ("model", "stages")}
    layer["model_kwargs"] = {**{k: v for k, v in kwargs.items() if k == "tile_px"},
                             **dict(kwargs.get("member_kwargs") or {})}
    for key in ("pretrained", "init_from", "classes"):
        if cfg.get(key) is not None:
            layer[key] = cfg[key]
    for section in ("data", "split", "sampler", "augment", "loss", "optimizer", "scheduler",
                    "train"):
        layer[section] = cfg[section]
    packages = []
    for i, name in enumerate(members):
        folder = out / "members" / f"{i + 1}-{name}"
        packages.append(str(folder))
        if (folder / "config.json").is_file() and (folder / "weights.pt").is_file():
            continue  # trained by an earlier (interrupted) run of this command
        again = (folder / "train_config.json").is_file()
        if callback is not None:
            from qpseg.training.loop import TrainEvent

            callback(TrainEvent("stage", f"member {i + 1}/{len(members)}",
                                message=f"GB U-Net member {name} -> {folder}"))
        train(source, folder, model=name, config=layer, overrides=overrides, resume=again,
              device=device, callback=callback, params=params,
              allow_changed_annotations=allow_changed_annotations)
    cfg["model_kwargs"] = {**kwargs, "member_packages": packages}


#: Share of a package's training schedule that ``train --init-from PACKAGE`` runs when no
#: model or config is given: the package's own recipe (its ``training.config``) with
#: ``train.steps`` / ``train.epochs`` scaled by this (rounded up, at least 1), since the model
#: starts from what it learnt. A package that was itself fine-tuned from another one already
#: has the shorter schedule, which is kept (round after round, it does not shrink further).
#: ``--steps`` / ``--epochs`` still decide when given.
FINETUNE_SCHEDULE = 0.5
#: Recipe keys not carried over: the architecture (returned as ``model``) and the earlier
#: run's starting weights (``init_from`` replaces them).
_NOT_RECIPE = ("model", "init_from", "pretrained")


def finetune_recipe(package: str | os.PathLike[str]) -> dict[str, Any]:
    """The training config ``package`` was trained with (``config.json`` ``training.config``),
    ready to fine-tune from it: ``model`` is its architecture; starting weights, split file and
    device are dropped; the schedule is :data:`FINETUNE_SCHEDULE` of the original. A package
    without a recorded recipe gives its architecture and model options only."""
    import math

    from qpseg.models.package import read_package_config

    pc = read_package_config(package)
    saved = pc.training.get("config") if isinstance(pc.training, Mapping) else None
    recipe: dict[str, Any] = {"model": pc.architecture,
                              "model_kwargs": dict(pc.architecture_kwargs)}
    if isinstance(saved, Mapping):
        recipe.update({k: v for k, v in saved.items() if k not in _NOT_RECIPE})
        kwargs = dict(recipe.get("model_kwargs") or {})
        kwargs.pop("pretrained", None)
        recipe["model_kwargs"] = kwargs
        split = dict(recipe.get("split") or {})
        split.pop("file", None)
        recipe["split"] = split
        tr = dict(recipe.get("train") or {})
        tr.pop("device", None)
        init = pc.training.get("initialisation")
        already = isinstance(init, Mapping) and bool(init.get("init_from"))
        for key in () if already else ("steps", "epochs"):
            if isinstance(tr.get(key), int) and not isinstance(tr[key], bool):
                tr[key] = max(1, math.ceil(tr[key] * FINETUNE_SCHEDULE))
        recipe["train"] = tr
    return recipe


def _open(source: str | os.PathLike[str], out: Path, cfg: Mapping[str, Any], dist: Dist,
          *, resume: bool, dry_run: bool) -> Manifest:
    from qpseg.manifest import read_manifest
    from qpseg.training.data import import_options, open_manifest

    p = Path(source)
    is_project = p.suffix.lower() == ".qpproj" or (p.is_dir() and not (
        p / "manifest.json").is_file() and any(p.glob("*.qpproj")))
    if is_project and resume and (out / "manifest.json").is_file():
        return read_manifest(out / "manifest.json")
    d = cfg["data"]
    if not is_project or dry_run:
        return open_manifest(source, None, classes=cfg.get("classes"), write=False,
                             **import_options(d))
    manifest: Manifest | None = None
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            manifest = open_manifest(source, out, classes=cfg.get("classes"), write=True,
                                     **import_options(d))
        except OSError as exc:  # the import writes manifest.json into OUT
            raise OutputError.from_os_error(exc, exc.filename or out / "manifest.json") from exc
    dist.barrier()
    return manifest if manifest is not None else read_manifest(out / "manifest.json")


def _build_model(arch: str, num_classes: int, cfg: Mapping[str, Any], seed: int, *,
                 meta: bool = False, class_names: Any = None) -> Any:
    """The model of ``cfg``; ``meta``: on the meta device (a dry run needs the contract only,
    so no weights are allocated or read).

    Its starting weights: ``pretrained`` (``imagenet``, ``coco`` or a file; also accepted in
    ``model_kwargs``), then ``init_from`` (a model package, classes aligned by ``class_names``).
    Neither, for an architecture whose paper did not train from random init, is an
    :class:`~qpseg.models.registry.InitWarning`. ``model.qpseg_init`` records which.
    """
    from qpseg.models import create_model, get_entry
    from qpseg.models.registry import InitWarning, random_init_note
    from qpseg.training.checkpoint import seed_everything

    seed_everything(seed)
    kwargs = dict(cfg.get("model_kwargs") or {})
    pretrained = kwargs.pop("pretrained", None)
    top = cfg.get("pretrained")
    if top is not None and pretrained is not None and str(top) != str(pretrained):
        raise ConfigError(f"pretrained is set twice ({top!r} and model_kwargs.pretrained "
                          f"{pretrained!r}); keep one")
    pretrained = top if top is not None else pretrained
    init_from = cfg.get("init_from")
    if meta:
        for key in get_entry(arch).init_only:
            kwargs.pop(key, None)
        model = create_model(arch, num_classes, meta=True, **kwargs)
    else:
        model = create_model(arch, num_classes, pretrained=pretrained, **kwargs)
        if init_from is not None:
            from qpseg.models.package import init_from_package

            names = list(class_names) if class_names is not None else [
                str(i) for i in range(num_classes)]
            init_from_package(model, init_from, names)
        if pretrained is None and init_from is None:
            note = random_init_note(arch)
            model.qpseg_init = {"random": True, **({"warning": note} if note else {})}
            if note:
                warnings.warn(note, InitWarning, stacklevel=2)
    if not model.contract.trainable:
        raise ModelError(f"{arch} is a classical (non-learned) baseline; there is nothing to "
                         "train")
    return model


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


def _clean(value: Any) -> Any:
    """JSON-ready: NaN/inf -> None (undefined metrics), tuples -> lists, others -> str."""
    import math

    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return _clean(value.item())
    return str(value)


def _write_json(path: Path, data: Any) -> None:
    from qpseg._io import write_json_atomic

    try:
        write_json_atomic(path, _clean(data), backup=False)
    except OSError as exc:
        raise OutputError.from_os_error(exc, path) from exc


def _train(source: str | os.PathLike[str], out: Path, cfg: dict[str, Any], arch: str,
           dist: Dist, *, resume: bool, dry_run: bool, callback: Callback | None,
           params: Mapping[str, Any], allow_changed_annotations: bool = False) -> TrainResult:
    from qpseg.training.data import class_map_for, data_summary, prepare_data
    from qpseg.training.loop import TrainEvent, run_stage

    seed = int(cfg["train"]["seed"])
    started = time.time()
    if resume and (out / "split.json").is_file() and not cfg["split"]["file"]:
        cfg["split"]["file"] = str(out / "split.json")  # the slides a resumed run trained on
    manifest = _open(source, out, cfg, dist, resume=resume, dry_run=dry_run)
    if resume and not dry_run:
        _check_annotations(out, manifest, allow_changed_annotations)
    class_map = class_map_for(manifest, cfg.get("classes"))
    model = _build_model(arch, len(class_map), cfg, seed, meta=dry_run,
                         class_names=class_map.names)
    if arch == "gb_unet" and not dry_run and model.freeze_members and not all(
            getattr(m, "qpseg_from_package", None) for m in model.members):
        raise ConfigError("GB U-Net: frozen members must be trained U-Nets "
                          "(model_kwargs.member_packages, one package per member); frozen "
                          "members at their initial weights would give the second stage noise")
    if callback is not None and dist.is_main and not dry_run:
        callback(TrainEvent("stage", "init", message=describe_init(model)))
    contract = model.contract
    if not contract.stages:
        _check_memory(contract, int(cfg["train"]["batch_size"]))
    if contract.stages:
        from qpseg.training.h2g import train_two_stage

        return train_two_stage(manifest, out, cfg, arch, model, dist, resume=resume,
                               dry_run=dry_run, callback=callback, params=params)
    data = prepare_data(manifest, cfg, contract, seed=seed)
    summary = data_summary(data)
    summary["model"] = {"architecture": arch, "kwargs": cfg.get("model_kwargs") or {},
                        "output": contract.output}
    if not dry_run:
        summary["initialisation"] = getattr(model, "qpseg_init", None)
    if dry_run:
        return TrainResult(out, cfg, summary, dry_run=True, rank=dist.rank,
                           world_size=dist.world_size)
    spec, weights = _task_and_spec("train", cfg, model, data, out, dist, seed,
                                   out / "checkpoints")
    meta = _start_metadata(out, cfg, arch, manifest, data, dist, params, summary, source,
                           resume)
    if callback is not None and dist.is_main:
        callback(TrainEvent("stage", "train", message=f"{arch}: {len(data.train)} training "
                            f"items from {len(data.train_slides)} slide(s)"))
    result = run_stage(spec, dist, resume=resume, callback=callback, seed=seed)
    training = _training_summary(cfg, data, [result], weights)
    from qpseg.training.loop import choose_threshold

    # lagree2021's post-processing threshold, on the selected weights (the package's rules)
    training["threshold"] = choose_threshold(spec, result.model, dist, seed=seed,
                                             target=data.target, mpp=data.mpp)
    package = None
    if dist.is_main:
        package = _save(out, result.model, data, training)
        _finish_metadata(out, meta, [result], started)
        if callback is not None:
            callback(TrainEvent("done", "train", result.epochs, result.epochs, result.steps,
                                result.steps, metrics=result.best.get("last_metrics", {}),
                                message=str(out)))
    dist.barrier()
    return TrainResult(out, cfg, summary, model=result.model, stages=[result], package=package,
                       metrics=result.best.get("last_metrics", {}), rank=dist.rank,
                       world_size=dist.world_size)


def _check_annotations(out: Path, manifest: Manifest, allow: bool) -> None:
    """Resuming: ConfigError listing the changed annotations (:func:`annotation_changes`),
    or with ``allow`` a warning that lists them."""
    changes = annotation_changes(out, manifest)
    if not changes:
        return
    shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5
                                      else "")
    if not allow:
        raise ConfigError(
            f"the annotations changed since this run started ({shown}): resuming would train "
            "the rest of the run on other labels than its first part; pass "
            "--allow-changed-annotations to resume on the new annotations, or start a new run "
            "in another --out", out / "run_metadata.json")
    warnings.warn(f"resuming on changed annotations ({shown})", ChangedAnnotationsWarning,
                  stacklevel=3)


def _start_metadata(out: Path, cfg: Mapping[str, Any], arch: str, manifest: Manifest,
                    data: StageData, dist: Dist, params: Mapping[str, Any],
                    summary: Mapping[str, Any], source: Any, resume: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        previous: dict[str, Any] = {}
        if resume and (out / "run_metadata.json").is_file():
            try:
                previous = json.loads((out / "run_metadata.json").read_text(encoding="utf-8"))
            except ValueError:
                previous = {}
        meta = {
            "qpseg_run": "train",
            "created": previous.get("created") or _now(),
            "resumed": [*previous.get("resumed", []), _now()] if resume else [],
            "status": "running",
            "command": list(sys.argv),
            "params": dict(params),
            "source": str(source),
            "model": arch,
            "config": cfg,
            "versions": _versions(),
            "device": str(dist.device),
            "world_size": dist.world_size,
            "data": _data_record(manifest, data),
            "split": data.split.to_json(),
            "summary": summary,
        }
        try:
            data.split.save(out / "split.json")
        except OSError as exc:
            raise OutputError.from_os_error(exc, out / "split.json") from exc
        _write_json(out / "train_config.json", cfg)
        _write_json(out / "run_metadata.json", meta)
    if dist.is_main and dist.distributed:
        from qpseg.data.samplers import slide_shards

        shards = slide_shards(data.train.item_tiles, dist.world_size)
        meta["ranks"] = [{"rank": r, "train_slides": [data.train.slides[i].key for i in s]}
                         for r, s in enumerate(shards)]
        _write_json(out / "run_metadata.json", meta)
    return meta


def _finish_metadata(out: Path, meta: dict[str, Any], results: list[StageResult],
                     started: float) -> None:
    meta["status"] = "done"
    meta["finished"] = _now()
    meta["seconds"] = round(time.time() - started, 1)
    meta["result"] = {r.name: {"steps": r.steps, "epochs": r.epochs,
                               "stopped_early": r.stopped_early, "best": r.best}
                      for r in results}
    _write_json(out / "run_metadata.json", meta)


def _training_summary(cfg: Mapping[str, Any], data: StageData, results: list[StageResult],
                      weights: Any) -> dict[str, Any]:
    return {
        "split": data.split.to_json(),
        "classes": data.class_map.names,
        "mpp": data.mpp,
        "tile_px": data.tile_px,
        "tissue_method": data.tissue_method,
        "ai_objects": data.manifest.review.to_json(),  # AI objects left out of / kept in truth
        "target": data.target,
        "class_weights": weights,
        "slides": {"train": [s.key for s in data.train_slides],
                   "val": [s.key for s in data.val_slides]},
        "stages": {r.name: {"steps": r.steps, "epochs": r.epochs, "best": r.best,
                            "stopped_early": r.stopped_early,
                            "history": _curves(r.history)} for r in results},
        "config": cfg,
        "run_metadata": "run_metadata.json",
    }


#: Per-epoch values kept in the package's training summary (the model card's curves table).
_CURVE_KEYS = ("epoch", "step", "train_loss", "val_loss", "val_mdice", "val_miou")


def _curves(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The epoch records of a stage reduced to :data:`_CURVE_KEYS` (epochs counted from 1)."""
    out = []
    for rec in history:
        if rec.get("kind", "epoch") != "epoch":
            continue
        row = {k: rec[k] for k in _CURVE_KEYS if rec.get(k) is not None}
        if "epoch" in row:
            row["epoch"] = int(row["epoch"]) + 1
        out.append(row)
    return out


def describe_init(model: Any) -> str:
    """One line saying which weights ``model`` started from (``model.qpseg_init``)."""
    init = getattr(model, "qpseg_init", None) or {}
    parts = []
    pre = init.get("pretrained")
    if pre:
        files = ", ".join((f"torchvision {f['weights']} " if "weights" in f else "")
                          + f"from {f['file']}" for f in pre.get("files", []))
        label = "local weights" if pre.get("source") == "file" else f"{pre['source']} weights"
        parts.append(f"{label} ({files or pre.get('note', '')})")
    pkg = init.get("init_from")
    if pkg:
        cls = pkg["classes"]
        text = (f"model package {pkg['package']} ({pkg['architecture']}): "
                f"{len(pkg['loaded'])} of {pkg['tensors']} tensors loaded, "
                f"{len(pkg['aligned_by_class'])} aligned by class, "
                f"{len(pkg['not_loaded'])} not loaded")
        if cls["new"]:
            text += f"; new classes with fresh heads: {', '.join(cls['new'])}"
        if cls["dropped"]:
            text += f"; package classes not used: {', '.join(cls['dropped'])}"
        parts.append(text)
    if not parts:
        return "weights: random initialisation" + (
            " (the paper started from pretrained weights; see the warning)"
            if init.get("warning") else "")
    return "weights: started from " + " then ".join(parts)


def _save(out: Path, module: Any, data: StageData, training: Mapping[str, Any],
          stage_normalization: Any = None, mean: Any = None, std: Any = None) -> Path:
    from qpseg.models import save_package
    from qpseg.models.contract import default_inference_rules, get_contract

    training = {**training, "initialisation": getattr(module, "qpseg_init", None)}
    # the tissue rule and object type inference follows (the same rule as training's tiles)
    inference = default_inference_rules(get_contract(module), training).to_json()
    names = data.class_map.names
    colors = [c.color for c in data.class_map.classes]
    # the colour normaliser every training tile went through: inference applies it too
    normalizer: Any = getattr(data.train, "normalizer", None)
    stain = normalizer.to_json() if hasattr(normalizer, "to_json") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return save_package(out, module.cpu(), class_names=names, class_colors=colors,
                            mpp=data.mpp, mean=mean if mean is not None else data.mean,
                            std=std if std is not None else data.std,
                            ignore_index=data.class_map.ignore_index, training=_clean(training),
                            stage_normalization=stage_normalization, overwrite=True,
                            inference=inference, stain_normalization=stain)
