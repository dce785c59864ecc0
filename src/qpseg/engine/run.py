"""Whole-slide inference runs: model package + slides -> QuPath objects, summaries, metadata.

One pipeline for every model, driven by its :class:`~qpseg.models.ModelContract`:

* ``pixel`` models (FCN-32s, U-Nets, ensembles, DMMN with its 20x/10x/5x inputs) and ``patch``
  classifiers: tissue detection, a :func:`~qpseg.engine.tiling.plan_tiles` grid at the model's
  mpp, batched forward passes, stitching (centre crop or Hann blending) into on-disk class and
  probability maps at the model's output resolution, then :func:`qpseg.objects.polygonise`.
* two-stage models (H2G-Net, ``contract.stages``): the stage-0 patch classifier runs over the
  tissue grid; its class-``heatmap_class`` probabilities form the heatmap; the slide read at
  low resolution (longer side = the refinement input) and the heatmap, both resized to the
  refinement input (bilinear, pedersen2022 §2.5), go through the refinement U-Net; its output,
  resized back to the slide's aspect ratio, is the class map.
* ``instance`` models (Mask R-CNN, Otsu/watershed): tiles with a margin, objects kept by the
  tile owning their centroid, painted into an instance map, then
  :func:`qpseg.objects.polygonise_instances` (cells with nucleus geometry).

Files per slide (``key`` = QuPath entry ID, or the slide's file stem outside a project), all in
the output folder: ``<key>.geojson`` and ``<key>.metadata.json`` (the import script's inputs),
optionally ``<key>.heatmap.ome.tif`` and ``<key>.overlay.png``; per run ``summary.csv`` and
``run_metadata.json`` (with ``--shard i/n``: ``summary.shard-i-of-n.csv`` and
``run_metadata.shard-i-of-n.json``).

Finished, skipped, resumed. Each slide has a state file ``.qpseg_state/<key>.json`` that says
``running`` from the moment its outputs start to change and ``done`` (with the outputs'
SHA-256, the model package's SHA-256 and the options that shape the outputs,
:func:`output_params`) once the GeoJSON, written last and atomically, is in place: the
done-marker. A slide is finished when its GeoJSON exists and its state is not ``running`` (a
GeoJSON from elsewhere, without state, counts as finished too). A finished slide is skipped
only when it was made by the same package and the same output options; otherwise (or with
``overwrite``) it is redone, the summary says why (``model changed``, ``parameters changed:
tile_px 512 -> 1024``) and the old outputs are kept as numbered backups
(:mod:`qpseg._io`). A run killed mid-slide leaves that slide ``running``, so the next run
redoes exactly it. Every file is written to a temporary name and renamed, never through a
symbolic link.

Concurrent runs. A slide is processed under an exclusive lock on
``.qpseg_state/<key>.lock`` (:class:`qpseg._io.FileLock`, released by the kernel when the
process ends however it ends, so a dead run never blocks a slide): a second run over the same
output folder skips a slide another run is processing ("being processed by another run"), and
run IDs (UTC time, process ID and a random suffix) never coincide.

Output folder. It is created and proven writable before any work starts
(:func:`check_output_dir`), and it may not lie inside a QuPath project's annotation export
folder ``qpseg/annotations``, where the pathologist's annotations live. Size options are
bounded by the memory a batch of tiles needs (ConfigError before any slide is read).

Several processes (torchrun): see :mod:`qpseg.engine.distributed`. A slide bigger than a fair
share is run by every rank, each stitching its band of map rows into shared map files
(:meth:`~qpseg.engine.tiling.TilePlan.row_bands`); rank 0 writes its outputs.

Pixel size. Each slide's pixel size follows the one rule of every command
(:func:`qpseg.slide.choose_pixel_size`): the slide's own, else the QuPath entry's calibration
(projects), else ``--mpp``; ``--mpp`` replaces a known value only with ``--mpp-override``. The
value used, where it came from and what it replaced are in the summary and run_metadata.json
(:class:`SlideResult` ``mpp``, ``mpp_source``, ``mpp_replaced``), and the value used is one of
the output options (:func:`output_params`), so a slide finished at another pixel size is redone.

Failures. A slide that cannot be opened or read, has no pixel size (and none was given), or
cannot be read at the model's pixel size fails with a one-line reason in the summary; the run
goes on with the other slides and :attr:`RunResult.failed` says which failed.

The library never prints: pass ``progress`` (a callable taking a :class:`ProgressEvent`) to
follow a run. An exception raised by ``progress`` aborts the run (the current slide stays
unfinished), which is how tests interrupt a run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import re
import secrets
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.devices import resolve_device
from qpseg.engine.tiling import InferenceWarning
from qpseg.errors import ConfigError, ModelError, OutputError, QpsegError, os_error_reason

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qpseg._io import FileLock
    from qpseg.engine.distributed import DistContext
    from qpseg.engine.loader import Opener
    from qpseg.engine.stitch import MapSet
    from qpseg.engine.tiling import TilePlan
    from qpseg.labels import ClassMap
    from qpseg.models.contract import InferenceRules, ModelContract
    from qpseg.models.package import ModelPackage
    from qpseg.objects import MapGeometry
    from qpseg.qupath.geojson import QuPathObject
    from qpseg.slide import PixelSize, Slide
    from qpseg.tissue import TissueMask

__all__ = [
    "SLIDE_SUFFIXES",
    "InferenceParams",
    "InferenceWarning",
    "ProgressEvent",
    "RunResult",
    "SlideJob",
    "SlideResult",
    "check_output_dir",
    "jobs_from_paths",
    "jobs_from_project",
    "run_inference",
]

#: File suffixes ``jobs_from_paths`` takes from a folder (single files of any type are tried).
SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".dcm", ".png", ".jpg", ".jpeg", ".bmp")
TISSUE_CHOICES: tuple[str, ...] = ("auto", "otsu", "otsu_od", "hsv", "none")
STATE_DIR = ".qpseg_state"
WORK_DIR = ".qpseg_work"
_LESION_RE = re.compile(r"^(tumou?r|metasta|carcinoma|cancer|malignan)", re.IGNORECASE)
_ID_NAMESPACE = uuid.UUID("5b0b3c6e-4f0e-4c55-9a52-2d1f6a4c9e11")  # qpseg object IDs
# A stage-0 heatmap is read whole for the refinement stage; refuse absurd grids.
_MAX_HEATMAP_PIXELS = 1 << 26
# Memory of one tile-reading worker process (Python + torch + a slide handle) before it reads.
_WORKER_BYTES = 256 << 20


class _Abort(Exception):
    """Carries an exception raised by the progress callback through the per-slide handler."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


# ==================================================================================== inputs

@dataclass(frozen=True)
class SlideJob:
    """One slide to run: ``key`` names its outputs (``<out>/<key>.geojson``).

    ``error`` marks a job that fails before running (e.g. the project's image was not found);
    ``mpp`` is the QuPath entry's calibration (µm/px), used when the slide itself has none.
    """

    key: str
    slide: Path | None
    name: str
    output: Path
    entry_id: int | None = None
    error: str | None = None
    mpp: float | None = None


@dataclass(frozen=True)
class InferenceParams:
    """Options of a run (the ``qpseg infer`` flags). ``None`` means "the model's / machine's
    default": ``workers`` 0 on CPU (a reader thread), up to 8 processes on CUDA; ``tissue``
    (``auto`` too), ``min_tissue`` and ``as_type`` the package's inference rules
    (:class:`~qpseg.models.contract.InferenceRules`; packages without them: the rules of
    their output type, :func:`~qpseg.models.contract.default_inference_rules`); ``precision``
    bf16 on CUDA, fp32
    elsewhere; ``lesion_classes`` the package's ``training.lesion_classes`` or the classes
    named like tumour/metastasis; ``heatmap_class`` the first lesion class or class 1."""

    device: str = "auto"
    batch_size: int = 8
    workers: int | None = None
    tissue: str | None = None
    min_tissue: float | None = None
    stitch: str = "center"
    min_area_um2: float | None = None   # None: qpseg.objects.REVIEW_DEFAULTS per output type
    fill_holes_um2: float | None = None
    simplify_um: float | None = None
    as_type: str | None = None
    lesion_classes: tuple[str, ...] | None = None
    heatmap: bool = False
    heatmap_class: str | None = None
    overlay: bool = False
    overwrite: bool = False
    keep_maps: bool = False
    mpp: float | None = None
    mpp_override: bool = False  # --mpp replaces a slide's (or project's) known pixel size
    precision: str | None = None
    channels_last: bool | None = None
    compile: bool = False
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    instance_margin: int = 16
    cell_expansion_um: float = 0.0
    max_upsample: float = 1.25
    tile_px: int | None = None
    run_id: str | None = None
    shard: str | None = None

    def validate(self) -> InferenceParams:
        """ConfigError for out-of-range values; returns self."""
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, not {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, not {self.workers}")
        if self.tissue is not None and self.tissue not in TISSUE_CHOICES:
            raise ConfigError(f"--tissue must be one of {', '.join(TISSUE_CHOICES)}, not "
                              f"{self.tissue!r}")
        if self.stitch not in ("center", "blend"):
            raise ConfigError(f"--stitch must be 'center' or 'blend', not {self.stitch!r}")
        kind = None if self.as_type is None else self.as_type.strip().lower().rstrip("s")
        if kind not in (None, "annotation", "detection"):
            raise ConfigError(f"--as must be 'annotations' or 'detections', not "
                              f"{self.as_type!r}")
        if self.min_tissue is not None and not (math.isfinite(self.min_tissue)
                                                and 0 <= self.min_tissue < 1):
            raise ConfigError(f"--min-tissue must be a fraction in [0, 1), not "
                              f"{self.min_tissue!r}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, not {self.precision!r}")
        for name in ("min_area_um2", "fill_holes_um2", "cell_expansion_um", "min_tissue"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, not {v!r}")
        if self.simplify_um is not None and not (math.isfinite(self.simplify_um)
                                                 and self.simplify_um >= 0):
            raise ConfigError(f"--simplify-um must be >= 0, not {self.simplify_um!r}")
        if self.mpp is not None:  # the one pixel-size plausibility rule (qpseg.slide)
            from qpseg.slide import check_mpp

            check_mpp(self.mpp, "--mpp", error=ConfigError)
        if self.mpp_override and self.mpp is None:
            raise ConfigError("--mpp-override needs --mpp (the pixel size that replaces the "
                              "slides' own)")
        if not 0 <= self.score_threshold <= 1 or not 0 <= self.mask_threshold <= 1:
            raise ConfigError("score and mask thresholds must be between 0 and 1")
        if not self.max_upsample >= 1:
            raise ConfigError("max_upsample must be >= 1")
        return replace(self, as_type=kind, tissue=None if self.tissue == "auto" else self.tissue)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready copy (for run_metadata.json)."""
        data = asdict(self)
        data["lesion_classes"] = None if self.lesion_classes is None else list(
            self.lesion_classes)
        return data


@dataclass(frozen=True)
class ProgressEvent:
    """A step of a run, for progress displays.

    ``kind``: ``run_start``, ``slide_start``, ``tiles`` (after each batch), ``polygonise``
    (the slide's map turned into objects: ``blocks_done`` of ``blocks_total`` map blocks and
    ``objects`` found so far, as :data:`qpseg.objects.PolygoniseProgress` reports them; only
    ``key`` and ``name`` of the slide fields are set), ``slide_end`` (with ``status``
    done/skipped/failed and ``message``) and ``run_end``. ``index`` and ``total`` count this
    process's slides.
    """

    kind: str
    index: int = 0
    total: int = 0
    key: str = ""
    name: str = ""
    tiles_done: int = 0
    tiles_total: int = 0
    status: str = ""
    message: str = ""
    blocks_done: int = 0
    blocks_total: int = 0
    objects: int = 0


ProgressFn = Callable[[ProgressEvent], None]


@dataclass
class SlideResult:
    """What happened to one slide.

    ``mpp`` is the slide's pixel size used (µm/px), ``mpp_source`` where it came from
    (``slide``, ``project``, ``option`` or ``override``; :class:`qpseg.slide.PixelSize`) and
    ``mpp_replaced`` the known value ``--mpp-override`` replaced. For a slide skipped as
    finished, ``mpp`` is the value its outputs were made with, when recorded.
    """

    key: str
    name: str
    slide: str
    output: str
    status: str
    reason: str = ""
    entry_id: int | None = None
    seconds: float = 0.0
    tiles: int = 0
    tiles_low_tissue: int = 0  # tiles with some tissue, not more than the least fraction
    tissue_fraction: float | None = None
    tissue_mpx: float = 0.0
    n_objects: int = 0
    map_mpp: float | None = None
    mpp: float | None = None
    mpp_source: str = ""
    mpp_replaced: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    maps: str | None = None
    rank: int = 0
    ranks: int = 1  # processes that ran its tiles (> 1: a slide shared by torchrun ranks)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (run_metadata.json)."""
        return asdict(self)

    def row(self) -> dict[str, Any]:
        """One summary-CSV row: identity, status, and the per-slide summary measurements."""
        row: dict[str, Any] = {
            "key": self.key, "entry_id": "" if self.entry_id is None else self.entry_id,
            "image": self.name, "slide": self.slide, "status": self.status,
            "reason": self.reason, "seconds": round(self.seconds, 3), "tiles": self.tiles,
            "tiles_low_tissue": self.tiles_low_tissue,
            "tissue_fraction": "" if self.tissue_fraction is None else
            round(self.tissue_fraction, 6),
            "n_objects": self.n_objects,
            "mpp": "" if self.mpp is None else self.mpp, "mpp_source": self.mpp_source,
            "mpp_replaced": "" if self.mpp_replaced is None else self.mpp_replaced,
        }
        for k, v in self.summary.items():
            if k.startswith(("qpseg_count_", "qpseg_area_um2_")) or k in (
                    "qpseg_n_lesions", "qpseg_lesion_area_um2", "qpseg_largest_lesion_um",
                    "qpseg_slide_category"):
                row[k[len("qpseg_"):]] = v
        return row


@dataclass
class RunResult:
    """The slides of a run (all of them on rank 0; this rank's elsewhere) and its files."""

    results: list[SlideResult]
    out_dir: Path
    summary_csv: Path | None = None
    run_metadata: Path | None = None

    @property
    def failed(self) -> list[SlideResult]:
        """Slides that failed."""
        return [r for r in self.results if r.status == "failed"]

    def counts(self) -> dict[str, int]:
        """Number of slides per status."""
        out = {"done": 0, "skipped": 0, "failed": 0}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out


# ================================================================================ job lists

def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def jobs_from_paths(paths: Sequence[str | os.PathLike[str]],
                    out_dir: str | os.PathLike[str]) -> list[SlideJob]:
    """Jobs for slide files and folders of slides (not recursive), output ``<out>/<stem>``.

    Raises ConfigError for a missing path, an empty folder, or two slides with the same stem.
    """
    out = Path(out_dir)
    files: list[Path] = []
    for p in (Path(os.fsdecode(x)) for x in paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file()
                           and f.suffix.lower() in SLIDE_SUFFIXES and not f.name.startswith("."))
            if not found:
                raise ConfigError(f"no slides ({', '.join(SLIDE_SUFFIXES)}) in folder", p)
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise ConfigError("no such slide or folder", p)
    seen: dict[str, Path] = {}
    jobs = []
    for f in files:
        key = _stem(f)
        if key in seen:
            raise ConfigError(f"two slides would write {key}.geojson ({seen[key].name} and "
                              f"{f.name}); run them into different --out folders", f)
        seen[key] = f
        jobs.append(SlideJob(key=key, slide=f, name=f.name, output=out / f"{key}.geojson"))
    return jobs


def is_project_path(path: str | os.PathLike[str]) -> bool:
    """True for a ``.qpproj`` file (or backup) or a folder holding ``project.qpproj``."""
    p = Path(path)
    if p.is_dir():
        return (p / "project.qpproj").is_file()
    return p.name.endswith((".qpproj", ".qpproj.backup"))


def project_output_dir(project: str | os.PathLike[str]) -> Path:
    """``<project folder>/qpseg/predictions``."""
    p = Path(project)
    folder = p if p.is_dir() else p.parent
    return folder / "qpseg" / "predictions"


def check_output_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create the output folder and prove it writable (:func:`qpseg._io.ensure_writable_dir`);
    returns it.

    OutputError when it is not a folder, cannot be written, or lies inside a project's
    annotation export folder ``<project>/qpseg/annotations`` (groovy/export_annotations.groovy,
    line 38: ``buildFilePath(PROJECT_BASE_DIR, 'qpseg', 'annotations')``): predictions are
    named ``<entryID>.geojson`` like the exported annotations and would replace them. The
    check follows links, so a link to that folder is refused too.
    """
    from qpseg._io import ensure_writable_dir

    out = Path(out_dir)
    resolved = out.resolve()
    for folder in (resolved, *resolved.parents):
        if folder.name.casefold() == "annotations" and \
                folder.parent.name.casefold() == "qpseg":
            raise OutputError(
                f"is inside {folder}, a QuPath project's annotation export folder (the "
                "pathologist's annotations, <entryID>.geojson); predictions never go there - "
                "leave out --out (<project>/qpseg/predictions) or choose another folder", out)
    return ensure_writable_dir(out)


def jobs_from_project(project: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None
                      = None, entries: Sequence[str] | None = None) -> tuple[list[SlideJob],
                                                                            Path]:
    """Jobs for a QuPath project's entries (``entries``: IDs or image names; default all).

    Output: ``<out>/<entryID>.geojson`` with ``out`` defaulting to
    ``<project>/qpseg/predictions``. Entries whose image is missing become failing jobs.
    Returns ``(jobs, out_dir)``.
    """
    from qpseg.qupath.project import QuPathProject

    proj = QuPathProject.load(project)
    out = Path(out_dir) if out_dir is not None else project_output_dir(proj.path)
    selected = list(proj.entries)
    if entries:
        wanted = [e.strip() for e in entries if e.strip()]
        by_id = {str(e.entry_id): e for e in proj.entries}
        by_name = {e.image_name: e for e in proj.entries}
        picked, unknown = [], []
        for w in wanted:
            e = by_id.get(w) or by_name.get(w)
            if e is None:
                unknown.append(w)
            elif e not in picked:
                picked.append(e)
        if unknown:
            raise ConfigError(f"--entries: no entry with ID or image name "
                              f"{', '.join(repr(u) for u in unknown[:5])}", proj.path)
        selected = picked
    jobs = []
    for e in selected:
        err = None
        if e.image_path is None:
            err = (f"image not found ({e.uri})" if not e.is_remote
                   else f"remote image cannot be read ({e.uri})")
        jobs.append(SlideJob(key=str(e.entry_id), slide=e.image_path, name=e.image_name,
                             output=out / f"{e.entry_id}.geojson", entry_id=e.entry_id,
                             error=err, mpp=e.mpp))
    return jobs, out


# ============================================================================ model helpers

def package_class_map(pkg: ModelPackage) -> ClassMap:
    """The package's classes as a :class:`~qpseg.labels.ClassMap` (index 0 = Background)."""
    from qpseg.errors import LabelError
    from qpseg.labels import BACKGROUND, ClassInfo, ClassMap

    infos = [ClassInfo(i, BACKGROUND if i == 0 else name, tuple(color))  # type: ignore[arg-type]
             for i, (name, color) in enumerate(zip(pkg.class_names, pkg.class_colors,
                                                   strict=True))]
    try:
        return ClassMap(tuple(infos), ignore_index=255)
    except LabelError as exc:
        raise ModelError(f"class names cannot label objects: {exc.message}",
                         pkg.path / "config.json") from exc


def _lesion_classes(pkg: ModelPackage, params: InferenceParams) -> tuple[str, ...]:
    if params.lesion_classes is not None:
        known = {n.lower() for n in pkg.class_names[1:]}
        unknown = [c for c in params.lesion_classes if c.lower() not in known]
        if unknown:
            raise ConfigError(f"--lesion-classes: {', '.join(unknown)} not among the model's "
                              f"classes ({', '.join(pkg.class_names[1:])})")
        return tuple(params.lesion_classes)
    configured = pkg.config.training.get("lesion_classes")
    if isinstance(configured, list) and all(isinstance(c, str) for c in configured):
        return tuple(configured)
    return tuple(n for n in pkg.class_names[1:] if _LESION_RE.match(n.strip()))


def _heatmap_channel(pkg: ModelPackage, params: InferenceParams,
                     lesions: Sequence[str]) -> int:
    names = [n.lower() for n in pkg.class_names]
    if params.heatmap_class is not None:
        key = params.heatmap_class.strip()
        if key.isdigit() and int(key) < len(names):
            return int(key)
        if key.lower() in names:
            return names.index(key.lower())
        raise ConfigError(f"--heatmap-class {key!r} is not a class of the model "
                          f"({', '.join(pkg.class_names)})")
    if lesions and lesions[0].lower() in names:
        return names.index(lesions[0].lower())
    return 1 if len(names) > 1 else 0


def inference_rules(pkg: ModelPackage, params: InferenceParams) -> InferenceRules:
    """The rules a run follows: the package's recorded inference rules (a package without
    them: :func:`~qpseg.models.contract.default_inference_rules` of its output type and
    training summary), with the run's ``tissue``, ``min_tissue``, ``as_type``,
    ``min_area_um2`` and ``fill_holes_um2`` where given. Instance models always write cells.
    Warns when a nuclei model is asked for annotations: instance metrics (AJI) read
    detections and cells only, so such outputs score 0 there."""
    from qpseg.models.contract import InferenceRules, default_inference_rules

    stored = pkg.config.inference
    rules = InferenceRules.from_json(stored, pkg.path / "config.json") if stored else \
        default_inference_rules(pkg.contract, pkg.config.training)
    objects = rules.objects
    if pkg.contract.output == "instance":
        objects = "cell"
    elif params.as_type is not None:
        objects = params.as_type
    rules = replace(
        rules, objects=objects,
        tissue=rules.tissue if params.tissue is None else params.tissue,
        min_tissue=rules.min_tissue if params.min_tissue is None else params.min_tissue,
        min_area_um2=rules.min_area_um2 if params.min_area_um2 is None
        else params.min_area_um2,
        fill_holes_um2=rules.fill_holes_um2 if params.fill_holes_um2 is None
        else params.fill_holes_um2)
    if rules.nuclei and rules.objects == "annotation":
        warnings.warn(f"{pkg.path.name} segments nuclei: --as annotations writes them as "
                      "annotations, which instance metrics (AJI in qpseg evaluate) do not read; "
                      "leave out --as for one detection per nucleus", InferenceWarning,
                      stacklevel=3)
    return rules


def output_params(ctx: _Context, slide_mpp: float | None) -> dict[str, Any]:
    """The options that shape a slide's outputs, as recorded in its done state.

    A finished slide is redone when any of these differ (:func:`_redo_reason`). The tissue
    rule, the model's output type, the object type and the post-processing are the resolved
    :func:`inference_rules`. The pixel size is the one the slide was read at (``slide_mpp``,
    decided by the pixel-size rule), not
    the options that lead to it: ``--mpp`` for a slide with its own value changes nothing,
    ``--mpp-override`` or a new project calibration for a slide without one does. Options that
    only change how fast the same answer comes (device, batch size, workers, compile, channels
    last, arithmetic precision) are left out, so resuming a GPU run on another machine does
    not redo finished slides. ``heatmap`` / ``overlay`` count only when asked for and missing.
    """
    p = ctx.params
    pkg = ctx.pkg
    r = ctx.rules
    data: dict[str, Any] = {
        "model_mpp": pkg.mpp, "classes": list(pkg.class_names), "output": pkg.contract.output,
        "slide_mpp": slide_mpp, "tile_px": ctx.tile_px, "stitch": p.stitch,
        "tissue": r.tissue, "min_tissue": r.min_tissue,
        "max_upsample": p.max_upsample, "min_area_um2": r.min_area_um2,
        "fill_holes_um2": r.fill_holes_um2, "simplify_um": p.simplify_um,
        "as_type": r.objects, "nuclei": r.nuclei, "threshold": r.threshold,
        "lesion_classes": list(ctx.lesions),
        "score_threshold": p.score_threshold, "mask_threshold": p.mask_threshold,
        "instance_margin": p.instance_margin, "cell_expansion_um": p.cell_expansion_um,
        "heatmap": p.heatmap, "overlay": p.overlay,
    }
    if p.heatmap:
        data["heatmap_class"] = pkg.class_names[ctx.heat_channel]
    return dict(json.loads(json.dumps(data)))


def _fmt(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def _param_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``name old -> new`` for each recorded option that differs (options missing from
    ``old``, recorded by an older qpseg, are not compared)."""
    changes = []
    for key, value in new.items():
        if key not in old:
            continue
        was = old[key]
        if key in ("heatmap", "overlay"):  # an extra output asked for now
            if value and not was:
                changes.append(f"{key} off -> on")
        elif was != value:
            changes.append(f"{key} {_fmt(was)} -> {_fmt(value)}")
    return changes


def _host_memory() -> tuple[int, str]:
    """Bytes of memory this process may use, and what limits it (RAM or a cgroup limit)."""
    total, where = 0, "this machine's memory"
    with contextlib.suppress(AttributeError, ValueError, OSError):
        total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    for limit_file in ("/sys/fs/cgroup/memory.max",
                       "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text(encoding="ascii").strip()
            limit = int(text)
        except (OSError, ValueError):
            continue
        if 0 < limit < (total or 1 << 62):
            total, where = limit, "the memory limit of this container (cgroup)"
    return (total or 8 << 30), where


def _device_memory(device: torch.device) -> tuple[int, str] | None:
    if device.type != "cuda":
        return None
    import torch

    try:
        props = torch.cuda.get_device_properties(device)
    except (RuntimeError, AssertionError):
        return None
    return int(props.total_memory), f"the memory of {device}"


def check_memory(contract: ModelContract, params: InferenceParams, workers: int,
                 device: torch.device, num_classes: int) -> None:
    """ConfigError when one batch of tiles cannot fit in memory, before anything is read.

    A lower bound is counted: uint8 tiles held by the readers (one batch per worker plus
    one in flight), the normalised float inputs, float and uint8 class probabilities, and
    :data:`_WORKER_BYTES` per reader process. It must fit in half the memory (host RAM or a
    container limit; a GPU's own memory for what lives there), since the model's activations
    need at least as much again. ``--tile-px 1000000000`` is refused here instead of meeting
    the OOM killer.
    """
    from qpseg.engine.tiling import inference_contract

    bs = params.batch_size

    def per_tile(c: ModelContract) -> tuple[int, int]:
        ins = sum(int(s.size_px) ** 2 for s in c.inputs)
        out = 1 if c.output == "patch" else int(c.output_px) ** 2
        host = 3 * ins + out * (num_classes + 1)  # uint8 reads; quantised probs + classes
        dev = 12 * ins + 8 * out * num_classes    # float inputs; float probabilities (x2)
        return host, dev

    readers = max(workers, 1) + 1
    host_mem, host_where = _host_memory()
    dev = _device_memory(device)

    def fits(c: ModelContract, batch: int) -> tuple[bool, int, int, str]:
        host_t, dev_t = per_tile(c)
        host_need = batch * host_t * readers + workers * _WORKER_BYTES
        if dev is None:
            need = host_need + batch * dev_t
            return need <= host_mem // 2, need, host_mem, host_where
        if host_need > host_mem // 2:
            return False, host_need, host_mem, host_where
        need = batch * dev_t
        return need <= dev[0] // 2, need, dev[0], dev[1]

    ok, need, mem, where = fits(contract, bs)
    if ok:
        return
    gib = 1 << 30
    tile = contract.tile_px
    hint = ""
    if workers and workers * _WORKER_BYTES > mem // 2:
        hint = f"use fewer --workers (each reader process needs about " \
               f"{_WORKER_BYTES >> 20} MiB)"
    else:
        lo, hi = 0, bs
        while lo < hi:  # the largest batch of these tiles that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(contract, mid)[0] else (lo, mid - 1)
        if lo >= 1:
            hint = f"use --batch-size {lo} or less at {tile} px tiles"
        else:
            step = max(1, contract.size_multiple)
            lo_t, hi_t = 0, tile // step
            while lo_t < hi_t:  # the largest tile size (in steps) of which one tile fits
                mid = (lo_t + hi_t + 1) // 2
                try:
                    c = inference_contract(contract, mid * step)
                except ModelError:
                    c = None
                lo_t, hi_t = (mid, hi_t) if c is not None and fits(c, 1)[0] else \
                    (lo_t, mid - 1)
            hint = f"use --tile-px {lo_t * step} or less with --batch-size 1" if lo_t else \
                "this model's tiles cannot fit"
    raise ConfigError(
        f"--tile-px {tile} with --batch-size {bs} (--workers {workers}) needs at least "
        f"{need / gib:.1f} GiB for one batch of tiles and their class probabilities, more "
        f"than half of {where} ({mem / gib:.1f} GiB; the model's activations need the "
        f"rest): {hint}")


class _Runner:
    """Forward passes of one model (stage) on batches of uint8 NHWC tiles."""

    def __init__(self, module: torch.nn.Module, pkg: ModelPackage, stage: int | None,
                 device: torch.device, precision: str, channels_last: bool,
                 compile_model: bool) -> None:
        import torch

        from qpseg.models.contract import get_contract

        self.contract = get_contract(module)
        self.pkg = pkg
        self.stage = stage
        self.device = device
        self.channels_last = channels_last
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        module = module.to(device).eval()
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.forward: Any = module
        # The colour normaliser training applied to every tile (stored in the package); the
        # whole-slide stage of a two-stage pipeline never went through it.
        self.stain = pkg.stain_normalizer() if stage in (None, 0) else None
        if compile_model:
            self.forward = torch.compile(module)
            self.forward.contract = self.contract  # predict() reads the contract

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) -> normalised float (N, C, H, W) on the device: the package's
        colour normaliser per tile (as training's TileDataset did), then mean/std."""
        import numpy as np
        import torch

        if self.stain is not None:
            tiles = x.cpu().numpy()
            x = torch.from_numpy(np.stack([np.asarray(self.stain(t), dtype=np.uint8)
                                           for t in tiles]))
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = self.pkg.normalize(x, self.stage)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last
                            else torch.contiguous_format)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        import torch

        from qpseg.models.contract import predict

        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None):
            return predict(self.forward, *inputs)


def _check_supported(contract: ModelContract) -> str:
    """``"tiles"``, ``"instance"`` or ``"two_stage"``; ModelError for other contracts."""
    if contract.stages:
        if len(contract.stages) != 2:
            raise ModelError(f"{contract.architecture}: only two-stage (heatmap + refinement) "
                             "pipelines are supported")
        first, second = contract.stages
        if first.output not in ("patch", "pixel") or any(s.scale is None
                                                          for s in first.inputs):
            raise ModelError(f"{contract.architecture}: stage 0 must tile the slide")
        kinds = [s.kind for s in second.inputs]
        if kinds != ["image", "heatmap"] or any(s.scale is not None for s in second.inputs):
            raise ModelError(f"{contract.architecture}: stage 1 must read the whole slide "
                             "and the stage-0 heatmap")
        return "two_stage"
    if any(s.scale is None or s.kind != "image" for s in contract.inputs):
        raise ModelError(f"{contract.architecture} is one stage of a pipeline (it reads the "
                         "whole slide and a heatmap); package the full pipeline (h2g_net)")
    return "instance" if contract.output == "instance" else "tiles"


# ============================================================================== the pipeline

@dataclass
class _Context:
    pkg: ModelPackage
    params: InferenceParams
    out_dir: Path
    device: torch.device
    precision: str
    channels_last: bool
    workers: int
    classes: ClassMap
    lesions: tuple[str, ...]
    heat_channel: int
    rules: InferenceRules
    run_id: str
    run_date: str
    opener: Opener | None
    progress: ProgressFn | None
    tile_px: int | None = None  # the tile size run (None: two-stage models)
    runners: dict[int, _Runner] = field(default_factory=dict)

    @property
    def tissue_method(self) -> str:
        """The tissue detection of the run (``none``: every tile)."""
        return self.rules.tissue

    def runner(self, stage: int | None) -> _Runner:
        key = -1 if stage is None else stage
        if key not in self.runners:
            module: Any = self.pkg.model if stage is None else \
                self.pkg.model.stages[stage]  # type: ignore[index]
            self.runners[key] = _Runner(module, self.pkg, stage, self.device, self.precision,
                                        self.channels_last, self.params.compile)
        return self.runners[key]

    def emit(self, event: ProgressEvent) -> None:
        if self.progress is None:
            return
        try:
            self.progress(event)
        except BaseException as exc:
            raise _Abort(exc) from exc


class _State:
    """The per-slide state files (``running`` / ``done``) and locks in ``<out>/.qpseg_state``."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir / STATE_DIR
        self._locks: dict[str, tuple[FileLock, int]] = {}

    def acquire(self, key: str) -> bool:
        """Take the slide's lock (re-entrant within this run); False when another run
        (process or thread) holds it."""
        from qpseg._io import FileLock

        if key in self._locks:
            lock, depth = self._locks[key]
            self._locks[key] = (lock, depth + 1)
            return True
        lock = FileLock(self.dir / f"{key}.lock")
        if not lock.acquire():
            return False
        self._locks[key] = (lock, 1)
        return True

    def release(self, key: str) -> None:
        """Undo one :meth:`acquire`."""
        lock, depth = self._locks[key]
        if depth > 1:
            self._locks[key] = (lock, depth - 1)
        else:
            del self._locks[key]
            lock.release()

    def holder(self, key: str) -> str:
        """Who holds (or last held) the slide's lock, for messages."""
        from qpseg._io import FileLock

        return FileLock(self.dir / f"{key}.lock").holder()

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def read(self, key: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write(self, key: str, data: Mapping[str, Any]) -> None:
        from qpseg._io import write_json_atomic

        write_json_atomic(self.path(key), dict(data), backup=False)

    def mark(self, job: SlideJob, run_id: str, status: str, **fields: Any) -> None:
        """Record that ``job`` is ``running`` (with its start time) or ``done`` / ``failed``
        (with its end time and ``fields``). A ``running`` or ``failed`` record keeps what
        made the last finished outputs (``last_done``: model and options), since a failed
        attempt leaves those outputs in place."""
        when = "started" if status == "running" else "finished"
        data: dict[str, Any] = {"status": status, "slide": str(job.slide), "run": run_id,
                                when: _now(), **fields}
        if status != "done":
            last = self.last_done(job.key)
            if last is not None:
                data["last_done"] = last
        self.write(job.key, data)

    def last_done(self, key: str) -> dict[str, Any] | None:
        """Model and options of the slide's last finished outputs (None: unknown)."""
        state = self.read(key)
        if state is None:
            return None
        done = state if state.get("status") == "done" else state.get("last_done")
        if not isinstance(done, dict):
            return None
        return {k: done[k] for k in ("model_sha256", "params", "run") if k in done}


def _redo_reason(ctx: _Context, job: SlideJob,
                 state: _State) -> tuple[str, PixelSize | None]:
    """Why a finished slide's outputs are stale ("" when they are current or their origin is
    unknown, e.g. a GeoJSON made elsewhere), and the pixel size the rule gives the slide now
    when it had to be compared (None otherwise)."""
    done = state.last_done(job.key)
    if done is None:
        return "", None
    sha = done.get("model_sha256")
    if isinstance(sha, str) and sha != ctx.pkg.sha256:
        return f"model changed (package SHA-256 {sha[:12]} -> {ctx.pkg.sha256[:12]})", None
    old = done.get("params")
    chosen: PixelSize | None = None
    if isinstance(old, dict):
        if "slide_mpp" in old:  # what the pixel-size rule gives now
            try:
                chosen = _pixel_size(ctx, job)
            except (QpsegError, OSError) as exc:  # redone: the run reports the real failure
                return f"pixel size cannot be decided ({_reason(exc, job)})", None
        changes = _param_changes(old, output_params(ctx, None if chosen is None
                                                    else chosen.mpp))
        if changes:
            return "parameters changed: " + ", ".join(changes), chosen
    return "", chosen


def _decide(ctx: _Context, job: SlideJob,
            state: _State) -> tuple[bool, str, PixelSize | None]:
    """``(run, reason, pixel size)``: whether the slide is (re)done, why it is skipped or
    redone, and its pixel size when deciding needed it."""
    if slide_status(job, ctx.out_dir) != "finished":
        return True, "", None
    if ctx.params.overwrite:
        return True, "--overwrite", None
    why, chosen = _redo_reason(ctx, job, state)
    if why:
        return True, why, chosen
    return False, "finished earlier (--overwrite replaces it)", chosen


def _busy(job: SlideJob, state: _State) -> SlideResult:
    holder = state.holder(job.key)
    return SlideResult(job.key, job.name, str(job.slide or ""), str(job.output), "skipped",
                       reason="being processed by another run" + (
                           f" ({holder})" if holder else ""), entry_id=job.entry_id)


def _fresh_dir(folder: Path) -> None:
    """Remove ``folder`` (a link planted there is removed, never followed)."""
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    else:
        shutil.rmtree(folder, ignore_errors=True)


def slide_status(job: SlideJob, out_dir: str | os.PathLike[str]) -> str:
    """``finished``, ``interrupted`` (a run was killed while writing it) or ``todo``."""
    state = _State(Path(out_dir)).read(job.key)
    running = state is not None and state.get("status") == "running"
    if running:
        return "interrupted"
    return "finished" if job.output.is_file() else "todo"


def _read_existing_summary(job: SlideJob) -> dict[str, Any]:
    from qpseg.objects import metadata_path

    try:
        data = json.loads(metadata_path(job.output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return dict(data) if isinstance(data, dict) else {}


def _open(ctx: _Context, job: SlideJob) -> tuple[Slide, PixelSize]:
    """Open the slide and decide its pixel size by the one rule
    (:meth:`qpseg.slide.Slide.choose_mpp`: the slide's own, else the entry's calibration,
    else ``--mpp``; ``--mpp-override`` replaces a known value), which the slide uses from
    now on. SlideError when no plausible pixel size is known."""
    assert job.slide is not None
    if ctx.opener is not None:
        slide = ctx.opener(job.slide, None)
    else:
        from qpseg.slide import open_slide

        slide = open_slide(job.slide)
    try:
        p = ctx.params
        chosen = slide.choose_mpp(job.mpp, p.mpp, override=p.mpp_override)
    except BaseException:
        slide.close()
        raise
    return slide, chosen


def _pixel_size(ctx: _Context, job: SlideJob) -> PixelSize:
    """The pixel size the rule gives ``job``'s slide now (opens the slide's metadata only)."""
    slide, chosen = _open(ctx, job)
    slide.close()
    return chosen


def _reader_mpp(chosen: PixelSize) -> float | None:
    """The pixel size the tile readers, which open the slide again, must be given: None for
    the slide's own (they read it themselves), else the value chosen."""
    return None if chosen.source == "slide" else chosen.mpp


def _record_mpp(job: SlideJob, result: SlideResult, chosen: PixelSize,
                warn: bool = True) -> None:
    """Put the pixel size used into ``result``; warn about what the user should hear (a
    stored value that was skipped, slide and project that disagree)."""
    result.mpp, result.mpp_source, result.mpp_replaced = (
        float(chosen.mpp), chosen.source, chosen.replaced)
    if warn:
        where = f"entry {job.entry_id} ({job.name})" if job.entry_id is not None else job.name
        for note in chosen.notes:
            warnings.warn(f"{where}: {note}", InferenceWarning, stacklevel=2)


def _run_tiles(ctx: _Context, job: SlideJob, reader_mpp: float | None, plan: TilePlan,
               maps: MapSet, runner: _Runner, num_classes: int, index: int, total: int,
               tiles_before: int = 0, tiles_total: int | None = None,
               rows: tuple[int, int] | None = None) -> int:
    """Run every tile of ``plan`` and stitch the outputs into ``maps`` (only map rows
    ``rows`` when given: a band of a shared slide); returns objects kept (instance plans) or
    0."""
    import torch

    from qpseg.engine.loader import TileDataset, iterate_batches
    from qpseg.engine.stitch import Stitcher

    assert job.slide is not None
    stitcher = Stitcher(plan, maps, num_classes, rows=rows)
    dataset = TileDataset(job.slide, plan, mpp=reader_mpp, opener=ctx.opener)
    c = runner.contract
    mode = plan.mode
    params = ctx.params
    total_tiles = plan.n_tiles if tiles_total is None else tiles_total
    kept = [0]

    def stitch(idx: Any, out: Any) -> None:
        if mode == "instance":
            for n, k in enumerate(idx):
                i, j = (int(v) for v in plan.tiles[k])
                det = out[n]
                kept[0] += stitcher.add_instances(i, j, det["masks"], det["labels"],
                                                  det["scores"])
            return
        probs, cls = out
        for n, k in enumerate(idx):
            i, j = (int(v) for v in plan.tiles[k])
            stitcher.add(i, j, probs[n], None if cls is None else cls[n])

    def postprocess(out: Any) -> Any:
        if mode == "instance":
            dets = []
            for d in out:
                keep = d["scores"] >= params.score_threshold
                dets.append({"masks": (d["masks"][keep] > params.mask_threshold).cpu().numpy(),
                             "labels": d["labels"][keep].cpu().numpy(),
                             "scores": d["scores"][keep].float().cpu().numpy()})
            return dets
        probs = out.float()
        if c.output == "patch":
            probs = probs[:, :, None, None]
        if mode == "blend":
            return probs.cpu().numpy(), None
        q = torch.floor(probs * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8)
        cls = probs.argmax(dim=1).to(torch.uint8 if num_classes <= 255 else torch.int32)
        return q.cpu().numpy(), cls.cpu().numpy()

    done = tiles_before
    ctx.emit(ProgressEvent("tiles", index, total, job.key, job.name, done, total_tiles))
    pending: Future[None] | None = None
    batches = iterate_batches(dataset, batch_size=params.batch_size, workers=ctx.workers,
                              pin_memory=ctx.device.type == "cuda")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qpseg-stitch") as pool, \
            contextlib.closing(batches):  # stops the readers at once on any error
        try:
            for idx, inputs in batches:
                xs = [runner.prepare(x) for x in inputs]
                result = postprocess(runner(*xs))
                if pending is not None:
                    pending.result()
                pending = pool.submit(stitch, idx.numpy(), result)
                done += len(idx)
                ctx.emit(ProgressEvent("tiles", index, total, job.key, job.name, done,
                                       total_tiles))
            if pending is not None:
                pending.result()
                pending = None
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(Exception):  # the original error is propagating
                    pending.result()
    stitcher.finish()
    return kept[0]


def _run_two_stage(ctx: _Context, job: SlideJob, slide: Slide, reader_mpp: float | None,
                   tissue: TissueMask | None, work: Path, index: int, total: int
                   ) -> tuple[MapSet, MapGeometry, int, float, float, int]:
    """H2G-Net: patch heatmap over the tissue, then refinement of slide + heatmap."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from qpseg.engine.stitch import MapSet, resample_map
    from qpseg.engine.tiling import plan_for_slide
    from qpseg.objects import MapGeometry

    pkg = ctx.pkg
    c = pkg.contract
    first, second = c.stages
    plan = plan_for_slide(first, slide, pkg.mpp, tissue=tissue, mode=ctx.params.stitch,
                          min_tissue=ctx.rules.min_tissue,
                          max_upsample=ctx.params.max_upsample)
    if plan.map_width * plan.map_height > _MAX_HEATMAP_PIXELS:
        raise ModelError(f"stage-0 heatmap of {plan.map_width}x{plan.map_height} is too large "
                         "for the refinement stage", pkg.path)
    maps0 = MapSet.create(work / "stage0", (plan.map_height, plan.map_width), c.num_classes,
                          "pixel")
    try:
        _run_tiles(ctx, job, reader_mpp, plan, maps0, ctx.runner(0), c.num_classes, index,
                   total, tiles_total=plan.n_tiles + 1)
        hc = second.inputs[1].heatmap_class
        hc = ctx.heat_channel if hc is None else hc
        assert maps0.probs is not None
        heat = np.asarray(maps0.probs[hc], dtype=np.float32) / 255.0
    finally:
        maps0.close()
    size = second.inputs[0].size_px
    w_q, h_q = slide.qupath_dimensions
    ds_r = max(w_q, h_q) / size
    wr, hr = max(1, math.ceil(w_q / ds_r - 1e-9)), max(1, math.ceil(h_q / ds_r - 1e-9))
    img = slide.read_region_mpp(0.0, 0.0, wr, hr, slide.mpp * ds_r)
    heat_r = resample_map(heat[None], plan.map_downsample, (hr, wr), ds_r)
    runner = ctx.runner(1)
    dev = ctx.device
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div_(255.0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = pkg.normalize(x, 1).to(dev)
    hm = F.interpolate(torch.from_numpy(heat_r)[None], size=(size, size), mode="bilinear",
                       align_corners=False).to(dev)
    probs = runner(x, hm).float()
    probs = F.interpolate(probs, size=(hr, wr), mode="bilinear", align_corners=False)[0].cpu()
    maps = MapSet.create(work / "final", (hr, wr), c.num_classes, "pixel")
    assert maps.probs is not None
    q = torch.floor(probs * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8).numpy()
    maps.classes.write_rows(0, probs.argmax(dim=0).to(torch.uint8).numpy())
    for k in range(c.num_classes):
        maps.probs.write_rows(0, q[k], channel=k)
    ctx.emit(ProgressEvent("tiles", index, total, job.key, job.name, plan.n_tiles + 1,
                           plan.n_tiles + 1))
    geometry = MapGeometry(0.0, 0.0, ds_r, slide.mpp)
    return (maps, geometry, plan.n_tiles + 1, plan.tissue_fraction, _tissue_mpx(plan, slide),
            plan.low_tissue)


def _provenance(ctx: _Context, map_mpp: float) -> dict[str, str]:
    from qpseg.objects import provenance

    pkg = ctx.pkg
    return provenance(
        pkg.path.name, pkg.sha256, mpp=map_mpp, run=ctx.run_id,
        thresholds={"tissue": ctx.tissue_method, "stitch": ctx.params.stitch},
        extra={"qpseg_date": ctx.run_date, "qpseg_architecture": pkg.architecture})


def _objects(ctx: _Context, maps: MapSet, geometry: MapGeometry, prov: Mapping[str, str],
             progress: Callable[[int, int, int], None] | None = None) -> list[QuPathObject]:
    from qpseg.objects import polygonise, polygonise_instances

    p = ctx.params
    r = ctx.rules
    if maps.kind == "instance":
        default = ctx.classes.names[1] if len(ctx.classes) > 1 else None
        return polygonise_instances(
            maps.instances, geometry, ctx.classes, provenance=prov, class_map=maps.classes,
            default_class=default, probabilities=maps.scores, min_area_um2=r.min_area_um2,
            fill_holes_um2=r.fill_holes_um2, simplify_um=p.simplify_um,
            cell_expansion_um=p.cell_expansion_um, progress=progress)
    # nuclei: one object per 4-connected nucleus, so nuclei touching at a corner stay apart
    return polygonise(
        maps.classes, geometry, ctx.classes, provenance=prov, probabilities=maps.probs,
        min_area_um2=r.min_area_um2, fill_holes_um2=r.fill_holes_um2,
        simplify_um=p.simplify_um, as_type=r.objects, lesion_classes=ctx.lesions,
        nuclei=r.nuclei, connectivity=1 if r.nuclei else 2, progress=progress)


def _apply_threshold(threshold: float | None, maps: MapSet) -> None:
    """The rules' probability threshold (lagree2021 post-processing): rewrite the class map so
    a pixel is foreground when ``1 - P(Background)`` is above the threshold, of its most
    probable other class; nothing without a threshold (the most probable class stays)."""
    import numpy as np

    t = threshold
    if t is None or maps.kind == "instance" or maps.probs is None or maps.probs.shape[0] < 2:
        return
    h, w = maps.shape
    band = max(1, (1 << 22) // max(1, w))
    for r0 in range(0, h, band):
        p = np.asarray(maps.probs[:, r0:r0 + band, :])  # uint8, 255 = 1
        fg = p[0].astype(np.float64) < 255.0 * (1.0 - t)
        cls = p[1:].argmax(axis=0) + 1
        maps.classes.write_rows(r0, np.where(fg, cls, 0).astype(maps.classes.dtype))


def _process(ctx: _Context, job: SlideJob, index: int, total: int,
             state: _State) -> SlideResult:
    """Run one slide (the caller turns errors into a failed result)."""
    t0 = time.perf_counter()
    result = SlideResult(job.key, job.name, str(job.slide or ""), str(job.output), "failed",
                         entry_id=job.entry_id)
    if job.error:
        result.reason = job.error
        return result
    if not state.acquire(job.key):
        return _busy(job, state)
    try:
        return _process_locked(ctx, job, index, total, state, result, t0)
    finally:
        state.release(job.key)


def _process_locked(ctx: _Context, job: SlideJob, index: int, total: int, state: _State,
                    result: SlideResult, t0: float) -> SlideResult:
    """:func:`_process` once this run holds the slide's lock."""
    p = ctx.params
    run, why, chosen = _decide(ctx, job, state)
    if not run:
        result.status = "skipped"
        result.reason = why
        if chosen is not None:  # the pixel size its outputs were made with
            _record_mpp(job, result, chosen, warn=False)
        result.summary = _read_existing_summary(job)
        result.n_objects = int(float(result.summary.get("qpseg_n_objects", 0) or 0))
        return result
    state.mark(job, ctx.run_id, "running")
    work = ctx.out_dir / WORK_DIR / job.key
    _fresh_dir(work)
    maps: MapSet | None = None
    try:
        slide, chosen = _open(ctx, job)
        try:
            _record_mpp(job, result, chosen)
            maps, geometry = _predict(ctx, job, slide, _reader_mpp(chosen), work, index, total,
                                      result)
            _write_outputs(ctx, job, slide, maps, geometry, result)
        finally:
            slide.close()
            if maps is not None:
                maps.close()
        if p.keep_maps and maps is not None:
            _keep_maps(ctx, job, maps.folder, result)
    except BaseException as exc:
        if not isinstance(exc, _Abort | KeyboardInterrupt | SystemExit):
            # A failure leaves any earlier GeoJSON untouched (it is written last, atomically).
            _mark_failed(ctx, job, state, _reason(exc, job))
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.seconds = time.perf_counter() - t0
    result.reason = "" if why == "--overwrite" else why
    _mark_done(ctx, job, state, result)
    return result


def _mark_done(ctx: _Context, job: SlideJob, state: _State, result: SlideResult) -> None:
    state.mark(job, ctx.run_id, "done", outputs=result.outputs, model_sha256=ctx.pkg.sha256,
               params=output_params(ctx, result.mpp))


def _mark_failed(ctx: _Context, job: SlideJob, state: _State, reason: str) -> None:
    """Record a failure if the disk allows (the slide's own reason is what gets reported)."""
    with contextlib.suppress(QpsegError, OSError):
        state.mark(job, ctx.run_id, "failed", reason=reason)


def _keep_maps(ctx: _Context, job: SlideJob, folder: Path, result: SlideResult) -> None:
    """``--keep-maps``: move the slide's map files to ``<out>/maps/<key>``."""
    dest = ctx.out_dir / "maps" / job.key
    _fresh_dir(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(dest))
    result.maps = str(dest)


def _reason(exc: BaseException, job: SlideJob) -> str:
    """The one-line reason a slide failed."""
    if isinstance(exc, QpsegError):
        return exc.message if exc.path in (None, job.slide) else exc.one_line()
    if isinstance(exc, OSError):  # a file that could not be read or written: name it
        name = exc.filename if exc.filename is not None else job.output
        return OutputError(os_error_reason(exc), os.fsdecode(name)).one_line()
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _tissue_mpx(plan: TilePlan, slide: Slide) -> float:
    """Level-0 megapixels the planned tiles predict (the work done, for throughput)."""
    return plan.tissue_pixels() * (plan.map_mpp / slide.mpp) ** 2 / 1e6


def _record_work(result: SlideResult, tiles: int, tissue_fraction: float | None,
                 tissue_mpx: float, geometry: MapGeometry, low_tissue: int = 0) -> None:
    """What a slide's prediction covered, for the summary and run_metadata.json."""
    result.tiles = tiles
    result.tiles_low_tissue = low_tissue
    result.tissue_fraction = tissue_fraction
    result.tissue_mpx = tissue_mpx
    result.map_mpp = geometry.map_mpp


def _tile_plan(ctx: _Context, slide: Slide, tissue: TissueMask | None) -> TilePlan:
    from qpseg.engine.tiling import plan_for_slide

    p = ctx.params
    return plan_for_slide(ctx.pkg.contract, slide, ctx.pkg.mpp, tissue=tissue, mode=p.stitch,
                          min_tissue=ctx.rules.min_tissue, instance_margin=p.instance_margin,
                          max_upsample=p.max_upsample, tile_px=p.tile_px)


def _process_shared(ctx: _Context, dist: DistContext, job: SlideJob, index: int, total: int,
                    state: _State) -> SlideResult | None:
    """One slide run by every rank together (see :meth:`DistContext.plan_work`).

    Rank 0 decides whether it runs (skip and failure rules as for one process) and creates
    the map files; every rank opens the slide, plans the same tiles and stitches its band of
    map rows (:meth:`TilePlan.row_bands`) into those files; rank 0 then polygonises and
    writes the outputs exactly as one process would. Every rank goes through the same
    collective calls whatever fails, so a failure fails the slide on all ranks and the run
    goes on. Returns the result on rank 0, None elsewhere.
    """
    go, why, locked = "run", "", False
    if dist.is_main:
        if job.error:
            go = "alone"
        else:
            try:
                locked = state.acquire(job.key)
            except QpsegError:  # the lock file cannot be made: _process reports it
                go = "alone"
            else:
                if not locked:
                    go = "busy"
                else:
                    run, why, _ = _decide(ctx, job, state)
                    go = "run" if run else "alone"
    go = dist.broadcast(go)
    try:
        if go == "busy":
            return _busy(job, state) if dist.is_main else None
        if go == "alone":  # failed before starting, or finished: as one process
            return _process(ctx, job, index, total, state) if dist.is_main else None
        return _process_shared_locked(ctx, dist, job, index, total, state, why)
    finally:
        if locked:
            state.release(job.key)


def _process_shared_locked(ctx: _Context, dist: DistContext, job: SlideJob, index: int,
                           total: int, state: _State, why: str) -> SlideResult | None:
    """:func:`_process_shared` once rank 0 holds the slide's lock and decided to run it."""
    from qpseg.engine.stitch import MapSet
    from qpseg.tissue import detect_tissue

    t0 = time.perf_counter()
    result = SlideResult(job.key, job.name, str(job.slide or ""), str(job.output), "failed",
                         entry_id=job.entry_id, ranks=dist.world_size)
    work = ctx.out_dir / WORK_DIR / job.key
    folder = work / "maps"
    c = ctx.pkg.contract
    slide: Slide | None = None
    error = ""
    try:
        if dist.is_main:
            state.mark(job, ctx.run_id, "running")
            _fresh_dir(work)
        slide, chosen = _open(ctx, job)
        reader_mpp = _reader_mpp(chosen)
        _record_mpp(job, result, chosen, warn=dist.is_main)
        method = ctx.tissue_method
        tissue = None if method == "none" else detect_tissue(slide, method)
        plan = _tile_plan(ctx, slide, tissue)
        if dist.is_main:
            MapSet.create(folder, (plan.map_height, plan.map_width), c.num_classes,
                          "pixel").close()
    except Exception as exc:
        error = _reason(exc, job)
    errors = [e for e in dist.all_gather(error) if e]
    if not errors:
        rows = plan.row_bands(dist.world_size)[dist.rank]
        try:
            maps = MapSet.open(folder, writable=True)
            try:
                _run_tiles(ctx, job, reader_mpp, plan.for_rows(*rows), maps,
                           ctx.runner(None), c.num_classes, index, total, rows=rows)
            finally:
                maps.close()
        except _Abort:
            raise
        except Exception as exc:
            error = _reason(exc, job)
        errors = [e for e in dist.all_gather(error) if e]
    try:
        if not dist.is_main:
            return None
        if errors:
            result.reason = errors[0]
            result.seconds = time.perf_counter() - t0
            _mark_failed(ctx, job, state, errors[0])
            return result
        assert slide is not None
        geometry = plan.geometry()
        _record_work(result, plan.n_tiles, None if tissue is None else plan.tissue_fraction,
                     _tissue_mpx(plan, slide), geometry, plan.low_tissue)
        maps = MapSet.open(folder, writable=ctx.rules.threshold is not None)
        maps.tissue = tissue
        try:
            _apply_threshold(ctx.rules.threshold, maps)
            _write_outputs(ctx, job, slide, maps, geometry, result)
        finally:
            maps.close()
        if ctx.params.keep_maps:
            _keep_maps(ctx, job, folder, result)
        result.seconds = time.perf_counter() - t0
        result.reason = "" if why == "--overwrite" else why
        _mark_done(ctx, job, state, result)
        return result
    except _Abort:
        raise
    except Exception as exc:  # rank 0 could not write the outputs: the slide failed
        result.status, result.reason = "failed", _reason(exc, job)
        result.seconds = time.perf_counter() - t0
        _mark_failed(ctx, job, state, result.reason)
        return result
    finally:
        if slide is not None:
            slide.close()
        if dist.is_main:
            shutil.rmtree(work, ignore_errors=True)


def _predict(ctx: _Context, job: SlideJob, slide: Slide, reader_mpp: float | None,
             work: Path, index: int, total: int,
             result: SlideResult) -> tuple[MapSet, MapGeometry]:
    """Tissue, tiles, model, stitching: the slide's maps and where they lie (the work done
    goes into ``result``)."""
    from qpseg.engine.stitch import MapSet
    from qpseg.tissue import detect_tissue

    method = ctx.tissue_method
    tissue = None if method == "none" else detect_tissue(slide, method)
    kind = _check_supported(ctx.pkg.contract)
    c = ctx.pkg.contract
    if kind == "two_stage":
        maps, geometry, tiles, fraction, tissue_mpx, low = _run_two_stage(
            ctx, job, slide, reader_mpp, tissue, work, index, total)
    else:
        plan = _tile_plan(ctx, slide, tissue)
        maps = MapSet.create(work / "maps", (plan.map_height, plan.map_width),
                             c.num_classes, "instance" if kind == "instance" else "pixel")
        try:
            _run_tiles(ctx, job, reader_mpp, plan, maps, ctx.runner(None), c.num_classes,
                       index, total)
        except BaseException:
            maps.close()
            raise
        geometry = plan.geometry()
        tiles, fraction, low = plan.n_tiles, plan.tissue_fraction, plan.low_tissue
        tissue_mpx = _tissue_mpx(plan, slide)
    maps.tissue = tissue
    try:
        _apply_threshold(ctx.rules.threshold, maps)
    except BaseException:
        maps.close()
        raise
    _record_work(result, tiles, None if tissue is None else fraction, tissue_mpx, geometry,
                 low)
    return maps, geometry


def _write_outputs(ctx: _Context, job: SlideJob, slide: Slide, maps: MapSet,
                   geometry: MapGeometry, result: SlideResult) -> None:
    """Objects, summary, optional images, then the GeoJSON (last: it marks the slide done)."""
    from qpseg.engine.writers import (
        TissueMasked,
        sha256_file,
        write_heatmap_ome_tiff,
        write_overlay_png,
    )
    from qpseg.objects import metadata_path, slide_summary, write_predictions

    p = ctx.params
    prov = _provenance(ctx, geometry.map_mpp)

    def polygonising(done: int, blocks: int, found: int) -> None:
        ctx.emit(ProgressEvent("polygonise", key=job.key, name=job.name, blocks_done=done,
                               blocks_total=blocks, objects=found))

    # clipped to the image: a coarse map's last row/column reaches past its edge
    objects = _objects(ctx, maps, geometry.within(*slide.qupath_dimensions), prov,
                       progress=polygonising)
    # Object IDs from the run, slide and position: a rerun with the same --run-id (or another
    # rank of the same torchrun job) writes byte-identical files.
    for n, obj in enumerate(objects):
        obj.id = str(uuid.uuid5(_ID_NAMESPACE, f"{ctx.run_id}/{job.key}/{n}"))
    summary = slide_summary(objects, lesion_classes=ctx.lesions, classes=ctx.classes,
                            provenance=prov)
    summary["qpseg_image"] = job.name
    summary["qpseg_tissue_method"] = ctx.tissue_method
    summary["qpseg_tissue_fraction"] = ("" if result.tissue_fraction is None
                                        else round(result.tissue_fraction, 6))
    summary["qpseg_tiles"] = result.tiles
    summary["qpseg_tiles_low_tissue"] = result.tiles_low_tissue
    summary["qpseg_min_tissue"] = ctx.rules.min_tissue
    outputs: dict[str, Path] = {}
    if p.heatmap:
        hp = job.output.with_name(f"{job.key}.heatmap.ome.tif")
        src: Any = maps.scores if maps.kind == "instance" else maps.probs
        if src is not None and maps.kind != "instance":
            src = src.channel(ctx.heat_channel)
        if src is not None:
            if maps.tissue is not None:  # exactly 0 on glass
                src = TissueMasked(src, maps.tissue, geometry.downsample,
                                   (geometry.x0, geometry.y0))
            what = "score" if maps.kind == "instance" else \
                ctx.pkg.class_names[ctx.heat_channel]
            outputs["heatmap"] = write_heatmap_ome_tiff(hp, src, mpp=geometry.map_mpp,
                                                        name=f"{job.name}: {what} probability",
                                                        channel=what, backup=True)
    if p.overlay:
        op = job.output.with_name(f"{job.key}.overlay.png")
        outputs["overlay"] = write_overlay_png(op, slide, maps.classes, geometry.downsample,
                                               [c.color for c in ctx.classes.classes],
                                               names=[c.name for c in ctx.classes.classes],
                                               backup=True)
    write_predictions(job.output, objects, overwrite=job.output.exists(), summary=summary)
    outputs["geojson"] = job.output
    outputs["metadata"] = metadata_path(job.output)
    result.outputs = {k: {"path": str(v), "sha256": sha256_file(v)} for k, v in outputs.items()}
    result.n_objects = len(objects)
    result.summary = summary
    result.status = "done"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("qpseg", "torch", "torchvision", "numpy", "shapely", "scikit-image",
                 "tifffile", "pillow", "openslide-python", "openslide-bin"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import openslide

        out["openslide"] = str(openslide.__library_version__)
    except (ImportError, OSError, AttributeError):
        pass
    return out


def _csv_text(rows: Iterable[Mapping[str, Any]]) -> str:
    rows = list(rows)
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in columns})
    return buf.getvalue()


def _write_run_files(ctx: _Context, dist: DistContext, results: list[SlideResult],
                     started: str, n_jobs: int) -> tuple[Path, Path]:
    from qpseg._io import atomic_write, write_json_atomic

    suffix = "" if dist.shard == (0, 1) else f".shard-{dist.shard[0]}-of-{dist.shard[1]}"
    csv_path = ctx.out_dir / f"summary{suffix}.csv"
    meta_path = ctx.out_dir / f"run_metadata{suffix}.json"
    try:
        with atomic_write(csv_path, "w", backup=False) as fh:
            fh.write(_csv_text(r.row() for r in results))
    except OSError as exc:
        raise OutputError.from_os_error(exc, csv_path) from None
    pkg = ctx.pkg
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    meta = {
        "format": "qpseg-inference-run", "format_version": 1,
        "run_id": ctx.run_id, "started": started, "finished": _now(),
        "versions": _versions(),
        "device": str(ctx.device), "precision": ctx.precision, "world_size": dist.world_size,
        "shard": list(dist.shard), "slides_in_run": n_jobs,
        "model": {"name": pkg.path.name, "path": str(pkg.path), "architecture": pkg.architecture,
                  "sha256": pkg.sha256, "class_names": list(pkg.class_names),
                  "mpp": pkg.mpp, "input_mpp": list(pkg.input_mpp),
                  "contract": pkg.contract.to_dict()},
        "params": ctx.params.to_json(),
        "resolved": {"tissue": ctx.tissue_method, "inference": ctx.rules.to_json(),
                     "lesion_classes": list(ctx.lesions),
                     "heatmap_class": pkg.class_names[ctx.heat_channel],
                     "workers": ctx.workers},
        "counts": counts,
        "slides": [r.to_json() for r in results],
    }
    try:
        write_json_atomic(meta_path, json.loads(json.dumps(meta, default=str)), backup=True)
    except OSError as exc:
        raise OutputError.from_os_error(exc, meta_path) from None
    return csv_path, meta_path


def run_inference(
    jobs: Sequence[SlideJob],
    model: str | os.PathLike[str] | ModelPackage,
    out_dir: str | os.PathLike[str],
    params: InferenceParams | None = None,
    *,
    progress: ProgressFn | None = None,
    opener: Opener | None = None,
) -> RunResult:
    """Run a model package over slides; see the module docstring for files and rules.

    ``model`` is a package directory or a loaded :class:`~qpseg.models.ModelPackage`.
    ``opener(path, mpp)`` replaces :func:`qpseg.slide.open_slide` (tests use it to stub
    OpenSlide handles; with ``workers > 0`` it must survive a fork). Under torchrun each rank
    runs its share and rank 0 returns (and writes) the results of all slides.
    Raises ModelError/ConfigError for problems of the run as a whole; slide problems become
    failed :class:`SlideResult` s.
    """
    import torch

    from qpseg.engine.distributed import setup_distributed
    from qpseg.models.package import ModelPackage, load_package

    params = (params or InferenceParams()).validate()
    out = check_output_dir(out_dir)
    dist = setup_distributed(params.shard)
    try:
        device = resolve_device(params.device, dist.local_rank)
        pkg = model if isinstance(model, ModelPackage) else load_package(model)
        precision = params.precision or ("bf16" if device.type == "cuda" else "fp32")
        channels_last = (device.type == "cuda") if params.channels_last is None \
            else params.channels_last
        if params.workers is not None:
            workers = params.workers
        elif device.type == "cuda":
            workers = max(1, min(8, (os.cpu_count() or 2) // max(1, dist.world_size) - 1))
        else:
            workers = 0
        started = _now()
        run_id = params.run_id or _new_run_id()
        run_id, run_date = dist.broadcast((run_id, started))
        lesions = _lesion_classes(pkg, params)
        ctx = _Context(pkg=pkg, params=params, out_dir=out, device=device, precision=precision,
                       channels_last=channels_last, workers=workers,
                       classes=package_class_map(pkg), lesions=lesions,
                       heat_channel=_heatmap_channel(pkg, params, lesions),
                       rules=inference_rules(pkg, params), run_id=run_id,
                       run_date=run_date, opener=opener, progress=progress)
        if _check_supported(pkg.contract) != "two_stage":
            from qpseg.engine.tiling import inference_contract

            try:  # a bad --tile-px fails the run, not every slide
                tiled = inference_contract(pkg.contract, params.tile_px)
            except ModelError as exc:
                raise ConfigError(exc.message) from exc
            ctx.tile_px = tiled.tile_px
        else:
            tiled = pkg.contract.stages[0]
        check_memory(tiled, params, workers, device, pkg.contract.num_classes)
        sizes = []
        for j in jobs:
            try:
                sizes.append(float(j.slide.stat().st_size) if j.slide is not None else 0.0)
            except OSError:
                sizes.append(0.0)
        # Pixel maps can be stitched band by band, so a slide too big for one rank's share
        # is run by all ranks together; instance and two-stage slides always by one rank.
        together, mine = dist.plan_work(
            sizes, splittable=_check_supported(pkg.contract) == "tiles")
        state = _State(out)
        results: dict[int, SlideResult] = {}
        n_slides = len(together) + len(mine)
        ctx.emit(ProgressEvent("run_start", 0, n_slides))
        try:
            for n, k in enumerate([*together, *mine]):
                job = jobs[k]
                ctx.emit(ProgressEvent("slide_start", n, n_slides, job.key, job.name))
                t0 = time.perf_counter()
                res: SlideResult | None
                try:
                    with torch.inference_mode():
                        if n < len(together):
                            res = _process_shared(ctx, dist, job, n, n_slides, state)
                        else:
                            res = _process(ctx, job, n, n_slides, state)
                except _Abort:
                    raise
                except Exception as exc:  # any slide problem: report it, go on
                    res = _failed(job, _reason(exc, job))
                if res is not None:
                    if res.status == "failed":
                        res.seconds = time.perf_counter() - t0
                    res.rank = dist.rank
                    results[k] = res
                ctx.emit(ProgressEvent("slide_end", n, n_slides, job.key, job.name,
                                       status="done" if res is None else res.status,
                                       message="" if res is None else res.reason))
        except _Abort as abort:
            raise abort.original from None
        with contextlib.suppress(OSError):  # only when empty (another run may be using it)
            (out / WORK_DIR).rmdir()
        merged: dict[int, SlideResult] = {}
        for part in dist.all_gather(results):
            merged.update(part)
        final = [merged[k] for k in sorted(merged)]
        csv_path = meta_path = None
        if dist.is_main:
            _warn_unused_mpp(params, final)
            csv_path, meta_path = _write_run_files(ctx, dist, final, started, len(jobs))
        dist.barrier()
        ctx.emit(ProgressEvent("run_end", n_slides, n_slides))
        return RunResult(final, out, csv_path, meta_path)
    finally:
        dist.close()


def _warn_unused_mpp(params: InferenceParams, results: Sequence[SlideResult]) -> None:
    """One warning for the slides that kept a pixel size of their own (or their project's)
    although ``--mpp`` gave another one (``--mpp-override`` would replace it)."""
    if params.mpp is None or params.mpp_override:
        return
    kept = [f"{r.key} ({r.name}) {r.mpp:g} µm/px from the {r.mpp_source}" for r in results
            if r.mpp is not None and r.mpp_source in ("slide", "project")
            and r.mpp != params.mpp]
    if kept:
        warnings.warn(
            f"--mpp {params.mpp:g} is not used for {len(kept)} slide(s) with a pixel size of "
            f"their own ({'; '.join(kept[:3])}{'; ...' if len(kept) > 3 else ''}); pass "
            "--mpp-override to replace it", InferenceWarning, stacklevel=3)


def _new_run_id() -> str:
    """A run ID no other run shares: UTC start time, process ID and a random suffix."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{os.getpid()}-{secrets.token_hex(3)}"


def _failed(job: SlideJob, reason: str) -> SlideResult:
    return SlideResult(job.key, job.name, str(job.slide or ""), str(job.output), "failed",
                       reason=" ".join(reason.split()), entry_id=job.entry_id)
