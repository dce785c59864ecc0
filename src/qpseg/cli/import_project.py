"""``qpseg import-project``: a QuPath project and its annotations -> training manifest."""

from __future__ import annotations

from pathlib import Path

import typer


def import_project(
    project: Path = typer.Argument(..., help="project.qpproj (or the folder holding it)."),
    out: Path = typer.Option(..., "--out", help="Folder for manifest.json."),
    geojson_dir: Path | None = typer.Option(
        None, "--geojson-dir",
        help="Annotation GeoJSON files named <entryID>.geojson or <imageName>.geojson "
             "(default: <project>/qpseg/annotations).",
    ),
    classes: str | None = typer.Option(
        None, "--classes", help="Comma-separated label classes in index order (default: all found)."
    ),
    mpp: float | None = typer.Option(
        None, "--mpp", help="Pixel size in µm/px for slides that have none (neither in the slide "
                            "nor set in QuPath)."
    ),
    mpp_override: bool = typer.Option(
        False, "--mpp-override", help="Let --mpp replace every slide's own pixel size (each "
                                      "change is printed as old -> new)."
    ),
    ai_objects: str = typer.Option(
        "unreviewed-out", "--ai-objects",
        help="Which objects qpseg wrote count as annotations: unreviewed-out (all but those "
             "left unchanged and unlocked in the review), all-out (none) or all-in (all).",
    ),
    no_paquo: bool = typer.Option(False, "--no-paquo", help="Never use paquo/QuPath."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
) -> int:
    """Write OUT/manifest.json: per entry the slide, mpp, size and labelled areas per class.

    Ignore* and unclassified annotations are excluded, Region* marks labelled area, and pixels
    outside every labelled annotation are ignored (index 255) rather than background.
    Pixel size: the slide's own, else the one set in QuPath, else --mpp.
    Exits 1 when some entries failed (they stay in the manifest with their reason).
    """
    import sys

    from qpseg.cli._common import console, print_json
    from qpseg.cli._progress import StepProgress
    from qpseg.manifest import import_project as run_import

    class_list = [c for c in classes.split(",")] if classes else None
    with StepProgress("reading entries") as progress:
        manifest = run_import(project, out, geojson_dir=geojson_dir, classes=class_list,
                              mpp=mpp, mpp_override=mpp_override,
                              use_paquo=False if no_paquo else None, ai_objects=ai_objects,
                              progress=progress)
    failed = manifest.failed_entries
    for e, old, new in manifest.mpp_changes:
        # stderr, so --json output stays one JSON document
        print(f"pixel size replaced: entry {e.entry_id} ({e.image_name}): {old:g} -> {new:g} "
              "µm/px (--mpp-override)", file=sys.stderr)
    if as_json:
        print_json(manifest.to_json())
        return 1 if failed else 0
    from rich.table import Table

    c = console()
    table = Table(title=f"{len(manifest.usable_entries)}/{len(manifest.entries)} entries usable")
    table.add_column("id")
    table.add_column("image")
    table.add_column("status")
    table.add_column("mpp")
    for name in manifest.class_map.names:
        table.add_column(f"{name} µm²", justify="right")
    for e in manifest.entries:
        areas = [
            f"{e.classes[n].area_um2:,.0f}" if n in e.classes and e.classes[n].area_um2 else ""
            for n in manifest.class_map.names
        ]
        status = e.status if e.status == "ok" else f"[red]{e.status}[/]: {e.problem}"
        table.add_row(str(e.entry_id), e.image_name, status,
                      f"{e.mpp:.4g}" if e.mpp else "?", *areas)
    c.print(table)
    for line in manifest.review.lines():
        c.print(line, highlight=False)
    c.print(f"manifest: {manifest.path}")
    return 1 if failed else 0
