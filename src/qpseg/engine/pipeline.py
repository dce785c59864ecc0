"""One slide of an inference run from the skip / redo decision to its done state: under its
lock, marked ``running``, predicted, written, marked ``done`` (:func:`_process`); or, for a
slide bigger than a fair share, run by every torchrun rank together, each stitching its band
of map rows, rank 0 writing the outputs (:func:`_process_shared`). Work files live in
``<out>/.qpseg_work/<key>`` and are removed afterwards.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qpseg.engine.context import _Abort, _open, _reader_mpp, _reason, _record_mpp
from qpseg.engine.outputs import _write_outputs
from qpseg.engine.predict import (
    _apply_threshold,
    _predict,
    _record_work,
    _run_tiles,
    _tile_plan,
    _tissue_mpx,
)
from qpseg.engine.results import SlideResult
from qpseg.engine.state import (
    _busy,
    _decide,
    _mark_done,
    _mark_failed,
    _read_existing_summary,
)
from qpseg.errors import QpsegError

if TYPE_CHECKING:  # pragma: no cover
    from qpseg.engine.context import _Context
    from qpseg.engine.distributed import DistContext
    from qpseg.engine.jobs import SlideJob
    from qpseg.engine.state import _State
    from qpseg.engine.stitch import MapSet
    from qpseg.slide import Slide

WORK_DIR = ".qpseg_work"


def _fresh_dir(folder: Path) -> None:
    """Remove ``folder`` (a link planted there is removed, never followed)."""
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    else:
        shutil.rmtree(folder, ignore_errors=True)


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


def _keep_maps(ctx: _Context, job: SlideJob, folder: Path, result: SlideResult) -> None:
    """``--keep-maps``: move the slide's map files to ``<out>/maps/<key>``."""
    dest = ctx.out_dir / "maps" / job.key
    _fresh_dir(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(dest))
    result.maps = str(dest)


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
