"""``qpseg info``: what a QuPath project holds and whether its images can be found."""

from __future__ import annotations

from pathlib import Path

import typer


def info(
    project: Path = typer.Argument(..., help="project.qpproj (or the folder holding it)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    open_slides: bool = typer.Option(
        False, "--open-slides", help="Open every found image to read its pixel size and size."
    ),
) -> int:
    """List a project's entries: id, name, resolved image path, found/missing, pixel size.

    The pixel size is the one set in QuPath; with --open-slides, the one every command uses
    (the slide's own, else QuPath's).
    """
    from qpseg.cli._common import print_json
    from qpseg.errors import QpsegError
    from qpseg.qupath.project import QuPathProject

    qp = QuPathProject.load(project)
    rows = []
    for e in qp.entries:
        mpp, dims, problem = e.mpp, e.dimensions, None
        source = "project" if mpp is not None else None
        if open_slides and e.image_found and e.image_path is not None:
            from qpseg.slide import open_slide

            try:
                with open_slide(e.image_path) as s:
                    dims = s.qupath_dimensions
                    chosen = s.choose_mpp(e.mpp_xy)
                    mpp, source = chosen.mpp, chosen.source
                    problem = "; ".join(chosen.notes) or None
            except QpsegError as exc:
                mpp, source, problem = None, None, exc.message
        rows.append({
            "id": e.entry_id,
            "name": e.image_name,
            "image": str(e.image_path or e.uri_path or e.uri),
            "found": e.image_found,
            "mpp": mpp,
            "mpp_source": source,
            "width": dims[0] if dims else None,
            "height": dims[1] if dims else None,
            "provider": e.provider,
            "problem": problem,
        })
    n_missing = sum(not r["found"] for r in rows)
    if as_json:
        print_json({
            "project": str(qp.path),
            "version": qp.version,
            "classes": [{"name": c.name, "color": list(c.color)} for c in qp.classes],
            "entries": rows,
            "missing": n_missing,
        })
        return 0
    typer.echo(f"{qp.path}: QuPath {qp.version or '?'}, {len(rows)} entries, "
               f"{n_missing} image(s) missing, {len(qp.classes)} classes")
    # Plain columns (no wrapping) so the listing stays greppable in logs and pipes.
    width = max([len(str(r["name"])) for r in rows] + [4])
    typer.echo(f"{'id':>5}  {'found':7}  {'mpp':>8}  {'size':>13}  {'name':{width}}  image")
    for r in rows:
        size = f"{r['width']}x{r['height']}" if r["width"] else "?"
        mpp_text = f"{r['mpp']:.4g}" if r["mpp"] else "?"
        found = "yes" if r["found"] else "missing"
        line = f"{r['id']!s:>5}  {found:7}  {mpp_text:>8}  {size:>13}  {r['name']!s:{width}}  "
        typer.echo(line + str(r["image"]) + (f"  ({r['problem']})" if r["problem"] else ""))
    return 0
