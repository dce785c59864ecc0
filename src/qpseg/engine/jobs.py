"""What an inference run works through: slide files, folders of slides or a QuPath project's
entries turned into :class:`SlideJob` s (one per slide, each naming its output GeoJSON), and
the output folder (:func:`check_output_dir`: created, proven writable, never a project's
annotation export folder).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qpseg.errors import ConfigError, OutputError

#: File suffixes ``jobs_from_paths`` takes from a folder (single files of any type are tried).
SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".dcm", ".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class SlideJob:
    """One slide to run: ``key`` names its outputs (``<out>/<key>.geojson``).

    ``error`` marks a job that fails before running (e.g. the project's image was not found);
    ``mpp`` is the QuPath entry's calibration (µm/px), used when the slide itself has none.
    """

    key: str
    slide: Path | None
    name: str
    output: Path
    entry_id: int | None = None
    error: str | None = None
    mpp: float | None = None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def jobs_from_paths(paths: Sequence[str | os.PathLike[str]],
                    out_dir: str | os.PathLike[str]) -> list[SlideJob]:
    """Jobs for slide files and folders of slides (not recursive), output ``<out>/<stem>``.

    Raises ConfigError for a missing path, an empty folder, or two slides with the same stem.
    """
    out = Path(out_dir)
    files: list[Path] = []
    for p in (Path(os.fsdecode(x)) for x in paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file()
                           and f.suffix.lower() in SLIDE_SUFFIXES and not f.name.startswith("."))
            if not found:
                raise ConfigError(f"no slides ({', '.join(SLIDE_SUFFIXES)}) in folder", p)
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise ConfigError("no such slide or folder", p)
    seen: dict[str, Path] = {}
    jobs = []
    for f in files:
        key = _stem(f)
        if key in seen:
            raise ConfigError(f"two slides would write {key}.geojson ({seen[key].name} and "
                              f"{f.name}); run them into different --out folders", f)
        seen[key] = f
        jobs.append(SlideJob(key=key, slide=f, name=f.name, output=out / f"{key}.geojson"))
    return jobs


def is_project_path(path: str | os.PathLike[str]) -> bool:
    """True for a ``.qpproj`` file (or backup) or a folder holding ``project.qpproj``."""
    p = Path(path)
    if p.is_dir():
        return (p / "project.qpproj").is_file()
    return p.name.endswith((".qpproj", ".qpproj.backup"))


def project_output_dir(project: str | os.PathLike[str]) -> Path:
    """``<project folder>/qpseg/predictions``."""
    p = Path(project)
    folder = p if p.is_dir() else p.parent
    return folder / "qpseg" / "predictions"


def check_output_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create the output folder and prove it writable (:func:`qpseg._io.ensure_writable_dir`);
    returns it.

    OutputError when it is not a folder, cannot be written, or lies inside a project's
    annotation export folder ``<project>/qpseg/annotations`` (groovy/export_annotations.groovy,
    line 38: ``buildFilePath(PROJECT_BASE_DIR, 'qpseg', 'annotations')``): predictions are
    named ``<entryID>.geojson`` like the exported annotations and would replace them. The
    check follows links, so a link to that folder is refused too.
    """
    from qpseg._io import ensure_writable_dir

    out = Path(out_dir)
    resolved = out.resolve()
    for folder in (resolved, *resolved.parents):
        if folder.name.casefold() == "annotations" and \
                folder.parent.name.casefold() == "qpseg":
            raise OutputError(
                f"is inside {folder}, a QuPath project's annotation export folder (the "
                "pathologist's annotations, <entryID>.geojson); predictions never go there - "
                "leave out --out (<project>/qpseg/predictions) or choose another folder", out)
    return ensure_writable_dir(out)


def jobs_from_project(project: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None
                      = None, entries: Sequence[str] | None = None) -> tuple[list[SlideJob],
                                                                            Path]:
    """Jobs for a QuPath project's entries (``entries``: IDs or image names; default all).

    Output: ``<out>/<entryID>.geojson`` with ``out`` defaulting to
    ``<project>/qpseg/predictions``. Entries whose image is missing become failing jobs.
    Returns ``(jobs, out_dir)``.
    """
    from qpseg.qupath.project import QuPathProject

    proj = QuPathProject.load(project)
    out = Path(out_dir) if out_dir is not None else project_output_dir(proj.path)
    selected = list(proj.entries)
    if entries:
        wanted = [e.strip() for e in entries if e.strip()]
        by_id = {str(e.entry_id): e for e in proj.entries}
        by_name = {e.image_name: e for e in proj.entries}
        picked, unknown = [], []
        for w in wanted:
            e = by_id.get(w) or by_name.get(w)
            if e is None:
                unknown.append(w)
            elif e not in picked:
                picked.append(e)
        if unknown:
            raise ConfigError(f"--entries: no entry with ID or image name "
                              f"{', '.join(repr(u) for u in unknown[:5])}", proj.path)
        selected = picked
    jobs = []
    for e in selected:
        err = None
        if e.image_path is None:
            err = (f"image not found ({e.uri})" if not e.is_remote
                   else f"remote image cannot be read ({e.uri})")
        jobs.append(SlideJob(key=str(e.entry_id), slide=e.image_path, name=e.image_name,
                             output=out / f"{e.entry_id}.geojson", entry_id=e.entry_id,
                             error=err, mpp=e.mpp))
    return jobs, out
