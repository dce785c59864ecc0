"""``qpseg infer --write-to-project``: predictions straight into the project's ``data.qpdata``.

Without QuPath, predictions reach a project through ``groovy/import_predictions.groovy``. When
paquo finds a QuPath installation, this module does the same from Python after a run: for
each finished entry it reads ``<entryID>.geojson`` back (through qpseg's reader, so exactly
what the import script would import), replaces the earlier qpseg objects nobody reviewed,
stores the per-slide summary as entry metadata and saves that entry (see
:meth:`qpseg.qupath.paquo_backend.ProjectSession.write`). The project is opened once for all
entries; an entry is written completely or left as it was. User annotations are never
touched.

Earlier qpseg objects follow the review rule (:mod:`qpseg.review`): one is replaced only when
it is unlocked and unchanged from the predictions qpseg saved for the entry before this write
(:func:`previous_predictions`). A reshaped or reclassified one is the pathologist's, a locked
one is accepted, and one whose original cannot be found (the earlier predictions are gone)
cannot be shown to be unchanged: they all stay, and :meth:`WriteBack.describe` says how many.
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
    from qpseg.qupath.paquo_backend import ProjectSession, Replaced

__all__ = ["WriteBack", "check_write_back", "previous_predictions", "write_back"]


@dataclass
class WriteBack:
    """What happened to one entry's objects (the earlier qpseg objects by the review rule)."""

    key: str
    entry_id: int
    removed: int = 0        # earlier unreviewed qpseg objects replaced
    added: int = 0
    kept_edited: int = 0    # earlier qpseg objects kept: reshaped or reclassified
    kept_locked: int = 0    # earlier qpseg objects kept: locked (accepted)
    kept_unproven: int = 0  # earlier qpseg objects kept: no earlier prediction to compare with
    not_added: int = 0      # predictions not added: an object kept has their id
    error: str = ""

    def describe(self) -> str:
        """One line for the user: added, replaced, and what was kept and why."""
        text = (f"{self.added} object(s) added, {self.removed} earlier qpseg object(s) "
                "replaced (unchanged and unlocked)")
        kept = [f"{n} {what}" for n, what in ((self.kept_edited, "edited"),
                                               (self.kept_locked, "locked"))]
        if self.kept_unproven:
            kept.append(f"{self.kept_unproven} without the earlier predictions to show them "
                        "unchanged")
        text += "; kept: " + ", ".join(kept)
        if self.not_added:
            text += (f"; {self.not_added} prediction(s) not added: a kept object has their id")
        return text


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
                   metadata: dict[str, str], originals: list[QuPathObject] | None) -> Replaced:
    """One entry's objects and summary through the open project."""
    return session.write(entry_id, objects, originals=originals, entry_metadata=metadata)


def previous_predictions(result: SlideResult) -> list[Path]:
    """The files that hold what qpseg wrote for the entry before, most recent first.

    ``write_predictions`` (:mod:`qpseg.objects`) keeps the file it replaces as the newest
    numbered backup (:func:`qpseg._io.backups`; the highest number is the newest): for a
    slide done in this run that backup is what the project got last time. A slide skipped as
    finished kept its file, which is then the most recent. The other one is looked at too (a
    run whose write-back failed leaves the project a version behind); an object's original
    is taken from the first file that has its id.
    """
    from qpseg._io import backups

    out = Path(result.output)
    slots = [b for b in backups(out) if b.is_file() and not b.is_symlink()]
    newest_backup = slots[-1:]
    here = [out] if out.is_file() else []
    return [*here, *newest_backup] if result.status == "skipped" else [*newest_backup, *here]


def _read_originals(files: Sequence[Path]) -> list[QuPathObject] | None:
    """The objects of ``files`` in order (None when none could be read): an unreadable file
    is passed over, so its objects count as not found and stay in the project."""
    import warnings

    from qpseg.errors import GeoJSONError, GeoJSONWarning
    from qpseg.qupath.geojson import read_geojson

    out: list[QuPathObject] | None = None
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", GeoJSONWarning)
                objs = read_geojson(f)
        except (GeoJSONError, OSError):
            continue
        out = [*(out or []), *objs]
    return out


def write_back(project: str | os.PathLike[str], results: Sequence[SlideResult]
               ) -> list[WriteBack]:
    """Put each finished (done or skipped-as-finished) entry's predictions into the project,
    with its per-slide summary (``SlideResult.summary``) as entry metadata.

    Only the entry's unreviewed qpseg objects are replaced, judged against
    :func:`previous_predictions` (module docstring). An entry that cannot be written gets its
    one-line reason in ``WriteBack.error`` and is left as it was; the others go on.
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
                done = _paquo_replace(session, eid, objects, summary_metadata(r.summary),
                                      _read_originals(previous_predictions(r)))
                wb.removed, wb.added = done.removed, done.added
                wb.kept_edited, wb.kept_locked = done.kept_edited, done.kept_locked
                wb.kept_unproven, wb.not_added = done.kept_unproven, done.not_added
            except QpsegError as exc:
                wb.error = exc.one_line()
            out.append(wb)
    return out
