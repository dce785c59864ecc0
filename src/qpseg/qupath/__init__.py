"""Everything QuPath-specific, in pure Python: projects, classes, (GeoJSON in ``geojson``)."""

from __future__ import annotations

from qpseg.qupath.classes import (
    DEFAULT_CLASSES,
    PathClass,
    argb_to_rgb,
    default_classes,
    default_color,
    read_classes,
    rgb_to_argb,
    write_classes,
)
from qpseg.qupath.compat import QuPathVersion, parse_version
from qpseg.qupath.project import (
    ImageMetadata,
    ProjectEntry,
    QuPathProject,
    ServerBuilder,
    read_project,
    resolve_image_uri,
)

__all__ = [
    "DEFAULT_CLASSES",
    "ImageMetadata",
    "PathClass",
    "ProjectEntry",
    "QuPathProject",
    "QuPathVersion",
    "ServerBuilder",
    "argb_to_rgb",
    "default_classes",
    "default_color",
    "parse_version",
    "read_classes",
    "read_project",
    "resolve_image_uri",
    "rgb_to_argb",
    "write_classes",
]
