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

import json
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError, ModelError, OutputError, QpsegWarning
from qpseg.training.run_record import (
    TrainResult,
    _finish_metadata,
    _save,
    _sha256,
    _start_metadata,
    _training_summary,
)
from qpseg.training.stage_setup import _check_memory, _task_and_spec

if TYPE_CHECKING:
    from qpseg.manifest import Manifest
    from qpseg.training.distributed import Dist
    from qpseg.training.loop import Callback

__all__ = ["ChangedAnnotationsWarning", "TrainResult", "annotation_changes", "train"]

_RUN_FILES = ("train_config.json", "run_metadata.json", "train_log.jsonl", "train_log.csv",
              "split.json")


class ChangedAnnotationsWarning(QpsegWarning):
    """A run resumed (``--allow-changed-annotations``) on annotations that changed since it
    started."""


# ------------------------------------------------------------------------- resuming
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
#: Share of the recipe's learning rate a fine-tune starts at (same rule: a package fine-tuned
#: already keeps its rate). At the recipe's own rate, with the optimiser restarted, the first
#: fine-tune of the demo's model shook it whatever the review taught: fine-tuned on two slides
#: whose predictions were all accepted, held-out tumour Dice fell 0.983 -> 0.973 and the
#: corrections its held-out slides needed doubled; at a third of the rate they fell round by
#: round (``qpseg demo --rounds 3``, see ``qpseg.demo``).
FINETUNE_LR_SHARE = 1 / 3
#: Recipe keys not carried over: the architecture (returned as ``model``) and the earlier
#: run's starting weights (``init_from`` replaces them).
_NOT_RECIPE = ("model", "init_from", "pretrained")


def finetune_recipe(package: str | os.PathLike[str]) -> dict[str, Any]:
    """The training config ``package`` was trained with (``config.json`` ``training.config``),
    ready to fine-tune from it: ``model`` is its architecture; starting weights, split file and
    device are dropped; the schedule is :data:`FINETUNE_SCHEDULE` of the original and the
    learning rate :data:`FINETUNE_LR_SHARE` of it. A package
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
        opt = dict(recipe.get("optimizer") or {})
        lr = opt.get("lr")
        if not already and isinstance(lr, int | float) and not isinstance(lr, bool):
            opt["lr"] = lr * FINETUNE_LR_SHARE
            recipe["optimizer"] = opt
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


