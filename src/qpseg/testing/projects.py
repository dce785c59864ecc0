"""Generated QuPath projects: synthetic slides + project.qpproj + annotation GeoJSON.

The annotations are the slides' exact ground truth (one annotation per class region), so
whatever qpseg derives from them has a known answer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qpseg.testing.synthetic import SyntheticSlide, make_slide

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from qpseg.qupath.geojson import QuPathObject

__all__ = ["SyntheticProject", "make_project", "qupath_exported", "qupath_round",
           "write_ai_predictions"]


@dataclass(frozen=True)
class SyntheticProject:
    """A generated project and the ground truth of each of its entries."""

    path: Path  # project.qpproj
    slides: tuple[SyntheticSlide, ...]
    entry_ids: tuple[int, ...]
    annotation_files: tuple[Path, ...]

    @property
    def folder(self) -> Path:
        """The project folder."""
        return self.path.parent


def make_project(
    folder: str | os.PathLike[str],
    *,
    n_slides: int = 2,
    width: int = 1024,
    height: int = 1024,
    mpp: float = 0.5,
    seed: int = 0,
    classes: Sequence[str] = ("Tumor", "Stroma", "Necrosis"),
    levels: Sequence[float] | None = None,
    annotations: bool = True,
) -> SyntheticProject:
    """Write slides to ``folder/slides``, a QuPath project in ``folder``, and annotations.

    Annotations go to ``folder/qpseg/annotations/<entryID>.geojson`` (where
    ``groovy/export_annotations.groovy`` puts them), one classified annotation per ground-truth
    region. Slide ``i`` uses seed ``seed + i``.
    """
    from qpseg.qupath.classes import PathClass, default_color
    from qpseg.qupath.geojson import QuPathObject, write_geojson
    from qpseg.qupath.images import add_slide
    from qpseg.qupath.project import QuPathProject

    folder = Path(folder)
    path_classes = [PathClass(c, default_color(c)) for c in classes]
    project = QuPathProject.create(folder, path_classes)
    colors = {pc.name: pc.color for pc in path_classes}
    slides, ids, files = [], [], []
    for i in range(n_slides):
        slide = make_slide(folder / "slides" / f"slide_{i:02d}.tif", width=width, height=height,
                           mpp=mpp, levels=levels, seed=seed + i)
        entry = add_slide(project, slide.path)
        slides.append(slide)
        ids.append(entry.entry_id)
        if annotations:
            objs = [
                QuPathObject(geometry=r.geometry, object_type="annotation",
                             classification=r.class_name, class_color=colors.get(r.class_name))
                for r in slide.regions
            ]
            target = folder / "qpseg" / "annotations" / f"{entry.entry_id}.geojson"
            write_geojson(target, objs)
            files.append(target)
    project.save()
    return SyntheticProject(project.path, tuple(slides), tuple(ids), tuple(files))


def qupath_round(geometry: BaseGeometry) -> BaseGeometry:
    """``geometry`` as QuPath gives it back after an import and an export: vertices stored as
    32-bit floats (``GeometryTools.java`` lines 100-103, v0.5.1: ``FLOAT_FACTORY``), GeoJSON
    written with 2 decimals (``ROITypeAdapters.java`` line 74, v0.5.1: ``numDecimalPlaces = 2``).
    """
    import numpy as np
    import shapely

    return shapely.transform(
        geometry, lambda c: np.round(c.astype(np.float32).astype(np.float64), 2))


def qupath_exported(
    obj: QuPathObject,
    *,
    geometry: BaseGeometry | None = None,
    classification: str | None = None,
    locked: bool | None = None,
) -> QuPathObject:
    """``obj`` as QuPath's GeoJSON export writes it after a review in QuPath.

    QuPath keeps the object's id, metadata, measurements, name and type through import,
    editing and export; coordinates come back as :func:`qupath_round` makes them. A reviewer's
    edits are given here: a new ``geometry`` (reshaped), a new ``classification`` (its class
    colour becomes QuPath's colour for that class) and ``locked`` (QuPath writes
    ``"isLocked": true`` only for locked objects, ``QuPathTypeAdapters.java`` lines 387-391,
    v0.5.1).
    """
    import dataclasses

    from qpseg.qupath.classes import default_color

    changes: dict[str, object] = {
        "geometry": qupath_round(geometry if geometry is not None else obj.geometry)}
    if obj.nucleus_geometry is not None:
        changes["nucleus_geometry"] = qupath_round(obj.nucleus_geometry)
    if classification is not None and classification != obj.classification:
        changes["classification"] = classification
        changes["class_color"] = default_color(classification)
    if locked is not None:
        changes["is_locked"] = locked
    return dataclasses.replace(obj, **changes)  # type: ignore[arg-type]


def write_ai_predictions(
    project_dir: str | os.PathLike[str],
    entry_id: int,
    objects: Sequence[QuPathObject],
    *,
    model: str = "tiny_unet",
    model_sha256: str = "cd" * 32,
    run: str = "20250101T000000Z",
) -> list[QuPathObject]:
    """Write ``objects`` as ``qpseg infer`` writes predictions for an entry
    (``<project>/qpseg/predictions/<entryID>.geojson``): each with a fresh id and the
    provenance metadata of ``model`` (SHA-256 ``model_sha256``). Returns the objects written."""
    import dataclasses
    import uuid

    from qpseg.objects import predictions_path, provenance, write_predictions

    prov = provenance(model, model_sha256, mpp=2.0, run=run)
    out = [dataclasses.replace(o, id=str(uuid.uuid4()), metadata=dict(prov)) for o in objects]
    write_predictions(predictions_path(project_dir, entry_id), out, overwrite=True)
    return out
