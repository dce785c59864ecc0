"""``qpseg demo``: the whole round trip on an embedded example."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("qpseg-demo"), "--out", help="Folder for the example project."),
) -> None:
    """Build an example project, train, infer and evaluate on it (not yet available)."""
    typer.echo(
        "qpseg demo: not yet available in this version. The foundation (project I/O, slide "
        "reading, `import-project`, `info`, `validate`) works; training and inference land next."
    )
