"""``qpseg demo``: the whole round trip on a generated example project.

Only :func:`build_example` and :func:`simulate_review` are demo-specific: the first writes a small
QuPath project of generated H&E-like slides with sparse "pathologist" annotations (as real users
draw them) and the full ground truth. :func:`run_demo` then calls the same library functions as
the real commands:
``import_project`` -> ``train`` -> ``infer`` -> ``evaluate``, then one simulated review round in
QuPath (:func:`simulate_review`: the export QuPath would write after a pathologist kept, reshaped,
reclassified, deleted, locked and added objects) read back by ``import_project``, ``evaluate``
and ``evaluate_edits``, whose counts of AI objects left out and kept must be those the
simulation implies (:func:`run_review_round`).

Its parts: ``demo_example`` (the generated project and the demo's training recipe),
``demo_review`` (the simulated review round) and ``demo_rounds`` (``--rounds N``); this module
claims the output folder, runs the round trip and re-exports their public names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpseg.demo_example import CLASSES, DEMO_TRAIN_CONFIG, Example, Progress, build_example
from qpseg.demo_review import (
    ADDED_RADIUS_PX,
    BEFORE_REVIEW,
    ONE_EACH,
    RESHAPE_PX,
    TRUTH_READERS,
    ReviewRound,
    SimulatedReview,
    run_review_round,
    simulate_review,
    undo_review,
)
from qpseg.demo_rounds import Correction, RoundOutcome, correct_from_truth, run_rounds

__all__ = ["ADDED_RADIUS_PX", "BEFORE_REVIEW", "CLASSES", "DEMO_MARKER", "DEMO_TRAIN_CONFIG",
           "ONE_EACH", "RESHAPE_PX", "TRUTH_READERS", "Correction", "DemoResult", "Example",
           "ReviewRound", "RoundOutcome", "SimulatedReview", "build_example", "claim_demo_folder",
           "correct_from_truth", "held_out_dice", "run_demo", "run_review_round", "run_rounds",
           "simulate_review", "undo_review"]

#: The file that marks a folder as the demo's own: only there does the demo replace outputs.
DEMO_MARKER = ".qpseg-demo"


def _is_demo_folder(folder: Path) -> bool:
    """Whether ``folder`` was made by the demo: its marker, or (demos from before the marker)
    the example stamp that only :func:`build_example` writes."""
    return (folder / DEMO_MARKER).is_file() or (folder / "project" / "qpseg" / "example.json"
                                                ).is_file()


def claim_demo_folder(out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Make ``out`` the demo's folder, refusing one that holds anything the demo did not make.

    The demo replaces ``project/``, ``labels/``, ``model/``, ``evaluation/`` and ``review/``
    inside its folder, so a folder that is neither new, empty nor marked as the demo's own (the
    ``.qpseg-demo`` file written here) is refused with ``OutputError`` unless ``force``.
    """
    from qpseg._io import ensure_writable_dir, write_json_atomic
    from qpseg.errors import OutputError

    folder = Path(out)
    if folder.is_dir() and not force and not _is_demo_folder(folder) and any(folder.iterdir()):
        raise OutputError("is not empty and was not made by `qpseg demo` (no .qpseg-demo file); "
                          "the demo would replace its project/, labels/, model/, evaluation/ and "
                          "review/: choose a new or empty folder, or pass --force", folder)
    ensure_writable_dir(folder)
    if not (folder / DEMO_MARKER).is_file():
        write_json_atomic(folder / DEMO_MARKER, {
            "made_by": "qpseg demo",
            "note": "qpseg demo may replace everything in this folder when it runs again"},
            backup=False)
    return folder



@dataclass
class DemoResult:
    """What the demo measured and where it wrote it."""

    example: Example | None
    out: Path
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds
    scores: list[dict[str, Any]] = field(default_factory=list)  # per slide (role marked)
    objects: dict[str, int] = field(default_factory=dict)  # entry id -> objects written
    paths: dict[str, Path] = field(default_factory=dict)
    review: ReviewRound | None = None  # the simulated review round and its counts



def run_demo(
    out: str | os.PathLike[str],
    *,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    train_callback: Callable[[Any], None] | None = None,
    infer_progress: Callable[[Any], None] | None = None,
) -> DemoResult:
    """Build the example under ``out/project``, run import -> train -> infer -> evaluate, then
    one simulated review round (:func:`run_review_round`, outputs in ``out/review``).

    ``out`` must be new, empty or a previous demo's folder (see :func:`claim_demo_folder`;
    ``force`` lifts that); a previous demo's model and evaluation there are replaced, and the
    example project is reused when it was built with the same settings.
    ``progress(step, info)`` is called as each step starts and ends; ``train_callback`` and
    ``infer_progress`` receive the training and inference events of those commands.
    The review round's counts are in ``DemoResult.review`` (``ok`` says whether they are the
    expected ones); a previous round's export is undone before the example is imported.
    """
    import shutil
    import time

    from qpseg.engine.run import InferenceParams, jobs_from_project, run_inference
    from qpseg.evaluate import evaluate
    from qpseg.manifest import import_project
    from qpseg.training.run import train

    out = claim_demo_folder(out, force=force)
    report = progress or (lambda step, info: None)
    from qpseg.devices import resolve_device

    if resolve_device(device).type == "cpu":
        import torch

        # The demo's 64 px tiles are too small to split across cores: extra OpenMP threads only
        # contend (measured here: 85 ms/step with one thread, 180-290 ms with two on 2 busy cores).
        torch.set_num_threads(1)
    result = DemoResult(example=None, out=out)

    def timed(step: str, fn: Callable[[], Any]) -> Any:
        report(step, {"event": "start"})
        t = time.perf_counter()
        value = fn()
        result.steps[step] = time.perf_counter() - t
        report(step, {"event": "end", "seconds": result.steps[step]})
        return value

    import warnings

    example = timed("example", lambda: build_example(out / "project"))
    undo_review(example.folder)  # train on the example's own annotations, not a reviewed export
    with warnings.catch_warnings():
        # Held-out entries have no annotations on purpose: the notes about them are noise here.
        warnings.filterwarnings("ignore", message=r".*\(test_\d+\.tif\).*no annotation")
        result.example = example
        manifest = timed("import-project",
                         lambda: import_project(example.project, out / "labels", use_paquo=False))
        result.paths["manifest"] = manifest.path or out / "labels" / "manifest.json"

        model_dir = out / "model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        trained = timed("train", lambda: train(result.paths["manifest"], model_dir,
                                               config=DEMO_TRAIN_CONFIG, device=device,
                                               callback=train_callback))
        result.paths["model"] = trained.package or model_dir

        def infer() -> Any:
            jobs, pred_dir = jobs_from_project(example.project)
            params = InferenceParams(device=device, overwrite=True, overlay=True, heatmap=True,
                                     min_area_um2=100.0)
            return run_inference(jobs, result.paths["model"], pred_dir, params,
                                 progress=infer_progress), pred_dir

        run, pred_dir = timed("infer", infer)
        result.paths["predictions"] = pred_dir
        from qpseg.errors import QpsegError

        if run.failed:
            raise QpsegError("inference failed on " + "; ".join(
                f"{r.name}: {r.reason}" for r in run.failed), pred_dir)
        # What QuPath will import must re-read through qpseg's own reader as valid objects.
        from qpseg.qupath.geojson import read_geojson

        for r in run.results:
            objs = read_geojson(r.output)
            bad = [i for i, o in enumerate(objs) if not o.geometry.is_valid]
            if bad:
                raise QpsegError(f"objects {bad[:5]} have invalid geometry", r.output)
            result.objects[str(r.entry_id or r.key)] = len(objs)

        eval_dir = out / "evaluation"
        evaluation = timed("evaluate", lambda: evaluate(
            example.ground_truth, pred_dir, eval_dir, mpp=0.5, eval_mpp=2.0, instances=False))
        result.paths["evaluation"] = eval_dir
        roles = {str(i): "train" for i in example.train_ids} | {
            str(i): "held-out" for i in example.test_ids}
        from qpseg.qupath.project import QuPathProject

        # A per-slide row names its entry, or only its slide: both find the role.
        roles |= {e.image_name: roles[str(e.entry_id)]
                  for e in QuPathProject.load(example.project).entries
                  if e.image_name and str(e.entry_id) in roles}
        by_slide: dict[str, dict[str, Any]] = {}
        for row in evaluation.per_slide_rows():
            key = str(row.get("entry_id") or row["slide"])
            rec = by_slide.setdefault(key, {"slide": row["slide"], "entry_id": key,
                                            "role": roles.get(key, "?")})
            name = str(row["class_name"])
            rec[f"dice_{name}"] = row["dice"]
            rec[f"iou_{name}"] = row["iou"]
        lesions = {str(r["slide"]): r for r in evaluation.lesion_slide_rows()}
        for rec in by_slide.values():
            les = lesions.get(str(rec["slide"]), {})
            for k in ("n_truth", "n_detected", "n_fp", "truth_category", "pred_category"):
                if k in les:
                    rec[f"lesion_{k}"] = les[k]
        result.scores = [by_slide[k] for k in sorted(by_slide, key=lambda k: (len(k), k))]
    result.review = timed("review", lambda: run_review_round(example, pred_dir, out / "review"))
    result.paths["review"] = out / "review"
    return result


def held_out_dice(result: DemoResult, class_name: str = "Tumor") -> float:
    """Mean Dice of ``class_name`` over the held-out slides (the demo's headline score)."""
    import math

    values = [float(r[f"dice_{class_name}"]) for r in result.scores
              if r["role"] == "held-out" and r.get(f"dice_{class_name}") is not None]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")

