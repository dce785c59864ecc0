"""From a manifest (or a QuPath project) to the training and validation datasets of one stage.

:func:`open_manifest` reads ``manifest.json`` or imports a ``.qpproj`` first;
:func:`prepare_data` applies the config's classes, splits the slides (never tiles), detects
tissue, builds the tile grids of the train and validation slides and wraps them in
:class:`~qpseg.data.dataset.TileDataset`; :func:`data_summary` is what ``--dry-run`` prints.

Patch classifiers (pedersen2022 §2.2) get one label per tile from its class histogram
(:func:`patch_labels`): the positive (heatmap) class when it covers more than
``patch_threshold`` (25 %) of the tile, nothing when it covers some but not that much, else the
class covering most of the tile when that is more than ``patch_threshold``; other tiles are
discarded.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError, LabelError, QpsegWarning

if TYPE_CHECKING:
    import numpy as np

    from qpseg.data.dataset import TileDataset
    from qpseg.data.grid import SlideRecord, Tile
    from qpseg.data.splits import Split
    from qpseg.labels import ClassMap
    from qpseg.manifest import Manifest
    from qpseg.models.contract import ModelContract

__all__ = [
    "StageData",
    "TrainingWarning",
    "class_map_for",
    "import_options",
    "normalization",
    "open_manifest",
    "patch_labels",
    "prepare_data",
    "resolve_mpp",
    "split_for",
]


class TrainingWarning(QpsegWarning):
    """Something about the training data or run the user should know (a slide skipped, ...)."""


def import_options(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` config keys that steer the import of a QuPath project, as keyword
    arguments of :func:`open_manifest`."""
    return {"slide_mpp": data_cfg.get("slide_mpp"),
            "slide_mpp_override": bool(data_cfg.get("slide_mpp_override", False)),
            "ai_objects": data_cfg.get("ai_objects")}


def open_manifest(source: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None, *,
                  classes: Sequence[str] | None = None, slide_mpp: float | None = None,
                  slide_mpp_override: bool = False, ai_objects: str | None = None,
                  write: bool = True) -> Manifest:
    """``manifest.json`` (or its folder), or a QuPath project (``.qpproj`` or the folder
    holding one) imported into ``out_dir/manifest.json`` first (``write=False``: in memory).

    The import is :func:`qpseg.manifest.import_project` (what ``qpseg import-project`` runs):
    ``slide_mpp`` is its ``--mpp`` (the pixel size of slides that have none, neither in the
    slide nor set in QuPath), ``slide_mpp_override`` its ``--mpp-override`` (``slide_mpp``
    replaces known values), ``ai_objects`` its ``--ai-objects`` (which objects qpseg wrote
    count as annotations, :mod:`qpseg.review`; None: the import's default). A manifest was
    imported already: an ``ai_objects`` other than the rule it was imported with is a
    :class:`ConfigError` when it holds AI objects (the labels would silently differ).
    """
    from qpseg.manifest import import_project, read_manifest

    p = Path(source)
    if p.is_dir():
        if (p / "manifest.json").is_file():
            return _check_policy(read_manifest(p / "manifest.json"), ai_objects)
        projects = sorted(p.glob("*.qpproj"))
        if not projects:
            raise ConfigError("neither manifest.json nor a QuPath project (.qpproj) here", p)
        p = projects[0]
    if p.suffix.lower() == ".qpproj":
        target = Path(out_dir) if (write and out_dir is not None) else None
        if ai_objects is None:
            return import_project(p, target, classes=classes, mpp=slide_mpp,
                                  mpp_override=slide_mpp_override)
        return import_project(p, target, classes=classes, mpp=slide_mpp,
                              mpp_override=slide_mpp_override, ai_objects=ai_objects)
    if not p.exists():
        raise ConfigError("no such manifest or project", p)
    return _check_policy(read_manifest(p), ai_objects)


def _check_policy(manifest: Manifest, ai_objects: str | None) -> Manifest:
    """``manifest`` when its truth follows ``ai_objects`` (or holds no AI objects)."""
    if ai_objects is None:
        return manifest
    from qpseg.review import check_policy

    wanted = check_policy(ai_objects)
    review = manifest.review
    if review.n_ai and review.policy != wanted:
        raise ConfigError(
            f"AI objects {wanted} (--ai-objects, data.ai_objects): this manifest was imported "
            f"with --ai-objects {review.policy} and holds {review.n_ai} AI object(s); run "
            f"`qpseg import-project --ai-objects {wanted}` again, or train on the QuPath "
            "project", manifest.path)
    return manifest


def class_map_for(manifest: Manifest, classes: Sequence[str] | None) -> ClassMap:
    """The manifest's class map, or one with just ``classes`` (Background first) when the
    config names them; a class the project does not have is a ConfigError."""
    from qpseg.labels import BACKGROUND, ClassMap

    cm = manifest.class_map
    if not classes:
        return cm
    known = {c.name.lower(): c for c in cm.classes}
    missing = [c for c in classes if c.strip().lower() not in known
               and c.strip().lower() != BACKGROUND.lower()]
    if missing:
        raise ConfigError(f"class(es) {', '.join(repr(m) for m in missing)} of the config are "
                          f"not in the project (it has {', '.join(cm.names)})", manifest.path)
    colors = {c.name: c.color for c in cm.classes}
    names = [known[c.strip().lower()].name if c.strip().lower() in known else c.strip()
             for c in classes]
    try:
        return ClassMap.from_names(names, colors)
    except LabelError as exc:
        raise ConfigError(f"classes: {exc.message}", manifest.path) from None


def _check_annotated(manifest: Manifest, classes: Sequence[str]) -> None:
    """Semantic targets: every configured class must be annotated somewhere (an import with
    ``classes`` keeps a class that no annotation has, with only a warning)."""
    counts: dict[str, int] = {}
    for entry in manifest.entries:
        for name, stats in entry.classes.items():
            counts[name.lower()] = counts.get(name.lower(), 0) + int(stats.count)
    missing = [c for c in classes if c.strip().lower() != "background"
               and counts.get(c.strip().lower(), 0) == 0]
    if missing:
        raise ConfigError(f"class(es) {', '.join(repr(m) for m in missing)} of the config are "
                          "not annotated anywhere in the project", manifest.path)


def normalization(value: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of a ``data.normalization`` value (``imagenet``, ``none`` or a mapping)."""
    from qpseg.training.config import IMAGENET_MEAN, IMAGENET_STD

    if value == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if value == "none":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return tuple(float(v) for v in value["mean"]), tuple(float(v) for v in value["std"])


def resolve_mpp(cfg_mpp: float | None, contract: ModelContract,
                slides: Sequence[SlideRecord]) -> float:
    """Base pixel size: the config's, else the paper's (contract), else the finest slide's."""
    if cfg_mpp is not None:
        return float(cfg_mpp)
    if contract.default_mpp is not None:
        return float(contract.default_mpp)
    return float(min(s.mpp for s in slides))


def split_for(slides: Sequence[SlideRecord], split_cfg: Mapping[str, Any], seed: int,
              group_by: str | None) -> Split:
    """The slide split: read from ``split.file`` or made from the seed (by slide key)."""
    from qpseg.data.splits import load_split, split_slides

    keys = [s.key for s in slides]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ConfigError(f"two slides share the name {dup[0]!r}: splits are by slide name")
    if split_cfg.get("file"):
        split = load_split(split_cfg["file"])
        unknown = [k for k in keys if split.subset_of(k) is None]
        if unknown:
            warnings.warn(f"{len(unknown)} slide(s) are not in {split_cfg['file']} and are not "
                          f"used: {', '.join(unknown[:5])}", TrainingWarning, stacklevel=2)
        return split
    if split_cfg.get("val_slides") is not None:
        return _named_split(keys, split_cfg, seed)
    groups = {s.key: s.group for s in slides} if (group_by and split_cfg.get("stratify", True)) \
        else None
    s_seed = seed if split_cfg.get("seed") is None else int(split_cfg["seed"])
    return split_slides(keys, val=float(split_cfg["val"]), test=float(split_cfg["test"]),
                        seed=s_seed, groups=groups)


def _named_split(keys: Sequence[str], split_cfg: Mapping[str, Any], seed: int) -> Split:
    """The split of ``split.val_slides`` / ``split.test_slides``: those slides validate / test,
    every other slide trains. A name no slide has is a ConfigError (with the closest name)."""
    import difflib

    from qpseg.data.splits import Split

    lower = {k.lower(): k for k in keys}

    def find(names: Sequence[str], what: str) -> list[str]:
        found = []
        for name in names:
            key = name if name in keys else lower.get(name.strip().lower())
            if key is None:
                close = difflib.get_close_matches(name, list(keys), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"split.{what} names {name!r}, which is not a slide of this "
                                  f"project{hint}; slides: {', '.join(sorted(keys)[:10])}"
                                  f"{', ...' if len(keys) > 10 else ''}")
            if key not in found:
                found.append(key)
        return found

    val = find(split_cfg["val_slides"], "val_slides")
    test = find(split_cfg.get("test_slides") or [], "test_slides")
    both = sorted(set(val) & set(test))
    if both:
        raise ConfigError(f"slide(s) {', '.join(both)} are named for both validation and test")
    train = sorted(k for k in keys if k not in val and k not in test)
    if not train:
        raise ConfigError("split.val_slides / split.test_slides name every slide: none is left "
                          "to train on")
    n = len(keys)
    s_seed = seed if split_cfg.get("seed") is None else int(split_cfg["seed"])
    return Split(tuple(train), tuple(sorted(val)), tuple(sorted(test)), s_seed, len(val) / n,
                 len(test) / n)


def patch_labels(tiles: Sequence[Tile], n_classes: int, tile_area: float, *,
                 threshold: float = 0.25, positive: int | None = 1) -> list[int | None]:
    """pedersen2022 §2.2 patch labels (see the module docstring); None = discarded."""
    out: list[int | None] = []
    for t in tiles:
        hist = [float(v) for v in t.class_hist[:n_classes]] + [0.0] * max(
            0, n_classes - len(t.class_hist))
        frac = [h / tile_area for h in hist]
        if positive is not None and 0 <= positive < n_classes and frac[positive] > 0:
            out.append(positive if frac[positive] > threshold else None)
            continue
        best = max(range(n_classes), key=lambda c: (frac[c], -c))
        out.append(best if frac[best] > threshold else None)
    return out


@dataclass
class StageData:
    """Everything a stage trains on."""

    manifest: Manifest
    class_map: ClassMap
    split: Split
    mpp: float
    tile_px: int
    scales: tuple[float, ...]
    context_px: int
    target: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_slides: list[SlideRecord]
    val_slides: list[SlideRecord]
    train: TileDataset
    val: TileDataset | None
    train_patch_labels: list[int] | None = None
    val_patch_labels: list[int] | None = None
    tissue_method: str | None = None
    skipped: list[str] = field(default_factory=list)
    #: Training tiles over corrected regions and how many times each is drawn as often
    #: (``data.correction_weight``; :func:`correction_items`).
    corrections: dict[str, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of label classes (model outputs)."""
        return len(self.class_map)


def _tissue_masks(slides: Sequence[SlideRecord], method: str | None,
                  on_error: str) -> tuple[list[Any], list[int]]:
    """Tissue masks of the slides (None without a method) and the indices that failed."""
    from qpseg.errors import SlideError

    if method is None:
        return [None] * len(slides), []
    from qpseg.slide import open_slide
    from qpseg.tissue import detect_tissue

    masks: list[Any] = []
    bad: list[int] = []
    for i, rec in enumerate(slides):
        try:
            with open_slide(rec.path, mpp=rec.mpp) as slide:
                masks.append(detect_tissue(slide, method))
        except SlideError as exc:
            if on_error == "raise":
                raise
            warnings.warn(f"{rec.path}: slide skipped: {exc.message}", TrainingWarning,
                          stacklevel=2)
            masks.append(None)
            bad.append(i)
    return masks, bad


def _tiles(slides: list[SlideRecord], class_map: ClassMap, d: Mapping[str, Any], tile_px: int,
           mpp: float) -> tuple[list[SlideRecord], list[Tile]]:
    """Tile grid of ``slides`` (slides that fail tissue detection with on_error=skip are
    dropped); returns the kept slides and their tiles."""
    from qpseg.data.grid import build_tiles

    masks, bad = _tissue_masks(slides, d["tissue_method"], d["on_error"])
    keep = [i for i in range(len(slides)) if i not in bad]
    slides = [slides[i] for i in keep]
    masks = [masks[i] for i in keep]
    select = d["select"]
    if d["tissue_method"] is None and select in ("tissue", "either", "both"):
        select = "labelled"  # no tissue detection: the labelled area decides
    tiles = build_tiles(slides, class_map, tile_px=tile_px, mpp=mpp, stride_px=d["stride_px"],
                        select=select, min_labelled=float(d["min_labelled"]),
                        min_tissue=float(d["min_tissue"]),
                        tissue_masks=masks if d["tissue_method"] else None,
                        resolution=int(d["resolution"]), unlabelled=d["unlabelled"])
    return slides, tiles


def _heatmap_class(value: Any, class_map: ClassMap) -> int | None:
    if value is None:
        return 1 if len(class_map) > 1 else None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(class_map):
            raise ConfigError(f"data.heatmap_class {value} is not a class index")
        return value
    idx = class_map.index_of(str(value))
    if idx is None:
        names = ", ".join(class_map.names)
        raise ConfigError(f"data.heatmap_class {value!r} is not a class ({names})")
    return idx


def _class_balance_items(tiles: Sequence[Tile], cb: Mapping[str, Any],
                         class_map: ClassMap) -> list[tuple[int, int]]:
    from qpseg.data.samplers import class_balance_items

    def index(name: Any) -> int:
        if isinstance(name, int) and not isinstance(name, bool):
            return name
        idx = class_map.index_of(str(name))
        if idx is None:
            raise ConfigError(f"data.class_balance names {name!r}, which is not a class "
                              f"({', '.join(class_map.names)})")
        return idx

    raw = cb["rates"]
    rates = {index(k): v for k, v in raw.items()} if isinstance(raw, Mapping) \
        else dict(enumerate(raw))
    order = [index(c) for c in cb["order"]] if cb.get("order") else None
    return class_balance_items(tiles, rates, class_order=order)


def prepare_data(manifest: Manifest, cfg: Mapping[str, Any], contract: ModelContract, *,
                 seed: int) -> StageData:
    """Datasets of one stage of ``cfg`` for a model with ``contract``.

    Raises LabelError when no slide or no tile is left to train on, ConfigError for config
    values that do not fit the project.
    """
    from qpseg.data.dataset import TileDataset
    from qpseg.data.grid import slides_from_manifest

    d = cfg["data"]
    class_map = class_map_for(manifest, cfg.get("classes"))
    if contract.num_classes != len(class_map):
        raise ConfigError(f"the model has {contract.num_classes} outputs but there are "
                          f"{len(class_map)} classes ({', '.join(class_map.names)})")
    target = d["target"]
    if target == "auto":
        target = "instance" if contract.output == "instance" else "semantic"
    if d["unlabelled"] != "ignore" and contract.output != "patch":
        raise ConfigError("data.unlabelled: background (exhaustive annotation) is implemented "
                          "for patch classifiers and the H2G-Net refinement stage; for a dense "
                          "model, mark the exhaustively annotated area with a Region* "
                          "annotation")
    if contract.output == "instance" and target != "instance":
        raise ConfigError("instance models train on instance targets (data.target: instance)")
    if target == "semantic" and cfg.get("classes"):
        _check_annotated(manifest, cfg["classes"])
    slides = slides_from_manifest(manifest, group_by=d["group_by"],
                                  detections=target == "instance")
    if target == "instance" and not any(s.detections for s in slides):
        raise LabelError("data.target is instance but no slide has cells or detections "
                         "(nuclei) in its annotation file", manifest.path)
    split = split_for(slides, cfg["split"], seed, d["group_by"])
    train_slides = [s for s in slides if split.subset_of(s.key) == "train"]
    val_slides = [s for s in slides if split.subset_of(s.key) == "val"]
    if not train_slides:
        raise LabelError("no slide left for training after the split", manifest.path)
    mpp = resolve_mpp(d["mpp"], contract, slides)
    finest = min(s.mpp for s in slides)
    if mpp < finest * 0.95:
        warnings.warn(f"training at {mpp:g} µm/px, finer than every slide ({finest:g} µm/px): "
                      "tiles are upsampled", TrainingWarning, stacklevel=2)
    if any(s.scale is None for s in contract.inputs):
        raise ConfigError(f"{contract.architecture} reads whole slides; it is trained as a "
                          "stage of its pipeline (h2g_net)")
    tile_px = contract.tile_px
    if d["tile_px"] is not None and int(d["tile_px"]) != tile_px:
        raise ConfigError(f"data.tile_px {d['tile_px']} differs from the model's tile "
                          f"({tile_px}); set tile_px in model_kwargs")
    scales = tuple(float(s.scale) for s in contract.inputs if s.scale is not None)
    context = int(contract.context_px)
    mean, std = normalization(d["normalization"])
    if len(mean) != contract.channels:
        raise ConfigError(f"data.normalization has {len(mean)} channel(s), the model reads "
                          f"{contract.channels}")

    train_slides, train_tiles = _tiles(train_slides, class_map, d, tile_px, mpp)
    val_slides, val_tiles = _tiles(val_slides, class_map, d, tile_px, mpp) if val_slides \
        else ([], [])
    if not train_tiles:
        raise LabelError(f"no training tile passes the selection ({d['select']}, labelled "
                         f">= {d['min_labelled']:g}) at {mpp:g} µm/px", manifest.path)

    train_pl = val_pl = None
    if contract.output == "patch":
        positive = _heatmap_class(d["heatmap_class"], class_map)
        area = float(tile_px * tile_px)
        tp = patch_labels(train_tiles, len(class_map), area, threshold=d["patch_threshold"],
                          positive=positive)
        train_tiles = [t for t, lab in zip(train_tiles, tp, strict=True) if lab is not None]
        train_pl = [lab for lab in tp if lab is not None]
        vp = patch_labels(val_tiles, len(class_map), area, threshold=d["patch_threshold"],
                          positive=positive)
        val_tiles = [t for t, lab in zip(val_tiles, vp, strict=True) if lab is not None]
        val_pl = [lab for lab in vp if lab is not None]
        if not train_tiles:
            raise LabelError("no training tile has a patch label (pedersen2022 §2.2: more than "
                             f"{d['patch_threshold']:.0%} of one class)", manifest.path)

    items = None
    elastic = None
    if d["class_balance"]:
        items = _class_balance_items(train_tiles, d["class_balance"], class_map)
        if d["elastic_in_workers"]:
            from qpseg.data.augment import ElasticDeformation

            elastic = ElasticDeformation()
    weight = int(d.get("correction_weight", 1))
    items, n_corrected = correction_items(manifest, train_slides, train_tiles, items, weight,
                                          tile_px, mpp)
    normalizer = _stain_normalizer(d["stain_normalization"], train_slides, train_tiles,
                                   tile_px, mpp)
    common: dict[str, Any] = {"tile_px": tile_px, "mpp": mpp, "scales": scales,
                              "context_px": context, "target": target, "normalizer": normalizer,
                              "on_error": d["on_error"], "max_open": int(d["max_open"])}
    train_ds = TileDataset(train_slides, train_tiles, class_map, items=items, elastic=elastic,
                           **common)
    val_ds = TileDataset(val_slides, val_tiles, class_map, **common) if val_tiles else None
    if val_ds is None and val_slides:
        warnings.warn("no validation tile passes the selection: training without validation",
                      TrainingWarning, stacklevel=2)
    for problem in data_problems(manifest, slides, split, class_map, train_ds, train_pl):
        warnings.warn(problem, TrainingWarning, stacklevel=2)
    return StageData(
        manifest=manifest, class_map=class_map, split=split, mpp=mpp, tile_px=tile_px,
        scales=scales, context_px=context, target=target, mean=mean, std=std,
        train_slides=train_slides, val_slides=val_slides, train=train_ds, val=val_ds,
        train_patch_labels=train_pl, val_patch_labels=val_pl,
        tissue_method=d["tissue_method"],
        corrections={"tiles": n_corrected, "weight": weight} if n_corrected else {})


#: Fewer slides than this cannot train, validate and test on different slides.
MIN_SLIDES = 3


def data_problems(manifest: Manifest, slides: Sequence[SlideRecord], split: Split,
                  class_map: ClassMap, train: TileDataset,
                  train_patch_labels: Sequence[int] | None = None) -> list[str]:
    """What the user should know before a long run (warned by :func:`prepare_data`): fewer
    than :data:`MIN_SLIDES` slides; a class annotated only on slides outside the training
    split (named: the validation slide(s) that hold it); a class with no training pixels (no
    training patches for a patch classifier) in the selected tiles."""
    out: list[str] = []
    if len(slides) < MIN_SLIDES:
        out.append(f"only {len(slides)} slide(s) with labels: validation scores cannot come "
                   "from slides the model did not train on, so they will not tell how it does "
                   f"on new slides (annotate at least {MIN_SLIDES})")
    by_entry = {e.entry_id: e for e in manifest.entries}
    holders: dict[str, list[str]] = {}  # class (lower case) -> slides annotated with it
    for rec in slides:
        entry = by_entry.get(rec.entry_id) if rec.entry_id is not None else None
        if entry is None:
            continue
        for name, stats in entry.classes.items():
            if stats.area_px > 0 or stats.count > 0:
                holders.setdefault(name.lower(), []).append(rec.key)
    if train_patch_labels is not None:
        counts = [0] * len(class_map)
        for lab in train_patch_labels:
            counts[lab] += 1
        unit = "training patches"
    else:
        summary = train.summary()["classes"]
        counts = [int(summary[c.name]["pixels"]) for c in class_map.classes]
        unit = "training pixels"
    for cls in class_map.classes:
        if counts[cls.index] > 0:
            continue
        where = holders.get(cls.name.lower(), [])
        subsets = {k: split.subset_of(k) for k in where}
        if where and "train" not in subsets.values():
            val = [k for k, v in subsets.items() if v == "val"]
            place = (f"only on {'slide' if len(where) == 1 else 'slides'} "
                     f"{', '.join(where)}, in the "
                     + ("validation split" if len(val) == len(where) else "validation/test "
                        "splits"))
            out.append(f"class {cls.name!r} is annotated {place}: the model never sees it in "
                       "training; name the validation slides (--val NAME,...) so a slide with "
                       "it trains")
        elif cls.index == 0:
            out.append(f"class {cls.name!r} has no {unit}: the model never learns to say "
                       "'none of the classes'; annotate some background, or mark exhaustively "
                       "annotated areas with a Region* annotation")
        else:
            out.append(f"class {cls.name!r} has no {unit}: the model cannot learn it"
                       + ("" if where else " (no slide is annotated with it)")
                       + "; annotate it on a training slide or leave it out (classes:)")
    return out


def correction_items(manifest: Manifest, slides: Sequence[SlideRecord], tiles: Sequence[Tile],
                     items: Sequence[tuple[int, int]] | None, weight: int, tile_px: int,
                     mpp: float) -> tuple[list[tuple[int, int]] | None, int]:
    """Weigh the pathologist's corrections: every item whose tile overlaps a region where the
    slide's reviewed export disagrees with the predictions qpseg saved for it
    (:func:`qpseg.rounds.corrected_regions`) is served ``weight`` times, so any sampler draws
    it ``weight`` times as often. Returns the items (``items`` unchanged, None for "every tile
    once", when nothing was corrected or ``weight`` is 1) and the number of tiles weighted."""
    if weight <= 1:
        return (list(items) if items is not None else None), 0
    from shapely import union_all
    from shapely.geometry import box
    from shapely.prepared import prep

    from qpseg.errors import GeoJSONError
    from qpseg.qupath.geojson import read_geojson
    from qpseg.rounds import corrected_regions

    by_entry = {e.entry_id: e for e in manifest.entries}
    zones: dict[int, Any] = {}
    for i, rec in enumerate(slides):
        entry = by_entry.get(rec.entry_id) if rec.entry_id is not None else None
        if entry is None or not entry.predictions_file or not rec.annotation_file:
            continue
        try:
            regions = corrected_regions(read_geojson(rec.annotation_file),
                                        read_geojson(entry.predictions_file))
        except (OSError, GeoJSONError) as exc:
            warnings.warn(f"{rec.name or rec.path}: corrections not weighted ({exc})",
                          TrainingWarning, stacklevel=2)
            continue
        if regions:
            zones[i] = prep(union_all(regions))
    if not zones:
        return (list(items) if items is not None else None), 0
    out: list[tuple[int, int]] = []
    hit: set[int] = set()
    for t, copy in (items if items is not None else [(t, 0) for t in range(len(tiles))]):
        tile = tiles[t]
        out.append((t, copy))
        zone = zones.get(tile.slide)
        if zone is None:
            continue
        side = tile_px * mpp / slides[tile.slide].mpp
        if zone.intersects(box(tile.x, tile.y, tile.x + side, tile.y + side)):
            out += [(t, copy)] * (weight - 1)
            hit.add(t)
    return out, len(hit)


def _stain_normalizer(method: str | None, slides: Sequence[SlideRecord], tiles: Sequence[Tile],
                      tile_px: int, mpp: float) -> Any:
    """A colour normaliser fitted on the training tile with the most labelled tissue: a
    callable ``uint8 (H, W, 3) -> uint8`` whose ``to_json()`` the model package stores, so
    inference normalises every tile the same way (:mod:`qpseg.data.stain`)."""
    if method is None:
        return None
    from qpseg.data.stain import fit_normalizer
    from qpseg.slide import open_slide

    ref = max(tiles, key=lambda t: (t.labelled_fraction, -t.slide, -t.y, -t.x))
    rec = slides[ref.slide]
    with open_slide(rec.path, mpp=rec.mpp) as slide:
        rgb = slide.read_region_mpp(ref.x, ref.y, tile_px, tile_px, mpp)
    return fit_normalizer(method, rgb)


def data_summary(data: StageData) -> dict[str, Any]:
    """Slides, tiles per class, ignored fraction, split (what ``--dry-run`` prints), and the
    truth rule's counts of AI objects in the annotations (``ai_objects``: policy, and per
    class how many were left out and kept; :meth:`qpseg.review.ReviewCounts.to_json`)."""
    out: dict[str, Any] = {
        "classes": data.class_map.names,
        "mpp": data.mpp,
        "tile_px": data.tile_px,
        "scales": list(data.scales),
        "context_px": data.context_px,
        "target": data.target,
        "split": data.split.to_json(),
        "train": data.train.summary(),
        "val": data.val.summary() if data.val is not None else None,
        "ai_objects": data.manifest.review.to_json(),
        "corrections": dict(data.corrections),
    }
    for name, labels in (("train", data.train_patch_labels), ("val", data.val_patch_labels)):
        if labels is not None:
            counts = [0] * data.num_classes
            for lab in labels:
                counts[lab] += 1
            out[f"{name}_patches"] = dict(zip(data.class_map.names, counts, strict=True))
    return out


def tiles_with_hist(tiles: Sequence[Tile], labels: Sequence[int], n_classes: int
                    ) -> list[Tile]:
    """Copies of ``tiles`` whose class histogram is the one-hot patch label (so the
    hierarchical sampler's class level follows patch labels)."""
    out = []
    for t, lab in zip(tiles, labels, strict=True):
        hist = [0] * n_classes
        hist[lab] = 1
        out.append(replace(t, class_hist=tuple(hist)))
    return out


def weights_for_classes(value: Any, class_map: ClassMap, counts: np.ndarray) -> list[float] | None:
    """CE class weights of ``loss.class_weights``: None, ``ho2021`` (ho2021 eq. 2 from the
    training pixel ``counts``), ``balanced`` (``N / (K · N_c)``), a list or a mapping."""
    import numpy as np

    n = len(class_map)
    if value is None:
        return None
    if value == "ho2021":
        from qpseg.data.weights import ho_class_weights

        return [float(w) for w in ho_class_weights(counts)]
    if value == "balanced":
        c = np.asarray(counts, dtype=np.float64)
        present = c > 0
        arr = np.ones(n)
        if present.any():
            arr[present] = c.sum() / (present.sum() * c[present])
        return [float(v) for v in arr]
    if isinstance(value, Mapping):
        w = [1.0] * n
        for k, v in value.items():
            idx = class_map.index_of(str(k))
            if idx is None:
                raise ConfigError(f"loss.class_weights names {k!r}, which is not a class")
            w[idx] = float(v)
        return w
    vals = [float(v) for v in value]
    if len(vals) != n or any(not (math.isfinite(v) and v >= 0) for v in vals):
        raise ConfigError(f"loss.class_weights must list {n} non-negative weights, got {value!r}")
    return vals
