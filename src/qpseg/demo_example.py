"""The demo's example project: generated H&E-like slides in a QuPath project, with sparse
"pathologist" annotations on the training slides and the full ground truth of every slide.

:func:`build_example` writes it; :data:`DEMO_TRAIN_CONFIG` is the short training recipe the demo
(``qpseg.demo``) and its review rounds (``qpseg.demo_rounds``) train on it with.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CLASSES", "DEMO_TRAIN_CONFIG", "Example", "Progress", "build_example"]

CLASSES = ("Tumor", "Stroma", "Necrosis")
EXAMPLE_VERSION = "1"


@dataclass(frozen=True)
class Example:
    """The generated example: its project, which entries train and which are held out."""

    project: Path  # project.qpproj
    train_ids: tuple[int, ...]
    test_ids: tuple[int, ...]
    ground_truth: Path  # folder of <entryID>.geojson with the full truth (Region* = tissue)
    pool_ids: tuple[int, ...] = ()  # unannotated slides the review rounds draw from

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
    n_pool: int = 0,
) -> Example:
    """Write (or reuse, when already built with the same settings) the example project.

    Slides are generated pyramidal TIFFs (``folder/slides``); training entries get sparse
    annotations in ``qpseg/annotations/`` (where the export Groovy script puts them), held-out
    entries none; the full ground truth of every entry goes to ``qpseg/ground_truth/``.
    ``n_pool`` more slides (entry metadata ``qpseg_demo_role: pool``, no annotations) are
    what the review rounds of :func:`run_rounds` draw from.
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
    settings: dict[str, Any] = {"version": EXAMPLE_VERSION, "n_train": n_train,
                                "n_test": n_test, "size_px": size_px, "mpp": mpp, "seed": seed}
    if n_pool:
        settings["n_pool"] = n_pool
    stamp = folder / "qpseg" / "example.json"
    if stamp.is_file() and (folder / "project.qpproj").is_file():
        saved = json.loads(stamp.read_text(encoding="utf-8"))
        if saved.get("settings") == settings:
            return Example(folder / "project.qpproj", tuple(saved["train_ids"]),
                           tuple(saved["test_ids"]), folder / "qpseg" / "ground_truth",
                           tuple(saved.get("pool_ids", ())))
    names = [*CLASSES, "Region*", "Ignore*"]
    project = QuPathProject.create(folder, [PathClass(n, default_color(n)) for n in names],
                                   overwrite=True)
    rng = np.random.default_rng(seed)
    ids: dict[str, list[int]] = {"train": [], "test": [], "pool": []}
    train_ids, test_ids = ids["train"], ids["test"]
    for i in range(n_train + n_test + n_pool):
        role = "train" if i < n_train else "test" if i < n_train + n_test else "pool"
        slide = make_slide(folder / "slides" / f"{role}_{i:02d}.tif", width=size_px,
                           height=size_px, mpp=mpp, seed=seed + i)
        entry = add_slide(project, slide.path, entry_metadata={"qpseg_demo_role": role})
        ids[role].append(entry.entry_id)
        write_geojson(folder / "qpseg" / "ground_truth" / f"{entry.entry_id}.geojson",
                      _ground_truth(slide), backup=False)
        if role == "train":
            write_geojson(folder / "qpseg" / "annotations" / f"{entry.entry_id}.geojson",
                          _sparse_annotations(slide, rng), backup=False)
    project.save()
    write_json_atomic(stamp, {"settings": settings, "train_ids": train_ids,
                              "test_ids": test_ids, "pool_ids": ids["pool"]}, backup=False)
    return Example(project.path, tuple(train_ids), tuple(test_ids),
                   folder / "qpseg" / "ground_truth", tuple(ids["pool"]))


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

