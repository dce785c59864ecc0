"""Whole-slide inference: tiling, batched reading, stitching into on-disk maps, writers, runs.

``run_inference(jobs, model_package, out_dir, InferenceParams(...))`` runs a model package over
slides (``jobs_from_project`` / ``jobs_from_paths`` build the jobs) and writes QuPath GeoJSON,
per-slide summaries, ``summary.csv`` and ``run_metadata.json``; see :mod:`qpseg.engine.run`.

Modules: :mod:`~qpseg.engine.tiling` (tile plans from the model contract),
:mod:`~qpseg.engine.loader` (DataLoader over a plan; imports torch),
:mod:`~qpseg.engine.stitch` (band-wise stitching), :mod:`~qpseg.engine.writers` (map files,
OME-TIFF heatmap, PNG overlay), :mod:`~qpseg.engine.distributed` (torchrun ranks, ``--shard``).
Importing this package does not import torch.
"""

from __future__ import annotations

from qpseg.engine.distributed import DistContext, assign_shares, parse_shard, setup_distributed
from qpseg.engine.run import (
    InferenceParams,
    InferenceWarning,
    ProgressEvent,
    RunResult,
    SlideJob,
    SlideResult,
    is_project_path,
    jobs_from_paths,
    jobs_from_project,
    project_output_dir,
    run_inference,
    slide_status,
)
from qpseg.engine.stitch import MapSet, Stitcher
from qpseg.engine.tiling import (
    InputRead,
    TilePlan,
    check_reachable,
    inference_contract,
    plan_for_slide,
    plan_tiles,
)
from qpseg.engine.writers import (
    MapChannel,
    MapFile,
    write_heatmap_ome_tiff,
    write_overlay_png,
)

__all__ = [
    "DistContext",
    "InferenceParams",
    "InferenceWarning",
    "InputRead",
    "MapChannel",
    "MapFile",
    "MapSet",
    "ProgressEvent",
    "RunResult",
    "SlideJob",
    "SlideResult",
    "Stitcher",
    "TilePlan",
    "assign_shares",
    "check_reachable",
    "inference_contract",
    "is_project_path",
    "jobs_from_paths",
    "jobs_from_project",
    "parse_shard",
    "plan_for_slide",
    "plan_tiles",
    "project_output_dir",
    "run_inference",
    "setup_distributed",
    "slide_status",
    "write_heatmap_ome_tiff",
    "write_overlay_png",
]
