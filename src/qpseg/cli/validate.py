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
    from qpseg.cli._common import console, print_json
    from qpseg.validation import validate_paths

    reports = validate_paths(paths)
    if as_json:
        print_json([r.to_json() for r in reports])
    else:
        out = console()
        for r in reports:
            mark = "[green]ok[/]" if r.ok else "[red]FAILED[/]"
            out.print(f"{mark} {r.path} ({r.kind}): {r.summary}")
            for p in r.problems[:50]:
                out.print(f"    {p}")
            if len(r.problems) > 50:
                out.print(f"    ... and {len(r.problems) - 50} more problem(s)")
    return 0 if all(r.ok for r in reports) else 1
