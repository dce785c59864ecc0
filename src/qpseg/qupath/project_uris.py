"""Where a project's image is on this machine: QuPath's rule for resolving an image URI.

The stored path when it exists, else the path relative to a moved project's folder. The URI
forms and path quirks themselves live in :mod:`qpseg.qupath.compat`.
"""

from __future__ import annotations

import os
from pathlib import Path

from qpseg.qupath import compat

__all__ = ["resolve_image_uri"]


def resolve_image_uri(uri: str, project_file: str | os.PathLike[str],
                      project_uri: str | None) -> Path | None:
    """The local file an image URI points at, or None if it cannot be found here.

    QuPath's rule, nothing more: the decoded absolute path if it exists on this machine;
    otherwise, if the project was moved, the image's path relative to the folder the project
    was saved in (``project_uri``, the top-level ``uri``) applied to the folder that holds
    ``project_file`` now. Windows paths are handled on Linux (drive letters, case-insensitive
    components). Non-file URIs (OMERO ``https://``) give None.
    """
    if not isinstance(uri, str):
        return None
    image = compat.file_uri_to_pure_path(uri)
    if image is None:
        return None
    local = compat.to_local_path(image)
    if local is not None and local.is_absolute() and compat.path_exists(local):
        return local
    if not isinstance(project_uri, str):
        return None
    old = compat.file_uri_to_pure_path(project_uri)
    if old is None:
        return None
    # QuPath stores the .qpproj file's URI; a trailing "/" would name the folder itself.
    old_dir = old if project_uri.rstrip().endswith("/") else old.parent
    pf = Path(os.path.abspath(project_file))
    try:
        new_dir = pf if pf.is_dir() else pf.parent
    except (OSError, ValueError):
        return None
    return compat.relocate(image, old_dir, new_dir)
