"""Generated QuPath projects: synthetic slides + project.qpproj + annotation GeoJSON.

The annotations are the slides' exact ground truth (one annotation per class region), so
whatever qpseg derives from them has a known answer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qpseg.testing.synthetic import SyntheticSlide, make_slide

__all__ = ["SyntheticProject", "make_project"]


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
