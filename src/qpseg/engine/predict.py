"""One slide's prediction at inference: tissue, the tile plan, batched forward passes and
stitching into on-disk class and probability maps (:func:`_predict`; :func:`_run_tiles` for
a whole plan or one rank's band of rows, :func:`_run_two_stage` for heatmap + refinement
models), then the rules' probability threshold (:func:`_apply_threshold`).
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.engine.results import ProgressEvent
from qpseg.engine.rules import _check_supported
from qpseg.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from qpseg.engine.context import _Context
    from qpseg.engine.jobs import SlideJob
    from qpseg.engine.results import SlideResult
    from qpseg.engine.runner import _Runner
    from qpseg.engine.stitch import MapSet
    from qpseg.engine.tiling import TilePlan
    from qpseg.objects import MapGeometry
    from qpseg.slide import Slide
    from qpseg.tissue import TissueMask

# A stage-0 heatmap is read whole for the refinement stage; refuse absurd grids.
_MAX_HEATMAP_PIXELS = 1 << 26


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
