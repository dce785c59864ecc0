"""``qpseg project create|add|relink``: QuPath projects for real slides, from the command line.

The work is done by :mod:`qpseg.qupath.project_edit`; this module only prints what happened.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from qpseg.qupath.project_edit import AddResult

__all__ = ["app"]

app = typer.Typer(
    name="project",
    help="Create QuPath projects, add slides to them, relink images that moved.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _reader(provider: str | None) -> str:
    return {"openslide": "OpenSlide", "bioformats": "Bio-Formats"}.get(provider or "",
                                                                         provider or "?")


def _print_added(results: list[AddResult]) -> None:
    for r in results:
        if r.status == "added" and r.entry is not None:
            e = r.entry
            mpp = e.mpp
            cal = f"{mpp:.4g} µm/px" if mpp is not None else "no pixel size"
            if e.dimensions is None:
                cal = "layout read by QuPath"
            typer.echo(f"added: entry {e.entry_id}: {r.path} ({_reader(e.provider)}, {cal})")
        else:
            typer.echo(f"skipped: {r.path}: {r.reason}")


@app.command("create")
def create(
    folder: Path = typer.Argument(..., help="Folder for the new project (new or empty)."),
    slides: list[Path] | None = typer.Argument(None, help="Slides or images to add."),
) -> int:
    """Create a QuPath project (QuPath 0.5/0.6 format) in an empty folder, with slides.

    OpenSlide formats get QuPath's OpenSlide reader, everything else Bio-Formats. Every slide
    is opened first: if one cannot be, nothing is created. Pixel sizes are the slides' own;
    a slide without one is added uncalibrated and the command says so.
    """
    from qpseg.qupath.project_edit import create_project

    project, results = create_project(folder, slides or [])
    _print_added(results)
    typer.echo(f"created: {project.path} ({len(project.entries)} image(s))")
    return 0


@app.command("add")
def add(
    project: Path = typer.Argument(..., help="project.qpproj (or the folder holding it)."),
    slides: list[Path] = typer.Argument(..., help="Slides or images to add."),
) -> int:
    """Add slides to a QuPath project; existing entries are left as they are.

    A slide already in the project (same file) is skipped. Every slide is opened first: if one
    cannot be, the project is not changed. The previous project file is kept as
    project.qpproj.backup.
    """
    from qpseg.qupath.project import QuPathProject
    from qpseg.qupath.project_edit import add_slides

    qp = QuPathProject.load(project)
    results = add_slides(qp, slides)
    _print_added(results)
    n = sum(r.status == "added" for r in results)
    typer.echo(f"{qp.path}: {n} image(s) added" + ("" if n else ", nothing written"))
    return 0


@app.command("relink")
def relink(
    project: Path = typer.Argument(..., help="project.qpproj (or the folder holding it)."),
    search: Path = typer.Option(..., "--search", help="Folder to search (with subfolders) "
                                "for the missing images, by file name."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report only; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of lines."),
) -> int:
    """Point a project's entries at images that moved (another machine, drive or folder).

    Each entry whose image is missing is looked up by file name under --search; among files of
    the same name the one with the image size the project records is chosen. Reader, args and
    metadata are kept; only the image URIs change. The project is written atomically (the
    previous file kept as project.qpproj.backup). Exit code 1 when images remain missing.
    """
    from qpseg.cli._common import print_json
    from qpseg.errors import MissingImageWarning
    from qpseg.qupath.project import QuPathProject
    from qpseg.qupath.project_edit import relink_project

    with warnings.catch_warnings():
        # Missing images are what this command is for: it reports each one below.
        warnings.simplefilter("ignore", MissingImageWarning)
        qp = QuPathProject.load(project)
    report = relink_project(qp, search, dry_run=dry_run)
    if as_json:
        print_json({
            "project": str(report.project),
            "search": str(report.search),
            "written": report.written,
            "missing": report.missing,
            "entries": [{"id": r.entry_id, "name": r.image_name, "status": r.status,
                         "uri": r.uri, "path": str(r.path) if r.path else None,
                         "candidates": [str(c) for c in r.candidates], "note": r.note}
                        for r in report.results],
        })
        return 1 if report.missing else 0
    for r in report.results:
        where = f" -> {r.path}" if r.path is not None and r.status != "ok" else ""
        note = f" ({r.note})" if r.note else ""
        typer.echo(f"{r.status}: entry {r.entry_id} {r.image_name}{where}{note}")
    counts = ", ".join(f"{report.count(s)} {s}" for s in
                       ("ok", "moved", "relinked", "not found", "ambiguous", "wrong size",
                        "remote") if report.count(s))
    if report.written:
        done = "written; the previous version is project.qpproj.backup"
    else:
        done = "dry run, nothing written" if dry_run else "nothing to write"
    typer.echo(f"{report.project}: {counts or 'no entries'} ({done})")
    return 1 if report.missing else 0
