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

This module is the entry point (import from here): :func:`run_inference` and the public names
of the run. The code lives beside it, one job per module: :mod:`~qpseg.engine.params`
(options, their ranges and memory bounds), :mod:`~qpseg.engine.jobs` (slides or project
entries -> jobs, the output folder), :mod:`~qpseg.engine.results` (progress events, slide and
run results), :mod:`~qpseg.engine.rules` (what the package makes of the run: classes, lesion
classes, heatmap channel, inference rules, pipeline kind), :mod:`~qpseg.engine.runner`
(forward passes), :mod:`~qpseg.engine.context` (the run's shared settings, opening a slide at
its pixel size, failure reasons), :mod:`~qpseg.engine.state` (state files, locks, skip / redo
decisions), :mod:`~qpseg.engine.predict` (tiles -> stitched maps), :mod:`~qpseg.engine.outputs`
(objects, GeoJSON, heatmap, overlay, summary.csv, run_metadata.json) and
:mod:`~qpseg.engine.pipeline` (one slide from decision to done state, alone or shared by
ranks).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from qpseg.devices import resolve_device
from qpseg.engine.context import _Abort, _Context, _reason
from qpseg.engine.jobs import SLIDE_SUFFIXES as SLIDE_SUFFIXES
from qpseg.engine.jobs import SlideJob as SlideJob
from qpseg.engine.jobs import check_output_dir as check_output_dir
from qpseg.engine.jobs import is_project_path as is_project_path
from qpseg.engine.jobs import jobs_from_paths as jobs_from_paths
from qpseg.engine.jobs import jobs_from_project as jobs_from_project
from qpseg.engine.jobs import project_output_dir as project_output_dir
from qpseg.engine.outputs import _write_run_files
from qpseg.engine.params import TISSUE_CHOICES as TISSUE_CHOICES
from qpseg.engine.params import InferenceParams as InferenceParams
from qpseg.engine.params import check_memory as check_memory
from qpseg.engine.pipeline import WORK_DIR as WORK_DIR
from qpseg.engine.pipeline import _process, _process_shared
from qpseg.engine.results import ProgressEvent as ProgressEvent
from qpseg.engine.results import ProgressFn as ProgressFn
from qpseg.engine.results import RunResult as RunResult
from qpseg.engine.results import SlideResult as SlideResult
from qpseg.engine.rules import _check_supported, _heatmap_channel, _lesion_classes
from qpseg.engine.rules import inference_rules as inference_rules
from qpseg.engine.rules import package_class_map as package_class_map
from qpseg.engine.state import STATE_DIR as STATE_DIR
from qpseg.engine.state import _now, _State
from qpseg.engine.state import output_params as output_params
from qpseg.engine.state import slide_status as slide_status
from qpseg.engine.tiling import InferenceWarning as InferenceWarning
from qpseg.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from qpseg.engine.loader import Opener
    from qpseg.models.package import ModelPackage

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
