"""Small output helpers shared by the command modules: JSON on stdout, the Rich console (the
progress displays are in ``_progress``; no library logic here)."""

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
