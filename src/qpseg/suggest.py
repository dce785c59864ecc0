"""``qpseg suggest``: which unreviewed slide would teach the model most if reviewed next.

The model runs over the candidate slides as ``qpseg infer`` does (the same engine, keeping its
per-slide probability maps), and each slide gets a score from those maps (:func:`score_probs`):

* **score** (the ranking): the mean *normalised predictive entropy* over the slide's tissue,
  ``H(p) / log(C)`` per map pixel with ``p`` the model's class probabilities (0: certain of one
  class, 1: all ``C`` classes equally likely). Tissue is where the engine ran tiles (the map
  is zero elsewhere), so glass and background never dilute a slide's score.
* ``low_confidence_um2``: the tissue area where the most likely class has a probability below
  :data:`LOW_CONFIDENCE` (the area a reviewer would have to look at), and its fraction.

Slides are ranked by score (highest first). The ranking goes into the QuPath project as entry
metadata (:data:`RANK_KEY`, :data:`SCORE_KEY`, :data:`MODEL_KEY`) on the top ``n`` entries —
QuPath shows entry metadata in the project list and can sort the list by it — and into
``<project>/qpseg/suggestions.csv`` for every scored slide. QuPath rewrites the ``.qpproj``
from memory when it saves with the project open, so the import script
(``import_predictions.groovy``) sets the same entry metadata from ``suggestions.csv``.
Reviewed slides (those the round history lists, or whose export holds AI objects the
pathologist accepted or edited, :mod:`qpseg.review`) are not candidates unless named.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["LOW_CONFIDENCE", "MODEL_KEY", "RANK_KEY", "SCORE_KEY", "SlideScore",
           "SuggestResult", "reviewed_entries", "score_maps", "score_probs", "suggest"]

#: Entry metadata written into the project for the suggested slides (1 = review first).
RANK_KEY = "qpseg_review_rank"
SCORE_KEY = "qpseg_review_score"
MODEL_KEY = "qpseg_review_model"
#: A map pixel is low-confidence when its most likely class is below this probability.
LOW_CONFIDENCE = 0.6
SUGGESTIONS_FILE = Path("qpseg") / "suggestions.csv"
_COLUMNS = ("rank", "entry_id", "image", "score", "low_confidence_fraction",
            "low_confidence_um2", "tissue_um2", "suggested", "model_sha256")


@dataclass
class SlideScore:
    """The uncertainty of the model on one slide (module doc)."""

    entry_id: int | None
    image: str
    score: float               # mean normalised entropy over tissue
    low_confidence_fraction: float
    low_confidence_um2: float
    tissue_um2: float
    rank: int = 0              # 1 = review first; 0 = not ranked

    def row(self, n: int, model_sha256: str = "") -> dict[str, Any]:
        """A row of ``suggestions.csv`` (``model_sha256``: the model that ranked it)."""
        return {"rank": self.rank, "entry_id": self.entry_id, "image": self.image,
                "score": round(self.score, 6),
                "low_confidence_fraction": round(self.low_confidence_fraction, 6),
                "low_confidence_um2": round(self.low_confidence_um2, 1),
                "tissue_um2": round(self.tissue_um2, 1),
                "suggested": 0 < self.rank <= n, "model_sha256": model_sha256}


@dataclass
class SuggestResult:
    """Every scored slide (ranked), the number suggested and where the ranking was written."""

    scores: list[SlideScore]
    n: int
    model_sha256: str
    failed: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def suggested(self) -> list[SlideScore]:
        """The top ``n`` slides, best first."""
        return [s for s in self.scores if 0 < s.rank <= self.n]


def score_probs(probs: np.ndarray | Any, map_mpp: float, *, band: int = 512) -> tuple[float, float,
                                                                               float, float]:
    """``(score, low_confidence_fraction, low_confidence_um2, tissue_um2)`` of one slide from
    its class probabilities ``(C, H, W)`` (uint8 with 255 = 1, as the engine stores them, or
    float in [0, 1]); pixels whose probabilities are all zero are not tissue (no tile ran).
    Read in bands of ``band`` rows, so a memory-mapped whole-slide map is never loaded whole.
    Without tissue every value is 0."""
    import numpy as np

    c, h = int(probs.shape[0]), int(probs.shape[1])
    if c < 2:
        raise ConfigError(f"ranking by uncertainty needs class probabilities of at least two "
                          f"classes, not {c}")
    log_c = math.log(c)
    ent_sum, n_tissue, n_low = 0.0, 0, 0
    for r0 in range(0, h, band):
        p = np.asarray(probs[:, r0:r0 + band, :], dtype=np.float64)
        total = p.sum(axis=0)
        tissue = total > 0
        if not tissue.any():
            continue
        q = p[:, tissue] / total[tissue]
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.where(q > 0, q * np.log(q), 0.0).sum(axis=0) / log_c
        ent_sum += float(ent.sum())
        n_tissue += int(tissue.sum())
        n_low += int((q.max(axis=0) < LOW_CONFIDENCE).sum())
    if n_tissue == 0:
        return 0.0, 0.0, 0.0, 0.0
    px = map_mpp * map_mpp
    return ent_sum / n_tissue, n_low / n_tissue, n_low * px, n_tissue * px


def score_maps(folder: str | os.PathLike[str], map_mpp: float) -> tuple[float, float, float,
                                                                        float]:
    """:func:`score_probs` of the probability map the engine kept in ``folder``
    (``infer --keep-maps``: ``<out>/maps/<slide>``)."""
    from qpseg.engine.stitch import MapSet

    maps = MapSet.open(folder)
    try:
        if maps.probs is None:
            raise ConfigError("these maps hold no class probabilities (an instance model): "
                              "suggest ranks by the probabilities of a pixel or patch model",
                              folder)
        return score_probs(maps.probs, map_mpp)
    finally:
        maps.close()


def reviewed_entries(project: str | os.PathLike[str]) -> set[int]:
    """Entries the pathologist reviewed: those the round history (:mod:`qpseg.rounds`)
    lists, and those whose annotation export holds AI objects they accepted or edited."""
    import warnings

    from qpseg.errors import GeoJSONError
    from qpseg.manifest import find_annotation_file
    from qpseg.qupath.geojson import read_geojson
    from qpseg.qupath.project import QuPathProject
    from qpseg.review import is_ai_object, truth_from_files
    from qpseg.rounds import history_path, read_history

    proj = QuPathProject.load(project)
    done: set[int] = set()
    for rec in read_history(history_path(proj.path)):
        done.update(int(e) for e in rec.entries if e.isdigit())
    base = proj.path.parent / "qpseg"
    for entry in proj.entries:
        af = find_annotation_file(entry, [base / "annotations"])
        if af is None:
            continue
        try:
            objs = read_geojson(af)
        except (GeoJSONError, OSError):
            continue
        if not any(is_ai_object(o) for o in objs):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sel = truth_from_files(objs, find_annotation_file(entry, [base / "predictions"]),
                                   warn=False)
        if sel.counts.total("accepted") + sel.counts.total("edited") > 0:
            done.add(entry.entry_id)
    return done


def _csv_text(scores: Sequence[SlideScore], n: int, model_sha256: str) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(_COLUMNS), lineterminator="\n")
    w.writeheader()
    for s in scores:
        w.writerow(s.row(n, model_sha256))
    return buf.getvalue()


def suggest(
    project: str | os.PathLike[str],
    model: str | os.PathLike[str],
    *,
    n: int = 5,
    entries: Sequence[str] | None = None,
    device: str = "auto",
    work_dir: str | os.PathLike[str] | None = None,
    write_project: bool = True,
    progress: Callable[[Any], None] | None = None,
) -> SuggestResult:
    """Rank the project's unreviewed slides by the uncertainty of ``model`` (module doc).

    ``entries`` (IDs or image names) are the candidates instead of every unreviewed entry.
    The model's predictions and maps go to ``work_dir`` (default
    ``<project>/qpseg/suggest``; the project's own predictions are left alone) and the maps
    are removed once scored. ``write_project``: store the ranking in the ``.qpproj`` (entry
    metadata, the previous ranking removed) and ``qpseg/suggestions.csv``. Slides the engine
    could not run are in ``failed``; none scored is a :class:`ConfigError`.
    """
    import shutil

    from qpseg._io import atomic_write, ensure_writable_dir
    from qpseg.engine.run import InferenceParams, jobs_from_project, run_inference
    from qpseg.models.package import load_package
    from qpseg.qupath.project import QuPathProject

    if n < 1:
        raise ConfigError(f"-n must be at least 1, not {n}")
    proj = QuPathProject.load(project)
    if entries:
        wanted: list[str] = [str(e) for e in entries]
    else:
        done = reviewed_entries(proj.path)
        wanted = [str(e.entry_id) for e in proj.entries if e.entry_id not in done]
        if not wanted:
            raise ConfigError("every entry has been reviewed: nothing to suggest", proj.path)
    work = Path(work_dir) if work_dir is not None else proj.path.parent / "qpseg" / "suggest"
    ensure_writable_dir(work)
    pkg = load_package(model)
    jobs, _ = jobs_from_project(proj.path, work, wanted)
    params = InferenceParams(device=device, overwrite=True, keep_maps=True)
    run = run_inference(jobs, pkg, work, params, progress=progress)
    scores: list[SlideScore] = []
    failed: list[tuple[str, str]] = [(r.name, r.reason or r.status) for r in run.failed]
    for r in run.results:
        if r.status == "failed":
            continue
        if not r.maps or r.map_mpp is None:
            failed.append((r.name, "no probability maps kept"))
            continue
        try:
            score, frac, low, tissue = score_maps(r.maps, float(r.map_mpp))
        finally:
            shutil.rmtree(r.maps, ignore_errors=True)
        scores.append(SlideScore(r.entry_id, r.name, score, frac, low, tissue))
    with contextlib.suppress(OSError):
        (work / "maps").rmdir()  # the slides' maps are gone; leave no empty folder behind
    if not scores:
        first = f"; first failure: {failed[0][0]}: {failed[0][1]}" if failed else ""
        raise ConfigError(f"no slide could be scored{first}", proj.path)
    scores.sort(key=lambda s: (-s.score, -s.low_confidence_um2,
                               s.entry_id if s.entry_id is not None else -1))
    for i, s in enumerate(scores, 1):
        s.rank = i
    result = SuggestResult(scores, n, pkg.sha256, failed)
    if write_project:
        top = {s.entry_id: s for s in result.suggested}
        for e in proj.entries:
            for key in (RANK_KEY, SCORE_KEY, MODEL_KEY):
                e.metadata.pop(key, None)
            pick = top.get(e.entry_id)
            if pick is not None:
                e.metadata[RANK_KEY] = str(pick.rank)
                e.metadata[SCORE_KEY] = f"{pick.score:.4f}"
                e.metadata[MODEL_KEY] = pkg.sha256[:12]
        proj.save()
        path = proj.path.parent / SUGGESTIONS_FILE
        with atomic_write(path, "w", backup=False) as fh:
            fh.write(_csv_text(scores, n, pkg.sha256))
        result.files = {"project": proj.path, "suggestions.csv": path}
    return result
