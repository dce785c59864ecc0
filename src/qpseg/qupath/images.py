"""Glue between the slide reader and projects: describe an opened slide the way QuPath does."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from qpseg.qupath.bioformats import bioformats_layout
from qpseg.qupath.project import ImageMetadata, ProjectEntry, QuPathProject

if TYPE_CHECKING:
    from qpseg.slide import Slide

__all__ = ["add_slide", "image_metadata"]


def image_metadata(slide: Slide) -> ImageMetadata:
    """QuPath's record of an image (size, pyramid, pixel size) from an opened slide.

    Sizes are QuPath's (bounds-cropped for OpenSlide slides with bounds). The pixel size is
    the slide's own or the ``mpp`` it was opened with; uncalibrated images are written in
    pixels, as QuPath does.
    """
    width, height = slide.qupath_dimensions
    levels = [
        (float(ds), max(1, round(width / ds)), max(1, round(height / ds)))
        for ds in slide.level_downsamples
    ]
    mpp_x = mpp_y = None
    if slide.has_mpp:
        mpp_x, mpp_y = slide.mpp_x, slide.mpp_y
    if slide.backend == "openslide":
        tw = int(slide.properties.get("openslide.level[0].tile-width", 256) or 256)
        th = int(slide.properties.get("openslide.level[0].tile-height", 256) or 256)
        return ImageMetadata(
            width=int(width), height=int(height), levels=levels, mpp_x=mpp_x, mpp_y=mpp_y,
            tile_width=tw, tile_height=th, provider="openslide",
            magnification=slide.magnification,
        )
    # Anything else goes to QuPath's Bio-Formats reader (ImageJ's would load it whole), with
    # metadata only where qpseg knows what Bio-Formats reports for the file.
    layout = bioformats_layout(slide.path, int(width), int(height))
    tw, th = layout.tile if layout is not None else (512, 512)
    return ImageMetadata(
        width=int(width), height=int(height), levels=levels, mpp_x=mpp_x, mpp_y=mpp_y,
        tile_width=tw, tile_height=th, provider="bioformats", magnification=slide.magnification,
        pixel_type=layout.pixel_type if layout is not None else "UINT8",
        channels=layout.channels if layout is not None else None, store=layout is not None,
    )


def add_slide(
    project: QuPathProject,
    path: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    image_name: str | None = None,
    entry_metadata: Mapping[str, str] | None = None,
) -> ProjectEntry:
    """Open a slide and add it to ``project`` (call ``project.save()`` afterwards)."""
    from qpseg.slide import open_slide

    with open_slide(path, mpp=mpp) as slide:
        meta = image_metadata(slide)
    return project.add_image(path, meta, image_name=image_name, entry_metadata=entry_metadata)
