"""Review rounds: the per-project history of what the pathologist corrected, and where.

A *round* is one pass of the loop a lab runs: ``qpseg infer`` with a model writes AI objects,
the pathologist reviews some slides in QuPath and exports, and ``qpseg evaluate-edits
--history`` records the round in ``<project>/qpseg/rounds.csv`` (:data:`HISTORY_COLUMNS`).
A round is identified by the model whose predictions were reviewed (its package SHA-256, which
``qpseg infer`` writes on every object as ``qpseg_model_sha256``): running ``evaluate-edits
--history`` again for the same model replaces that round's row (the export may have changed)
instead of adding a round, so the file never counts a round twice. A new model is a new round;
slides reviewed with an earlier model stay in that model's round.

Correction effort of a round: the AI objects the pathologist reshaped, reclassified or deleted
plus the objects they added, over the slides they reviewed (:func:`rounds_from_edits`); the
area changed is the area they added or removed. Rounds review different slides, and not always
as many, so the history compares them *per reviewed slide* (``corrections_per_slide``,
``area_changed_um2_per_slide``): a round that reviewed four slides is not twice the effort of
one that reviewed two. :func:`history_svg` plots corrections per slide and the Dice per round.

:func:`corrected_regions` is where the final truth of a slide disagrees with the saved
predictions: the regions training weighs more (``data.correction_weight``), since those are
the model's errors.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError, ProjectError

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from qpseg.edits import EditsResult
    from qpseg.qupath.geojson import QuPathObject

__all__ = ["EFFORT_KEYS", "HISTORY_COLUMNS", "HISTORY_FILE", "RoundRecord", "corrected_regions",
           "history_path", "history_svg", "read_history", "record_round", "rounds_from_edits",
           "write_history_report"]

#: The history file, relative to the project folder.
HISTORY_FILE = Path("qpseg") / "rounds.csv"
#: The edits that are corrections (the pathologist's effort), as ``evaluate-edits`` counts them.
EFFORT_KEYS = ("n_reshaped", "n_reclassified", "n_deleted", "n_added")
HISTORY_COLUMNS = ("round", "model_sha256", "slides_reviewed", "entries", "n_ai", "n_kept",
                   "n_accepted", "n_reshaped", "n_reclassified", "n_deleted", "n_added",
                   "corrections", "area_changed_px", "area_changed_um2", "dice", "recorded",
                   "corrections_per_slide", "area_changed_um2_per_slide")
#: Columns derived from the others: a history written before they existed still reads.
_DERIVED_COLUMNS = ("corrections_per_slide", "area_changed_um2_per_slide")
_INT_COLUMNS = ("round", "slides_reviewed", "n_ai", "n_kept", "n_accepted", "n_reshaped",
                "n_reclassified", "n_deleted", "n_added", "corrections")
_FLOAT_COLUMNS = ("area_changed_px", "area_changed_um2", "dice")


@dataclass
class RoundRecord:
    """One row of ``rounds.csv``: what the pathologist did to one model's predictions.

    Counts are over the reviewed slides only (a slide is reviewed when the pathologist
    accepted, reshaped, reclassified, deleted or added anything there); ``dice`` is the Dice
    between the AI's and the final areas over them (``evaluate-edits``' pooled Dice), NaN when
    none was reviewed. ``round`` is 0 until :func:`record_round` numbers it.
    """

    model_sha256: str
    entries: tuple[str, ...]
    n_ai: int = 0
    n_kept: int = 0
    n_accepted: int = 0
    n_reshaped: int = 0
    n_reclassified: int = 0
    n_deleted: int = 0
    n_added: int = 0
    area_changed_px: float = 0.0
    area_changed_um2: float = math.nan
    dice: float = math.nan
    round: int = 0
    recorded: str = ""

    @property
    def corrections(self) -> int:
        """The correction effort: objects reshaped, reclassified, deleted and added."""
        return self.n_reshaped + self.n_reclassified + self.n_deleted + self.n_added

    @property
    def corrections_per_slide(self) -> float:
        """:attr:`corrections` per reviewed slide (NaN when none was reviewed): the effort
        rounds are compared by."""
        return self.corrections / len(self.entries) if self.entries else math.nan

    @property
    def area_changed_um2_per_slide(self) -> float:
        """The area added or removed (µm²) per reviewed slide; NaN when unknown."""
        return self.area_changed_um2 / len(self.entries) if self.entries else math.nan

    def row(self) -> dict[str, Any]:
        """The CSV row (:data:`HISTORY_COLUMNS`)."""
        return {"round": self.round, "model_sha256": self.model_sha256,
                "slides_reviewed": len(self.entries), "entries": ";".join(self.entries),
                "n_ai": self.n_ai, "n_kept": self.n_kept, "n_accepted": self.n_accepted,
                "n_reshaped": self.n_reshaped, "n_reclassified": self.n_reclassified,
                "n_deleted": self.n_deleted, "n_added": self.n_added,
                "corrections": self.corrections, "area_changed_px": self.area_changed_px,
                "area_changed_um2": self.area_changed_um2, "dice": self.dice,
                "recorded": self.recorded, "corrections_per_slide": self.corrections_per_slide,
                "area_changed_um2_per_slide": self.area_changed_um2_per_slide}

    @classmethod
    def from_row(cls, row: dict[str, str], where: Path) -> RoundRecord:
        """Parse a CSV row; :class:`ProjectError` naming the file when it is malformed."""
        try:
            ints = {k: int(row[k]) for k in _INT_COLUMNS}
            floats = {k: float(row[k]) if row[k] not in ("", None) else math.nan
                      for k in _FLOAT_COLUMNS}
            entries = tuple(e for e in (row["entries"] or "").split(";") if e)
            sha = row["model_sha256"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProjectError(f"malformed review-round history ({type(exc).__name__}: {exc}); "
                               "fix or remove the file", where) from None
        if not sha or ints["round"] < 1:
            raise ProjectError("malformed review-round history (a row without a model "
                               "SHA-256 or round number)", where)
        return cls(model_sha256=sha, entries=entries, n_ai=ints["n_ai"], n_kept=ints["n_kept"],
                   n_accepted=ints["n_accepted"], n_reshaped=ints["n_reshaped"],
                   n_reclassified=ints["n_reclassified"], n_deleted=ints["n_deleted"],
                   n_added=ints["n_added"], area_changed_px=floats["area_changed_px"],
                   area_changed_um2=floats["area_changed_um2"], dice=floats["dice"],
                   round=ints["round"], recorded=row.get("recorded") or "")


def history_path(project: str | os.PathLike[str]) -> Path:
    """``<project folder>/qpseg/rounds.csv`` for a ``.qpproj`` file or its folder."""
    p = Path(project)
    folder = p.parent if p.suffix.lower() == ".qpproj" else p
    return folder / HISTORY_FILE


def _slide_model(predictions_file: str) -> tuple[str | None, float]:
    """The model that wrote a predictions file (the most common ``qpseg_model_sha256`` of its
    AI objects; None when none names one) and the file's modification time."""
    from collections import Counter

    from qpseg.errors import GeoJSONError
    from qpseg.qupath.geojson import read_geojson

    try:
        objs = read_geojson(predictions_file)
        mtime = Path(predictions_file).stat().st_mtime
    except (GeoJSONError, OSError):
        return None, 0.0
    found = Counter(str(o.metadata["qpseg_model_sha256"]) for o in objs
                    if o.metadata.get("qpseg_model_sha256"))
    return (found.most_common(1)[0][0] if found else None), mtime


def _older(export: str, predictions: str) -> bool:
    """Whether the annotation export was written before the predictions it is compared with."""
    try:
        return bool(export and predictions) and \
            Path(export).stat().st_mtime < Path(predictions).stat().st_mtime
    except OSError:
        return False


def rounds_from_edits(edits: EditsResult) -> list[RoundRecord]:
    """The review rounds in an ``evaluate-edits`` result (not yet numbered), oldest first.

    A slide is reviewed when the pathologist accepted (locked), reshaped, reclassified,
    deleted or added an object there, in an export written after its predictions (an older
    export predates them: nothing in it is a review of them). Reviewed slides are grouped by
    the model that wrote their predictions (``qpseg_model_sha256``): one record per model,
    ordered by when its predictions were written, so slides reviewed in earlier rounds (with
    an earlier model) stay in their own round. :class:`~qpseg.errors.ConfigError` when no
    reviewed slide's predictions name their model.
    """
    rows = edits.rows()
    groups: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    newest: dict[str, float] = {}
    unnamed = 0
    for s, r in zip(edits.slides, rows, strict=True):
        if r["n_accepted"] + sum(int(r[k]) for k in EFFORT_KEYS) == 0 \
                or _older(s.annotations_file, s.predictions_file):
            continue
        sha, mtime = _slide_model(s.predictions_file) if s.predictions_file else (None, 0.0)
        if sha is None:
            unnamed += 1
            continue
        groups.setdefault(sha, []).append((s, r))
        newest[sha] = max(newest.get(sha, 0.0), mtime)
    if not groups:
        raise ConfigError("no reviewed slide has predictions that name their model (no "
                          "qpseg_model_sha256 on their objects)" if unnamed else
                          "no slide was reviewed: nothing accepted, reshaped, reclassified, "
                          "deleted or added", edits.project)
    return [_record(sha, groups[sha]) for sha in sorted(groups, key=lambda k: newest[k])]


def _record(sha: str, reviewed: list[tuple[Any, dict[str, Any]]]) -> RoundRecord:
    entries = tuple(str(s.entry_id if s.entry_id is not None else s.slide) for s, _ in reviewed)
    inter = sum(c.intersection_px for s, _ in reviewed for c in s.classes)
    den = sum(c.ai_area_px + c.final_area_px for s, _ in reviewed for c in s.classes)
    um2 = [float(r["area_added_um2"]) + float(r["area_removed_um2"]) for _, r in reviewed]

    def total(key: str) -> int:
        return int(sum(int(r[key]) for _, r in reviewed))

    return RoundRecord(
        model_sha256=sha, entries=entries, n_ai=total("n_ai"), n_kept=total("n_kept"),
        n_accepted=total("n_accepted"), n_reshaped=total("n_reshaped"),
        n_reclassified=total("n_reclassified"), n_deleted=total("n_deleted"),
        n_added=total("n_added"),
        area_changed_px=float(sum(float(r["area_added_px"]) + float(r["area_removed_px"])
                                  for _, r in reviewed)),
        area_changed_um2=float(sum(um2)) if all(math.isfinite(v) for v in um2) else math.nan,
        dice=2.0 * inter / den if den > 0 else math.nan)


def read_history(path: str | os.PathLike[str]) -> list[RoundRecord]:
    """The rounds recorded in ``path`` (``rounds.csv``), in round order; [] when absent."""
    p = Path(path)
    if not p.is_file():
        return []
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(f"cannot read the review-round history ({exc})", p) from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in HISTORY_COLUMNS
               if c not in (reader.fieldnames or []) and c not in _DERIVED_COLUMNS]
    if missing:
        raise ProjectError(f"not a review-round history (columns missing: "
                           f"{', '.join(missing)}); fix or remove the file", p)
    records = [RoundRecord.from_row(row, p) for row in reader]
    return sorted(records, key=lambda r: r.round)


def _csv_text(records: Sequence[RoundRecord]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(HISTORY_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in records:
        row = r.row()
        for k in (*_FLOAT_COLUMNS, *_DERIVED_COLUMNS):
            v = row[k]
            row[k] = "" if not math.isfinite(v) else f"{v:.6g}" if k == "dice" else \
                f"{v:.2f}" if k == "corrections_per_slide" else f"{v:.1f}"
        w.writerow(row)
    return buf.getvalue()


def record_round(project: str | os.PathLike[str], record: RoundRecord,
                 history: str | os.PathLike[str] | None = None) -> tuple[list[RoundRecord],
                                                                         RoundRecord]:
    """Add ``record`` to the project's history (``history``: another file) and return the
    whole history and the numbered record.

    The same model as a recorded round replaces that round's row, keeping its number (a rerun
    of ``evaluate-edits --history`` after more review); a new model becomes round
    ``last + 1``. The file is replaced atomically.
    """
    from qpseg._io import atomic_write
    from qpseg.errors import OutputError

    path = Path(history) if history is not None else history_path(project)
    records = read_history(path)
    same = next((r for r in records if r.model_sha256 == record.model_sha256), None)
    number = same.round if same is not None else max((r.round for r in records), default=0) + 1
    new = RoundRecord(**{**record.__dict__, "round": number,
                         "recorded": datetime.now(UTC).isoformat(timespec="seconds")})
    records = sorted([r for r in records if r.round != number] + [new], key=lambda r: r.round)
    try:
        with atomic_write(path, "w", backup=False) as fh:
            fh.write(_csv_text(records))
    except OSError as exc:
        raise OutputError.from_os_error(exc, path) from exc
    return records, new


def history_svg(records: Sequence[RoundRecord], *, width: int = 480, height: int = 240) -> str:
    """An SVG plot of correction effort per round: bars of the corrections per reviewed slide
    (objects reshaped, reclassified, deleted and added), a line of the Dice between AI and
    final areas."""
    from html import escape

    left, right, top, bottom = 48, 48, 28, 36
    pw, ph = width - left - right, height - top - bottom
    n = max(len(records), 1)
    def effort(r: RoundRecord) -> float:
        v = r.corrections_per_slide
        return v if math.isfinite(v) else 0.0

    peak = max([effort(r) for r in records] + [1.0])
    slot = pw / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="16">Correction effort per review round (bars: objects '
             'reshaped + reclassified + deleted + added per reviewed slide; line: Dice AI vs '
             'final)</text>',
             f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" '
             'stroke="#444"/>',
             f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{peak:g}</text>',
             f'<text x="{left - 6}" y="{top + ph}" text-anchor="end">0</text>',
             f'<text x="{left + pw + 6}" y="{top + 4}">1.0</text>',
             f'<text x="{left + pw + 6}" y="{top + ph}">0.0</text>']
    points = []
    for i, r in enumerate(records):
        h = ph * effort(r) / peak
        x = left + i * slot + slot * 0.2
        parts.append(f'<rect x="{x:.1f}" y="{top + ph - h:.1f}" width="{slot * 0.6:.1f}" '
                     f'height="{h:.1f}" fill="#4a7ab5"><title>round {r.round}: '
                     f'{r.corrections} corrections on {len(r.entries)} slide(s) '
                     f'({escape(r.model_sha256[:12])})</title></rect>')
        parts.append(f'<text x="{x + slot * 0.3:.1f}" y="{top + ph - h - 3:.1f}" '
                     f'text-anchor="middle">{effort(r):.3g}</text>')
        parts.append(f'<text x="{x + slot * 0.3:.1f}" y="{top + ph + 14:.1f}" '
                     f'text-anchor="middle">round {r.round}</text>')
        if math.isfinite(r.dice):
            points.append((x + slot * 0.3, top + ph * (1 - r.dice)))
    if points:
        parts.append('<polyline fill="none" stroke="#c0392b" stroke-width="2" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in points) + '"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#c0392b"/>'
                  for x, y in points]
    parts.append("</svg>")
    return "\n".join(parts)


def write_history_report(out_dir: str | os.PathLike[str],
                         records: Sequence[RoundRecord]) -> dict[str, Path]:
    """Write ``rounds.svg`` (:func:`history_svg`) and ``rounds.html`` (the plot and the table
    of every round) into ``out_dir`` atomically; returns their paths."""
    from html import escape

    from qpseg._io import atomic_write

    out = Path(out_dir)
    svg = history_svg(records)
    cols = ("round", "model_sha256", "slides_reviewed", "n_accepted", "n_reshaped",
            "n_reclassified", "n_deleted", "n_added", "corrections", "corrections_per_slide",
            "area_changed_um2", "area_changed_um2_per_slide", "dice")
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = []
    for r in records:
        row = r.row()
        row["model_sha256"] = str(row["model_sha256"])[:12]
        cells = []
        for c in cols:
            v = row[c]
            text = ("" if not math.isfinite(v) else f"{v:.3f}" if c == "dice" else
                    f"{v:.2f}" if c == "corrections_per_slide" else f"{v:.0f}") \
                if isinstance(v, float) else str(v)
            cells.append(f"<td>{escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    html = ("<!doctype html><html><head><meta charset='utf-8'><title>qpseg review rounds"
            "</title><style>body{font-family:sans-serif}td,th{padding:2px 8px;"
            "text-align:right}</style></head><body><h1>Review rounds</h1>"
            f"{svg}<table><tr>{head}</tr>{''.join(body)}</table></body></html>\n")
    files = {"rounds.svg": out / "rounds.svg", "rounds.html": out / "rounds.html"}
    for name, text in (("rounds.svg", svg + "\n"), ("rounds.html", html)):
        with atomic_write(files[name], "w", backup=False) as fh:
            fh.write(text)
    return files


# ============================================================================ corrections


def corrected_regions(exported: Sequence[QuPathObject],
                      originals: Sequence[QuPathObject] | None, *,
                      tolerance_px: float | None = None) -> list[BaseGeometry]:
    """Where one slide's reviewed export disagrees with the predictions qpseg saved for it.

    ``exported``: every object of the slide's annotation export (not only the truth);
    ``originals``: the saved predictions (None or empty: nothing was predicted, so nothing was
    corrected). The regions (level-0 QuPath coordinates):

    * an AI object the pathologist reshaped or reclassified (:func:`qpseg.review.review`):
      its final and its original outline;
    * an AI object they deleted (its id is not in the export): its original outline;
    * a class annotation of their own: the part no saved prediction of its class covers.

    Untouched, locked (accepted), ``Region*`` and ``Ignore*`` objects are no correction.
    """
    from shapely import union_all

    from qpseg.labels import label_role
    from qpseg.qupath.geojson import repair_polygonal
    from qpseg.review import DEFAULT_TOLERANCE_PX, is_ai_object, review

    if not originals:
        return []
    tol = DEFAULT_TOLERANCE_PX if tolerance_px is None else tolerance_px
    by_id = {o.id: o for o in originals if o.id}
    out: list[BaseGeometry] = []
    ai = [o for o in exported if is_ai_object(o)]
    found = [by_id.get(o.id) if o.id else None for o in ai]
    for f, o, r in zip(ai, found, review(ai, found, tol), strict=True):
        if r.status == "edited" and o is not None:
            out += [repair_polygonal(f.geometry), repair_polygonal(o.geometry)]
    present = {o.id for o in exported if o.id}
    out += [repair_polygonal(o.geometry) for o in originals if o.id and o.id not in present]
    per_class: dict[str, Any] = {}
    for o in originals:
        key = (o.classification or "").strip().lower()
        per_class.setdefault(key, []).append(repair_polygonal(o.geometry))
    covered = {k: union_all(v) for k, v in per_class.items()}
    for o in exported:
        if is_ai_object(o) or o.object_type != "annotation" \
                or label_role(o.classification) != "class":
            continue
        g = repair_polygonal(o.geometry)
        cover = covered.get((o.classification or "").strip().lower())
        rest = g if cover is None else repair_polygonal(g.difference(cover))
        if not rest.is_empty and rest.area > 0:
            out.append(rest)
    return [g for g in out if not g.is_empty]
