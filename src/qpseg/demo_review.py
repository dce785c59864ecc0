"""The demo's simulated QuPath review round: the export QuPath would write after a pathologist
kept, reshaped, reclassified, deleted, locked and added objects (:func:`simulate_review`), read
back by ``import_project``, ``evaluate`` and ``evaluate_edits``, whose counts of AI objects left
out and kept must be those the simulation implies (:func:`run_review_round`);
:func:`undo_review` puts the export from before the round back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpseg.demo_example import CLASSES, Example

__all__ = ["ADDED_RADIUS_PX", "BEFORE_REVIEW", "ONE_EACH", "RESHAPE_PX", "TRUTH_READERS",
           "ReviewRound", "SimulatedReview", "run_review_round", "simulate_review",
           "undo_review"]

#: The folder (in the example project's ``qpseg/``) where the review round keeps the annotation
#: export from before the review: ``evaluate-edits --baseline`` reads it, and :func:`undo_review`
#: puts it back before the next demo trains.
BEFORE_REVIEW = "annotations_before_review"
_REVIEW_RECORD = "review_round.json"
#: How far the simulated pathologist trims the reshaped object's outline (level-0 px): far beyond
#: the review rule's 1 px allowance for QuPath's coordinate rounding.
RESHAPE_PX = 8.0
#: Radius (level-0 px) of the annotation the simulated pathologist draws where they deleted one.
ADDED_RADIUS_PX = 16.0
#: The reviewer's edits on the reviewed slide, one AI object each, given to the largest objects
#: in this order; every other AI object is left untouched.
ONE_EACH = ("reshaped", "reclassified", "locked", "deleted")
_MIN_UNTOUCHED = 2
#: The review rule's counts recorded per class (qpseg.review.ReviewCounts).
_COUNT_KEYS = ("left_out", "kept", "unreviewed", "accepted", "edited", "unproven")
#: evaluate-edits' per-slide counts (edits.csv columns) recorded by the review round.
_EDIT_KEYS = ("n_ai", "n_kept", "n_accepted", "n_left_out", "n_reshaped", "n_reclassified",
              "n_deleted", "n_added", "n_existing", "n_other_ai", "n_user_other")
#: The commands that read the reviewed export as truth, in the order the round runs them.
TRUTH_READERS = ("import-project", "evaluate", "evaluate-edits")


@dataclass(frozen=True)
class SimulatedReview:
    """What :func:`simulate_review` did, and the counts that follow from it.

    ``actions`` maps each edit (:data:`ONE_EACH`, ``added``, and ``untouched`` for the reviewed
    slide's other AI objects) to object ids. ``expected_ai``: the AI objects of the export per
    class (``Tumor``, or ``Tumor (detections)`` for other object types) with their review status
    and whether the default rule (``unreviewed-out``) keeps them; every reader of truth counts
    them over all exported slides. ``no_truth`` lists the exported entries left without truth
    (only unreviewed AI objects): partial truth cannot score them, but their AI objects are
    still counted. ``expected_edits``: the ``evaluate-edits`` counts over all exported slides
    (:data:`_EDIT_KEYS`).
    """

    entry_id: int
    slide: str
    actions: dict[str, list[str]]
    exported: tuple[int, ...]
    no_truth: tuple[int, ...]
    expected_ai: dict[str, dict[str, int]]
    expected_edits: dict[str, int]
    baseline: Path


@dataclass
class ReviewRound:
    """The demo's simulated review round: what was done, expected and observed.

    ``expected`` and ``observed`` have the same shape: per truth reader
    (:data:`TRUTH_READERS`) the AI objects left out and kept per class (with their review
    statuses), and under ``edits`` the ``evaluate-edits`` counts.
    """

    simulation: SimulatedReview
    expected: dict[str, Any]
    observed: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every observed count is the expected one."""
        return self.observed == self.expected

    def mismatches(self) -> list[str]:
        """One line per count that differs (``where: what: expected X, observed Y``)."""
        out: list[str] = []
        for where in self.expected.keys() | self.observed.keys():
            exp, obs = self.expected.get(where, {}), self.observed.get(where, {})
            for key in sorted(exp.keys() | obs.keys()):
                e, o = exp.get(key), obs.get(key)
                if e != o:
                    out.append(f"{where}: {key}: expected {e}, observed {o}")
        return sorted(out)

    def to_json(self) -> dict[str, Any]:
        """The JSON form ``demo_summary.json`` holds under ``review_round``."""
        sim = self.simulation
        return {
            "entry_id": sim.entry_id, "slide": sim.slide, "policy": "unreviewed-out",
            "actions": {k: len(v) for k, v in sim.actions.items()},
            "object_ids": sim.actions, "exported_entries": list(sim.exported),
            "entries_without_truth": list(sim.no_truth),
            "expected": self.expected, "observed": self.observed, "ok": self.ok,
            "mismatches": self.mismatches(),
            "paths": {k: str(v) for k, v in self.paths.items()},
        }


def _count_key(object_type: str, class_name: str) -> str:
    return class_name if object_type == "annotation" else f"{class_name} ({object_type}s)"


def _counts_json(counts: Any) -> dict[str, dict[str, int]]:
    """A :class:`qpseg.review.ReviewCounts` as ``{class: {count: n}}`` (:data:`_COUNT_KEYS`)."""
    return {_count_key(r["object_type"], r["class_name"]): {k: int(r[k]) for k in _COUNT_KEYS}
            for r in counts.rows()}


def undo_review(project_folder: str | os.PathLike[str]) -> bool:
    """Put back the annotation export from before a review round (False: there was none).

    The files the round replaced are restored from ``qpseg/annotations_before_review`` and the
    ones it created are removed, so the demo trains on the example's own annotations again.
    """
    import json
    import shutil

    from qpseg._io import atomic_write

    qp = Path(project_folder) / "qpseg"
    before, ann = qp / BEFORE_REVIEW, qp / "annotations"
    partial = qp / f"{BEFORE_REVIEW}.partial"
    if partial.exists():  # a round stopped before its export was written: nothing to undo
        shutil.rmtree(partial)
    if not before.is_dir():
        return False
    created: list[str] = []
    record = before / _REVIEW_RECORD
    if record.is_file():
        data = json.loads(record.read_text(encoding="utf-8"))
        created = [n for n in data.get("created", []) if isinstance(n, str) and Path(n).name == n]
    for f in sorted(before.glob("*.geojson")):
        with atomic_write(ann / f.name, "wb", backup=False) as fh:
            fh.write(f.read_bytes())
    for name in created:
        (ann / name).unlink(missing_ok=True)
    shutil.rmtree(before)
    return True


def _other_class(name: str | None) -> str:
    """The class a reviewer changes ``name`` to: the next of :data:`CLASSES`."""
    i = CLASSES.index(name) if name in CLASSES else -1
    return CLASSES[(i + 1) % len(CLASSES)]


def simulate_review(example: Example, predictions: str | os.PathLike[str], *,
                    seed: int = 0) -> SimulatedReview:
    """Write the annotation export QuPath would write after one review round.

    The story: ``import_predictions.groovy`` brought every entry's predictions into QuPath; a
    pathologist reviewed one training slide (the one with the most AI objects): of its largest
    objects one is reshaped (trimmed by :data:`RESHAPE_PX`), one reclassified, one locked
    (accepted as it is) and one deleted, and one annotation of their own is drawn where the
    deleted one was; everything else is left untouched. ``export_annotations.groovy`` ("Run for
    project") then writes ``qpseg/annotations/<entryID>.geojson`` for every entry with
    predictions: the entry's earlier annotations and its AI objects as QuPath exports them
    (:func:`qpseg.testing.projects.qupath_exported`: same ids, metadata and classes, float32
    coordinates with 2 decimals, ``isLocked`` on the locked one), the new annotation with no
    qpseg metadata. The earlier export is kept in ``qpseg/annotations_before_review`` (undone by
    :func:`undo_review`, which runs first). Raises :class:`~qpseg.errors.QpsegError` when no
    training slide has enough AI objects to review.
    """
    import shutil
    import uuid

    import numpy as np

    from qpseg._io import write_json_atomic
    from qpseg.errors import QpsegError
    from qpseg.labels import label_role
    from qpseg.qupath.classes import default_color
    from qpseg.qupath.geojson import QuPathObject, read_geojson, write_geojson
    from qpseg.qupath.project import QuPathProject
    from qpseg.review import ReviewCounts, is_ai_object
    from qpseg.testing.projects import qupath_exported

    pred_dir = Path(predictions)
    qp = example.folder / "qpseg"
    ann = qp / "annotations"
    undo_review(example.folder)
    ai: dict[int, list[QuPathObject]] = {}
    for eid in sorted((*example.train_ids, *example.test_ids)):
        pf = pred_dir / f"{eid}.geojson"
        if pf.is_file():
            ai[eid] = [o for o in read_geojson(pf) if is_ai_object(o)]
    need = len(ONE_EACH) + _MIN_UNTOUCHED
    candidates = [eid for eid in example.train_ids if len(ai.get(eid, ())) >= need]
    if not candidates:
        raise QpsegError(f"no training slide has the {need} AI objects a review round needs "
                         f"(objects per entry: {({k: len(v) for k, v in ai.items()})})",
                         pred_dir)
    reviewed = max(candidates, key=lambda eid: (len(ai[eid]), -eid))
    entry = next(e for e in QuPathProject.load(example.project).entries
                 if e.entry_id == reviewed)

    # The export from before the review, complete before anything is replaced.
    partial, before = qp / f"{BEFORE_REVIEW}.partial", qp / BEFORE_REVIEW
    partial.mkdir(parents=True)
    created = []
    for eid in ai:
        src = ann / f"{eid}.geojson"
        if src.is_file():
            shutil.copy2(src, partial / src.name)
        else:
            created.append(src.name)
    write_json_atomic(partial / _REVIEW_RECORD, {
        "made_by": "qpseg demo review round",
        "note": "the annotation export before the simulated review; the next demo restores it",
        "created": created}, backup=False)
    partial.rename(before)

    rng = np.random.default_rng(seed)
    actions: dict[str, list[str]] = {k: [] for k in (*ONE_EACH, "added", "untouched")}
    expected = ReviewCounts("unreviewed-out")
    no_truth: list[int] = []
    edits = dict.fromkeys(_EDIT_KEYS, 0)
    for eid, objs in ai.items():
        own_file = before / f"{eid}.geojson"
        own = read_geojson(own_file) if own_file.is_file() else []
        final = [qupath_exported(o) for o in own]
        slide_counts = ReviewCounts("unreviewed-out")
        edits["n_existing"] += len(own)
        edits["n_ai"] += len(objs)
        picked: dict[int, str] = {}
        if eid == reviewed:
            largest = sorted(range(len(objs)), key=lambda i: (-objs[i].geometry.area,
                                                              objs[i].id or ""))
            picked = {i: what for i, what in zip(largest, ONE_EACH, strict=False)}
        for i, o in enumerate(objs):
            what = picked.get(i, "untouched")
            if eid == reviewed:
                actions[what].append(str(o.id))
            if what == "deleted":
                edits["n_deleted"] += 1
                continue
            if what == "reshaped":
                trimmed = o.geometry.buffer(-RESHAPE_PX)
                if trimmed.is_empty:
                    raise QpsegError(f"object {o.id} vanishes when trimmed by {RESHAPE_PX} px",
                                     pred_dir / f"{eid}.geojson")
                f, status = qupath_exported(o, geometry=trimmed), "edited"
                edits["n_reshaped"] += 1
            elif what == "reclassified":
                f = qupath_exported(o, classification=_other_class(o.classification))
                status = "edited"
                edits["n_reclassified"] += 1
            elif what == "locked":
                f, status = qupath_exported(o, locked=True), "accepted"
                edits["n_accepted"] += 1
                edits["n_kept"] += 1
            else:
                f, status = qupath_exported(o), "unreviewed"
                edits["n_kept"] += 1
                edits["n_left_out"] += 1
            slide_counts.add(f, status, status != "unreviewed")
            final.append(f)
        if eid == reviewed:
            gone = objs[next(i for i, w in picked.items() if w == "deleted")]
            spot = gone.geometry.representative_point()
            own_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
            cls = gone.classification or CLASSES[0]
            final.append(qupath_exported(QuPathObject(
                spot.buffer(ADDED_RADIUS_PX), classification=cls,
                class_color=default_color(cls), id=own_id)))
            actions["added"].append(own_id)
            edits["n_added"] += 1
        write_geojson(ann / f"{eid}.geojson", final, backup=False)
        expected.merge(slide_counts)
        if not (slide_counts.total("kept") or any(label_role(o.classification) == "class"
                                                  for o in final if not is_ai_object(o))):
            no_truth.append(eid)
    return SimulatedReview(reviewed, entry.image_name or f"entry {reviewed}", actions,
                           tuple(ai), tuple(no_truth), _counts_json(expected), edits, before)


def run_review_round(example: Example, predictions: str | os.PathLike[str],
                     out: str | os.PathLike[str]) -> ReviewRound:
    """:func:`simulate_review`, then ``import_project``, ``evaluate`` (the project's reviewed
    export as truth against its predictions) and ``evaluate_edits`` with the default rule,
    writing to ``out/labels``, ``out/evaluation`` and ``out/edits`` (``out`` is replaced).

    The observed counts are those the three commands report; the expected ones follow from
    what the simulation did (:class:`SimulatedReview`). Nothing is raised when they differ:
    :attr:`ReviewRound.ok` says so.
    """
    import shutil
    import warnings

    from qpseg.edits import evaluate_edits
    from qpseg.evaluate import evaluate
    from qpseg.manifest import import_project

    out = Path(out)
    sim = simulate_review(example, predictions)
    if out.exists():
        shutil.rmtree(out)
    with warnings.catch_warnings():
        # Held-out slides hold only AI objects nobody reviewed: they are meant to have no truth.
        warnings.filterwarnings("ignore", message=r".*\(test_\d+\.tif\).*no annotation")
        manifest = import_project(example.project, out / "labels", use_paquo=False)
    # partial: a slide whose truth is only unreviewed AI objects has no truth to score, rather
    # than being scored as all-negative; its AI objects are counted either way.
    evaluation = evaluate(example.project, example.project, out / "evaluation", eval_mpp=2.0,
                          instances=False, report=False, n_bootstrap=0, truth_mode="partial")
    edited = evaluate_edits(example.project, out / "edits", baseline_dir=sim.baseline)
    rows = edited.rows()
    observed: dict[str, Any] = {
        "import-project": _counts_json(manifest.review),
        "evaluate": _counts_json(evaluation.review),
        "evaluate-edits": _counts_json(edited.review),
        "edits": {k: int(sum(r[k] for r in rows)) for k in _EDIT_KEYS},
    }
    expected: dict[str, Any] = {k: sim.expected_ai for k in TRUTH_READERS}
    expected["edits"] = sim.expected_edits
    return ReviewRound(sim, expected, observed, {
        "export": example.folder / "qpseg" / "annotations", "baseline": sim.baseline,
        "labels": out / "labels", "evaluation": out / "evaluation", "edits": out / "edits"})
