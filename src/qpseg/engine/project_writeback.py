"""``qpseg infer --write-to-project``: predictions straight into the project's ``data.qpdata``.

Without QuPath, predictions reach a project through ``groovy/import_predictions.groovy``. When
paquo finds a QuPath installation, this module does the same from Python after a run: for
each finished entry it reads ``<entryID>.geojson`` back (through qpseg's reader, so exactly
what the import script would import), replaces the earlier unlocked qpseg objects, stores the
per-slide summary as entry metadata and saves that entry (see
:meth:`qpseg.qupath.paquo_backend.ProjectSession.write`). The project is opened once for all
entries; an entry is written completely or left as it was. User annotations and locked
objects are never touched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qpseg.errors import ConfigError, QpsegError

if TYPE_CHECKING:
    from qpseg.engine.run import SlideResult
    from qpseg.qupath.geojson import QuPathObject
    from qpseg.qupath.paquo_backend import ProjectSession

__all__ = ["WriteBack", "check_write_back", "write_back"]

@dataclass
class WriteBack:
    """What happened to one entry's objects."""

    key: str
    entry_id: int
    removed: int = 0
    added: int = 0
    kept_locked: int = 0  # predictions not added: the pathologist locked an object with its id
    error: str = ""


def check_write_back(project: str | os.PathLike[str] | None, shard: str | None = None) -> None:
    """Raise :class:`ConfigError` before a run when ``--write-to-project`` cannot work."""
    if project is None:
        raise ConfigError("--write-to-project needs a QuPath project as input, not loose slides")
    from qpseg.engine.distributed import parse_shard

    if parse_shard(shard)[1] > 1:
        # Shards run on several machines at once, and each would save the same project.
        raise ConfigError("--write-to-project cannot be combined with --shard: once every "
                          "shard has finished, run the same command without --shard (finished "
                          "slides are skipped, only the objects are written)", project)
    from qpseg.qupath.paquo_backend import qupath_available

    if not qupath_available():
        raise ConfigError("--write-to-project needs paquo and a QuPath installation, and paquo "
                          "found none (set PAQUO_QUPATH_DIR); without it, import the "
                          "predictions with import_predictions.groovy in QuPath (`qpseg groovy "
                          "--out DIR` writes it)", project)


def _paquo_replace(session: ProjectSession, entry_id: int, objects: list[QuPathObject],
                   metadata: dict[str, str]) -> tuple[int, int, int]:
    """One entry's objects and summary through the open project: (removed, added, kept_locked)."""
    return session.write(entry_id, objects, entry_metadata=metadata)


def write_back(project: str | os.PathLike[str], results: Sequence[SlideResult]
               ) -> list[WriteBack]:
    """Put each finished (done or skipped-as-finished) entry's predictions into the project,
    with its per-slide summary (``SlideResult.summary``) as entry metadata.

    An entry that cannot be written gets its one-line reason in ``WriteBack.error`` and is
    left as it was; the others go on.
    """
    from qpseg.objects import summary_metadata
    from qpseg.qupath.geojson import read_geojson
    from qpseg.qupath.paquo_backend import ProjectSession

    todo = [(r, r.entry_id) for r in results
            if r.status in ("done", "skipped") and r.entry_id is not None]
    if not todo:
        return []
    try:
        session = ProjectSession(project)
    except QpsegError as exc:  # the project itself went missing or broke during the run
        return [WriteBack(r.key, eid, error=exc.one_line()) for r, eid in todo]
    out: list[WriteBack] = []
    with session:
        for r, eid in todo:
            wb = WriteBack(r.key, eid)
            try:
                objects = read_geojson(r.output)
                wb.removed, wb.added, wb.kept_locked = _paquo_replace(
                    session, eid, objects, summary_metadata(r.summary))
            except QpsegError as exc:
                wb.error = exc.one_line()
            out.append(wb)
    return out
