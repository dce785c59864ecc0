"""The files an inference run writes: per slide the objects (polygonised maps with
provenance and run-derived IDs), the optional heatmap and overlay, then the GeoJSON and its
summary (:func:`_write_outputs`, the GeoJSON last: it marks the slide done); per run
``summary.csv`` and ``run_metadata.json`` (:func:`_write_run_files`).
"""

from __future__ import annotations

import csv
import io
import json
import platform
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.engine.results import ProgressEvent
from qpseg.engine.state import _now
from qpseg.errors import OutputError

if TYPE_CHECKING:  # pragma: no cover
    from qpseg.engine.context import _Context
    from qpseg.engine.distributed import DistContext
    from qpseg.engine.jobs import SlideJob
    from qpseg.engine.results import SlideResult
    from qpseg.engine.stitch import MapSet
    from qpseg.objects import MapGeometry
    from qpseg.qupath.geojson import QuPathObject
    from qpseg.slide import Slide

_ID_NAMESPACE = uuid.UUID("5b0b3c6e-4f0e-4c55-9a52-2d1f6a4c9e11")  # qpseg object IDs


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
