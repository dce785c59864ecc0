"""Everything QuPath-specific, in pure Python: projects, classes, (GeoJSON in ``geojson``).

The names below are loaded on first use (PEP 562): importing this package, or any of its
modules, loads nothing else, and no module here imports the package back.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# name -> the module it is imported from
_EXPORTS: dict[str, str] = {
    "DEFAULT_CLASSES": "classes",
    "PathClass": "classes",
    "argb_to_rgb": "classes",
    "default_classes": "classes",
    "default_color": "classes",
    "read_classes": "classes",
    "rgb_to_argb": "classes",
    "write_classes": "classes",
    "QuPathVersion": "compat",
    "parse_version": "compat",
    "ImageMetadata": "project",
    "ProjectEntry": "project",
    "QuPathProject": "project",
    "ServerBuilder": "project",
    "read_project": "project",
    "resolve_image_uri": "project",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qpseg.qupath' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qpseg.qupath.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
