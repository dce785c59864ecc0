"""One exception hierarchy for qpseg.

Library code raises these; only :mod:`qpseg.cli` turns them into a one-line message and an exit
code (see ``EXIT_CODES``). Every error carries the file it is about, so the user sees
``error: <file>: <what is wrong>``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "EXIT_CODES",
    "ConfigError",
    "GeoJSONError",
    "GeoJSONWarning",
    "LabelError",
    "MissingImageWarning",
    "ModelError",
    "OutputError",
    "ProjectError",
    "ProjectWarning",
    "QpsegError",
    "QpsegWarning",
    "SlideError",
    "os_error_reason",
]


class QpsegError(Exception):
    """Base of every error qpseg reports to a user.

    ``path`` names the file the problem is in (if any); ``message`` says what is wrong with it.
    """

    exit_code: int = 1

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        self.message = message
        self.path: Path | None = Path(path) if path is not None else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The user-facing message on a single line: ``<file>: <what is wrong>``."""
        msg = " ".join(str(self.message).split())
        return f"{self.path}: {msg}" if self.path is not None else msg


class ProjectError(QpsegError):
    """A QuPath project (``.qpproj``, ``classes.json``) is missing, corrupt or inconsistent."""

    exit_code = 3


class GeoJSONError(QpsegError):
    """A GeoJSON file cannot be read or an object cannot be written validly."""

    exit_code = 4


class SlideError(QpsegError):
    """A slide cannot be opened or read, or its pixel size is unknown or implausible."""

    exit_code = 5


class ModelError(QpsegError):
    """A model package or architecture is unknown, corrupt or mismatched."""

    exit_code = 6


class LabelError(QpsegError):
    """Annotations cannot be turned into labels (no classes, unknown class names, ...)."""

    exit_code = 7


class OutputError(QpsegError):
    """An output file or folder cannot be written (read-only, disk or inodes full, not a folder,
    a link qpseg refuses to write through, or a file qpseg must not replace)."""

    exit_code = 8

    @classmethod
    def from_os_error(cls, exc: OSError, path: str | os.PathLike[str] | None = None
                      ) -> OutputError:
        """The one-line error for an ``OSError`` raised while writing ``path``."""
        return cls(os_error_reason(exc), path if path is not None else exc.filename)


def os_error_reason(exc: OSError) -> str:
    """What went wrong in an ``OSError``, in words and without the file name (e.g.
    ``no space left on device``)."""
    reason = exc.strerror or (str(exc.args[0]) if exc.args else type(exc).__name__)
    return str(reason)[:1].lower() + str(reason)[1:]


class ConfigError(QpsegError):
    """A command-line option or configuration file is invalid."""

    exit_code = 2


# The single place that maps error kinds to process exit codes (used by the CLI).
EXIT_CODES: dict[type[QpsegError], int] = {
    cls: cls.exit_code
    for cls in (QpsegError, ConfigError, ProjectError, GeoJSONError, SlideError, ModelError,
                LabelError, OutputError)
}


class QpsegWarning(UserWarning):
    """Something was skipped or repaired, and the user should know."""


class GeoJSONWarning(QpsegWarning):
    """A GeoJSON feature was skipped or repaired while reading or writing."""


class ProjectWarning(QpsegWarning):
    """A project entry has a problem (e.g. its image cannot be found) but the project loads."""


class MissingImageWarning(ProjectWarning):
    """Project entries whose images cannot be found on this machine (normal for shared projects)."""
