"""``qpseg demo``: the whole round trip on a generated example project.

Only :func:`build_example` is demo-specific: it writes a small QuPath project of generated H&E-like
slides with sparse "pathologist" annotations (as real users draw them) and the full ground truth.
:func:`run_demo` then calls the same library functions as the real commands:
``import_project`` -> ``train`` -> ``infer`` -> ``evaluate``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CLASSES", "DEMO_MARKER", "DEMO_TRAIN_CONFIG", "DemoResult", "Example",
           "build_example", "claim_demo_folder", "held_out_dice", "run_demo"]

CLASSES = ("Tumor", "Stroma", "Necrosis")
EXAMPLE_VERSION = "1"
#: The file that marks a folder as the demo's own: only there does the demo replace outputs.
DEMO_MARKER = ".qpseg-demo"


@dataclass(frozen=True)
class Example:
    """The generated example: its project, which entries train and which are held out."""

    project: Path  # project.qpproj
    train_ids: tuple[int, ...]
    test_ids: tuple[int, ...]
    ground_truth: Path  # folder of <entryID>.geojson with the full truth (Region* = tissue)

    @property
    def folder(self) -> Path:
        """The project folder."""
        return self.project.parent


def _sparse_annotations(slide: Any, rng: Any) -> list[Any]:
    """What a pathologist would draw: one exhaustive Region*, partial outlines, an Ignore*."""
    from shapely.geometry import Point, box

    from qpseg.qupath.classes import default_color
    from qpseg.qupath.geojson import QuPathObject

    w, h = slide.width, slide.height
    # The Region* box straddles the tissue edge, so it teaches glass and unlabelled tissue as
    # Background (ho2021/khalil2022 train on such exhaustively annotated areas).
    region = box(0.05 * w, 0.05 * h, 0.62 * w, 0.62 * h)
    objs = [QuPathObject(region, classification="Region*", class_color=default_color("Region*"))]
    for r in slide.regions:
        inside = r.geometry.intersection(region)
        if not inside.is_empty and inside.area > 1:
            objs.append(QuPathObject(inside, classification=r.class_name,
                                     class_color=default_color(r.class_name)))
        outside = r.geometry.difference(region)
        if outside.is_empty or rng.random() < 0.3:
            continue  # some regions outside the box are never annotated
        c = outside.representative_point()
        partial = outside.intersection(Point(c.x, c.y).buffer(0.12 * min(w, h)))
        if not partial.is_empty and partial.area > 1:
            objs.append(QuPathObject(partial, classification=r.class_name,
                                     class_color=default_color(r.class_name)))
    # A "pen mark" the pathologist excluded: labels under it are ignored.
    pen = box(0.40 * w, 0.08 * h, 0.46 * w, 0.30 * h)
    objs.append(QuPathObject(pen, classification="Ignore*", class_color=default_color("Ignore*")))
    return objs


def _ground_truth(slide: Any) -> list[Any]:
    from qpseg.qupath.classes import default_color
    from qpseg.qupath.geojson import QuPathObject

    objs = [QuPathObject(slide.tissue, classification="Region*",
                         class_color=default_color("Region*"))]
    objs += [QuPathObject(r.geometry, classification=r.class_name,
                          class_color=default_color(r.class_name)) for r in slide.regions]
    return objs


def build_example(
    folder: str | os.PathLike[str],
    *,
    n_train: int = 3,
    n_test: int = 2,
    size_px: int = 1536,
    mpp: float = 0.5,
    seed: int = 0,
) -> Example:
    """Write (or reuse, when already built with the same settings) the example project.

    Slides are generated pyramidal TIFFs (``folder/slides``); training entries get sparse
    annotations in ``qpseg/annotations/`` (where the export Groovy script puts them), held-out
    entries none; the full ground truth of every entry goes to ``qpseg/ground_truth/``.
    """
    import json

    import numpy as np

    from qpseg._io import write_json_atomic
    from qpseg.qupath.classes import PathClass, default_color
    from qpseg.qupath.geojson import write_geojson
    from qpseg.qupath.images import add_slide
    from qpseg.qupath.project import QuPathProject
    from qpseg.testing.synthetic import make_slide

    folder = Path(folder)
    settings = {"version": EXAMPLE_VERSION, "n_train": n_train, "n_test": n_test,
                "size_px": size_px, "mpp": mpp, "seed": seed}
    stamp = folder / "qpseg" / "example.json"
    if stamp.is_file() and (folder / "project.qpproj").is_file():
        saved = json.loads(stamp.read_text(encoding="utf-8"))
        if saved.get("settings") == settings:
            return Example(folder / "project.qpproj", tuple(saved["train_ids"]),
                           tuple(saved["test_ids"]), folder / "qpseg" / "ground_truth")
    names = [*CLASSES, "Region*", "Ignore*"]
    project = QuPathProject.create(folder, [PathClass(n, default_color(n)) for n in names],
                                   overwrite=True)
    rng = np.random.default_rng(seed)
    train_ids: list[int] = []
    test_ids: list[int] = []
    for i in range(n_train + n_test):
        role = "train" if i < n_train else "test"
        slide = make_slide(folder / "slides" / f"{role}_{i:02d}.tif", width=size_px,
                           height=size_px, mpp=mpp, seed=seed + i)
        entry = add_slide(project, slide.path, entry_metadata={"qpseg_demo_role": role})
        (train_ids if role == "train" else test_ids).append(entry.entry_id)
        write_geojson(folder / "qpseg" / "ground_truth" / f"{entry.entry_id}.geojson",
                      _ground_truth(slide), backup=False)
        if role == "train":
            write_geojson(folder / "qpseg" / "annotations" / f"{entry.entry_id}.geojson",
                          _sparse_annotations(slide, rng), backup=False)
    project.save()
    write_json_atomic(stamp, {"settings": settings, "train_ids": train_ids,
                              "test_ids": test_ids}, backup=False)
    return Example(project.path, tuple(train_ids), tuple(test_ids),
                   folder / "qpseg" / "ground_truth")


def _is_demo_folder(folder: Path) -> bool:
    """Whether ``folder`` was made by the demo: its marker, or (demos from before the marker)
    the example stamp that only :func:`build_example` writes."""
    return (folder / DEMO_MARKER).is_file() or (folder / "project" / "qpseg" / "example.json"
                                                ).is_file()


def claim_demo_folder(out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Make ``out`` the demo's folder, refusing one that holds anything the demo did not make.

    The demo replaces ``project/``, ``labels/``, ``model/`` and ``evaluation/`` inside its
    folder, so a folder that is neither new, empty nor marked as the demo's own (the
    ``.qpseg-demo`` file written here) is refused with ``OutputError`` unless ``force``.
    """
    from qpseg._io import ensure_writable_dir, write_json_atomic
    from qpseg.errors import OutputError

    folder = Path(out)
    if folder.is_dir() and not force and not _is_demo_folder(folder) and any(folder.iterdir()):
        raise OutputError("is not empty and was not made by `qpseg demo` (no .qpseg-demo file); "
                          "the demo would replace its project/, labels/, model/ and evaluation/: "
                          "choose a new or empty folder, or pass --force", folder)
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


#: The demo's fixed training budget (examples/configs/tiny_unet_demo.yaml holds the same
#: settings as a file; a test keeps the two equal). tiny_unet at 2 µm/px on 64 px tiles.
DEMO_TRAIN_CONFIG: dict[str, Any] = {
    "model": "tiny_unet",
    "model_kwargs": {"tile_px": 64, "base_filters": 8, "depth": 3},
    "data": {"mpp": 2.0, "stride_px": 32, "min_labelled": 0.05},
    "split": {"val": 0.25, "test": 0.0},
    "sampler": {"name": "uniform"},
    "augment": {"preset": "none", "rot90": True, "hflip": True, "vflip": True},
    "loss": {"name": "ce"},
    "optimizer": {"name": "adam", "lr": 3.0e-3},
    "train": {"batch_size": 8, "epochs": 10, "steps": 150, "log_every": 10,
              "checkpoint_every": 50},
}

Progress = Callable[[str, dict[str, Any]], None]


def run_demo(
    out: str | os.PathLike[str],
    *,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    train_callback: Callable[[Any], None] | None = None,
    infer_progress: Callable[[Any], None] | None = None,
) -> DemoResult:
    """Build the example under ``out/project`` and run import -> train -> infer -> evaluate.

    ``out`` must be new, empty or a previous demo's folder (see :func:`claim_demo_folder`;
    ``force`` lifts that); a previous demo's model and evaluation there are replaced, and the
    example project is reused when it was built with the same settings.
    ``progress(step, info)`` is called as each step starts and ends; ``train_callback`` and
    ``infer_progress`` receive the training and inference events of those commands.
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
    return result


def held_out_dice(result: DemoResult, class_name: str = "Tumor") -> float:
    """Mean Dice of ``class_name`` over the held-out slides (the demo's headline score)."""
    import math

    values = [float(r[f"dice_{class_name}"]) for r in result.scores
              if r["role"] == "held-out" and r.get(f"dice_{class_name}") is not None]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")
