"""The ``qpseg`` command line: one module per command, errors mapped to exit codes here.

Only typer and the standard library are imported at start-up; each command imports the
library (and through it torch / openslide) inside its function body, so ``qpseg --help`` is
instant.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Sequence

import typer

from qpseg import __version__
from qpseg.cli import (
    demo,
    evaluate,
    groovy,
    import_project,
    infer,
    info,
    models,
    suggest,
    train,
    validate,
)
from qpseg.cli.project import app as project_app
from qpseg.errors import EXIT_CODES, OutputError, QpsegError

__all__ = ["app", "main"]

app = typer.Typer(
    name="qpseg",
    help="QuPath projects to segmentation labels, models, whole-slide predictions and metrics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qpseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """QuPath projects to segmentation labels, models, whole-slide predictions and metrics."""
    _state["debug"] = debug or _state["debug"]


app.command("info")(info.info)
app.command("validate")(validate.validate)
app.command("import-project")(import_project.import_project)
app.command("models")(models.models)
app.command("model-info")(models.model_info)
app.command("train")(train.train)
app.command("infer")(infer.infer)
app.command("evaluate")(evaluate.evaluate)
app.command("evaluate-edits")(evaluate.evaluate_edits)
app.command("demo")(demo.demo)
app.command("suggest")(suggest.suggest)
app.command("groovy")(groovy.groovy)
app.add_typer(project_app, name="project")


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    # Library warnings are user-facing notes (a skipped feature, a missing image): one line each.
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=sys.stderr)


def exit_code_for(exc: QpsegError) -> int:
    """The process exit code for a qpseg error (the one mapping, see ``qpseg.errors``)."""
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = "--debug" in args or os.environ.get("QPSEG_DEBUG", "") not in ("", "0")
    old_show = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        result = app(args=args, prog_name="qpseg", standalone_mode=False)
        return int(result) if isinstance(result, int) else 0
    except QpsegError as exc:
        if _state["debug"]:
            traceback.print_exc()
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exit_code_for(exc)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except OSError as exc:
        # A write (or read) the library did not anticipate: read-only folder, disk or inodes
        # full, a path that is a file. Still one line naming the file, never a traceback.
        if _state["debug"]:
            traceback.print_exc()
        err = OutputError.from_os_error(exc)
        print(f"error: {err.one_line()}", file=sys.stderr)
        return exit_code_for(err)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Usage errors (bad option, missing argument) come from click, or from the copy of
        # click that newer typer vendors: recognise them by their interface.
        code, show = getattr(exc, "exit_code", None), getattr(exc, "show", None)
        if callable(show) and isinstance(code, int):
            show()
            return code
        raise
    finally:
        warnings.showwarning = old_show


def run() -> None:  # pragma: no cover - console-script entry point
    """Console-script entry point."""
    sys.exit(main())
