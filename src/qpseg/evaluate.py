"""``qpseg evaluate``: match truth and prediction slides, score them, write CSVs and a report.

Inputs (truth ``T`` and prediction ``P`` are each one of):

* **a QuPath project** (``project.qpproj`` or its folder). As truth: the annotations exported
  by ``groovy/export_annotations.groovy`` to ``<project>/qpseg/annotations/``; as prediction:
  ``<project>/qpseg/predictions/`` (what ``qpseg infer`` writes). Files are found per entry as
  ``<entryID>.geojson`` or ``<imageName>.geojson`` (:func:`qpseg.manifest.find_annotation_file`).
  The image size comes from the project's image metadata.
* **a folder of GeoJSON files** (``*.geojson``, ``*.geojson.gz``, ``*.json``; names ending in
  ``metadata.json`` and ``manifest.json``/``classes.json``/``config.json`` are skipped), one per
  slide, named ``<slide>.geojson``. Coordinates are level-0 pixels; ``--mpp`` gives their size.
* **a folder of label masks** (``*.png``, ``*.tif``, ``*.tiff``): ``<slide>.png`` or
  ``<slide>_labels.png`` hold *class indices* (uint8/uint16; 0 = Background, ``i`` = the
  ``i``-th name of ``--classes``, 255 = unlabelled); ``<slide>_instances.tif`` holds *instance
  ids* (any integer type, 0 = no instance). A mask covers the whole slide on a grid of
  ``--mask-mpp`` µm/px (default: deduced from the slide size when known, else level 0).
* a single GeoJSON file or mask (two single files always match each other).

Mask values: in a truth class mask 255 is unlabelled and 0 is labelled Background; in a
prediction class mask 255 ("not predicted") counts as Background. Without ``--classes`` two mask
inputs are compared on numbered classes ("class 1", ...); a mask against GeoJSON needs
``--classes``. Label masks carry no pixel size: lesion diameters need ``--mask-mpp`` (or
``--mpp``, or a project that gives the slide's size and pixel size).

Pixel size (level-0 µm/px) of a matched slide: the rule of every command,
:func:`qpseg.slide.choose_pixel_size` — the slide's own (a project entry's image, truth side
first), else the QuPath project's calibration, else ``--mpp``; ``--mpp-override`` makes
``--mpp`` replace a known value (``slides.csv`` records where each value came from in
``mpp_source`` and what was replaced in ``mpp_replaced``). ``--mpp``, ``--eval-mpp`` and
``--mask-mpp`` are checked by :func:`qpseg.slide.check_mpp`.

Matching: every slide has keys — a project entry its image name (with and without the image
extension, e.g. ``a.svs`` and ``a``) and its entry id; a file its stem (``a.svs.geojson`` ->
``a.svs`` and ``a``; an all-digit stem is also an entry id). Keys are compared case-insensitively,
entry ids first, then names. Entry ids are only compared between a project and a folder, or
within one project (two different projects are matched by image name only). Truth and
prediction slides without a partner are listed in ``unmatched.csv`` (not an error); nothing
matching at all is a :class:`~qpseg.errors.ConfigError`.

What is scored (per slide):

* **Pixels** — truth annotations are rasterised with :func:`qpseg.labels.rasterize_labels` (the
  label rules: ``Ignore*`` annotations carry no label, ``Region*`` marks exhaustively labelled
  area that is Background where no class is drawn), predictions with the same function;
  unpredicted pixels are Background. Pixel objects of either side are its classified
  annotations, or, where it has none, its classified detections and cells (a cell's nucleus
  geometry when it has one): a cells-only truth is pixel truth too. ``--truth-mode`` says what
  an unannotated truth pixel is:

  - ``exhaustive`` (the default, the papers' protocol: an untrained model painting everything
    must not score 1.0): Background, over the **whole image** (not a tissue mask: glass
    painted as a class counts against the model). A slide whose truth has ``Region*``
    annotations keeps them as the bound of its exhaustive area. A truth file without any
    annotation (a benign slide, or one holding only AI objects the review rule leaves out)
    is scored as all-negative: its predicted pixels are false positives and its predicted
    lesions lesion-level false positives. Without a known image size (GeoJSON folders) the
    whole image is the bounding box of the truth's and the prediction's objects.
  - ``partial``: unlabelled (not scored); only the truth's labelled area is scored, and a
    truth without labelled annotations or instances is listed as unmatched. A warning says
    when the truth looks exhaustive by intent (one class, no ``Region*``) in this mode.

  Both are drawn at ``--eval-mpp`` (default: the finest pixel size the matched predictions
  record in their provenance, ``qpseg_map_mpp`` / ``qpseg_mpp``, else
  :data:`DEFAULT_EVAL_MPP` = 2 µm/px) over the image (exhaustive) or the bounding box of the
  truth's labelled area grown to whole predicted objects touching it (partial), on a grid
  aligned to multiples of the eval pixel from the image origin. A raster above
  ``_FULL_RASTER_PIXELS`` is scored tile by tile (the confusion matrix at the eval pixel
  size; lesions and the overlay on a grid coarsened to fit, noted per slide). With a
  label-mask side, the mask's own grid is used instead (a truth mask says itself what is
  unlabelled: 255).
* **Lesions** (CAMELYON-style, :mod:`qpseg.metrics.lesion`) of one class: ``--lesion-class``,
  by default the first class (in class order) named Tumor, Tumour or Metastasis; predicted
  lesions outside the labelled area are left out.
* **Instances** (:mod:`qpseg.metrics.instance`) when the truth holds detections or cells (or an
  instance mask): truth and predicted detections/cells (a cell's nucleus geometry when it has
  one). Geometry against geometry is scored on the polygons themselves (exact areas, no raster);
  a mask side on its grid. If the truth has ``Region*`` annotations, only instances whose
  interior point lies inside them are scored. Instance metrics are class-agnostic. AJI is
  reported pooled over slides (sums over every slide) and as the per-image mean (the nuclei
  papers' protocol); a warning says when the prediction of a slide with truth instances holds
  no detections or cells (annotations cannot be instances: every truth instance is missed).

Classes: ``--classes`` fixes them (Background is index 0); objects of other classes are dropped
with a warning (truth: unlabelled; prediction: Background). Otherwise the classes are those of
the truth (in the truth project's ``classes.json`` order, then alphabetical), and a prediction
class the truth never uses is an error (:class:`~qpseg.errors.LabelError`: the classes
disagree). Class means (mIoU, ...) average over the classes present in the truth of at least one
slide.

A slide that cannot be scored (unreadable file, unknown pixel size, ...) is listed in
``failed.csv`` with its reason and the others are still scored; in partial mode a truth
without labelled annotations or instances is listed as unmatched (its AI-object counts are
still reported). Every CSV of scores has a ``truth_mode`` column. Outputs (see
:meth:`Evaluation.write`):
``per_slide.csv``, ``slides.csv``, ``summary.csv``, ``confusion.csv``, ``lesions.csv`` and
``lesion_slides.csv`` (lesion class present), ``instances.csv`` (instance data present),
``unmatched.csv``, ``failed.csv`` and ``report.html``. In the CSVs an empty cell is an undefined
value (``NaN``: a ratio with a zero denominator).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qpseg.errors import (
    ConfigError,
    LabelError,
    QpsegError,
    QpsegWarning,
    SlideError,
)
from qpseg.labels import BACKGROUND, IGNORE_INDEX, ClassMap, label_role

if TYPE_CHECKING:
    import numpy as np
    from shapely.geometry.base import BaseGeometry

    from qpseg.metrics.instance import InstanceAccumulator, InstanceMetrics, InstanceOverlap
    from qpseg.metrics.lesion import LesionAccumulator, LesionMetrics
    from qpseg.metrics.pixel import PixelAccumulator
    from qpseg.qupath.geojson import QuPathObject
    from qpseg.review import ReviewCounts

__all__ = [
    "DEFAULT_EVAL_MPP",
    "LESION_CLASS_NAMES",
    "PER_SLIDE_COLUMNS",
    "SUMMARY_COLUMNS",
    "EvalInput",
    "Evaluation",
    "Failed",
    "InputItem",
    "SlideScore",
    "Unmatched",
    "bootstrap_ci",
    "evaluate",
    "load_input",
    "match_inputs",
    "read_label_mask",
    "write_csv",
]

#: default pixel size (µm/px) at which pixel and lesion metrics are computed from GeoJSON
DEFAULT_EVAL_MPP = 2.0
#: ``--truth-mode``: ``exhaustive`` (unannotated pixels are Background) or ``partial``
TRUTH_MODES: tuple[str, ...] = ("exhaustive", "partial")
#: the default: an unannotated pixel is Background, so a model is charged for what it paints
#: outside the outlines (partial scoring of tumour-only outlines rewards painting everything)
DEFAULT_TRUTH_MODE = "exhaustive"
#: default lesion classes, in order of preference (case-insensitive)
LESION_CLASS_NAMES: tuple[str, ...] = ("Tumor", "Tumour", "Metastasis")
#: columns of ``per_slide.csv`` (one row per slide x class; pixel counts at the eval mpp)
PER_SLIDE_COLUMNS: tuple[str, ...] = (
    "slide", "entry_id", "class_index", "class_name", "n_truth", "n_pred", "tp", "fp", "fn",
    "tn", "precision", "recall", "f1", "dice", "iou", "truth_mode",
)
#: columns of ``slides.csv`` (one row per scored slide)
SLIDE_COLUMNS: tuple[str, ...] = (
    "slide", "entry_id", "truth_file", "pred_file", "base_mpp", "mpp_source", "mpp_replaced",
    "eval_mpp", "width", "height", "n_pixels", "accuracy", "miou", "mrecall", "mprecision",
    "mf1", "n_truth_instances", "n_pred_instances", "truth_mode", "notes",
)
#: columns of ``summary.csv``
SUMMARY_COLUMNS: tuple[str, ...] = (
    "level", "class_index", "class_name", "metric", "n_slides", "slide_mean", "slide_std",
    "ci_low", "ci_high", "slide_min", "slide_max", "pooled", "truth_mode",
)
CONFUSION_COLUMNS: tuple[str, ...] = ("slide", "truth_class", "pred_class", "count",
                                      "row_fraction", "truth_mode")
UNMATCHED_COLUMNS: tuple[str, ...] = ("side", "slide", "path", "reason")
FAILED_COLUMNS: tuple[str, ...] = ("slide", "entry_id", "truth_file", "pred_file", "reason")

InputKind = Literal["project", "geojson", "masks"]

GEOJSON_SUFFIXES: tuple[str, ...] = (".geojson.gz", ".geojson", ".json")
MASK_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff")
_NOT_GEOJSON = frozenset({"manifest.json", "classes.json", "config.json", "project.qpproj"})
_INSTANCE_TAG = "_instances"
_LABEL_TAG = "_labels"
# image extensions stripped from names for matching ("a.svs" also matches "a")
_IMAGE_EXTS = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".czi", ".png",
    ".jpg", ".jpeg", ".dcm", ".qptiff", ".btf", ".isyntax", ".ome", ".svslide", ".ndpis",
})
#: label masks above this many pixels (x4) are refused as too large to read
MAX_RASTER_PIXELS = 400_000_000
#: evaluation rasters up to this many pixels are scored in one piece; larger ones tile by tile
_FULL_RASTER_PIXELS = 50_000_000
_TILE = 1024
# Geometric instance areas are passed to the metric core as integers in 1/256 px² (its AJI sums
# are integer): IoUs and AJI are ratios, so the unit does not change them.
_AREA_SCALE = 256.0
_THUMB_SIDE = 512   # error maps: the longer side, in outcome cells (report.html enlarges
_MAP_SIDE = 512     # smaller ones to at least this many pixels, the tissue read at that size)
_PIXEL_OBJECT_TYPES = ("annotation",)
_INSTANCE_OBJECT_TYPES = ("detection", "cell")


# ============================================================================== input model


@dataclass
class InputItem:
    """One slide of an input: where its data is and how it can be matched."""

    name: str                      # display name (image name or file stem)
    keys: tuple[str, ...]          # lower-case match keys; "#<n>" is entry id n
    path: Path | None = None       # GeoJSON file, or class mask
    instance_path: Path | None = None  # instance mask (mask folders)
    entry_id: int | None = None
    mpp: tuple[float, float] | None = None  # the project's calibration (x, y µm/px), if set
    size: tuple[int, int] | None = None  # level-0 (QuPath) width, height, when known
    image_path: Path | None = None  # the slide (project entries): its own pixel size
    problem: str | None = None     # why there is no data (e.g. "no prediction file")
    originals: Path | None = None  # truth of a project: the predictions qpseg saved for it
    image_name: str | None = None  # the slide's image name (a project entry; a prediction
    #                                folder's run_metadata.json), for reports

    @property
    def overlay(self) -> Path | None:
        """The overlay PNG ``qpseg infer --overlay`` wrote beside this prediction file."""
        if self.path is None:
            return None
        stem = _strip_suffix(self.path.name, GEOJSON_SUFFIXES)
        found = self.path.with_name(f"{stem}.overlay.png") if stem else None
        return found if found is not None and found.is_file() else None

    @property
    def has_data(self) -> bool:
        """True when a file for this slide exists."""
        return self.path is not None or self.instance_path is not None

    @property
    def files(self) -> str:
        """The data file(s) as text, for CSVs."""
        return ";".join(str(p) for p in (self.path, self.instance_path) if p is not None)


@dataclass
class EvalInput:
    """A truth or prediction input: its kind and its slides."""

    kind: InputKind
    path: Path
    role: str                      # "truth" | "pred"
    items: list[InputItem]
    class_order: tuple[str, ...] = ()   # the project's classes.json order
    single_file: bool = False


@dataclass(frozen=True)
class Unmatched:
    """A slide present on one side only (or without anything to score)."""

    side: str     # "truth" | "pred"
    slide: str
    path: str
    reason: str


@dataclass(frozen=True)
class Failed:
    """A matched slide that could not be scored."""

    slide: str
    entry_id: int | None
    truth_file: str
    pred_file: str
    reason: str


def _dedupe(values: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        if v and v not in out:
            out.append(v)
    return tuple(out)


def _name_keys(name: str) -> list[str]:
    """``name`` and ``name`` without up to two image extensions, lower case."""
    keys = [name.lower()]
    stem = name
    for _ in range(2):
        suffix = Path(stem).suffix.lower()
        if suffix not in _IMAGE_EXTS or len(suffix) == len(stem):
            break
        stem = stem[: -len(suffix)]
        keys.append(stem.lower())
    return keys


def _file_keys(stem: str) -> tuple[str, ...]:
    keys = _name_keys(stem)
    if stem.isascii() and stem.isdigit():  # "²".isdigit() is True too
        keys.append(f"#{int(stem)}")
    return _dedupe(keys)


def _strip_suffix(name: str, suffixes: Sequence[str]) -> str | None:
    low = name.lower()
    for s in suffixes:
        if low.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return None


def _is_geojson_name(name: str) -> bool:
    low = name.lower()
    if low in _NOT_GEOJSON or low.endswith("metadata.json") or low.startswith("."):
        return False
    return _strip_suffix(name, GEOJSON_SUFFIXES) is not None


#: name endings (before the image suffix) of the images `qpseg infer` writes next to its GeoJSON
_INFER_SIDE_OUTPUTS = (".heatmap", ".heatmap.ome", ".overlay")


def _mask_stem(name: str) -> tuple[str, str] | None:
    """``(slide stem, "class" | "instance")`` of a mask file name, or None."""
    if name.startswith("."):
        return None
    stem = _strip_suffix(name, MASK_SUFFIXES)
    if stem is None:
        return None
    if stem.lower().endswith(_INFER_SIDE_OUTPUTS):
        return None  # `qpseg infer`'s heatmaps and overlays sit beside its GeoJSON: not labels
    if stem.lower().endswith(_INSTANCE_TAG) and len(stem) > len(_INSTANCE_TAG):
        return stem[: -len(_INSTANCE_TAG)], "instance"
    if stem.lower().endswith(_LABEL_TAG) and len(stem) > len(_LABEL_TAG):
        return stem[: -len(_LABEL_TAG)], "class"
    return stem, "class"


def _project_input(path: Path, role: str) -> EvalInput:
    from qpseg.manifest import find_annotation_file
    from qpseg.qupath.project import QuPathProject

    project = QuPathProject.load(path)
    sub = "annotations" if role == "truth" else "predictions"
    folder = project.path.parent / "qpseg" / sub
    items: list[InputItem] = []
    names = [e.image_name for e in project.entries]
    for entry in project.entries:
        f = find_annotation_file(entry, [folder]) if folder.is_dir() else None
        name = entry.image_name or f"entry {entry.entry_id}"
        if names.count(entry.image_name) > 1:  # duplicate image names: keep slide names unique
            name = f"{name} #{entry.entry_id}"
        keys = _name_keys(entry.image_name) if entry.image_name else []
        if entry.image_path is not None:
            keys += _name_keys(entry.image_path.name)
        keys.append(f"#{entry.entry_id}")
        what = "annotation export" if role == "truth" else "prediction file"
        pred_folder = project.path.parent / "qpseg" / "predictions"
        originals = (find_annotation_file(entry, [pred_folder])
                     if role == "truth" and pred_folder.is_dir() else None)
        items.append(InputItem(
            name=name, keys=_dedupe(keys), path=f, entry_id=entry.entry_id, mpp=entry.mpp_xy,
            size=entry.dimensions, image_path=entry.image_path if entry.image_found else None,
            problem=None if f is not None else f"no {what} in {folder}", originals=originals,
            image_name=name,
        ))
    return EvalInput("project", project.path, role, items,
                     tuple(pc.name for pc in project.classes))


def _recorded_names(folder: Path, items: Sequence[InputItem]) -> None:
    """Image names of a folder written by ``qpseg infer``: its ``run_metadata.json`` lists
    each slide's key (the file stem) and image name. A missing or unreadable file names
    nothing (the file stems stay the names)."""
    import json

    try:
        data = json.loads((folder / "run_metadata.json").read_text(encoding="utf-8"))
        slides = data.get("slides") if isinstance(data, dict) else None
    except (OSError, ValueError):
        return
    names: dict[str, str] = {}
    for row in slides if isinstance(slides, list) else []:
        if isinstance(row, dict) and row.get("key") and row.get("name"):
            names[str(row["key"]).lower()] = str(row["name"])
    for item in items:
        item.image_name = names.get(item.name.lower(), item.image_name)


def load_input(path: str | os.PathLike[str], role: str = "truth") -> EvalInput:
    """Describe a truth or prediction input (``role`` "truth" or "pred"; see the module doc).

    Raises :class:`ConfigError` when the path does not exist or holds nothing usable, and
    :class:`~qpseg.errors.ProjectError` for an unreadable project.
    """
    if role not in ("truth", "pred"):
        raise ConfigError(f"role must be 'truth' or 'pred', not {role!r}")
    p = Path(path)
    what = "truth" if role == "truth" else "prediction"
    if not p.exists():
        raise ConfigError(f"{what} input not found", p)
    if p.is_file():
        name = p.name
        if name.endswith(".qpproj") or name.endswith(".qpproj.backup"):
            return _project_input(p, role)
        stem = _strip_suffix(name, GEOJSON_SUFFIXES)
        if stem is not None:
            return EvalInput("geojson", p, role,
                             [InputItem(stem, _file_keys(stem), path=p)], single_file=True)
        mask = _mask_stem(name)
        if mask is not None:
            item = InputItem(mask[0], _file_keys(mask[0]))
            if mask[1] == "instance":
                item.instance_path = p
            else:
                item.path = p
            return EvalInput("masks", p, role, [item], single_file=True)
        raise ConfigError(f"{what} input is not a QuPath project, a GeoJSON file or a label "
                          "mask (.png/.tif)", p)
    if (p / "project.qpproj").is_file() or any(p.glob("*.qpproj")):
        return _project_input(p, role)
    try:
        files = sorted(f for f in p.iterdir() if f.is_file())
    except OSError as exc:
        raise ConfigError(f"cannot list {what} folder ({exc.strerror or exc})", p) from None
    geojson = [f for f in files if _is_geojson_name(f.name)]
    masks = [(f, m) for f in files if (m := _mask_stem(f.name)) is not None]
    if geojson and masks:
        raise ConfigError(f"{what} folder holds both GeoJSON files and label masks; put them "
                          "in separate folders", p)
    if geojson:
        items = []
        for f in geojson:
            stem = _strip_suffix(f.name, GEOJSON_SUFFIXES) or f.name
            items.append(InputItem(stem, _file_keys(stem), path=f))
        _recorded_names(p, items)
        return EvalInput("geojson", p, role, items)
    if masks:
        by_stem: dict[str, InputItem] = {}
        for f, (stem, kind) in masks:
            item = by_stem.setdefault(stem.lower(), InputItem(stem, _file_keys(stem)))
            if kind == "instance" and item.instance_path is None:
                item.instance_path = f
            elif kind == "class" and item.path is None:
                item.path = f
            else:
                warnings.warn(f"{f}: a second {kind} mask for slide {stem!r}; ignored",
                              QpsegWarning, stacklevel=2)
        return EvalInput("masks", p, role, list(by_stem.values()))
    raise ConfigError(f"{what} folder holds no GeoJSON files (.geojson) or label masks "
                      "(.png/.tif) and no QuPath project", p)


def match_inputs(
    truth: EvalInput, pred: EvalInput
) -> tuple[list[tuple[InputItem, InputItem]], list[Unmatched]]:
    """Pair truth and prediction slides (see the module doc); returns the pairs (in truth
    order, both sides with data) and the unmatched slides."""
    if truth.single_file and pred.single_file:
        t, p = truth.items[0], pred.items[0]
        return [(t, p)], []
    both_projects = truth.kind == pred.kind == "project"
    use_ids = not both_projects or truth.path.resolve() == pred.path.resolve()

    index: dict[str, list[int]] = {}
    for j, item in enumerate(pred.items):
        for key in item.keys:
            index.setdefault(key, []).append(j)
    partner: dict[int, int] = {}
    taken: set[int] = set()
    phases = ("id", "name") if use_ids else ("name",)
    for phase in phases:
        for i, item in enumerate(truth.items):
            if i in partner:
                continue
            for key in item.keys:
                if key.startswith("#") != (phase == "id"):
                    continue
                hit = next((j for j in index.get(key, []) if j not in taken), None)
                if hit is not None:
                    partner[i] = hit
                    taken.add(hit)
                    break

    pairs: list[tuple[InputItem, InputItem]] = []
    unmatched: list[Unmatched] = []
    for i, t in enumerate(truth.items):
        pj = partner.get(i)
        if pj is None:
            # (a project entry without an export and without a prediction is not listed)
            if t.has_data:
                unmatched.append(Unmatched("truth", t.name, t.files, "no matching prediction"))
            continue
        p = pred.items[pj]
        if not t.has_data:
            if p.has_data:
                unmatched.append(Unmatched("pred", t.name, p.files, t.problem or "no truth"))
            continue
        if not p.has_data:
            unmatched.append(Unmatched("truth", t.name, t.files, p.problem or "no prediction"))
            continue
        pairs.append((t, p))
    for j, item in enumerate(pred.items):
        if j not in taken and item.has_data:
            unmatched.append(Unmatched("pred", item.name, item.files, "no matching truth"))
    return pairs, unmatched


# ============================================================================== reading data


def read_label_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """A 2-D integer label mask from a PNG or TIFF file (first page; equal RGB channels are
    accepted as one). Raises :class:`LabelError` when the file is not a readable label mask."""
    import numpy as np

    p = Path(path)
    try:
        if p.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(p) as tif:
                if not tif.pages:
                    raise LabelError("TIFF has no pages", p)
                page = tif.pages[0]
                shape = tuple(int(s) for s in page.shape)
                if math.prod(shape) > 4 * MAX_RASTER_PIXELS:
                    raise LabelError(f"mask of shape {shape} is too large", p)
                arr = np.asarray(page.asarray())
        else:
            from PIL import Image

            with Image.open(p) as im:
                if im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
                    arr = np.asarray(im.convert("RGB"))
                elif im.mode == "F":
                    raise LabelError("mask holds floating-point values, not labels", p)
                else:
                    arr = np.asarray(im)
    except QpsegError:
        raise
    except MemoryError:
        raise LabelError("mask too large to read", p) from None
    except Exception as exc:  # PIL/tifffile raise many kinds for corrupt files
        raise LabelError(f"cannot read label mask ({type(exc).__name__}: {exc})", p) from None
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if not ((rgb == rgb[..., :1]).all()):
            raise LabelError("mask is a colour image; expected one channel of label values", p)
        arr = np.ascontiguousarray(rgb[..., 0])
    if arr.ndim != 2 or arr.size == 0:
        raise LabelError(f"mask must be a 2-D image, not of shape {arr.shape}", p)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise LabelError(f"mask holds {arr.dtype} values, not integer labels", p)
    return arr


def _read_objects(path: Path) -> list[QuPathObject]:
    from qpseg.qupath.geojson import read_geojson

    return read_geojson(path)


def _polygonal(geom: BaseGeometry) -> BaseGeometry | None:
    """The valid polygonal part of a geometry, or None."""
    try:
        if geom.geom_type in ("Polygon", "MultiPolygon") and geom.is_valid:
            g = geom
        else:  # imported here only: this runs once per object
            from qpseg.qupath.geojson import repair_polygonal

            g = repair_polygonal(geom)
    except Exception:  # GEOS refuses some degenerate input
        return None
    return None if g.is_empty or g.area <= 0 else g


def _instance_geometries(objs: Iterable[QuPathObject]) -> list[BaseGeometry]:
    """The valid polygonal geometry (nucleus of a cell) of each instance object, in order.

    Validity and area are tested for all at once (tens of thousands per slide); only the
    invalid ones go through :func:`_polygonal`'s repair one by one.
    """
    import numpy as np
    import shapely

    geoms = [o.nucleus_geometry if o.nucleus_geometry is not None else o.geometry
             for o in objs if o.object_type in _INSTANCE_OBJECT_TYPES]
    if not geoms:
        return []
    arr = np.array(geoms, dtype=object)
    polygonal = np.isin(shapely.get_type_id(arr), (3, 6))  # Polygon, MultiPolygon
    fine = polygonal & shapely.is_valid(arr) & (shapely.area(arr) > 0)
    out: list[BaseGeometry] = []
    for g, ok in zip(geoms, fine.tolist(), strict=True):
        if ok:
            out.append(g)
        elif (poly := _polygonal(g)) is not None:
            out.append(poly)
    return out


def _class_key(name: str | None) -> str:
    return (name or "").strip().lower()


def _class_names(objs: Iterable[QuPathObject]) -> list[str]:
    """Label-class names (role "class") used by ``objs``, first spelling of each."""
    seen: dict[str, str] = {}
    for o in objs:
        if label_role(o.classification) == "class" and o.classification:
            seen.setdefault(_class_key(o.classification), o.classification.strip())
    return list(seen.values())


# ============================================================================== rasterising


def _raster_tiles(
    objects: Sequence[QuPathObject], region: tuple[float, float, int, int], mpp: float,
    class_map: ClassMap, base_mpp: float, exhaustive: bool = False,
) -> Iterator[tuple[int, int, int, int, np.ndarray | None]]:
    """``(row, col, height, width, labels)`` per tile of ``region``: the labels of
    :func:`qpseg.labels.rasterize_labels` on that tile, or None for a tile no object reaches
    (then every pixel is Background when ``exhaustive``, else unlabelled).

    Each tile gets only the objects whose bounds reach it, in their original order, so the
    paint order (smaller on top, then file order) is the same as for the whole region.
    ``exhaustive``: unlabelled pixels are Background (``unlabelled="background"``).
    """
    import numpy as np
    import shapely

    from qpseg.labels import rasterize_labels

    x0, y0, width, height = region
    ds = mpp / base_mpp
    tree = shapely.STRtree([o.geometry for o in objects]) if objects else None
    for r in range(0, height, _TILE):
        for c in range(0, width, _TILE):
            th, tw = min(_TILE, height - r), min(_TILE, width - c)
            tx, ty = x0 + c * ds, y0 + r * ds
            hits = np.zeros(0, dtype=np.intp)
            if tree is not None:
                window = shapely.box(tx - ds, ty - ds, tx + (tw + 1) * ds, ty + (th + 1) * ds)
                hits = np.sort(tree.query(window))
            if hits.size == 0:
                yield r, c, th, tw, None
                continue
            yield r, c, th, tw, rasterize_labels(
                [objects[i] for i in hits.tolist()], (tx, ty, tw, th), mpp, class_map,
                base_mpp=base_mpp, unlabelled="background" if exhaustive else "ignore")


def _rasterize(
    objects: Sequence[QuPathObject], region: tuple[float, float, int, int], mpp: float,
    class_map: ClassMap, base_mpp: float, exhaustive: bool = False,
) -> np.ndarray:
    """:func:`qpseg.labels.rasterize_labels` tile by tile (same result, bounded work);
    ``exhaustive``: unlabelled pixels are Background."""
    import numpy as np

    _, _, width, height = region
    fill = 0 if exhaustive else class_map.ignore_index
    out = np.full((height, width), fill, dtype=np.uint8)
    for r, c, th, tw, tile in _raster_tiles(objects, region, mpp, class_map, base_mpp,
                                             exhaustive):
        if tile is not None:
            out[r:r + th, c:c + tw] = tile
    return out


def _tiled_confusion(
    truth: Sequence[QuPathObject], pred: Sequence[QuPathObject],
    region: tuple[float, float, int, int], mpp: float, class_map: ClassMap, base_mpp: float,
    exhaustive: bool,
) -> np.ndarray:
    """The confusion matrix of ``region`` at ``mpp`` computed one tile at a time, so memory
    stays that of one tile whatever the region's size (unpredicted pixels are Background)."""
    import numpy as np

    from qpseg.metrics.pixel import confusion_matrix

    n = len(class_map)
    total = np.zeros((n, n), dtype=np.int64)
    tiles = zip(_raster_tiles(truth, region, mpp, class_map, base_mpp, exhaustive),
                _raster_tiles(pred, region, mpp, class_map, base_mpp), strict=True)
    for (_, _, th, tw, t), (_, _, _, _, p) in tiles:
        if t is None:
            if not exhaustive:
                continue
            if p is None:  # Background everywhere on both sides
                total[0, 0] += th * tw
                continue
            t = np.zeros((th, tw), dtype=np.uint8)
        if p is None:
            p = np.zeros((th, tw), dtype=np.uint8)
        total += confusion_matrix(t, p, n, IGNORE_INDEX, pred_ignore=0)
    return total


def _paint_instances(geoms: Sequence[BaseGeometry], shape: tuple[int, int],
                     ds: float) -> np.ndarray:
    """Instance ids ``1..n`` drawn on a grid of ``ds`` level-0 px (pixel-centre rule of
    :func:`qpseg.labels.rasterize_labels`, one object at a time; later ones on top)."""
    import numpy as np

    from qpseg.labels import rasterize_labels
    from qpseg.qupath.geojson import QuPathObject

    cm = ClassMap.from_names(["instance"])
    out = np.zeros(shape, dtype=np.int32)
    h, w = shape
    for i, g in enumerate(geoms, start=1):
        minx, miny, maxx, maxy = g.bounds
        c0, r0 = max(math.floor(minx / ds) - 1, 0), max(math.floor(miny / ds) - 1, 0)
        c1, r1 = min(math.ceil(maxx / ds) + 1, w), min(math.ceil(maxy / ds) + 1, h)
        if c1 <= c0 or r1 <= r0:
            continue
        lab = rasterize_labels([QuPathObject(geometry=g, classification="instance")],
                               (c0 * ds, r0 * ds, c1 - c0, r1 - r0), ds, cm, base_mpp=1.0)
        out[r0:r1, c0:c1][lab == 1] = i
    return out


def _geometric_overlap(truth: Sequence[BaseGeometry],
                       pred: Sequence[BaseGeometry]) -> InstanceOverlap:
    """The metric core's sparse overlap table computed from polygons (exact areas)."""
    import numpy as np
    import shapely

    from qpseg.metrics.instance import InstanceOverlap

    tg = np.array(truth, dtype=object)
    pg = np.array(pred, dtype=object)
    ta = np.rint(shapely.area(tg) * _AREA_SCALE).astype(np.int64) if tg.size else \
        np.zeros(0, np.int64)
    pa = np.rint(shapely.area(pg) * _AREA_SCALE).astype(np.int64) if pg.size else \
        np.zeros(0, np.int64)
    tg, ta = tg[ta > 0], ta[ta > 0]
    pg, pa = pg[pa > 0], pa[pa > 0]
    if tg.size and pg.size:
        tree = shapely.STRtree(pg)
        ti, pj = tree.query(tg, predicate="intersects")
        inter = np.rint(shapely.area(shapely.intersection(tg[ti], pg[pj])) * _AREA_SCALE)
        inter = np.minimum(inter.astype(np.int64), np.minimum(ta[ti], pa[pj]))
        keep = inter > 0
        order = np.lexsort((pj[keep], ti[keep]))
        ti, pj, inter = ti[keep][order], pj[keep][order], inter[keep][order]
    else:
        ti = pj = np.zeros(0, np.intp)
        inter = np.zeros(0, np.int64)
    return InstanceOverlap(
        truth_ids=np.arange(1, ta.size + 1), pred_ids=np.arange(1, pa.size + 1),
        truth_area=ta, pred_area=pa, pair_truth=ti.astype(np.intp),
        pair_pred=pj.astype(np.intp), pair_inter=inter.astype(np.int64),
    )


def _overlay_codes(truth: np.ndarray, pred: np.ndarray, max_side: int = _THUMB_SIDE
                   ) -> np.ndarray:
    """Thumbnail of outcome codes ``outcome * 256 + class``, the worst outcome of each block
    kept. Outcomes: 0 unlabelled, 1 correct Background, 2 TP (correct class), 3 FN (class
    missed: predicted Background), 4 FP (a class predicted where the truth is Background or
    another class); the class (local index) is the truth's for TP and FN, the predicted one for
    FP, 0 otherwise."""
    import numpy as np

    truth = np.asarray(truth)
    pred = np.asarray(pred)
    labelled = truth != IGNORE_INDEX
    codes = np.zeros(truth.shape, dtype=np.uint16)
    codes[labelled] = 1 << 8
    tp = labelled & (truth == pred) & (truth != 0)
    fn = labelled & (truth != 0) & (pred == 0)
    fp = labelled & (pred != 0) & (pred != truth)
    codes[tp] = (2 << 8) | truth[tp].astype(np.uint16)
    codes[fn] = (3 << 8) | truth[fn].astype(np.uint16)
    codes[fp] = (4 << 8) | np.minimum(pred[fp], 255).astype(np.uint16)
    shape: tuple[int, ...] = codes.shape
    h, w = shape[0], shape[1]
    step = max(1, math.ceil(max(h, w) / max_side))
    if step == 1:
        return codes
    ph, pw = -h % step, -w % step
    padded = np.pad(codes, ((0, ph), (0, pw)))
    return padded.reshape((h + ph) // step, step, (w + pw) // step, step).max(axis=(1, 3))


# ============================================================================== scoring


@dataclass
class SlideScore:
    """What was computed for one matched slide (class indices local to ``class_names``)."""

    slide: str
    entry_id: int | None
    truth_file: str
    pred_file: str
    base_mpp: float | None
    eval_mpp: float | None
    size: tuple[int, int] | None              # raster width, height
    class_names: tuple[str, ...]              # local class list (Background first)
    confusion: np.ndarray | None              # local confusion matrix, None: no labelled area
    truth_classes: tuple[str, ...] = ()       # class names the truth uses
    pred_classes: tuple[str, ...] = ()        # class names the prediction uses
    lesions: dict[str, LesionMetrics] = field(default_factory=dict)  # class key -> result
    instance: InstanceMetrics | None = None
    thumbnail: np.ndarray | None = None       # :func:`_overlay_codes`
    tissue: np.ndarray | None = None          # RGB of the slide under the thumbnail (enlarged)
    overlay: str | None = None                # the prediction's overlay PNG (qpseg infer)
    notes: list[str] = field(default_factory=list)
    review: ReviewCounts | None = None        # the truth rule's counts (AI objects in truth)
    origin: tuple[float, float] = (0.0, 0.0)  # level-0 position of raster pixel (0, 0)
    downsample: float | None = None           # level-0 px per raster px
    mpp_source: str | None = None             # where base_mpp came from (PixelSize.source)
    mpp_replaced: float | None = None         # the known value --mpp-override replaced
    mpp_given_unused: bool = False            # --mpp differs from the slide's/project's own
    has_region: bool = False                  # the truth has Region* annotations
    pred_instances: bool | None = None        # the prediction holds detections or cells


@dataclass
class _Options:
    classes: tuple[str, ...] | None
    mpp: float | None
    eval_mpp: float
    mask_mpp: float | None
    lesion_class: str | None     # None: auto; "": off
    instances: bool | None
    thumbnails: bool
    ai_objects: str = "unreviewed-out"
    mpp_override: bool = False
    truth_mode: str = DEFAULT_TRUTH_MODE


def _pixel_size_option(value: float | None, what: str) -> float | None:
    """A pixel-size option checked by the one plausibility rule (None stays None)."""
    if value is None:
        return None
    from qpseg.slide import check_mpp

    return check_mpp(value, what, error=ConfigError)


def _base_mpp(t: InputItem, p: InputItem, opts: _Options, score: SlideScore) -> float:
    """Level-0 pixel size of a matched pair by :func:`qpseg.slide.choose_pixel_size`: the
    slide's own (truth side first), else the project's calibration, else ``--mpp``
    (``--mpp-override``: ``--mpp`` replaces a known value). Where it came from goes to
    ``score``; :class:`SlideError` when no value is known."""
    from qpseg.slide import choose_pixel_size, open_slide

    native: tuple[float, float] | None = None
    for item in (t, p):
        if item.image_path is None:
            continue
        try:
            with open_slide(item.image_path) as slide:
                native = slide.native_mpp
            break
        except SlideError as exc:
            note = (f"the slide cannot be opened to read its pixel size "
                    f"({exc.one_line()}); the project's or --mpp is used")
            score.notes.append(note)
            warnings.warn(f"{score.slide}: {note}", QpsegWarning, stacklevel=2)
    project = next((i.mpp for i in (t, p) if i.mpp is not None), None)
    chosen = choose_pixel_size(native, project, opts.mpp, override=opts.mpp_override,
                               path=t.image_path or p.image_path or t.path)
    for note in chosen.notes:
        score.notes.append(note)
        warnings.warn(f"{score.slide}: {note}", QpsegWarning, stacklevel=2)
    score.mpp_source, score.mpp_replaced = chosen.source, chosen.replaced
    score.mpp_given_unused = chosen.given_unused
    return chosen.mpp


def _local_class_map(names: Sequence[str], opts: _Options) -> ClassMap:
    if opts.classes is not None:
        return ClassMap.from_names(opts.classes)
    uniq: dict[str, str] = {}
    for n in names:
        if _class_key(n) != _class_key(BACKGROUND):
            uniq.setdefault(_class_key(n), n)
    return ClassMap.from_names(sorted(uniq.values(), key=str.lower))


def _lesion_candidates(cm: ClassMap, opts: _Options) -> list[int]:
    if opts.lesion_class == "":
        return []
    if opts.lesion_class is not None:
        idx = cm.index_of(opts.lesion_class)
        return [] if idx is None else [idx]
    wanted = {n.lower() for n in LESION_CLASS_NAMES}
    return [c.index for c in cm.classes if c.name.lower() in wanted]


def _bounds(geoms: Iterable[BaseGeometry]) -> tuple[float, float, float, float] | None:
    import numpy as np
    import shapely

    arr = np.array(list(geoms), dtype=object)
    if arr.size == 0:
        return None
    b = shapely.bounds(arr)
    b = b[np.isfinite(b).all(axis=1)]
    if b.size == 0:
        return None
    return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())


def _grid_region(box: tuple[float, float, float, float], ds: float,
                 size: tuple[int, int] | None) -> tuple[float, float, int, int] | None:
    """Raster region (x, y, w, h at ``ds`` level-0 px per pixel) covering the level-0 box
    ``(minx, miny, maxx, maxy)`` clipped to the image, on a grid aligned to multiples of the
    pixel from the image origin; None when nothing is left."""
    minx, miny, maxx, maxy = box
    if size is not None:
        minx, miny = max(minx, 0.0), max(miny, 0.0)
        maxx, maxy = min(maxx, float(size[0])), min(maxy, float(size[1]))
    if not (maxx > minx and maxy > miny):
        return None
    x0 = math.floor(minx / ds) * ds
    y0 = math.floor(miny / ds) * ds
    w = max(1, math.ceil((maxx - x0) / ds - 1e-9))
    h = max(1, math.ceil((maxy - y0) / ds - 1e-9))
    return x0, y0, w, h


def _eval_region(
    truth_geoms: Sequence[BaseGeometry], pred_geoms: Sequence[BaseGeometry], ds: float,
    size: tuple[int, int] | None,
) -> tuple[float, float, int, int] | None:
    """Raster region (x, y, w, h at the eval pixel size) covering the truth's labelled area and
    whole predicted objects touching it; None when the labelled area is empty."""
    tb = _bounds(truth_geoms)
    if tb is None:
        return None
    minx, miny, maxx, maxy = tb
    for g in pred_geoms:
        gx0, gy0, gx1, gy1 = g.bounds
        if gx1 >= tb[0] and gx0 <= tb[2] and gy1 >= tb[1] and gy0 <= tb[3]:
            minx, miny = min(minx, gx0), min(miny, gy0)
            maxx, maxy = max(maxx, gx1), max(maxy, gy1)
    return _grid_region((minx, miny, maxx, maxy), ds, size)


def _exhaustive_region(
    geoms: Sequence[BaseGeometry], ds: float, size: tuple[int, int] | None,
) -> tuple[float, float, int, int] | None:
    """Raster region of exhaustive truth: the whole image, or, when the image size is not
    known (GeoJSON folders), the bounding box of every truth and predicted object; None when
    the size is unknown and there is no object."""
    if size is not None:
        return _grid_region((0.0, 0.0, float(size[0]), float(size[1])), ds, size)
    b = _bounds(geoms)
    return None if b is None else _grid_region(b, ds, None)


def _region_filter(truth_objs: Sequence[QuPathObject],
                   geoms: list[BaseGeometry]) -> list[BaseGeometry]:
    """Instances whose interior point lies in the truth's Region* annotations (if any)."""
    import numpy as np
    import shapely

    regions = [g for o in truth_objs if o.object_type == "annotation"
               and label_role(o.classification) == "region"
               and (g := _polygonal(o.geometry)) is not None]
    if not regions or not geoms:
        return geoms
    area = shapely.union_all(regions)
    shapely.prepare(area)
    pts = shapely.point_on_surface(np.array(geoms, dtype=object))
    keep = shapely.intersects(area, pts)
    return [g for g, k in zip(geoms, keep, strict=True) if k]


def _score_pixels(
    score: SlideScore, truth_map: np.ndarray, pred_map: np.ndarray, cm: ClassMap,
    mpp: float | None, opts: _Options, confusion: np.ndarray | None = None,
) -> None:
    """Confusion (unless given: computed at a finer grid), lesions and the overlay of one
    slide from its truth and prediction rasters at ``mpp``."""
    from qpseg.metrics.lesion import lesion_metrics
    from qpseg.metrics.pixel import confusion_matrix

    score.confusion = confusion if confusion is not None else confusion_matrix(
        truth_map, pred_map, len(cm), IGNORE_INDEX, pred_ignore=0)
    valid = truth_map != IGNORE_INDEX
    cands = _lesion_candidates(cm, opts)
    if cands and mpp is None:
        score.notes.append("lesion metrics skipped: pixel size unknown (pass --mpp)")
    elif mpp is not None:
        for idx in cands:
            score.lesions[_class_key(cm.classes[idx].name)] = lesion_metrics(
                truth_map == idx, pred_map == idx, mpp, slide=score.slide, valid=valid)
    if opts.thumbnails:
        score.thumbnail = _overlay_codes(truth_map, pred_map)


def _pixel_objects(objs: Sequence[QuPathObject], truth: bool) -> list[QuPathObject]:
    """The objects drawn as pixel labels: the classified annotations (the truth's ``Region*``
    and ``Ignore*`` annotations too); where there is no classified annotation, the classified
    detections and cells instead, each drawn as the geometry instance metrics score (a cell's
    nucleus when it has one), so a cells-only truth or prediction is pixel data as well."""
    import dataclasses

    ann = [o for o in objs if o.object_type in _PIXEL_OBJECT_TYPES]
    out = [o for o in ann if label_role(o.classification) == "class"]
    if not out:
        out = [o if o.nucleus_geometry is None
               else dataclasses.replace(o, geometry=o.nucleus_geometry, nucleus_geometry=None)
               for o in objs if o.object_type in _INSTANCE_OBJECT_TYPES
               and label_role(o.classification) == "class"]
    if truth:
        out += [o for o in ann if label_role(o.classification) in ("region", "ignore")]
    return out


def _pixel_pass(score: SlideScore, truth_pix: Sequence[QuPathObject],
                pred_pix: Sequence[QuPathObject], region: tuple[float, float, int, int],
                mpp: float, base: float, cm: ClassMap, opts: _Options, exhaustive: bool) -> None:
    """Score ``region`` at ``mpp``: in one raster when it is small enough, else the confusion
    tile by tile at ``mpp`` and lesions and overlay on a grid coarsened to fit in memory."""
    x0, y0, w, h = region
    ds = mpp / base
    score.size = (w, h)
    score.origin, score.downsample = (x0, y0), ds
    if w * h <= _FULL_RASTER_PIXELS:
        truth_map = _rasterize(truth_pix, region, mpp, cm, base, exhaustive)
        pred_map = _rasterize(pred_pix, region, mpp, cm, base)
        pred_map[pred_map == IGNORE_INDEX] = 0
        _score_pixels(score, truth_map, pred_map, cm, mpp, opts)
        return
    confusion = _tiled_confusion(truth_pix, pred_pix, region, mpp, cm, base, exhaustive)
    k = math.ceil(math.sqrt(w * h / _FULL_RASTER_PIXELS))
    coarse = (x0, y0, math.ceil(w / k), math.ceil(h / k))
    truth_map = _rasterize(truth_pix, coarse, mpp * k, cm, base, exhaustive)
    pred_map = _rasterize(pred_pix, coarse, mpp * k, cm, base)
    pred_map[pred_map == IGNORE_INDEX] = 0
    score.notes.append(f"pixel metrics computed in tiles at {mpp:g} µm/px ({w} x {h} pixels); "
                       f"lesions and the overlay at {mpp * k:g} µm/px")
    score.size, score.downsample = (coarse[2], coarse[3]), ds * k
    _score_pixels(score, truth_map, pred_map, cm, mpp * k, opts, confusion=confusion)


def _score_geometry_pair(t: InputItem, p: InputItem, opts: _Options, score: SlideScore,
                         truth_objs: list[QuPathObject], pred_objs: list[QuPathObject]) -> None:
    truth_pix = _pixel_objects(truth_objs, truth=True)
    pred_pix = _pixel_objects(pred_objs, truth=False)
    score.truth_classes = tuple(_class_names(truth_pix))
    score.has_region = any(label_role(o.classification) == "region" for o in truth_pix)
    has_instances = any(o.object_type in _INSTANCE_OBJECT_TYPES for o in truth_objs)
    score.pred_instances = any(o.object_type in _INSTANCE_OBJECT_TYPES for o in pred_objs)
    # Exhaustive truth: unlabelled pixels are Background over the whole image, unless Region*
    # annotations say where the truth is exhaustive. A truth of unclassified detections or
    # cells only is instance data: it has no pixel classes to compare a prediction with.
    exhaustive = opts.truth_mode == "exhaustive" and not score.has_region
    pixels = bool(score.truth_classes) or score.has_region or (
        exhaustive and not has_instances)
    if not pixels and has_instances:
        score.notes.append("pixel metrics skipped: the truth's detections/cells carry no class")
    score.pred_classes = tuple(_class_names(pred_pix)) if pixels else ()
    cm = _local_class_map([*score.truth_classes, *score.pred_classes], opts)
    score.class_names = tuple(cm.names)

    labelled = []
    for o in truth_pix:
        role = label_role(o.classification)
        if role == "region" or (role == "class" and cm.index_of(o.classification) is not None):
            labelled.append(o.geometry)
    pred_known = [o for o in pred_pix if cm.index_of(o.classification) is not None]
    if pixels and len(pred_known) < len(pred_pix):
        score.notes.append(f"{len(pred_pix) - len(pred_known)} predicted object(s) of classes "
                           "not evaluated were ignored")
    if pixels and (labelled or exhaustive):
        base = _base_mpp(t, p, opts, score)
        score.base_mpp = base
        score.eval_mpp = opts.eval_mpp
        ds = opts.eval_mpp / base
        size = t.size or p.size
        if exhaustive:
            region = _exhaustive_region([*labelled, *(o.geometry for o in pred_known)], ds,
                                        size)
            if size is None:
                score.notes.append("image size unknown: exhaustive truth scored over the "
                                   "bounding box of the truth's and the prediction's objects")
        else:
            region = _eval_region(labelled, [o.geometry for o in pred_known], ds, size)
        if region is not None:
            _pixel_pass(score, truth_pix, pred_known, region, opts.eval_mpp, base, cm, opts,
                        exhaustive)
        elif exhaustive:  # nothing drawn anywhere and no image size: an empty negative slide
            import numpy as np

            score.confusion = np.zeros((len(cm), len(cm)), dtype=np.int64)

    if opts.instances is not False:
        truth_inst = _instance_geometries(truth_objs)
        if truth_inst:
            from qpseg.metrics.instance import instance_metrics

            pred_inst = _instance_geometries(pred_objs)
            truth_inst = _region_filter(truth_objs, truth_inst)
            pred_inst = _region_filter(truth_objs, pred_inst)
            score.instance = instance_metrics(
                None, None, slide=score.slide, overlap=_geometric_overlap(truth_inst, pred_inst))


def _mask_grid(t: InputItem, p: InputItem, shape: tuple[int, int], opts: _Options,
               base: float | None) -> tuple[float, float | None]:
    """(level-0 px per mask px, mask µm/px or None) for a mask of ``shape`` (rows, cols)."""
    if opts.mask_mpp is not None:
        if base is not None:
            return opts.mask_mpp / base, opts.mask_mpp
        return 1.0, opts.mask_mpp
    size = t.size or p.size
    if size is not None:
        dsx, dsy = size[0] / shape[1], size[1] / shape[0]
        if abs(dsx - dsy) > 0.02 * max(dsx, dsy) + 1.0 / min(shape):
            raise LabelError(f"mask of {shape[1]} x {shape[0]} pixels does not have the "
                             f"slide's aspect ratio ({size[0]} x {size[1]}); pass --mask-mpp")
        ds = (dsx + dsy) / 2
        return ds, None if base is None else base * ds
    return 1.0, base


def _score_mask_pair(t: InputItem, p: InputItem, t_kind: str, p_kind: str, opts: _Options,
                     score: SlideScore, truth_objs: list[QuPathObject] | None,
                     pred_objs: list[QuPathObject] | None) -> None:
    """At least one side is a label mask: everything happens on the mask's grid."""
    import numpy as np

    t_cls = read_label_mask(t.path) if t_kind == "masks" and t.path else None
    t_ins = read_label_mask(t.instance_path) if t_kind == "masks" and t.instance_path else None
    p_cls = read_label_mask(p.path) if p_kind == "masks" and p.path else None
    p_ins = read_label_mask(p.instance_path) if p_kind == "masks" and p.instance_path else None
    shapes = {a.shape for a in (t_cls, t_ins, p_cls, p_ins) if a is not None}
    if len(shapes) > 1:
        raise LabelError("truth and prediction masks differ in size: "
                         + ", ".join(f"{s[1]} x {s[0]}" for s in sorted(shapes)))
    shape = next(iter(shapes))
    geometry = truth_objs is not None or pred_objs is not None
    base = None
    if geometry or opts.mpp is not None:
        try:
            base = _base_mpp(t, p, opts, score)
        except QpsegError:
            base = None
    ds, mask_mpp = _mask_grid(t, p, shape, opts, base)
    score.base_mpp, score.eval_mpp = base, mask_mpp
    score.size = (shape[1], shape[0])
    score.downsample = ds
    region = (0.0, 0.0, shape[1], shape[0])

    if opts.classes is not None:
        cm = ClassMap.from_names(opts.classes)
    else:  # masks on both sides, no names: classes are numbered
        top = max(int(a[a != IGNORE_INDEX].max(initial=0)) for a in (t_cls, p_cls)
                  if a is not None) if (t_cls is not None or p_cls is not None) else 0
        if top >= IGNORE_INDEX:
            raise LabelError(f"class mask value {top} is not a class index (0..254)")
        cm = ClassMap.from_names([f"class {i}" for i in range(1, top + 1)])
    score.class_names = tuple(cm.names)

    truth_map = pred_map = None
    if t_cls is not None:
        truth_map = t_cls
        present = np.unique(t_cls)
        score.truth_classes = tuple(cm.names[v] for v in present if 0 < v < len(cm))
    elif truth_objs is not None:
        ann = _pixel_objects(truth_objs, truth=True)
        score.truth_classes = tuple(_class_names(ann))
        score.has_region = any(label_role(o.classification) == "region" for o in ann)
        exhaustive = opts.truth_mode == "exhaustive" and not score.has_region
        has_instances = any(o.object_type in _INSTANCE_OBJECT_TYPES for o in truth_objs)
        if score.truth_classes or score.has_region or (exhaustive and not has_instances):
            truth_map = _rasterize(ann, region, ds, cm, 1.0, exhaustive)
    if p_cls is not None:
        pred_map = p_cls
        present = np.unique(p_cls)
        score.pred_classes = tuple(cm.names[v] for v in present if 0 < v < len(cm))
    elif pred_objs is not None:
        pix = _pixel_objects(pred_objs, truth=False)
        score.pred_instances = any(o.object_type in _INSTANCE_OBJECT_TYPES for o in pred_objs)
        score.pred_classes = tuple(_class_names(pix))
        pred_map = _rasterize([o for o in pix if cm.index_of(o.classification) is not None],
                              region, ds, cm, 1.0)
        pred_map[pred_map == IGNORE_INDEX] = 0
    if truth_map is not None and (truth_map != IGNORE_INDEX).any():
        if pred_map is None:
            pred_map = np.zeros(shape, dtype=np.uint8)
        _score_pixels(score, truth_map, pred_map, cm, mask_mpp, opts)

    if opts.instances is not False:
        from qpseg.metrics.instance import instance_metrics

        truth_inst = t_ins
        if truth_inst is None and truth_objs is not None:
            geoms = _instance_geometries(truth_objs)
            truth_inst = _paint_instances(geoms, shape, ds) if geoms else None
        if truth_inst is not None:
            pred_inst = p_ins
            if pred_inst is None and pred_objs is not None:
                pred_inst = _paint_instances(_instance_geometries(pred_objs), shape, ds)
            if pred_inst is None:
                pred_inst = np.zeros(shape, dtype=np.int32)
            score.instance = instance_metrics(truth_inst, pred_inst, slide=score.slide)


def _score_pair(t: InputItem, p: InputItem, t_kind: str, p_kind: str,
                opts: _Options) -> SlideScore:
    score = SlideScore(
        slide=display_name(t, p), entry_id=t.entry_id if t.entry_id is not None else p.entry_id,
        truth_file=t.files, pred_file=p.files, base_mpp=None, eval_mpp=None, size=None,
        class_names=(), confusion=None,
    )
    truth_objs = _read_objects(t.path) if t_kind != "masks" and t.path else None
    pred_objs = _read_objects(p.path) if p_kind != "masks" and p.path else None
    if truth_objs is not None:
        truth_objs = _truth_rule(t, p, opts, score, truth_objs, pred_objs)
    if t_kind == "masks" or p_kind == "masks":
        _score_mask_pair(t, p, t_kind, p_kind, opts, score, truth_objs, pred_objs)
    else:
        _score_geometry_pair(t, p, opts, score, truth_objs or [], pred_objs or [])
    if opts.thumbnails:
        overlay = p.overlay
        score.overlay = str(overlay) if overlay is not None else None
        image = t.image_path or p.image_path
        if score.thumbnail is not None and image is not None:
            _read_tissue(score, image)
    return score


def display_name(t: InputItem, p: InputItem) -> str:
    """The name a matched slide is shown by: its image name where either side knows it (a
    project entry, a prediction folder's ``run_metadata.json``), else the truth file's name."""
    return t.image_name or p.image_name or t.name


def _read_tissue(score: SlideScore, image: Path) -> None:
    """The slide's pixels under the error map of ``score`` (its scored region), at the size
    report.html shows (the longer side at least ``_MAP_SIDE``); a note when unreadable."""
    import numpy as np

    from qpseg.slide import open_slide

    assert score.thumbnail is not None
    th, tw = score.thumbnail.shape[:2]
    if score.size is None or score.downsample is None or score.base_mpp is None:
        return
    factor = max(1, math.ceil(_MAP_SIDE / max(th, tw)))
    # one thumbnail cell covers `step` raster pixels of `downsample` level-0 pixels each
    step = max(1, math.ceil(max(score.size) / _THUMB_SIDE))
    mpp = score.base_mpp * score.downsample * step / factor
    try:
        with open_slide(image, mpp=score.base_mpp) as slide:
            rgb = slide.read_region_mpp(score.origin[0], score.origin[1], tw * factor,
                                        th * factor, mpp)
    except (SlideError, ValueError, MemoryError) as exc:
        text = exc.one_line() if isinstance(exc, SlideError) else f"{type(exc).__name__}: {exc}"
        score.notes.append(f"the error map is drawn without the tissue ({text})")
        return
    score.tissue = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)


def _truth_rule(t: InputItem, p: InputItem, opts: _Options, score: SlideScore,
                truth_objs: list[QuPathObject],
                pred_objs: list[QuPathObject] | None) -> list[QuPathObject]:
    """The truth objects by the rule of :mod:`qpseg.review`; counts go to ``score.review``.

    The originals of the truth's AI objects: the predictions saved in the truth's project
    (``qpseg/predictions``), and the prediction file matched to the slide (for a folder of
    truth files, the only place they can be).
    """
    from qpseg.review import AiObjectWarning, is_ai_object, select_truth

    if not any(is_ai_object(o) for o in truth_objs):
        return truth_objs
    originals: list[QuPathObject] = []
    sources: list[str] = []
    same = (t.originals is not None and p.path is not None
            and t.originals.resolve() == p.path.resolve())
    if t.originals is not None and not same:
        from qpseg.errors import GeoJSONError

        try:
            originals += _read_objects(t.originals)
            sources.append(str(t.originals))
        except GeoJSONError as exc:
            warnings.warn(f"{exc.one_line()} (the saved predictions: AI objects of the truth "
                          "cannot be compared with them)", AiObjectWarning, stacklevel=2)
    if pred_objs is not None and p.path is not None:
        originals += pred_objs
        sources.append(str(p.path))
    sel = select_truth(truth_objs, originals if sources else None, policy=opts.ai_objects,
                       originals_source=" or ".join(sources))
    score.review = sel.counts
    note = sel.unproven_note()
    if note is not None:
        score.notes.append(note)
        warnings.warn(f"{t.name}: {note}", AiObjectWarning, stacklevel=2)
    return sel.objects


_Job = tuple[InputItem, InputItem, str, str, _Options]
# (SlideScore, or the one-line reason the slide failed; warnings said while scoring it)
_Outcome = tuple["SlideScore | str", list[tuple[type[Warning], str]]]


def _score_job(job: _Job) -> SlideScore | str:
    """:func:`_score_pair`, with an input problem turned into the failed slide's reason."""
    import shapely

    try:
        return _score_pair(*job)
    except QpsegError as exc:
        return exc.one_line()
    except (ValueError, TypeError, shapely.errors.GEOSException, MemoryError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _score_job_recorded(job: _Job) -> _Outcome:
    """:func:`_score_job` in a worker process: its warnings go back to the parent."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = _score_job(job)
    return outcome, [(w.category, str(w.message)) for w in caught]


_MIN_JOBS_FOR_POOL = 4


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm or container limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _score_all(jobs: Sequence[_Job], workers: int) -> Iterator[_Outcome]:
    """Each job's outcome, in order: in this process, or spread over worker processes.

    Slides are independent and the work per slide is CPU-bound Python and GEOS (reading
    GeoJSON, polygon intersections), so processes, not threads, scale it. Workers are
    spawned (not forked): the parent may hold torch or other threaded state.
    """
    if workers == 0:  # auto: starting a worker costs about a second, a small slide less
        workers = usable_cpus() if len(jobs) >= _MIN_JOBS_FOR_POOL else 1
    n = min(len(jobs), workers)
    if n <= 1:
        for job in jobs:
            yield _score_job(job), []
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=n,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_score_job_recorded, jobs)


# ============================================================================== model


_PROVENANCE_KEYS = ("qpseg_model", "qpseg_model_sha256", "qpseg_run", "qpseg_architecture")
_PROVENANCE_TEXT = re.compile(
    rb'"(qpseg_model|qpseg_model_sha256|qpseg_run|qpseg_architecture)"\s*:\s*"([^"\\]{1,200})"')
_PROVENANCE_HEAD = 1 << 20   # provenance is in every object: the first MiB of a file has it


@dataclass
class ModelInfo:
    """What made the predictions: the provenance their objects record (model package name,
    weights SHA-256, run ids) and, when the package is found (``--model``, or the path the
    prediction folder's ``run_metadata.json`` records), its training split."""

    names: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()
    architecture: str | None = None
    package: str | None = None            # the package folder read, if any
    split: dict[str, tuple[str, ...]] = field(default_factory=dict)  # subset -> slide keys
    notes: list[str] = field(default_factory=list)

    def subset_of(self, slide: str) -> str | None:
        """``train`` / ``val`` / ``test`` when the package's split holds ``slide`` (its name
        with or without the image extension, case-insensitive), else None."""
        keys = set(_name_keys(slide))
        for subset in ("train", "val", "test"):
            if any(k in keys for s in self.split.get(subset, ()) for k in _name_keys(s)):
                return subset
        return None


def _file_provenance(path: Path) -> dict[str, set[str]]:
    import gzip

    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                head = fh.read(_PROVENANCE_HEAD)
        else:
            with open(path, "rb") as fh:
                head = fh.read(_PROVENANCE_HEAD)
    except (OSError, EOFError, gzip.BadGzipFile):
        return {}
    out: dict[str, set[str]] = {}
    for m in _PROVENANCE_TEXT.finditer(head):
        out.setdefault(m.group(1).decode(), set()).add(m.group(2).decode("utf-8", "replace"))
    return out


def model_info(preds: Sequence[InputItem], pred: EvalInput,
               model: str | os.PathLike[str] | None = None) -> ModelInfo | None:
    """The :class:`ModelInfo` of the matched prediction files; None when they record no
    provenance and no ``model`` is given. ``model``: a package folder (its ``config.json`` is
    read, not its weights: no torch); a folder that is not a package is a
    :class:`~qpseg.errors.ModelError`."""
    import json

    from qpseg.models.package import read_package_config

    found: dict[str, set[str]] = {}
    if pred.kind != "masks":
        for item in preds:
            if item.path is not None:
                for k, v in _file_provenance(item.path).items():
                    found.setdefault(k, set()).update(v)
    info = ModelInfo(names=tuple(sorted(found.get("qpseg_model", ()))),
                     sha256=tuple(sorted(found.get("qpseg_model_sha256", ()))),
                     runs=tuple(sorted(found.get("qpseg_run", ()))))
    archs = sorted(found.get("qpseg_architecture", ()))
    info.architecture = ", ".join(archs) or None
    package: Path | None = Path(model) if model is not None else None
    if package is None:
        folders = {i.path.parent for i in preds if i.path is not None}
        for folder in sorted(folders):
            try:
                meta = json.loads((folder / "run_metadata.json").read_text(encoding="utf-8"))
                recorded = meta["model"]["path"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(recorded, str) and (Path(recorded) / "config.json").is_file():
                package = Path(recorded)
                break
    if package is None:
        return info if found else None
    cfg = read_package_config(package)  # ModelError when it is no package
    info.package = str(package)
    info.architecture = info.architecture or cfg.architecture
    if not info.names:
        info.names = (package.name,)
    if cfg.weights_sha256 and info.sha256 and cfg.weights_sha256 not in info.sha256:
        info.notes.append(f"the package {package} holds other weights (SHA-256 "
                          f"{cfg.weights_sha256[:12]}…) than the predictions record "
                          f"({', '.join(s[:12] + '…' for s in info.sha256)}): its training "
                          "split may not be the one of the model scored")
    if not info.sha256 and cfg.weights_sha256:
        info.sha256 = (cfg.weights_sha256,)
    training = cfg.training if isinstance(cfg.training, dict) else {}
    for source in (training.get("split"), training.get("slides")):
        if isinstance(source, dict):
            for subset in ("train", "val", "test"):
                vals = source.get(subset)
                if isinstance(vals, list) and subset not in info.split:
                    info.split[subset] = tuple(str(v) for v in vals)
    if not info.split:
        info.notes.append(f"the package {package} records no training split")
    return info


# ============================================================================== results


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over slides (``NaN`` skipped).

    ``n_boot`` resamples of the defined values with replacement, drawn from
    ``numpy.random.default_rng(seed)`` (so the interval is reproducible); ``(NaN, NaN)`` with
    fewer than two defined values.
    """
    import numpy as np

    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    n = int(v.size)
    if n < 2 or n_boot < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 4_000_000 // n)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        means[start:start + k] = v[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _with_ci(rows: list[dict[str, Any]], values_of: Callable[[dict[str, Any]], list[float]],
             level: str, n_boot: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        lo, hi = bootstrap_ci(values_of(r), n_boot=n_boot, seed=seed)
        row = {"level": level, "class_index": r.get("class_index"),
               "class_name": r.get("class_name", ""), **r, "ci_low": lo, "ci_high": hi}
        out.append({k: row.get(k) for k in SUMMARY_COLUMNS})
    return out


@dataclass
class Evaluation:
    """The result of :func:`evaluate`: per-slide scores, accumulators and what was left out."""

    truth: str
    pred: str
    class_names: tuple[str, ...]
    eval_mpp: float
    slides: list[SlideScore]
    pixel: PixelAccumulator
    lesion_class: str | None
    lesion: LesionAccumulator | None
    instance: InstanceAccumulator | None
    unmatched: list[Unmatched]
    failed: list[Failed]
    notes: list[str] = field(default_factory=list)
    seed: int = 0
    n_bootstrap: int = 2000
    files: dict[str, Path] = field(default_factory=dict)
    ai_objects: str = "unreviewed-out"
    truth_mode: str = DEFAULT_TRUTH_MODE
    eval_mpp_source: str = "--eval-mpp"   # where eval_mpp came from
    unscored: list[SlideScore] = field(default_factory=list)  # matched, nothing to score
    model: ModelInfo | None = None  # what made the predictions (provenance, package)

    @property
    def _reviewed(self) -> list[SlideScore]:
        """Scored and unscored slides: the AI-object counts of both are reported."""
        return [*self.slides, *self.unscored]

    @property
    def review(self) -> ReviewCounts:
        """The truth rule's counts (AI objects in the truth left out / kept) over all slides."""
        from qpseg.review import ReviewCounts

        total = ReviewCounts(self.ai_objects)
        for s in self._reviewed:
            if s.review is not None:
                total.merge(s.review)
        return total

    @property
    def mpp_changes(self) -> list[tuple[SlideScore, float, float]]:
        """``(slide, old, new)`` for every slide whose known pixel size ``--mpp-override``
        replaced (the CLI prints them)."""
        return [(s, s.mpp_replaced, s.base_mpp) for s in self.slides
                if s.mpp_replaced is not None and s.base_mpp is not None]

    def ai_object_rows(self) -> list[dict[str, Any]]:
        """``ai_objects.csv``: per slide, object type and class, the AI objects of the truth
        by status and whether they were kept or left out (:mod:`qpseg.review`)."""
        return [{"slide": s.slide, "entry_id": s.entry_id, "policy": self.ai_objects, **r}
                for s in self._reviewed if s.review is not None for r in s.review.rows()]

    @property
    def pixel_slides(self) -> list[SlideScore]:
        """Slides with a labelled area (in the order of ``pixel.per_slide``)."""
        return [s for s in self.slides if s.confusion is not None]

    # -- rows of the CSV files
    def per_slide_rows(self) -> list[dict[str, Any]]:
        """``per_slide.csv``: one row per slide x class (:data:`PER_SLIDE_COLUMNS`)."""
        rows = []
        for s, m in zip(self.pixel_slides, self.pixel.per_slide, strict=True):
            for r in m.to_rows():
                r["entry_id"] = s.entry_id
                r["truth_mode"] = self.truth_mode
                rows.append({k: r.get(k) for k in PER_SLIDE_COLUMNS})
        return rows

    def slide_rows(self) -> list[dict[str, Any]]:
        """``slides.csv``: one row per scored slide (:data:`SLIDE_COLUMNS`)."""
        pix = {s.slide: m for s, m in zip(self.pixel_slides, self.pixel.per_slide, strict=True)}
        rows = []
        for s in self.slides:
            m = pix.get(s.slide)
            row: dict[str, Any] = {
                "slide": s.slide, "entry_id": s.entry_id, "truth_file": s.truth_file,
                "pred_file": s.pred_file, "base_mpp": s.base_mpp, "mpp_source": s.mpp_source,
                "mpp_replaced": s.mpp_replaced, "eval_mpp": s.eval_mpp,
                "width": s.size[0] if s.size else None, "height": s.size[1] if s.size else None,
                "n_truth_instances": s.instance.n_true if s.instance else None,
                "n_pred_instances": s.instance.n_pred if s.instance else None,
                "truth_mode": self.truth_mode, "notes": "; ".join(s.notes),
            }
            if m is not None:
                row.update({k: v for k, v in m.summary_row().items() if k != "slide"})
            rows.append({k: row.get(k) for k in SLIDE_COLUMNS})
        return rows

    def confusion_rows(self) -> list[dict[str, Any]]:
        """``confusion.csv``: per slide and ``pooled``, long format (truth rows)."""
        rows = []
        for m in self.pixel.per_slide:
            rows += m.confusion_rows()
        if self.pixel.per_slide:
            rows += self.pixel.pooled().confusion_rows()
        return [{**r, "truth_mode": self.truth_mode} for r in rows]

    def lesion_rows(self) -> list[dict[str, Any]]:
        """``lesions.csv``: one row per truth or predicted lesion; ``row0..col1`` in raster
        pixels, ``qupath_x0..qupath_y1`` the same box in level-0 (QuPath) pixels."""
        if self.lesion is None:
            return []
        where = {s.slide: s for s in self.pixel_slides}
        rows = []
        for r in self.lesion.per_slide:
            s = where.get(r.slide)
            for row in r.to_rows():
                row = {"lesion_class": self.lesion_class, **row}
                if s is not None and s.downsample is not None:
                    (ox, oy), ds = s.origin, s.downsample
                    row.update(qupath_x0=ox + row["col0"] * ds, qupath_y0=oy + row["row0"] * ds,
                               qupath_x1=ox + row["col1"] * ds, qupath_y1=oy + row["row1"] * ds)
                rows.append({**row, "truth_mode": self.truth_mode})
        return rows

    def lesion_slide_rows(self) -> list[dict[str, Any]]:
        """``lesion_slides.csv``: one row per slide plus ``pooled``."""
        if self.lesion is None:
            return []
        rows = [{"lesion_class": self.lesion_class, **r.summary_row()}
                for r in self.lesion.per_slide]
        if rows:
            rows.append({"lesion_class": self.lesion_class, **self.lesion.pooled_row()})
        return [{**r, "truth_mode": self.truth_mode} for r in rows]

    def instance_rows(self) -> list[dict[str, Any]]:
        """``instances.csv``: one row per slide plus ``pooled``."""
        if self.instance is None:
            return []
        rows = [r.summary_row() for r in self.instance.per_slide]
        if rows:
            rows.append(self.instance.pooled().summary_row())
        return [{**r, "truth_mode": self.truth_mode} for r in rows]

    def summary_rows(self) -> list[dict[str, Any]]:
        """``summary.csv`` (:data:`SUMMARY_COLUMNS`): per metric the mean, std, min and max over
        slides, the 95 % percentile bootstrap CI of the mean, and the value pooled over slides.
        ``level`` is ``pixel``, ``lesion`` or ``instance``."""
        nb, seed = self.n_bootstrap, self.seed
        rows: list[dict[str, Any]] = []
        per = self.pixel.per_slide
        if per:
            class_rows = [m.to_rows() for m in per]
            slide_rows = [m.summary_row() for m in per]

            def pixel_values(r: dict[str, Any]) -> list[float]:
                ci = r["class_index"]
                if ci is None:
                    return [float(s[r["metric"]]) for s in slide_rows]
                return [float(c[ci][r["metric"]]) for c in class_rows]

            rows += _with_ci(self.pixel.summary_rows(), pixel_values, "pixel", nb, seed)
        if self.lesion is not None and len(self.lesion):
            lrows = [r.summary_row() for r in self.lesion.per_slide]
            for r in lrows:
                r["category_agreement"] = float(r["category_agrees"])
            rows += _with_ci(self.lesion.summary_rows(),
                             lambda r: [float(x[r["metric"]]) for x in lrows], "lesion", nb,
                             seed)
        if self.instance is not None and len(self.instance):
            irows = [r.summary_row() for r in self.instance.per_slide]
            rows += _with_ci(self.instance.summary_rows(),
                             lambda r: [float(x[r["metric"]]) for x in irows], "instance", nb,
                             seed)
        for r in rows:
            r["truth_mode"] = self.truth_mode
        return rows

    def unmatched_rows(self) -> list[dict[str, Any]]:
        """``unmatched.csv``: side, slide, path, reason."""
        return [{"side": u.side, "slide": u.slide, "path": u.path, "reason": u.reason}
                for u in self.unmatched]

    def failed_rows(self) -> list[dict[str, Any]]:
        """``failed.csv``: slide, entry_id, truth_file, pred_file, reason."""
        return [{"slide": f.slide, "entry_id": f.entry_id, "truth_file": f.truth_file,
                 "pred_file": f.pred_file, "reason": f.reason} for f in self.failed]

    def summary(self) -> dict[str, Any]:
        """A small JSON-able overview (what the CLI prints)."""
        out: dict[str, Any] = {
            "truth": self.truth, "pred": self.pred, "classes": list(self.class_names),
            "eval_mpp": self.eval_mpp, "eval_mpp_source": self.eval_mpp_source,
            "truth_mode": self.truth_mode, "n_scored": len(self.slides),
            "n_failed": len(self.failed), "n_unmatched": len(self.unmatched),
            "lesion_class": self.lesion_class, "notes": list(self.notes),
            "files": {k: str(v) for k, v in self.files.items()},
            "ai_objects": self.review.to_json(),
        }
        if self.pixel.per_slide:
            pooled = self.pixel.pooled()
            out["pixel"] = {
                "pooled_miou": pooled.miou, "pooled_mf1": pooled.mf1,
                "slide_mean_mf1": _mean([m.mf1 for m in self.pixel.per_slide]),
                "dice": {n: float(v) for n, v in zip(self.class_names, pooled.f1, strict=True)},
            }
        if self.lesion is not None and len(self.lesion):
            row = self.lesion.pooled_row()
            out["lesion"] = {k: row[k] for k in ("n_truth", "n_detected", "sensitivity", "n_fp",
                                                 "category_agreement")}
        if self.instance is not None and len(self.instance):
            pooled_i = self.instance.pooled()
            out["instance"] = {"aji_pooled": pooled_i.aji,
                               "aji_image_mean": self.instance.image_mean("aji"),
                               "map": pooled_i.map, "pq": pooled_i.pq,
                               "f1_50": float(pooled_i.at(0.5)["f1"])}
        return out

    def write(self, out_dir: str | os.PathLike[str], *, report: bool = True) -> dict[str, Path]:
        """Write the CSVs (and ``report.html``) into ``out_dir`` atomically; returns the paths.

        Always written: ``per_slide.csv``, ``slides.csv``, ``summary.csv``, ``confusion.csv``,
        ``unmatched.csv``, ``failed.csv``; ``lesions.csv`` and ``lesion_slides.csv`` when a
        lesion class was scored; ``instances.csv`` when instance data was present.
        """
        out = Path(out_dir)
        files: dict[str, Path] = {}

        def put(name: str, rows: list[dict[str, Any]], cols: Sequence[str] | None) -> None:
            files[name] = write_csv(out / name, rows, cols)

        put("per_slide.csv", self.per_slide_rows(), PER_SLIDE_COLUMNS)
        put("slides.csv", self.slide_rows(), SLIDE_COLUMNS)
        put("summary.csv", self.summary_rows(), SUMMARY_COLUMNS)
        put("confusion.csv", self.confusion_rows(), CONFUSION_COLUMNS)
        if self.lesion is not None:
            put("lesions.csv", self.lesion_rows(), _LESION_COLUMNS)
            put("lesion_slides.csv", self.lesion_slide_rows(), None)
        if self.instance is not None:
            put("instances.csv", self.instance_rows(), None)
        put("unmatched.csv", self.unmatched_rows(), UNMATCHED_COLUMNS)
        put("failed.csv", self.failed_rows(), FAILED_COLUMNS)
        put("ai_objects.csv", self.ai_object_rows(), AI_OBJECT_COLUMNS)
        self.files = files
        if report:
            from qpseg.report import write_report

            files["report.html"] = write_report(self, out / "report.html")
        return files


AI_OBJECT_COLUMNS: tuple[str, ...] = (
    "slide", "entry_id", "policy", "object_type", "class_name", "unreviewed", "accepted",
    "edited", "unproven", "kept", "left_out",
)
_LESION_COLUMNS: tuple[str, ...] = (
    "lesion_class", "slide", "source", "label", "area_px", "area_um2", "diameter_um",
    "category", "hit", "n_overlaps", "overlaps", "row0", "col0", "row1", "col1", "qupath_x0",
    "qupath_y0", "qupath_x1", "qupath_y1", "truth_mode",
)


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None) -> Path:
    """Write ``rows`` as CSV atomically (``columns`` fixes the header even with no rows)."""
    import pandas as pd

    from qpseg._io import atomic_write

    df = pd.DataFrame(list(rows), columns=list(columns) if columns is not None else None)
    for col in df.columns:
        # integer columns with gaps (None) would print as floats ("3.0"): keep them integers
        vals = [r[col] for r in rows if r.get(col) is not None]
        if (vals and len(vals) < len(rows)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in vals)):
            df[col] = df[col].astype("Int64")
    with atomic_write(path, "w", backup=False) as fh:
        df.to_csv(fh, index=False, lineterminator="\n")
    return path


# ============================================================================== entry point


def _global_classes(scores: Sequence[SlideScore], truth: EvalInput,
                    opts: _Options) -> tuple[str, ...]:
    """The evaluated class list (Background first); LabelError when the classes disagree."""
    if opts.classes is not None:
        return tuple(ClassMap.from_names(opts.classes).names)
    if truth.kind == "masks":  # masks on both sides without --classes: numbered classes
        top = max((len(s.class_names) for s in scores), default=1)
        return tuple(ClassMap.from_names([f"class {i}" for i in range(1, top)]).names)
    found: dict[str, str] = {}
    for s in scores:
        for n in s.truth_classes:
            found.setdefault(_class_key(n), n)
    order = {_class_key(n): i for i, n in enumerate(truth.class_order)}
    names = sorted(found.values(), key=lambda n: (order.get(_class_key(n), len(order)),
                                                  n.lower()))
    extra: dict[str, list[str]] = {}
    for s in scores:
        for n in s.pred_classes:
            if _class_key(n) not in found and _class_key(n) != _class_key(BACKGROUND):
                extra.setdefault(n, []).append(s.slide)
    if extra:
        shown = ", ".join(f"{n!r} (e.g. slide {v[0]!r})" for n, v in list(extra.items())[:5])
        raise LabelError(
            f"classes disagree: the prediction uses {shown}, which the truth never uses "
            f"(truth classes: {', '.join(names) or 'none'}); pass --classes to choose the "
            "classes to evaluate")
    return tuple(ClassMap.from_names(names).names)


_PROVENANCE_MPP = re.compile(rb'"qpseg_(map_)?mpp"\s*:\s*"?([0-9][0-9.eE+-]*)')


def provenance_mpp(path: str | os.PathLike[str]) -> float | None:
    """The finest pixel size (µm/px) a prediction file's objects record as made at:
    ``qpseg_map_mpp`` (the class map the objects were traced from), else ``qpseg_mpp``, as
    :func:`qpseg.objects.provenance` writes them; None when the file records neither.

    The file's text is searched for the two keys instead of parsed, so a large prediction is
    not read twice.
    """
    import gzip

    p = Path(path)
    try:
        if p.name.lower().endswith(".gz"):
            with gzip.open(p, "rb") as fh:
                data = fh.read()
        else:
            data = p.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None  # the slide's own scoring reports the unreadable file
    found: dict[bool, set[float]] = {True: set(), False: set()}
    for m in _PROVENANCE_MPP.finditer(data):
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        if math.isfinite(value) and value > 0:
            found[m.group(1) is not None].add(value)
    values = found[True] or found[False]
    return min(values) if values else None


def _auto_eval_mpp(pairs: Sequence[tuple[InputItem, InputItem]],
                   pred: EvalInput) -> tuple[float, str]:
    """``(eval mpp, where it came from)`` when ``--eval-mpp`` is not given: the finest pixel
    size among the matched predictions' provenance, else :data:`DEFAULT_EVAL_MPP`."""
    from qpseg.slide import mpp_problem

    values = []
    if pred.kind != "masks":
        for _, p in pairs:
            if p.path is not None and (v := provenance_mpp(p.path)) is not None \
                    and mpp_problem(v) is None:
                values.append(v)
    if values:
        return min(values), "the predictions' provenance (finest)"
    return DEFAULT_EVAL_MPP, "default (the predictions record no pixel size)"


def _embed(score: SlideScore, names: Sequence[str]) -> np.ndarray:
    """The slide's confusion matrix in the global class order."""
    import numpy as np

    assert score.confusion is not None
    pos = {_class_key(n): i for i, n in enumerate(names)}
    k = len(names)
    out = np.zeros((k, k), dtype=np.int64)
    idx = [pos.get(_class_key(n), -1) for n in score.class_names]
    for i, gi in enumerate(idx):
        for j, gj in enumerate(idx):
            if gi >= 0 and gj >= 0:
                out[gi, gj] += score.confusion[i, j]
            elif gi >= 0 and score.confusion[i, j]:
                # a prediction class outside the evaluated classes: counted as Background
                out[gi, 0] += score.confusion[i, j]
    return out


def evaluate(
    truth: str | os.PathLike[str],
    pred: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    classes: Sequence[str] | None = None,
    mpp: float | None = None,
    eval_mpp: float | None = None,
    mask_mpp: float | None = None,
    lesion_class: str | None = None,
    instances: bool | None = None,
    report: bool = True,
    truth_mode: str = DEFAULT_TRUTH_MODE,
    seed: int = 0,
    n_bootstrap: int = 2000,
    workers: int = 1,
    ai_objects: str = "unreviewed-out",
    mpp_override: bool = False,
    model: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Evaluation:
    """Score predictions ``pred`` against ``truth`` slide by slide (see the module doc).

    ``classes``: class names to evaluate (default: the truth's). ``mpp``: level-0 µm/px of
    slides with no pixel size of their own or in the project (needed for GeoJSON folders);
    ``mpp_override`` makes it replace every known value (module doc; the replacements are in
    :attr:`Evaluation.mpp_changes`, and a warning says once when ``mpp`` differs from values it
    does not replace). ``eval_mpp``: pixel size of the evaluation raster (None: the finest pixel
    size the matched predictions record in their provenance, else :data:`DEFAULT_EVAL_MPP`;
    which one is in :attr:`Evaluation.eval_mpp_source`). ``truth_mode``: ``exhaustive``
    (unannotated pixels are Background, slides without annotations are all-negative) or
    ``partial`` (only the truth's labelled area is scored); see the module doc. ``mask_mpp``:
    pixel size of label masks. ``lesion_class``: class of the lesion metrics (default
    Tumor/Tumour/Metastasis when present; ``"none"`` or ``""`` turns them off). ``instances``:
    False skips instance metrics. ``seed`` and ``n_bootstrap`` set the bootstrap CIs.
    ``workers``: processes scoring slides in parallel (0: one per usable CPU from 4 slides on);
    the results do not depend on it. With ``out_dir`` the CSVs (and ``report.html`` unless
    ``report`` is False) are written there; it is checked to be writable before any slide is
    scored. ``ai_objects``: which AI objects of the truth count (:mod:`qpseg.review`:
    ``unreviewed-out``, ``all-out``, ``all-in``); the counts are in ``Evaluation.review`` and
    ``ai_objects.csv``. ``model``: the model package that made the predictions (default: the
    one their folder's ``run_metadata.json`` records): its training split marks the slides it
    was trained on (:attr:`Evaluation.model`). ``progress(done, total, slide)`` is called
    before the first slide and after each one.

    Raises :class:`ConfigError` when nothing matches or an option is invalid,
    :class:`LabelError` when the classes disagree, and a :class:`QpsegError` when no slide could
    be scored. Slides that fail are listed in ``Evaluation.failed``.
    """
    cls_list: tuple[str, ...] | None = None
    if classes is not None:
        cls_list = tuple(c.strip() for c in classes if c and c.strip())
        if not cls_list:
            raise ConfigError("--classes names no class")
        ClassMap.from_names(cls_list)  # raises LabelError for Ignore*/Region*/duplicates
    les: str | None = lesion_class
    if les is not None:
        les = les.strip()
        if les.lower() in ("none", "off", ""):
            les = ""
    from qpseg.review import check_policy

    if truth_mode not in TRUTH_MODES:
        raise ConfigError(f"--truth-mode must be one of {', '.join(TRUTH_MODES)}, not "
                          f"{truth_mode!r}")
    given_eval_mpp = _pixel_size_option(eval_mpp, "--eval-mpp")
    opts = _Options(
        ai_objects=check_policy(ai_objects), truth_mode=truth_mode,
        classes=cls_list, mpp=_pixel_size_option(mpp, "--mpp"),
        eval_mpp=given_eval_mpp or DEFAULT_EVAL_MPP,
        mask_mpp=_pixel_size_option(mask_mpp, "--mask-mpp"), lesion_class=les,
        instances=instances, thumbnails=report, mpp_override=bool(mpp_override),
    )
    if opts.mpp_override and opts.mpp is None:
        raise ConfigError("--mpp-override needs --mpp (the pixel size that replaces the "
                          "slides' own)")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ConfigError(f"--workers must be a whole number >= 0, not {workers!r}")
    if not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise ConfigError(f"number of bootstrap resamples must be >= 0, not {n_bootstrap}")
    if les and cls_list is not None and ClassMap.from_names(cls_list).index_of(les) is None:
        raise ConfigError(f"lesion class {les!r} is not among --classes ({', '.join(cls_list)})")

    t_in = load_input(truth, "truth")
    p_in = load_input(pred, "pred")
    if "masks" in (t_in.kind, p_in.kind) and t_in.kind != p_in.kind and cls_list is None:
        raise ConfigError("label masks hold class indices: pass --classes to name them "
                          "(index 1 = the first class)")
    if opts.mpp is None and t_in.kind == p_in.kind == "geojson":
        raise ConfigError("GeoJSON inputs need the pixel size: pass --mpp (µm per level-0 "
                          "pixel)")
    pairs, unmatched = match_inputs(t_in, p_in)
    if not pairs:
        t_keys = ", ".join([i.name for i in t_in.items if i.has_data][:3]) or "none"
        p_keys = ", ".join([i.name for i in p_in.items if i.has_data][:3]) or "none"
        raise ConfigError(f"nothing matches: no prediction matches a truth slide by entry id or "
                          f"image name (truth: {t_keys}; prediction: {p_keys})", t_in.path)
    if out_dir is not None:  # before the slides are scored (the long part)
        from qpseg._io import ensure_writable_dir

        ensure_writable_dir(out_dir)
    info = model_info([p for _, p in pairs], p_in, model)  # a bad --model fails here
    if given_eval_mpp is not None:
        eval_mpp_source = "--eval-mpp"
    else:
        opts.eval_mpp, eval_mpp_source = _auto_eval_mpp(pairs, p_in)

    scores: list[SlideScore] = []
    unscored: list[SlideScore] = []
    failed: list[Failed] = []
    jobs = [(t, p, t_in.kind, p_in.kind, opts) for t, p in pairs]
    done = 0
    if progress is not None:
        progress(0, len(jobs), "")
    for (t, p), (outcome, caught) in zip(pairs, _score_all(jobs, workers), strict=True):
        for category, message in caught:  # a worker's warnings, said here as if said here
            warnings.warn(message, category, stacklevel=2)
        done += 1
        if progress is not None:
            progress(done, len(jobs), display_name(t, p))
        if isinstance(outcome, str):
            failed.append(Failed(display_name(t, p), t.entry_id, t.files, p.files, outcome))
            continue
        score = outcome
        if score.confusion is None and score.instance is None:
            what = ("truth holds only AI objects left out by --ai-objects"
                    if score.review is not None and score.review.total("left_out")
                    else "truth has no labelled annotations or instances")
            unmatched.append(Unmatched("truth", display_name(t, p), t.files, what))
            unscored.append(score)  # its AI-object counts are still reported
            continue
        scores.append(score)
    if not scores:
        if failed:
            raise QpsegError(f"no slide could be scored ({len(failed)} failed); first: "
                             f"{failed[0].slide}: {failed[0].reason}")
        raise LabelError("no matched slide has labelled annotations or instances in the truth",
                         t_in.path)

    names = _global_classes(scores, t_in, opts)
    notes: list[str] = []
    pixel_scored = [s for s in scores if s.confusion is not None]
    if (opts.truth_mode == "partial" and len(names) == 2 and pixel_scored
            and t_in.kind != "masks" and not any(s.has_region for s in pixel_scored)):
        msg = (f"the truth looks exhaustive ({names[1]} only, no Region* annotations) but "
               "--truth-mode partial scores only inside its outlines: a model that paints "
               f"{names[1]} everywhere scores 1.0; use --truth-mode exhaustive unless the "
               "unannotated tissue was not checked")
        notes.append(msg)
        warnings.warn(msg, QpsegWarning, stacklevel=2)
    blind = [s.slide for s in scores if s.instance is not None and s.pred_instances is False]
    if blind:
        msg = (f"instance metrics of {len(blind)} slide(s) (e.g. {blind[0]}) score a "
               "prediction that holds no detections or cells: every truth instance counts "
               "as missed (AJI 0); predict them with `qpseg infer --as detections` or "
               "`--as cells`")
        notes.append(msg)
        warnings.warn(msg, QpsegWarning, stacklevel=2)
    unused = [s for s in scores if s.mpp_given_unused]
    if unused and opts.mpp is not None:
        shown = "; ".join(f"{s.slide} {s.base_mpp:g} µm/px from the {s.mpp_source}"
                          for s in unused[:3])
        msg = (f"--mpp {opts.mpp:g} is not used for {len(unused)} slide(s) with a pixel size of "
               f"their own ({shown}{'; ...' if len(unused) > 3 else ''}); pass --mpp-override "
               "to replace it")
        notes.append(msg)
        warnings.warn(msg, QpsegWarning, stacklevel=2)
    if opts.classes is not None:
        dropped = sorted({n for s in scores for n in s.pred_classes
                          if _class_key(n) not in {_class_key(c) for c in names}})
        if dropped:
            msg = (f"predicted classes not among --classes counted as Background: "
                   f"{', '.join(dropped)}")
            notes.append(msg)
            warnings.warn(msg, QpsegWarning, stacklevel=2)
        t_dropped = sorted({n for s in scores for n in s.truth_classes
                            if _class_key(n) not in {_class_key(c) for c in names}})
        if t_dropped:
            msg = f"truth classes not among --classes left unlabelled: {', '.join(t_dropped)}"
            notes.append(msg)
            warnings.warn(msg, QpsegWarning, stacklevel=2)

    from qpseg.metrics.instance import InstanceAccumulator
    from qpseg.metrics.lesion import LesionAccumulator, LesionMetrics
    from qpseg.metrics.pixel import PixelAccumulator

    pix_scores = [s for s in scores if s.confusion is not None]
    confusions = [_embed(s, names) for s in pix_scores]
    present = sorted({i for cm in confusions for i in range(len(names)) if cm[i].sum() > 0})
    pixel = PixelAccumulator(classes=names, mean_classes=present or None, pred_ignore=0)
    for s, cm in zip(pix_scores, confusions, strict=True):
        pixel.add_confusion(cm, slide=s.slide)

    chosen: str | None = None
    if opts.lesion_class:
        chosen = next((n for n in names if _class_key(n) == _class_key(opts.lesion_class)), None)
        if chosen is None:
            raise ConfigError(f"lesion class {opts.lesion_class!r} is not an evaluated class "
                              f"({', '.join(names)})")
    elif opts.lesion_class is None:
        wanted = {n.lower() for n in LESION_CLASS_NAMES}
        chosen = next((n for n in names if n.lower() in wanted), None)
    lesion = None
    if chosen is not None:
        lesion = LesionAccumulator()
        for s in pix_scores:
            res = s.lesions.get(_class_key(chosen))
            if res is None:
                if s.eval_mpp is None:
                    continue
                res = LesionMetrics(slide=s.slide, mpp=s.eval_mpp, truth=(), pred=())
            lesion.add(res)
        if not len(lesion):
            msg = f"lesion metrics ({chosen}) skipped: the pixel size is unknown"
            notes.append(msg)
            warnings.warn(msg, QpsegWarning, stacklevel=2)
            lesion, chosen = None, None

    instance = None
    inst_scores = [s for s in scores if s.instance is not None]
    if inst_scores:
        instance = InstanceAccumulator()
        instance.per_slide.extend(s.instance for s in inst_scores if s.instance is not None)
    elif instances:
        msg = "instance metrics requested but no truth holds detections, cells or instance masks"
        notes.append(msg)
        warnings.warn(msg, QpsegWarning, stacklevel=2)

    result = Evaluation(
        truth=str(t_in.path), pred=str(p_in.path), class_names=names, eval_mpp=opts.eval_mpp,
        slides=scores, pixel=pixel, lesion_class=chosen, lesion=lesion, instance=instance,
        unmatched=unmatched, failed=failed, notes=notes, seed=seed, n_bootstrap=n_bootstrap,
        ai_objects=opts.ai_objects, truth_mode=opts.truth_mode,
        eval_mpp_source=eval_mpp_source, unscored=unscored,
        model=info,
    )
    if out_dir is not None:
        result.write(out_dir, report=report)
    return result
