"""``qpseg infer --write-to-project``: predictions straight into the project's ``data.qpdata``.

Without QuPath, predictions reach a project through ``groovy/import_predictions.groovy``. When
paquo finds a QuPath installation, this module does the same from Python after a run: for
each finished entry it reads ``<entryID>.geojson`` back (through qpseg's reader, so exactly
what the import script would import), replaces the earlier unlocked qpseg objects, stores the
per-slide summary as entry metadata and saves (see
:func:`qpseg.qupath.paquo_backend.replace_qpseg_objects`). User annotations are never touched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qpseg.errors import ConfigError, QpsegError

if TYPE_CHECKING:
    from qpseg.engine.run import SlideResult
    from qpseg.qupath.geojson import QuPathObject

__all__ = ["WriteBack", "check_write_back", "write_back"]

@dataclass
class WriteBack:
    """What happened to one entry's objects."""

    key: str
    entry_id: int
    removed: int = 0
    added: int = 0
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
                          "predictions with groovy/import_predictions.groovy", project)


def _paquo_replace(project: Path, entry_id: int, objects: list[QuPathObject],
                   metadata: dict[str, str]) -> tuple[int, int]:
    from qpseg.qupath.paquo_backend import replace_qpseg_objects

    return replace_qpseg_objects(project, entry_id, objects, entry_metadata=metadata)


def write_back(project: str | os.PathLike[str], results: Sequence[SlideResult]
               ) -> list[WriteBack]:
    """Put each finished (done or skipped-as-finished) entry's predictions into the project,
    with its per-slide summary (``SlideResult.summary``) as entry metadata.

    An entry that cannot be written gets its one-line reason in ``WriteBack.error``; the
    others go on.
    """
    from qpseg.objects import summary_metadata
    from qpseg.qupath.geojson import read_geojson

    out: list[WriteBack] = []
    for r in results:
        if r.status not in ("done", "skipped") or r.entry_id is None:
            continue
        wb = WriteBack(r.key, r.entry_id)
        try:
            objects = read_geojson(r.output)
            wb.removed, wb.added = _paquo_replace(Path(project), r.entry_id, objects,
                                                  summary_metadata(r.summary))
        except QpsegError as exc:
            wb.error = exc.one_line()
        out.append(wb)
    return out
