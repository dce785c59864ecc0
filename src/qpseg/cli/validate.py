"""``qpseg validate``: check QuPath GeoJSON files and projects before importing them."""

from __future__ import annotations

from pathlib import Path

import typer


def validate(
    paths: list[Path] = typer.Argument(..., help="GeoJSON files, .qpproj files or folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> int:
    """Report object counts per type and class and every problem (with its feature index).

    Exits 1 when any file cannot be read or has a problem: a feature skipped (unreadable,
    NaN/infinite or out-of-range coordinates), an empty or wrong-type geometry, an invalid
    outline (self-intersection, hole outside its shell: qpseg would have to guess what was
    drawn), a non-numeric measurement, a duplicate object id. Warnings are listed and keep
    exit 0: NaN measurements (QuPath's own "no value"), classes without a colour, unknown
    object types and ignored properties, images of a project not found on this machine.
    """
    from qpseg.cli._common import print_json
    from qpseg.validation import validate_paths

    reports = validate_paths(paths)
    if as_json:
        print_json([r.to_json() for r in reports])
    else:
        for r in reports:
            typer.echo(f"{'ok' if r.ok else 'FAILED'} {r.path} ({r.kind}): {r.summary}")
            for p in r.problems[:50]:
                typer.echo(f"    {p if p.startswith('error:') else 'error: ' + p}")
            for p in r.warnings[:10]:
                typer.echo(f"    {p if p.startswith('note:') else 'warning: ' + p}")
            hidden = max(0, len(r.problems) - 50) + max(0, len(r.warnings) - 10)
            if hidden:
                typer.echo(f"    ... and {hidden} more (use --json for all)")
    return 0 if all(r.ok for r in reports) else 1
