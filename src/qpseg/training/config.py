"""Training configuration: sections, the papers' defaults, loading and merging.

A configuration is a mapping of sections (YAML or JSON file, ``qpseg train --config``)::

    model: tiny_unet            # registry name (``--model`` wins)
    model_kwargs: {tile_px: 64} # architecture options
    pretrained: imagenet        # imagenet | coco | PATH: starting weights of the backbone
    init_from: runs/lung        # start from another qpseg model package (classes by name)
    classes: null               # label classes (Background first, implied); null = the project's
    paper: lagree2021           # free-text note of the recipe's source (kept, not used)
    data: {...}                 # tiles: mpp, tile size, selection, tissue, target, workers
    split: {...}                # slide-level train/val/test split
    sampler: {...}              # uniform | focusing | boosting | hierarchical
    augment: {...}              # preset (a paper) + AugmentConfig overrides
    loss: {...}                 # ce | dice | ce+dice | lagree2021 | cwce | instance
    optimizer: {...}            # sgd | adam | adamw | adadelta | rmsprop
    scheduler: {...}            # constant | step | multistep | exponential | cosine | poly |
                                # plateau
    train: {...}                # epochs/steps, batch, accumulation, precision, checkpoints, ...
    stages: {patch: {...}, refine: {...}}   # two-stage models (h2g_net): per-stage overrides

Resolution order: generic defaults < the paper of the architecture (:func:`paper_defaults`) <
the file < command-line overrides. Unknown sections or keys are a :class:`ConfigError` naming
them (with a close match), so a typo never silently trains with a default.

Where a paper gives no number the default is marked *assumption* in :data:`PAPER_DEFAULTS`.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from qpseg.errors import ConfigError

__all__ = [
    "BATCH_MEMORY_SHARE",
    "GENERIC_DEFAULTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAPER_DEFAULTS",
    "SECTIONS",
    "check_batch_memory",
    "deep_merge",
    "load_config_file",
    "paper_defaults",
    "paper_of",
    "physical_memory",
    "resolve_config",
    "stage_config",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TOP_KEYS = ("model", "model_kwargs", "classes", "stages", "paper", "pretrained", "init_from")

#: Every section with every key it accepts and its generic default.
GENERIC_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "mpp": None,  # base pixel size of input 0; None: the contract's, else the finest slide
        "tile_px": None,  # None: the model's tile (set tile_px in model_kwargs to change it)
        "stride_px": None,  # None: tile_px (no overlap)
        "select": "labelled",  # labelled | tissue | either | both | all (qpseg.data.grid)
        "min_labelled": 0.05,  # khalil2022 eq. (1) γ
        "tissue_method": None,  # None | otsu | otsu_od | hsv
        "min_tissue": 0.25,  # pedersen2022 §2.2
        # ignore (partial annotation) | background (exhaustive: unannotated tissue is
        # Background, inside the tissue mask when tissue_method is set; qpseg.labels)
        "unlabelled": "ignore",
        # Importing a QuPath project (what import-project's options do; a manifest keeps its own):
        "slide_mpp": None,  # µm/px of slides that have none, in the slide or QuPath (--mpp)
        "slide_mpp_override": False,  # slide_mpp replaces every known pixel size (--mpp-override)
        "ai_objects": None,  # unreviewed-out (None) | all-out | all-in (--ai-objects)
        # Tiles over regions where a reviewed export disagrees with the saved predictions
        # (qpseg.rounds.corrected_regions: the model's errors) are drawn this many times as
        # often (a whole number; 1: no weighting). No effect without AI objects.
        "correction_weight": 3,
        "group_by": None,  # entry metadata key / tag for hierarchical sampling and strata
        "target": "auto",  # auto | semantic | instance
        "normalization": "imagenet",  # imagenet | none | {mean: [...], std: [...]}
        "stain_normalization": None,  # None | macenko | reinhard | vahadane (fitted on a train
        # tile, stored in the package and applied to every tile at inference too)
        "class_balance": None,  # ho2021 §2.3: {rates: {class: r}, order: [classes]}
        "elastic_in_workers": False,  # deform class-balancing copies in the loader workers
        "on_error": "raise",  # raise | skip (unreadable slides mid-training)
        "workers": "auto",  # DataLoader worker processes (auto: 0 on CPU, up to 8 per GPU)
        "max_open": 32,  # slide handles per process
        "patch_threshold": 0.25,  # pedersen2022 §2.2 patch labels (patch classifiers)
        "heatmap_class": None,  # class whose probability is the heatmap (two-stage models)
        "resolution": 16,  # coarse label cells per tile side when measuring tiles
    },
    "split": {
        "val": 0.15,  # share of slides for validation (pedersen2022 §2.1: ~70/15/15)
        "test": 0.15,  # share of slides held out for testing, never trained on (pedersen2022)
        "seed": None,  # None: train.seed
        "file": None,  # an existing split.json to reuse
        # slide names (QuPath image names) for validation, instead of the val share (--val);
        # the other slides train unless named in test_slides
        "val_slides": None,
        "test_slides": None,  # slide names held out for testing, with val_slides (--test)
        "stratify": True,  # split each data.group_by group on its own
    },
    "sampler": {
        "name": "uniform",  # uniform | focusing | boosting | hierarchical
        "samples_per_epoch": None,  # None: every eligible tile once
        "val_samples": None,  # None: every validation tile
        "gamma": 0.05,  # khalil2022 eq. (1)-(2)
        "chi": 1.0,  # khalil2022 eq. (2) (no value given; see qpseg.data.samplers.BOOST_CHI)
        "boost_eval": "pass",  # pass (re-predict the tiles) | batches (training predictions)
        # khalil2022 §3.2.2 round structure: round h trains θ_h on T_h for round_epochs epochs,
        # then eq. (2) updates the weights and T_{h+1} is built; rounds (H) null: as many
        # rounds as train.epochs allows, else train.epochs = rounds x round_epochs.
        "rounds": None,
        "round_epochs": 1,  # epochs per boosting round (assumption: the paper gives none)
        # hierarchical sampler: a tile counts for a class from this many pixels of it in the
        # tile's coarse class histogram (qpseg choice: any)
        "min_class_pixels": 1,
    },
    "augment": {"preset": "none"},
    "loss": {
        "name": "auto",  # auto | ce | dice | ce+dice | lagree2021 | cwce | instance
        "class_weights": None,  # None | ho2021 | balanced | [w0, w1, ...] | {class: w}
        "reduction": "mean",  # mean | labelled | pixels | sum (qpseg.losses)
        "ce_weight": 1.0,  # weight of the cross-entropy term of ce+dice and lagree2021 eq. (1)
        "dice_weight": 1.0,  # weight of the soft Dice term (lagree2021 eq. (1): 1)
        "dice_mode": None,  # macro | global (None: global for lagree2021, else macro)
        "dice_squared": True,  # squared terms in the Dice denominator (Milletari et al. 2016)
        "dice_classes": None,  # None/all | foreground | [indices]
        "border_w0": 10.0,  # Ronneberger et al. 2015
        "border_sigma": 5.0,  # px; width of the border weight (Ronneberger et al. 2015)
        "clusters": None,  # cwce: {k: 10, variance: 0.95, batches: 100, batch_size: 32,
        #                    features: vgg16 | rgb, weights: PATH}
    },
    "optimizer": {
        "name": "adam",  # sgd | adam | adamw | adadelta | rmsprop (qpseg choice: adam)
        "lr": 1e-3,  # initial learning rate (qpseg choice; each paper sets its own)
        "momentum": 0.9,  # sgd and rmsprop momentum (torch's usual 0.9)
        "weight_decay": 0.0,  # L2 penalty added by the optimizer
        "nesterov": False,  # sgd: Nesterov momentum
        "betas": [0.9, 0.999],  # adam/adamw moment decay rates (Kingma & Ba 2015)
        "eps": 1e-8,  # adam/adamw/adadelta/rmsprop denominator term (Kingma & Ba 2015)
        "rho": 0.9,  # adadelta
    },
    "scheduler": {
        "name": "constant",  # constant | step | multistep | exponential | cosine | poly |
        #                      plateau (lr schedule over optimizer steps; plateau: val loss)
        "step_size": 1000,  # steps (step)
        "milestones": [],  # steps (multistep)
        "gamma": 0.1,  # lr factor per step_size (step, exponential) or milestone (multistep)
        "power": 0.9,  # poly
        "min_lr": 0.0,  # floor of the learning rate (cosine, plateau; every schedule)
        "warmup_steps": 0,  # linear ramp of the lr from 0 over this many optimizer steps
        "patience": 10,  # plateau (validations)
        "factor": 0.1,  # plateau: lr multiplier when the validation loss stops improving
    },
    "train": {
        "epochs": 10,  # passes over the training tiles (qpseg choice; papers set their own)
        "steps": None,  # stop after this many optimizer steps (overrides epochs when set)
        "batch_size": 16,  # tiles per batch and process (qpseg choice)
        "accumulate": 1,  # gradient accumulation (micro-batches per optimizer step)
        "precision": "auto",  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
        "seed": 0,  # seed of the split, sampling, augmentation and initial weights
        "device": "auto",  # auto (GPU when present) | cpu | cuda | cuda:N (--device)
        "deterministic": False,  # torch deterministic algorithms (slower; same run, same result)
        "checkpoint_every": 200,  # optimizer steps (and at every epoch end)
        "keep_checkpoints": 1,  # newest step checkpoints kept (best.pt is kept apart)
        "log_every": 10,  # optimizer steps
        "val_every": 1,  # epochs (0: never)
        "early_stopping": None,  # {metric: val_loss, mode: min, patience: 10, min_delta: 0}
        "select": {"metric": "val_loss", "mode": "min"},  # which weights are packaged
        "max_grad_norm": None,  # clip the gradient norm to this (None: no clipping)
        "sync_bn": False,  # torchrun: batch-norm statistics over all processes (SyncBatchNorm)
        # torchrun: DDP find_unused_parameters, for models whose step skips some weights
        "find_unused_parameters": False,
        "channels_last": False,  # NHWC memory layout (faster convolutions on recent GPUs)
        # also write TensorBoard event files to OUT/tensorboard/<stage> (--tensorboard; needs
        # the optional extra: pip install 'qpseg[tensorboard]')
        "tensorboard": False,
        # the probability threshold written into the package's inference rules: auto (nuclei
        # models: the one that maximises object precision on the validation tiles, lagree2021
        # Methods) | precision (that, for any pixel model) | none | a number in (0, 1)
        "inference_threshold": "auto",
        # IoU above which a predicted nucleus matches a true one when the threshold is chosen
        # (lagree2021 names none; 0.5, the lowest IoU of its Table 2, is an assumption)
        "threshold_iou": 0.5,
    },
}
SECTIONS: tuple[str, ...] = tuple(GENERIC_DEFAULTS)

_PRESET_NAMES = ("khalil2022", "pedersen2022", "pedersen2022_refine", "ho2021", "lagree2021",
                 "none")

#: Training defaults per paper (deep-merged over :data:`GENERIC_DEFAULTS`).
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    # khalil2022 (Diagnostics 12:2044). §3.5: "optimized with stochastic gradient descent (SGD)
    # [...] cross-entropy function [...] a learning rate of 1×10^-10, dropout ratio of 0.5, and
    # weight decay of 0.0005". §3.2.2 boosting with γ = 0.05 (χ not given), §3.2.3 boosted
    # augmentation, §3.2.4 focusing sampling, §3.3 Otsu tissue filter, 512 px tiles.
    # Assumptions: lr 1e-10 is Caffe FCN's "heavy learning" of Shelhamer et al. 2017 (the FCN
    # that §3.4 modifies): unnormalised (summed) loss, batch size 1, momentum 0.99. Epochs
    # (boosting rounds H) are not given: one epoch over T_h per round, H = train.epochs.
    "khalil2022": {
        "data": {"tissue_method": "otsu", "select": "labelled", "min_labelled": 0.05},
        "sampler": {"name": "boosting", "gamma": 0.05, "chi": 1.0, "round_epochs": 1},
        "augment": {"preset": "khalil2022"},
        "loss": {"name": "ce", "reduction": "sum"},
        "optimizer": {"name": "sgd", "lr": 1e-10, "momentum": 0.99, "weight_decay": 5e-4},
        "train": {"batch_size": 1, "epochs": 20},
    },
    # pedersen2022 (Front. Med. 9:971873) stage 1, the patch classifier. §2.2: 256 px patches
    # at ×100 (≈1 µm/px), > 25 % tissue, HSV saturation tissue detection; §2.3 hierarchical
    # sampling; §3.4: "Adam optimizer with an initial learning rate of 1e-4. [...] 500 and 200
    # batches of size 64 for training and validation [...] each epoch. The models were trained
    # for 100 epochs", augmentation (flip, 90°, HSV ±20, brightness [0.8, 1.2]) at 50 %.
    # §2.1/§2.3: the tumour was outlined and everything else is non-tumour (exhaustive
    # annotation: unannotated tissue is Background).
    "pedersen2022_patch": {
        "data": {"mpp": 1.0, "tissue_method": "hsv", "select": "both", "min_tissue": 0.25,
                 "unlabelled": "background",
                 "min_labelled": 0.25, "patch_threshold": 0.25, "group_by": "grade"},
        "sampler": {"name": "hierarchical", "samples_per_epoch": 500 * 64,
                    "val_samples": 200 * 64},
        "augment": {"preset": "pedersen2022"},
        "loss": {"name": "ce"},
        "optimizer": {"name": "adam", "lr": 1e-4},
        "train": {"batch_size": 64, "epochs": 100},
    },
    # pedersen2022 stage 2, the refinement U-Net. §2.5: the low-resolution slide "normalized to
    # [0, 1]" and the heatmap, both resized to 1024 × 1024; §3.4: "trained from scratch using
    # the Adam optimizer with an initial learning rate of 1e-3. Accumulated gradients using a
    # batch size of four with six accumulation steps [...] flip, 90° rotations, random zoom of
    # range [0.8, 1.2], and Macenko stain augmentation using σ1 = σ2 = 0.1 [...] trained for
    # 1,000 epochs, or until the early stopping criterion with a patience of 100 epochs".
    # The paper names no loss: the authors' code (AICAN-Research/H2G-Net,
    # src/apps/refinement/train.py) uses a Dice loss and monitors val_loss.
    "pedersen2022_refine": {
        "data": {"normalization": "none", "unlabelled": "background"},
        "augment": {"preset": "pedersen2022_refine"},
        "loss": {"name": "dice"},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {"batch_size": 4, "accumulate": 6, "epochs": 1000,
                  "early_stopping": {"metric": "val_loss", "mode": "min", "patience": 100}},
    },
    # lagree2021 (Sci Rep 11:8025), Methods "U-net": "Adam optimizer with a learning rate of
    # 1e-4 [...] trained until convergence", "combined loss function of weighted cross-entropy
    # and soft Dice (Eq. 1)", 256 px tiles of 40× images (≈0.25 µm/px), rotation, distortion,
    # skew, shear and flip augmentation. Assumptions: batch size (not given) 8; "until
    # convergence" = early stopping on the validation loss (patience 10 epochs).
    "lagree2021": {
        # Methods: "All images were colour normalized" (ref. 39: Vahadane et al. 2016)
        "data": {"mpp": 0.25, "target": "instance", "min_labelled": 0.5,
                 "stain_normalization": "vahadane"},
        "augment": {"preset": "lagree2021"},
        "loss": {"name": "lagree2021", "reduction": "labelled"},
        "optimizer": {"name": "adam", "lr": 1e-4},
        "train": {"batch_size": 8, "epochs": 100,
                  "early_stopping": {"metric": "val_loss", "mode": "min", "patience": 10}},
    },
    # lagree2021, Methods "Mask R-CNN": "Gradient Descent was set to a momentum to 0.9, a
    # learning rate of 1e-3, a weight regularizer of 1e-4, and trained until convergence".
    "lagree2021_maskrcnn": {
        "data": {"mpp": 0.25, "target": "instance", "min_labelled": 0.5,
                 "stain_normalization": "vahadane"},  # as the U-Nets (Methods)
        "augment": {"preset": "lagree2021", "elastic": False, "shear_deg": 0.0,
                    "rotation_step_deg": None},
        "loss": {"name": "instance"},
        "optimizer": {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4},
        "train": {"batch_size": 4, "epochs": 100,
                  "early_stopping": {"metric": "val_mdice", "mode": "max", "patience": 10},
                  "select": {"metric": "val_mdice", "mode": "max"}},
    },
    # ho2021 (Med. Image Anal. 67:101866). §2.2: 256 px targets at 20× (0.5 µm/px) with
    # 20×/10×/5× views, patches with > 1 % annotation, Otsu; §2.3 elastic class balancing;
    # §2.5: weighted cross-entropy eq. (1)-(2) normalised by the N pixels of a patch,
    # "unlabeled pixels do not contribute", "SGD with a learning rate of 5×10^-5, a momentum
    # of 0.99, and a weight decay of 10^-4 for 20 epochs", best validation mIoU selected.
    # The batch size is not in the paper: 1 in the authors' code
    # (MSKCC-Computational-Pathology/DMMN, configs/DMMN-breast.yml: batch_size 1,
    # train_iters = 20 x 115,844 balanced patches). That code normalises the weighted loss by
    # the sum of weights (reduction: mean); eq. (1) by the N pixels of a patch (the default).
    "ho2021": {
        "data": {"mpp": 0.5, "tissue_method": "otsu", "min_labelled": 0.01},
        "augment": {"preset": "ho2021"},
        "loss": {"name": "ce", "class_weights": "ho2021", "reduction": "pixels"},
        "optimizer": {"name": "sgd", "lr": 5e-5, "momentum": 0.99, "weight_decay": 1e-4},
        "train": {"batch_size": 1, "epochs": 20,
                  "select": {"metric": "val_miou", "mode": "max"}},
    },
    # tiny_unet (qpseg's own test/demo model): Adam 1e-3, flips and quarter turns.
    "qpseg": {
        "augment": {"preset": "none", "rot90": True, "hflip": True, "vflip": True},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {"batch_size": 16, "epochs": 10},
    },
}


def paper_of(architecture: str) -> str:
    """The :data:`PAPER_DEFAULTS` key whose training an architecture follows."""
    if architecture in ("fcn32s_vgg16", "fcn8s_vgg16"):
        return "khalil2022"
    if architecture == "mobilenetv2_patch":
        return "pedersen2022_patch"
    if architecture in ("h2g_refine_unet", "h2g_net"):
        return "pedersen2022_refine"
    if architecture == "maskrcnn_resnet101":
        return "lagree2021_maskrcnn"
    if architecture.startswith("unet_") or architecture in ("gb_unet",):
        return "lagree2021"
    if architecture.startswith("dmmn_"):
        return "ho2021"
    return "qpseg"


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: nested mappings merge, anything else replaces.

    An ``augment`` mapping that names a ``preset`` replaces the previous one entirely (the
    overrides of one preset must not leak into another); without a preset it merges key by
    key.
    """
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if key == "augment" and isinstance(value, Mapping) and "preset" in value:
            out[key] = copy.deepcopy(dict(value))
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def paper_defaults(architecture: str) -> dict[str, Any]:
    """Generic defaults with the architecture's paper merged in; two-stage models get
    ``stages.patch`` / ``stages.refine``."""
    base = deep_merge(GENERIC_DEFAULTS, {})
    if architecture == "h2g_net":
        base["stages"] = {"patch": copy.deepcopy(PAPER_DEFAULTS["pedersen2022_patch"]),
                          "refine": copy.deepcopy(PAPER_DEFAULTS["pedersen2022_refine"])}
        # Both stages share the tissue detection of §2.2 and the slide split.
        base["data"]["tissue_method"] = "hsv"
        return base
    return deep_merge(base, PAPER_DEFAULTS[paper_of(architecture)])


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config; ConfigError naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", p) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config: {exc}", p) from None
    is_yaml = p.suffix.lower() in (".yaml", ".yml")
    if is_yaml:
        try:
            import yaml
        except ImportError:
            raise ConfigError("reading YAML configs needs PyYAML (pip install pyyaml), or "
                              "write the config as JSON", p) from None
    try:
        data = yaml.safe_load(text) if is_yaml else json.loads(text)
    except Exception as exc:  # yaml.YAMLError / JSONDecodeError: report, one line
        msg = " ".join(str(exc).split())[:300]
        raise ConfigError(f"invalid {'YAML' if is_yaml else 'JSON'}: {msg}", p) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config is a mapping of sections, not {type(data).__name__}", p)
    return data


def _unknown(key: str, allowed: Any, where: str, path: Path | None) -> ConfigError:
    close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint}", path)


def _augment_keys() -> set[str]:
    from qpseg.data.augment import AugmentConfig

    return {f.name for f in fields(AugmentConfig)} | {"preset"}


def _check_keys(cfg: Mapping[str, Any], path: Path | None, *, stage: str | None = None) -> None:
    where = f"stages.{stage}" if stage else "the config"
    for key, value in cfg.items():
        if key in _TOP_KEYS:
            if stage and key in ("stages",):
                raise ConfigError(f"stages cannot be nested (in {where})", path)
            continue
        if key not in GENERIC_DEFAULTS:
            raise _unknown(key, [*SECTIONS, *_TOP_KEYS], where, path)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"section {key!r} must be a mapping, not {type(value).__name__}",
                              path)
        allowed = _augment_keys() if key == "augment" else set(GENERIC_DEFAULTS[key])
        for sub in value:
            if sub not in allowed:
                raise _unknown(sub, sorted(allowed), f"section {key!r}", path)


def resolve_config(architecture: str, *layers: Mapping[str, Any] | None,
                   path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Defaults of ``architecture`` with ``layers`` merged in order (file, then overrides).

    Unknown keys raise ConfigError naming ``path``; values are checked by
    :func:`validate_config`. Returns a plain dict (JSON-ready).
    """
    p = Path(path) if path is not None else None
    cfg = paper_defaults(architecture)
    for layer in layers:
        if not layer:
            continue
        _check_keys(layer, p)
        stages = layer.get("stages")
        if stages is not None:
            if not isinstance(stages, Mapping):
                raise ConfigError("stages must map stage names to sections", p)
            for name, st in stages.items():
                if not isinstance(st, Mapping):
                    raise ConfigError(f"stages.{name} must be a mapping", p)
                _check_keys(st, p, stage=str(name))
        cfg = deep_merge(cfg, {k: v for k, v in layer.items() if v is not None or k in (
            "classes", "model_kwargs")})
    cfg["model"] = architecture
    cfg.setdefault("model_kwargs", {})
    cfg.setdefault("classes", None)
    if cfg.get("model_kwargs") is None:
        cfg["model_kwargs"] = {}
    validate_config(cfg, p)
    for name in (cfg.get("stages") or {}):
        validate_config(stage_config(cfg, name), p, stage=name)
    return cfg


def stage_config(cfg: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The full config of one stage: the top-level sections with ``stages.<stage>`` merged."""
    stages = cfg.get("stages") or {}
    if stage not in stages:
        raise ConfigError(f"no stage {stage!r} in the config (stages: {', '.join(stages)})")
    base = {k: v for k, v in cfg.items() if k != "stages"}
    return deep_merge(base, stages[stage] or {})


# ------------------------------------------------------------------------------ validation
def _num(value: Any, name: str, path: Path | None, *, lo: float | None = None,
         hi: float | None = None, integer: bool = False, allow_none: bool = False,
         open_lo: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, not {value!r}", path)
    if integer and int(value) != value:
        raise ConfigError(f"{name} must be an integer, not {value!r}", path)
    if lo is not None and (value <= lo if open_lo else value < lo):
        raise ConfigError(f"{name} must be {'>' if open_lo else '>='} {lo}, not {value!r}", path)
    if hi is not None and value > hi:
        raise ConfigError(f"{name} must be <= {hi}, not {value!r}", path)


def _choice(value: Any, name: str, choices: tuple[Any, ...], path: Path | None) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(str(c) for c in choices)}, not "
                          f"{value!r}", path)


#: Share of the machine's memory that one batch of input tiles (float32) may take. The network's
#: activations and gradients need many times the input, so a batch over this share can never
#: train: refusing it when the config is read beats the kernel's OOM killer later.
BATCH_MEMORY_SHARE = 0.25


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine (None where the OS does not say)."""
    try:
        size = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX, or the name is unknown
        return None
    return size if size > 0 else None


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.3g} GiB"


def check_batch_memory(batch_size: int, inputs: Sequence[tuple[int, int]], what: str,
                       path: str | os.PathLike[str] | None = None, *,
                       memory: int | None = None) -> None:
    """ConfigError when one batch of input tiles cannot fit in memory.

    ``inputs`` is ``(channels, side_px)`` per model input; a batch needs
    ``batch_size x sum(channels x side_px²) x 4`` bytes as float32, which must stay within
    :data:`BATCH_MEMORY_SHARE` of ``memory`` (default: this machine's, :func:`physical_memory`).
    ``what`` names the size option(s) in the message.
    """
    ram = physical_memory() if memory is None else memory
    if ram is None or batch_size < 1 or not inputs:
        return
    per_px2 = sum(int(c) * int(px) * int(px) for c, px in inputs)
    need = int(batch_size) * per_px2 * 4
    limit = int(ram * BATCH_MEMORY_SHARE)
    if need <= limit:
        return
    channels = sum(int(c) for c, _ in inputs)
    side = max(int(px) for _, px in inputs)
    largest = math.isqrt(max(0, limit // (4 * int(batch_size) * max(1, channels))))
    raise ConfigError(
        f"{what}: a batch of {batch_size} tile(s) of {side} px needs {_gib(need)} of memory for "
        f"its input alone (batch x channels x px² x 4 bytes of float32), over the limit of "
        f"{_gib(limit)} ({BATCH_MEMORY_SHARE:.0%} of this machine's {_gib(ram)}; the network "
        f"needs many times its input); with this batch size tiles can be at most {largest} px",
        path)


def _int_option(value: Any) -> int | None:
    """An integer-valued option as an int (None when absent or not an integer)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value)


def validate_config(cfg: Mapping[str, Any], path: Path | None = None, *,
                    stage: str | None = None) -> None:
    """Check the values of a resolved config; ConfigError naming the key."""
    pre = f"stages.{stage}." if stage else ""
    d, sp, sa = cfg["data"], cfg["split"], cfg["sampler"]
    lo, op, sc, tr = cfg["loss"], cfg["optimizer"], cfg["scheduler"], cfg["train"]
    if not isinstance(cfg.get("model_kwargs"), Mapping):
        raise ConfigError("model_kwargs must be a mapping", path)
    classes = cfg.get("classes")
    if classes is not None and (not isinstance(classes, list) or not classes or not all(
            isinstance(c, str) and c.strip() for c in classes)):
        raise ConfigError("classes must be a non-empty list of class names (or null)", path)
    for key in ("pretrained", "init_from"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{key} must be a name or a path (or null), not {value!r}", path)
    _num(d["mpp"], f"{pre}data.mpp", path, lo=0, open_lo=True, allow_none=True)
    if d["slide_mpp"] is not None:  # the one pixel-size plausibility rule (qpseg.slide)
        from qpseg.slide import check_mpp

        check_mpp(d["slide_mpp"], f"{pre}data.slide_mpp", path, error=ConfigError)
    if not isinstance(d["slide_mpp_override"], bool):
        raise ConfigError(f"{pre}data.slide_mpp_override must be true or false, not "
                          f"{d['slide_mpp_override']!r}", path)
    if d["slide_mpp_override"] and d["slide_mpp"] is None:
        raise ConfigError(f"{pre}data.slide_mpp_override needs {pre}data.slide_mpp (the pixel "
                          "size that replaces the slides' own)", path)
    from qpseg.review import POLICIES  # the truth rule for objects qpseg wrote

    _choice(d["ai_objects"], f"{pre}data.ai_objects", (None, *POLICIES), path)
    _num(d["correction_weight"], f"{pre}data.correction_weight", path, lo=1, integer=True)
    _num(d["tile_px"], f"{pre}data.tile_px", path, lo=1, integer=True, allow_none=True)
    _num(d["stride_px"], f"{pre}data.stride_px", path, lo=1, integer=True, allow_none=True)
    _choice(d["select"], f"{pre}data.select", ("labelled", "tissue", "either", "both", "all"),
            path)
    _num(d["min_labelled"], f"{pre}data.min_labelled", path, lo=0, hi=1)
    _num(d["min_tissue"], f"{pre}data.min_tissue", path, lo=0, hi=1)
    _num(d["patch_threshold"], f"{pre}data.patch_threshold", path, lo=0, hi=1)
    _choice(d["tissue_method"], f"{pre}data.tissue_method", (None, "otsu", "otsu_od", "hsv"),
            path)
    _choice(d["target"], f"{pre}data.target", ("auto", "semantic", "instance"), path)
    from qpseg.labels import UNLABELLED_MODES

    _choice(d["unlabelled"], f"{pre}data.unlabelled", tuple(UNLABELLED_MODES), path)
    _choice(d["on_error"], f"{pre}data.on_error", ("raise", "skip"), path)
    _choice(d["stain_normalization"], f"{pre}data.stain_normalization",
            (None, "macenko", "reinhard", "vahadane"), path)
    if d["workers"] != "auto":
        _num(d["workers"], f"{pre}data.workers", path, lo=0, hi=256, integer=True)
    _num(d["max_open"], f"{pre}data.max_open", path, lo=1, integer=True)
    _num(d["resolution"], f"{pre}data.resolution", path, lo=1, hi=256, integer=True)
    norm = d["normalization"]
    if isinstance(norm, Mapping):
        m, s = norm.get("mean"), norm.get("std")
        if set(norm) != {"mean", "std"} or not isinstance(m, list) or not isinstance(s, list) \
                or len(m) != len(s) or not m or any(
                    isinstance(v, bool) or not isinstance(v, int | float) for v in m + s) \
                or any(v <= 0 for v in s):
            raise ConfigError(f"{pre}data.normalization must be imagenet, none or "
                              "{mean: [...], std: [...]} with positive std", path)
    else:
        _choice(norm, f"{pre}data.normalization", ("imagenet", "none"), path)
    cb = d["class_balance"]
    if cb is not None and (not isinstance(cb, Mapping) or "rates" not in cb
                           or set(cb) - {"rates", "order"}):
        raise ConfigError(f"{pre}data.class_balance must be {{rates: {{class: r}}, order: "
                          "[classes]}", path)
    _num(sp["val"], f"{pre}split.val", path, lo=0, hi=0.95)
    _num(sp["test"], f"{pre}split.test", path, lo=0, hi=0.95)
    if sp["val"] + sp["test"] >= 1:
        raise ConfigError(f"{pre}split.val + split.test must be < 1", path)
    _num(sp["seed"], f"{pre}split.seed", path, integer=True, allow_none=True)
    for key in ("val_slides", "test_slides"):
        names = sp[key]
        if names is not None and (not isinstance(names, list) or not all(
                isinstance(n, str) and n.strip() for n in names)):
            raise ConfigError(f"{pre}split.{key} must be a list of slide names (or null), not "
                              f"{names!r}", path)
    if sp["test_slides"] is not None and sp["val_slides"] is None:
        raise ConfigError(f"{pre}split.test_slides needs {pre}split.val_slides (slides are "
                          "named for both subsets, or split by shares)", path)
    _choice(sa["name"], f"{pre}sampler.name", ("uniform", "focusing", "boosting",
                                               "hierarchical"), path)
    _num(sa["samples_per_epoch"], f"{pre}sampler.samples_per_epoch", path, lo=1, integer=True,
         allow_none=True)
    _num(sa["val_samples"], f"{pre}sampler.val_samples", path, lo=1, integer=True,
         allow_none=True)
    _num(sa["gamma"], f"{pre}sampler.gamma", path, lo=0, hi=1)
    _num(sa["chi"], f"{pre}sampler.chi", path, lo=0)
    _choice(sa["boost_eval"], f"{pre}sampler.boost_eval", ("pass", "batches"), path)
    _num(sa["rounds"], f"{pre}sampler.rounds", path, lo=1, integer=True, allow_none=True)
    _num(sa["round_epochs"], f"{pre}sampler.round_epochs", path, lo=1, integer=True)
    if sa["name"] == "boosting" and sa["samples_per_epoch"] is not None:
        raise ConfigError(f"{pre}sampler.samples_per_epoch does not apply to boosting: an epoch "
                          "is the enlarged training set T_h (every tile l_e times, khalil2022 "
                          "§3.2.3); set sampler.round_epochs / sampler.rounds instead", path)
    aug = cfg["augment"]
    _choice(aug.get("preset", "none"), f"{pre}augment.preset", _PRESET_NAMES, path)
    _choice(lo["name"], f"{pre}loss.name", ("auto", "ce", "dice", "ce+dice", "lagree2021",
                                            "cwce", "instance"), path)
    _choice(lo["reduction"], f"{pre}loss.reduction", ("mean", "labelled", "pixels", "sum"),
            path)
    _choice(lo["dice_mode"], f"{pre}loss.dice_mode", (None, "macro", "global"), path)
    cw = lo["class_weights"]
    if not (cw is None or cw in ("ho2021", "balanced") or isinstance(cw, list | Mapping)):
        raise ConfigError(f"{pre}loss.class_weights must be null, ho2021, balanced, a list or "
                          "a mapping of class names to weights", path)
    _num(lo["border_w0"], f"{pre}loss.border_w0", path, lo=0)
    _num(lo["border_sigma"], f"{pre}loss.border_sigma", path, lo=0, open_lo=True)
    _choice(op["name"], f"{pre}optimizer.name", ("sgd", "adam", "adamw", "adadelta", "rmsprop"),
            path)
    _num(op["lr"], f"{pre}optimizer.lr", path, lo=0, open_lo=True)
    _num(op["momentum"], f"{pre}optimizer.momentum", path, lo=0, hi=1)
    _num(op["weight_decay"], f"{pre}optimizer.weight_decay", path, lo=0)
    _choice(sc["name"], f"{pre}scheduler.name", ("constant", "step", "multistep", "exponential",
                                                 "cosine", "poly", "plateau"), path)
    _num(sc["warmup_steps"], f"{pre}scheduler.warmup_steps", path, lo=0, integer=True)
    _num(tr["epochs"], f"{pre}train.epochs", path, lo=1, integer=True)
    _num(tr["steps"], f"{pre}train.steps", path, lo=1, integer=True, allow_none=True)
    _num(tr["batch_size"], f"{pre}train.batch_size", path, lo=1, hi=1 << 16, integer=True)
    _num(tr["accumulate"], f"{pre}train.accumulate", path, lo=1, hi=1 << 12, integer=True)
    kwargs = cfg["model_kwargs"]
    tile = _int_option(d["tile_px"])
    tile_key = f"{pre}data.tile_px"
    if tile is None:
        tile, tile_key = _int_option(kwargs.get("tile_px")), "model_kwargs.tile_px"
    if tile is not None and tile > 0:
        channels = _int_option(kwargs.get("in_channels"))
        check_batch_memory(int(tr["batch_size"]), [(channels if channels and channels > 0
                                                     else 3, tile)],
                           f"{tile_key} {tile} with {pre}train.batch_size", path)
    _choice(tr["precision"], f"{pre}train.precision", ("auto", "bf16", "fp16", "fp32"), path)
    _num(tr["seed"], f"{pre}train.seed", path, integer=True)
    _num(tr["checkpoint_every"], f"{pre}train.checkpoint_every", path, lo=0, integer=True)
    _num(tr["keep_checkpoints"], f"{pre}train.keep_checkpoints", path, lo=1, integer=True)
    _num(tr["log_every"], f"{pre}train.log_every", path, lo=1, integer=True)
    _num(tr["val_every"], f"{pre}train.val_every", path, lo=0, integer=True)
    thr = tr["inference_threshold"]
    if isinstance(thr, str) or thr is None:
        _choice("none" if thr is None else thr, f"{pre}train.inference_threshold",
                ("auto", "precision", "none"), path)
    else:
        _num(thr, f"{pre}train.inference_threshold", path, lo=0, open_lo=True, hi=0.999999)
    _num(tr["threshold_iou"], f"{pre}train.threshold_iou", path, lo=0, hi=0.95)
    if not isinstance(tr["tensorboard"], bool):
        raise ConfigError(f"{pre}train.tensorboard must be true or false, not "
                          f"{tr['tensorboard']!r}", path)
    _num(tr["max_grad_norm"], f"{pre}train.max_grad_norm", path, lo=0, open_lo=True,
         allow_none=True)
    es = tr["early_stopping"]
    if es is not None:
        if not isinstance(es, Mapping) or set(es) - {"metric", "mode", "patience", "min_delta"}:
            raise ConfigError(f"{pre}train.early_stopping must be {{metric, mode, patience, "
                              "min_delta}", path)
        _choice(es.get("mode", "min"), f"{pre}train.early_stopping.mode", ("min", "max"), path)
        _num(es.get("patience", 10), f"{pre}train.early_stopping.patience", path, lo=1,
             integer=True)
        _num(es.get("min_delta", 0.0), f"{pre}train.early_stopping.min_delta", path, lo=0)
    sel = tr["select"]
    if not isinstance(sel, Mapping) or set(sel) - {"metric", "mode"}:
        raise ConfigError(f"{pre}train.select must be {{metric, mode}}", path)
    _choice(sel.get("mode", "min"), f"{pre}train.select.mode", ("min", "max", "last"), path)
