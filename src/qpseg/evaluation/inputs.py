"""The inputs of ``qpseg evaluate``: what a truth or prediction path holds, and which slides pair.

A path is a QuPath project, a folder of GeoJSON files, a folder of label masks, or one file
(:func:`load_input`); every slide of it becomes an :class:`InputItem` with the keys it can be
matched by, and :func:`match_inputs` pairs truth and prediction slides (the rules are in
:mod:`qpseg.evaluate`'s module doc). Also here: reading a label mask (:func:`read_label_mask`)
and the name a matched slide is shown by (:func:`display_name`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from qpseg.errors import ConfigError, LabelError, QpsegError, QpsegWarning

if TYPE_CHECKING:
    import numpy as np


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


def display_name(t: InputItem, p: InputItem) -> str:
    """The name a matched slide is shown by: its image name where either side knows it (a
    project entry, a prediction folder's ``run_metadata.json``), else the truth file's name."""
    return t.image_name or p.image_name or t.name
