"""Small helpers shared by the command modules (output only; no library logic)."""

from __future__ import annotations

import json
import sys
from typing import Any


def print_json(data: Any) -> None:
    """Print JSON to stdout (UTF-8, non-ASCII kept)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def console() -> Any:
    """A Rich console on stdout (imported lazily: rich is not needed for --help).

    Soft wrapping keeps each message on one line when output is piped (Rich would otherwise
    wrap at 80 columns, splitting a per-slide failure over several lines of a log).
    """
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


class StepProgress:
    """A Rich progress bar on stderr for one long step (slides scored, entries imported, ...).

    Shown only when stderr is a terminal (a log or a pipe gets no bar), transient (it leaves
    no line behind: the command's own summary follows), and never on stdout, so ``--json``
    output stays one JSON document. Use as a context manager; the instance is the library's
    ``progress(done, total, item)`` callback.
    """

    def __init__(self, description: str, *, enabled: bool = True) -> None:
        self.description = description
        self.enabled = enabled and stderr_is_terminal()
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> StepProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                TextColumn("{task.fields[item]}"),
                console=Console(stderr=True, force_terminal=True, soft_wrap=True),
                transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=None, item="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def __call__(self, done: int, total: int, item: str = "") -> None:
        if self._progress is None:
            return
        label = item if len(item) <= 40 else item[:37] + "..."
        self._progress.update(self._task, completed=done, total=total, item=label)


def stderr_is_terminal() -> bool:
    """True when stderr is an interactive terminal (where a progress bar belongs)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
