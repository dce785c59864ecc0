"""``qpseg groovy``: write the QuPath scripts that ship inside the package.

The scripts move annotations out of QuPath (``export_annotations.groovy``) and predictions in
(``import_predictions.groovy``). Their home in the repository is the top-level ``groovy/``
folder; ``src/qpseg/groovy/`` holds the same files so that an installed qpseg (wheel or
editable) carries them, and a test keeps the two copies identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

__all__ = ["SCRIPTS", "groovy", "packaged_script", "write_scripts"]

SCRIPTS = ("export_annotations.groovy", "import_predictions.groovy")


def packaged_script(name: str) -> bytes:
    """The bytes of one of :data:`SCRIPTS` as installed with qpseg."""
    from importlib.resources import files

    if name not in SCRIPTS:
        raise ValueError(f"unknown script {name!r}; qpseg ships {', '.join(SCRIPTS)}")
    return (files("qpseg") / "groovy" / name).read_bytes()


def write_scripts(out: str | os.PathLike[str], *, overwrite: bool = False
                  ) -> list[tuple[Path, str]]:
    """Write every script into the folder ``out``; returns ``(path, what happened)`` per script,
    what happened being ``"written"``, ``"unchanged"`` or ``"replaced"``.

    A file that already exists with other content (edited by the user, or from another qpseg
    version) is refused with ``OutputError`` unless ``overwrite``; it is then kept as
    ``<name>.bak``. Nothing is written when any file is refused.
    """
    from qpseg._io import atomic_write, ensure_writable_dir
    from qpseg.errors import OutputError

    folder = ensure_writable_dir(out)
    plan: list[tuple[Path, bytes, str]] = []
    for name in SCRIPTS:
        data = packaged_script(name)
        path = folder / name
        if path.is_dir():
            raise OutputError("is a folder, not a script file", path)
        if not path.exists():
            plan.append((path, data, "written"))
            continue
        try:
            same = path.read_bytes() == data
        except OSError as exc:
            raise OutputError.from_os_error(exc, path) from None
        if same:
            plan.append((path, data, "unchanged"))
        elif overwrite:
            plan.append((path, data, "replaced"))
        else:
            raise OutputError("differs from the script this qpseg ships (edited, or from "
                              "another qpseg version); pass --overwrite to replace it (the old "
                              "one is kept as .bak)", path)
    for path, data, what in plan:
        if what != "unchanged":
            try:
                with atomic_write(path, "wb", backup=what == "replaced") as fh:
                    fh.write(data)
            except OSError as exc:
                raise OutputError.from_os_error(exc, path) from None
    return [(path, what) for path, _, what in plan]


def groovy(
    out: Path = typer.Option(..., "--out", help="Folder to write the QuPath scripts into."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace scripts there that differ (kept as .bak)."
    ),
) -> int:
    """Write the QuPath scripts (export_annotations.groovy, import_predictions.groovy; QuPath
    0.5-0.7) into a folder, ready for QuPath's script editor or `QuPath script`."""
    for path, what in write_scripts(out, overwrite=overwrite):
        typer.echo(f"{what}: {path}")
    typer.echo("In QuPath: open the project, Automate > Script editor > open a script > Run > "
               "Run for project. Headless: QuPath script --args /path/to/project.qpproj "
               f"{Path(out) / SCRIPTS[1]}")
    return 0
