"""``qpseg validate``: check QuPath GeoJSON files and projects before importing them."""

from __future__ import annotations

from pathlib import Path

import typer


def validate(
    paths: list[Path] = typer.Argument(..., help="GeoJSON files, .qpproj files or folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> int:
    """Report object counts per type and class and every problem (with its feature index).

    Exits non-zero when a file cannot be read or holds invalid objects.
    """
    from qpseg.cli._common import print_json
    from qpseg.validation import validate_paths

    reports = validate_paths(paths)
    if as_json:
        print_json([r.to_json() for r in reports])
    else:
        for r in reports:
            typer.echo(f"{'ok' if r.ok else 'FAILED'} {r.path} ({r.kind}): {r.summary}")
            errors = [p for p in r.problems if not p.startswith("note:")]
            notes = [p for p in r.problems if p.startswith("note:")]
            for p in errors[:50] + notes[:3]:
                typer.echo(f"    {p}")
            hidden = max(0, len(errors) - 50) + max(0, len(notes) - 3)
            if hidden:
                typer.echo(f"    ... and {hidden} more (use --json for all)")
    return 0 if all(r.ok for r in reports) else 1
