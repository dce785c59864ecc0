"""``qpseg demo``: the whole round trip on a generated example project.

Only :func:`build_example` and :func:`simulate_review` are demo-specific: the first writes a small
QuPath project of generated H&E-like slides with sparse "pathologist" annotations (as real users
draw them) and the full ground truth. :func:`run_demo` then calls the same library functions as
the real commands:
``import_project`` -> ``train`` -> ``infer`` -> ``evaluate``, then one simulated review round in
QuPath (:func:`simulate_review`: the export QuPath would write after a pathologist kept, reshaped,
reclassified, deleted, locked and added objects) read back by ``import_project``, ``evaluate``
and ``evaluate_edits``, whose counts of AI objects left out and kept must be those the
simulation implies (:func:`run_review_round`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ADDED_RADIUS_PX", "BEFORE_REVIEW", "CLASSES", "DEMO_MARKER", "DEMO_TRAIN_CONFIG",
           "ONE_EACH", "RESHAPE_PX", "TRUTH_READERS", "DemoResult", "Example", "ReviewRound",
           "SimulatedReview", "build_example", "claim_demo_folder", "held_out_dice", "run_demo",
           "run_review_round", "simulate_review", "undo_review"]

CLASSES = ("Tumor", "Stroma", "Necrosis")
EXAMPLE_VERSION = "1"
#: The file that marks a folder as the demo's own: only there does the demo replace outputs.
DEMO_MARKER = ".qpseg-demo"


@dataclass(frozen=True)
class Example:
    """The generated example: its project, which entries train and which are held out."""

    project: Path  # project.qpproj
    train_ids: tuple[int, ...]
    test_ids: tuple[int, ...]
    ground_truth: Path  # folder of <entryID>.geojson with the full truth (Region* = tissue)
    pool_ids: tuple[int, ...] = ()  # unannotated slides the review rounds draw from

    @property
    def folder(self) -> Path:
        """The project folder."""
        return self.project.parent


def _sparse_annotations(slide: Any, rng: Any) -> list[Any]:
    """What a pathologist would draw: one exhaustive Region*, partial outlines, an Ignore*."""
    from shapely.geometry import Point, box

    from qpseg.qupath.classes import default_color
    from qpseg.qupath.geojson import QuPathObject

    w, h = slide.width, slide.height
    # The Region* box straddles the tissue edge, so it teaches glass and unlabelled tissue as
    # Background (ho2021/khalil2022 train on such exhaustively annotated areas).
    region = box(0.05 * w, 0.05 * h, 0.62 * w, 0.62 * h)
    objs = [QuPathObject(region, classification="Region*", class_color=default_color("Region*"))]
    for r in slide.regions:
        inside = r.geometry.intersection(region)
        if not inside.is_empty and inside.area > 1:
            objs.append(QuPathObject(inside, classification=r.class_name,
                                     class_color=default_color(r.class_name)))
        outside = r.geometry.difference(region)
        if outside.is_empty or rng.random() < 0.3:
            continue  # some regions outside the box are never annotated
        c = outside.representative_point()
        partial = outside.intersection(Point(c.x, c.y).buffer(0.12 * min(w, h)))
        if not partial.is_empty and partial.area > 1:
            objs.append(QuPathObject(partial, classification=r.class_name,
                                     class_color=default_color(r.class_name)))
    # A "pen mark" the pathologist excluded: labels under it are ignored.
    pen = box(0.40 * w, 0.08 * h, 0.46 * w, 0.30 * h)
    objs.append(QuPathObject(pen, classification="Ignore*", class_color=default_color("Ignore*")))
    return objs


def _ground_truth(slide: Any) -> list[Any]:
    from qpseg.qupath.classes import default_color
    from qpseg.qupath.geojson import QuPathObject

    objs = [QuPathObject(slide.tissue, classification="Region*",
                         class_color=default_color("Region*"))]
    objs += [QuPathObject(r.geometry, classification=r.class_name,
                          class_color=default_color(r.class_name)) for r in slide.regions]
    return objs


def build_example(
    folder: str | os.PathLike[str],
    *,
    n_train: int = 3,
    n_test: int = 2,
    size_px: int = 1536,
    mpp: float = 0.5,
    seed: int = 0,
    n_pool: int = 0,
) -> Example:
    """Write (or reuse, when already built with the same settings) the example project.

    Slides are generated pyramidal TIFFs (``folder/slides``); training entries get sparse
    annotations in ``qpseg/annotations/`` (where the export Groovy script puts them), held-out
    entries none; the full ground truth of every entry goes to ``qpseg/ground_truth/``.
    ``n_pool`` more slides (entry metadata ``qpseg_demo_role: pool``, no annotations) are
    what the review rounds of :func:`run_rounds` draw from.
    """
    import json

    import numpy as np

    from qpseg._io import write_json_atomic
    from qpseg.qupath.classes import PathClass, default_color
    from qpseg.qupath.geojson import write_geojson
    from qpseg.qupath.images import add_slide
    from qpseg.qupath.project import QuPathProject
    from qpseg.testing.synthetic import make_slide

    folder = Path(folder)
    settings: dict[str, Any] = {"version": EXAMPLE_VERSION, "n_train": n_train,
                                "n_test": n_test, "size_px": size_px, "mpp": mpp, "seed": seed}
    if n_pool:
        settings["n_pool"] = n_pool
    stamp = folder / "qpseg" / "example.json"
    if stamp.is_file() and (folder / "project.qpproj").is_file():
        saved = json.loads(stamp.read_text(encoding="utf-8"))
        if saved.get("settings") == settings:
            return Example(folder / "project.qpproj", tuple(saved["train_ids"]),
                           tuple(saved["test_ids"]), folder / "qpseg" / "ground_truth",
                           tuple(saved.get("pool_ids", ())))
    names = [*CLASSES, "Region*", "Ignore*"]
    project = QuPathProject.create(folder, [PathClass(n, default_color(n)) for n in names],
                                   overwrite=True)
    rng = np.random.default_rng(seed)
    ids: dict[str, list[int]] = {"train": [], "test": [], "pool": []}
    train_ids, test_ids = ids["train"], ids["test"]
    for i in range(n_train + n_test + n_pool):
        role = "train" if i < n_train else "test" if i < n_train + n_test else "pool"
        slide = make_slide(folder / "slides" / f"{role}_{i:02d}.tif", width=size_px,
                           height=size_px, mpp=mpp, seed=seed + i)
        entry = add_slide(project, slide.path, entry_metadata={"qpseg_demo_role": role})
        ids[role].append(entry.entry_id)
        write_geojson(folder / "qpseg" / "ground_truth" / f"{entry.entry_id}.geojson",
                      _ground_truth(slide), backup=False)
        if role == "train":
            write_geojson(folder / "qpseg" / "annotations" / f"{entry.entry_id}.geojson",
                          _sparse_annotations(slide, rng), backup=False)
    project.save()
    write_json_atomic(stamp, {"settings": settings, "train_ids": train_ids,
                              "test_ids": test_ids, "pool_ids": ids["pool"]}, backup=False)
    return Example(project.path, tuple(train_ids), tuple(test_ids),
                   folder / "qpseg" / "ground_truth", tuple(ids["pool"]))


def _is_demo_folder(folder: Path) -> bool:
    """Whether ``folder`` was made by the demo: its marker, or (demos from before the marker)
    the example stamp that only :func:`build_example` writes."""
    return (folder / DEMO_MARKER).is_file() or (folder / "project" / "qpseg" / "example.json"
                                                ).is_file()


def claim_demo_folder(out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Make ``out`` the demo's folder, refusing one that holds anything the demo did not make.

    The demo replaces ``project/``, ``labels/``, ``model/``, ``evaluation/`` and ``review/``
    inside its folder, so a folder that is neither new, empty nor marked as the demo's own (the
    ``.qpseg-demo`` file written here) is refused with ``OutputError`` unless ``force``.
    """
    from qpseg._io import ensure_writable_dir, write_json_atomic
    from qpseg.errors import OutputError

    folder = Path(out)
    if folder.is_dir() and not force and not _is_demo_folder(folder) and any(folder.iterdir()):
        raise OutputError("is not empty and was not made by `qpseg demo` (no .qpseg-demo file); "
                          "the demo would replace its project/, labels/, model/, evaluation/ and "
                          "review/: choose a new or empty folder, or pass --force", folder)
    ensure_writable_dir(folder)
    if not (folder / DEMO_MARKER).is_file():
        write_json_atomic(folder / DEMO_MARKER, {
            "made_by": "qpseg demo",
            "note": "qpseg demo may replace everything in this folder when it runs again"},
            backup=False)
    return folder


# ============================================================================== review round

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


@dataclass
class DemoResult:
    """What the demo measured and where it wrote it."""

    example: Example | None
    out: Path
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds
    scores: list[dict[str, Any]] = field(default_factory=list)  # per slide (role marked)
    objects: dict[str, int] = field(default_factory=dict)  # entry id -> objects written
    paths: dict[str, Path] = field(default_factory=dict)
    review: ReviewRound | None = None  # the simulated review round and its counts


#: The demo's fixed training budget (examples/configs/tiny_unet_demo.yaml holds the same
#: settings as a file; a test keeps the two equal). tiny_unet at 2 µm/px on 64 px tiles.
DEMO_TRAIN_CONFIG: dict[str, Any] = {
    "model": "tiny_unet",
    "model_kwargs": {"tile_px": 64, "base_filters": 8, "depth": 3},
    "data": {"mpp": 2.0, "stride_px": 32, "min_labelled": 0.05},
    "split": {"val": 0.25, "test": 0.0},
    "sampler": {"name": "uniform"},
    "augment": {"preset": "none", "rot90": True, "hflip": True, "vflip": True},
    "loss": {"name": "ce"},
    "optimizer": {"name": "adam", "lr": 3.0e-3},
    "train": {"batch_size": 8, "epochs": 10, "steps": 150, "log_every": 10,
              "checkpoint_every": 50},
}

Progress = Callable[[str, dict[str, Any]], None]


def run_demo(
    out: str | os.PathLike[str],
    *,
    device: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
    train_callback: Callable[[Any], None] | None = None,
    infer_progress: Callable[[Any], None] | None = None,
) -> DemoResult:
    """Build the example under ``out/project``, run import -> train -> infer -> evaluate, then
    one simulated review round (:func:`run_review_round`, outputs in ``out/review``).

    ``out`` must be new, empty or a previous demo's folder (see :func:`claim_demo_folder`;
    ``force`` lifts that); a previous demo's model and evaluation there are replaced, and the
    example project is reused when it was built with the same settings.
    ``progress(step, info)`` is called as each step starts and ends; ``train_callback`` and
    ``infer_progress`` receive the training and inference events of those commands.
    The review round's counts are in ``DemoResult.review`` (``ok`` says whether they are the
    expected ones); a previous round's export is undone before the example is imported.
    """
    import shutil
    import time

    from qpseg.engine.run import InferenceParams, jobs_from_project, run_inference
    from qpseg.evaluate import evaluate
    from qpseg.manifest import import_project
    from qpseg.training.run import train

    out = claim_demo_folder(out, force=force)
    report = progress or (lambda step, info: None)
    from qpseg.devices import resolve_device

    if resolve_device(device).type == "cpu":
        import torch

        # The demo's 64 px tiles are too small to split across cores: extra OpenMP threads only
        # contend (measured here: 85 ms/step with one thread, 180-290 ms with two on 2 busy cores).
        torch.set_num_threads(1)
    result = DemoResult(example=None, out=out)

    def timed(step: str, fn: Callable[[], Any]) -> Any:
        report(step, {"event": "start"})
        t = time.perf_counter()
        value = fn()
        result.steps[step] = time.perf_counter() - t
        report(step, {"event": "end", "seconds": result.steps[step]})
        return value

    import warnings

    example = timed("example", lambda: build_example(out / "project"))
    undo_review(example.folder)  # train on the example's own annotations, not a reviewed export
    with warnings.catch_warnings():
        # Held-out entries have no annotations on purpose: the notes about them are noise here.
        warnings.filterwarnings("ignore", message=r".*\(test_\d+\.tif\).*no annotation")
        result.example = example
        manifest = timed("import-project",
                         lambda: import_project(example.project, out / "labels", use_paquo=False))
        result.paths["manifest"] = manifest.path or out / "labels" / "manifest.json"

        model_dir = out / "model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        trained = timed("train", lambda: train(result.paths["manifest"], model_dir,
                                               config=DEMO_TRAIN_CONFIG, device=device,
                                               callback=train_callback))
        result.paths["model"] = trained.package or model_dir

        def infer() -> Any:
            jobs, pred_dir = jobs_from_project(example.project)
            params = InferenceParams(device=device, overwrite=True, overlay=True, heatmap=True,
                                     min_area_um2=100.0)
            return run_inference(jobs, result.paths["model"], pred_dir, params,
                                 progress=infer_progress), pred_dir

        run, pred_dir = timed("infer", infer)
        result.paths["predictions"] = pred_dir
        from qpseg.errors import QpsegError

        if run.failed:
            raise QpsegError("inference failed on " + "; ".join(
                f"{r.name}: {r.reason}" for r in run.failed), pred_dir)
        # What QuPath will import must re-read through qpseg's own reader as valid objects.
        from qpseg.qupath.geojson import read_geojson

        for r in run.results:
            objs = read_geojson(r.output)
            bad = [i for i, o in enumerate(objs) if not o.geometry.is_valid]
            if bad:
                raise QpsegError(f"objects {bad[:5]} have invalid geometry", r.output)
            result.objects[str(r.entry_id or r.key)] = len(objs)

        eval_dir = out / "evaluation"
        evaluation = timed("evaluate", lambda: evaluate(
            example.ground_truth, pred_dir, eval_dir, mpp=0.5, eval_mpp=2.0, instances=False))
        result.paths["evaluation"] = eval_dir
        roles = {str(i): "train" for i in example.train_ids} | {
            str(i): "held-out" for i in example.test_ids}
        from qpseg.qupath.project import QuPathProject

        # A per-slide row names its entry, or only its slide: both find the role.
        roles |= {e.image_name: roles[str(e.entry_id)]
                  for e in QuPathProject.load(example.project).entries
                  if e.image_name and str(e.entry_id) in roles}
        by_slide: dict[str, dict[str, Any]] = {}
        for row in evaluation.per_slide_rows():
            key = str(row.get("entry_id") or row["slide"])
            rec = by_slide.setdefault(key, {"slide": row["slide"], "entry_id": key,
                                            "role": roles.get(key, "?")})
            name = str(row["class_name"])
            rec[f"dice_{name}"] = row["dice"]
            rec[f"iou_{name}"] = row["iou"]
        lesions = {str(r["slide"]): r for r in evaluation.lesion_slide_rows()}
        for rec in by_slide.values():
            les = lesions.get(str(rec["slide"]), {})
            for k in ("n_truth", "n_detected", "n_fp", "truth_category", "pred_category"):
                if k in les:
                    rec[f"lesion_{k}"] = les[k]
        result.scores = [by_slide[k] for k in sorted(by_slide, key=lambda k: (len(k), k))]
    result.review = timed("review", lambda: run_review_round(example, pred_dir, out / "review"))
    result.paths["review"] = out / "review"
    return result


def held_out_dice(result: DemoResult, class_name: str = "Tumor") -> float:
    """Mean Dice of ``class_name`` over the held-out slides (the demo's headline score)."""
    import math

    values = [float(r[f"dice_{class_name}"]) for r in result.scores
              if r["role"] == "held-out" and r.get(f"dice_{class_name}") is not None]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


# ============================================================================== review rounds

#: Slides the simulated pathologist reviews per round (the top of ``suggest``'s ranking).
SLIDES_PER_ROUND = 2
#: The simulated pathologist fixes an error only when it is at least this large (µm²): what a
#: person sees and corrects at the slide's overview, not every pixel.
MIN_ERROR_UM2 = 400.0
#: An outline is redrawn only when the area it gets wrong is also at least this share of the
#: object: a few pixels along a large object's border are not worth a pathologist's time.
REDRAW_FRACTION = 0.15
#: The first model of the rounds: the demo's recipe (no validation split: every reviewed slide
#: trains) with a shorter budget, on the one sparsely annotated slide, so that it still makes
#: errors a review corrects (it misses Necrosis).
ROUNDS_FIRST_CONFIG: dict[str, Any] = {
    **DEMO_TRAIN_CONFIG,
    "split": {"val": 0.0, "test": 0.0},
    "train": {**DEMO_TRAIN_CONFIG["train"], "steps": 60},
}
_EDIT_KINDS = ("accepted", "reshaped", "reclassified", "deleted", "added", "untouched")


@dataclass
class Correction:
    """What the simulated pathologist did to one slide: the objects of its export and the
    count of each kind of edit (:data:`_EDIT_KINDS`)."""

    final: list[Any]
    counts: dict[str, int]


def correct_from_truth(ai: list[Any], truth: list[Any], *, mpp: float, seed: int = 0,
                       min_error_um2: float = MIN_ERROR_UM2) -> Correction:
    """Review one slide's AI objects against its full ground truth as a pathologist would:
    fix every error of at least ``min_error_um2`` and accept (lock) the rest.

    Per AI object, largest first: mostly inside truth of its own class -> redrawn as the true
    regions of that class it touches when the area it gets wrong is at least
    ``min_error_um2`` and :data:`REDRAW_FRACTION` of the object, else accepted; touching only
    regions another object already stands for -> deleted (a duplicate fragment); mostly
    inside truth of another class -> reclassified; otherwise (a false positive of at least
    ``min_error_um2``) deleted; smaller ones are left untouched. Every true region no object
    stands for and of at least ``min_error_um2`` is drawn as a new annotation, and the
    slide's tissue becomes one ``Region*`` annotation (reviewed exhaustively: what is not
    outlined there is Background). Objects come back as QuPath exports them
    (:func:`qpseg.testing.projects.qupath_exported`).
    """
    import uuid

    import numpy as np
    from shapely import union_all

    from qpseg.labels import label_role
    from qpseg.qupath.classes import default_color
    from qpseg.qupath.geojson import QuPathObject, repair_polygonal
    from qpseg.testing.projects import qupath_exported

    rng = np.random.default_rng(seed)
    min_px = min_error_um2 / (mpp * mpp)
    regions: list[tuple[str, Any]] = []  # (class, true region)
    tissue = []
    for t in truth:
        role = label_role(t.classification)
        if role == "class" and t.classification:
            regions.append((t.classification, repair_polygonal(t.geometry)))
        elif role == "region":
            tissue.append(repair_polygonal(t.geometry))
    truth_of = {c: union_all([g for k, g in regions if k == c]) for c, _ in regions}
    claimed: set[int] = set()
    counts = dict.fromkeys(_EDIT_KINDS, 0)
    final: list[Any] = []

    def new_id() -> str:
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))

    for o in sorted(ai, key=lambda o: -o.geometry.area):
        g = repair_polygonal(o.geometry)
        area = g.area
        own = truth_of.get(o.classification or "")
        inside = g.intersection(own).area if own is not None else 0.0
        if area > 0 and inside >= 0.5 * area:
            touched = [i for i, (c, r) in enumerate(regions)
                       if c == o.classification and r.intersection(g).area > 0]
            free = [i for i in touched if i not in claimed]
            if not free:
                counts["deleted"] += 1
                continue
            claimed.update(free)
            fixed = repair_polygonal(union_all([regions[i][1] for i in free]))
            wrong = g.symmetric_difference(fixed).area
            if wrong >= min_px and wrong >= REDRAW_FRACTION * max(area, fixed.area):
                final.append(qupath_exported(o, geometry=fixed))
                counts["reshaped"] += 1
            else:
                final.append(qupath_exported(o, locked=True))
                counts["accepted"] += 1
            continue
        other = max(((g.intersection(v).area, k) for k, v in truth_of.items()
                     if k != o.classification), default=(0.0, ""))
        if area > 0 and other[0] >= 0.5 * area and area >= min_px:
            final.append(qupath_exported(o, classification=other[1]))
            counts["reclassified"] += 1
        elif area - inside >= min_px:
            counts["deleted"] += 1
        else:
            final.append(qupath_exported(o))
            counts["untouched"] += 1
    for i, (cls, region) in enumerate(regions):
        if i in claimed:
            continue
        have = [repair_polygonal(f.geometry) for f in final if f.classification == cls]
        missing = repair_polygonal(region.difference(union_all(have)) if have else region)
        if missing.is_empty or missing.area < min_px:
            continue
        final.append(qupath_exported(QuPathObject(
            missing, classification=cls, class_color=default_color(cls), id=new_id())))
        counts["added"] += 1
    if tissue:
        final.append(qupath_exported(QuPathObject(
            union_all(tissue), classification="Region*", class_color=default_color("Region*"),
            id=new_id())))
    return Correction(final, counts)


@dataclass
class RoundOutcome:
    """One review round of :func:`run_rounds`: the model reviewed, the slides ``suggest``
    picked, what the pathologist did (``simulated``) and what ``evaluate-edits --history``
    recorded (``recorded``, a :class:`qpseg.rounds.RoundRecord` row), and the held-out tumour
    Dice of the model reviewed (``before``) and of the one fine-tuned on the corrections."""

    round: int
    model: Path
    model_sha256: str
    reviewed: list[int]
    ranking: list[dict[str, Any]]
    simulated: dict[str, int]
    recorded: dict[str, Any]
    held_out_tumor_dice_before: float
    held_out_tumor_dice: float
    seconds: dict[str, float] = field(default_factory=dict)
    #: The corrections per slide the simulated pathologist would make on the held-out slides
    #: with the model reviewed (``before``) and the fine-tuned one: the same slides every
    #: round, so this effort is comparable across rounds (the reviewed slides differ).
    held_out_corrections_before: float = float("nan")
    held_out_corrections: float = float("nan")

    def to_json(self) -> dict[str, Any]:
        """The item of ``demo_summary.json``'s ``rounds`` list (a value that is not a finite
        number, e.g. Dice without any area, is null)."""
        import math

        def num(v: Any) -> float | None:
            return float(v) if v is not None and math.isfinite(float(v)) else None

        rec = self.recorded
        return {
            "round": self.round, "model": str(self.model), "model_sha256": self.model_sha256,
            "reviewed_entries": self.reviewed, "ranking": self.ranking,
            "held_out_tumor_dice_before": num(self.held_out_tumor_dice_before),
            "held_out_tumor_dice": num(self.held_out_tumor_dice),
            **{f"n_{k}": int(rec[f"n_{k}"]) for k in ("accepted", "reshaped", "reclassified",
                                                    "deleted", "added")},
            "corrections": int(rec["corrections"]),
            "corrections_per_slide": num(rec["corrections_per_slide"]),
            "area_changed_um2": num(rec["area_changed_um2"]),
            "area_changed_um2_per_slide": num(rec["area_changed_um2_per_slide"]),
            "held_out_corrections_per_slide_before": num(self.held_out_corrections_before),
            "held_out_corrections_per_slide": num(self.held_out_corrections),
            "dice_ai_vs_final": num(rec["dice"]),
            "simulated": self.simulated,
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "round_seconds": round(sum(self.seconds.values()), 1),
        }


def _held_out(example: Example, model: Path, out: Path, truth: Path,
              device: str) -> tuple[float, float]:
    """Held-out tumour Dice of ``model`` and the corrections per held-out slide the
    simulated pathologist would make (:func:`correct_from_truth`): infer the held-out entries
    into ``out/predictions`` and evaluate them against their ground truth (``truth``: their
    files only)."""
    import math

    from qpseg.engine.run import InferenceParams, jobs_from_project, run_inference
    from qpseg.errors import QpsegError
    from qpseg.evaluate import evaluate

    jobs, _ = jobs_from_project(example.project, out / "predictions",
                                [str(e) for e in example.test_ids])
    run = run_inference(jobs, model, out / "predictions",
                        InferenceParams(device=device, overwrite=True, min_area_um2=100.0))
    if run.failed:
        raise QpsegError("inference failed on " + "; ".join(
            f"{r.name}: {r.reason}" for r in run.failed), out / "predictions")
    ev = evaluate(truth, out / "predictions", out / "evaluation", mpp=0.5, eval_mpp=2.0,
                  instances=False, report=False, n_bootstrap=0)
    values = [float(r["dice"]) for r in ev.per_slide_rows() if r["class_name"] == "Tumor"]
    values = [v for v in values if math.isfinite(v)]
    return (sum(values) / len(values) if values else float("nan"),
            _effort_per_slide(out / "predictions", truth, example.test_ids))


def _effort_per_slide(predictions: Path, truth: Path, ids: Sequence[int]) -> float:
    """The corrections (reshaped, reclassified, deleted, added) per slide the simulated
    pathologist makes on the AI objects in ``predictions`` against ``truth`` (both
    ``<entryID>.geojson``)."""
    from qpseg.qupath.geojson import read_geojson
    from qpseg.review import is_ai_object

    total = 0
    for eid in ids:
        ai = [o for o in read_geojson(predictions / f"{eid}.geojson") if is_ai_object(o)]
        counts = correct_from_truth(ai, read_geojson(truth / f"{eid}.geojson"), mpp=0.5,
                                    seed=eid).counts
        total += sum(counts[k] for k in ("reshaped", "reclassified", "deleted", "added"))
    return total / len(ids) if ids else float("nan")


def run_rounds(
    out: str | os.PathLike[str],
    n_rounds: int,
    *,
    device: str = "auto",
    progress: Progress | None = None,
    train_callback: Callable[[Any], None] | None = None,
) -> list[RoundOutcome]:
    """``qpseg demo --rounds N``: the loop a lab runs, ``n_rounds`` times, in ``out/rounds``
    (replaced; a project of its own, so the one-round demo's outputs are untouched).

    The first model is trained on one sparsely annotated slide (:data:`ROUNDS_FIRST_CONFIG`).
    Each round: ``suggest`` ranks the unreviewed pool slides with the current model (which
    writes their predictions, as ``infer`` would, and the ranking into the project); the top
    :data:`SLIDES_PER_ROUND` are corrected from the ground truth (:func:`correct_from_truth`)
    and exported; ``evaluate_edits`` + :func:`qpseg.rounds.record_round` add the round to
    ``qpseg/rounds.csv`` (report in ``round_<k>/edits/rounds.html``); ``train`` fine-tunes the
    next model from the current one (``init_from``: the package's recipe, a shorter schedule,
    corrected regions weighted; ``FINETUNE_LR_SHARE`` of its learning rate, as
    ``train --init-from`` does). The held-out
    tumour Dice, and the corrections the held-out slides would need, are measured for every
    model.
    """
    import shutil
    import time
    import warnings

    from qpseg.edits import evaluate_edits
    from qpseg.qupath.geojson import read_geojson, write_geojson
    from qpseg.review import is_ai_object
    from qpseg.rounds import record_round, rounds_from_edits, write_history_report
    from qpseg.suggest import suggest
    from qpseg.training.run import train

    if n_rounds < 1:
        from qpseg.errors import ConfigError

        raise ConfigError(f"--rounds must be at least 1, not {n_rounds}")
    report = progress or (lambda step, info: None)
    folder = Path(out) / "rounds"
    if folder.exists():
        shutil.rmtree(folder)

    from contextlib import contextmanager

    @contextmanager
    def timed(step: str, seconds: dict[str, float] | None = None) -> Iterator[None]:
        report(step, {"event": "start"})
        t = time.perf_counter()
        yield
        dt = time.perf_counter() - t
        if seconds is not None:
            seconds[step.split(": ", 1)[-1]] = dt
        report(step, {"event": "end", "seconds": dt})

    with timed("rounds: example"):
        example = build_example(folder / "project", n_train=1, n_test=2,
                                n_pool=SLIDES_PER_ROUND * n_rounds)
    truth = folder / "ground_truth_held_out"
    truth.mkdir(parents=True)
    for eid in example.test_ids:
        shutil.copy2(example.ground_truth / f"{eid}.geojson", truth / f"{eid}.geojson")
    qp = example.folder / "qpseg"
    pred_dir = qp / "predictions"
    outcomes: list[RoundOutcome] = []
    with warnings.catch_warnings():
        # Held-out and pool entries have no annotations on purpose.
        warnings.filterwarnings("ignore", message=r".*\((test|pool)_\d+\.tif\).*no annotation")
        warnings.filterwarnings("ignore", message=r".*\((test|pool)_\d+\.tif\).*skipped")
        # The exports come back with QuPath's float32 rounding, which can make a redrawn
        # outline touch itself; the reader repairs it, as for a real export.
        warnings.filterwarnings("ignore", message=r".*invalid polygon repaired")
        model = folder / "model_1"
        with timed("rounds: train model 1"):
            train(example.project, model, config=ROUNDS_FIRST_CONFIG, device=device,
                  callback=train_callback)
        with timed("rounds: held-out Dice of model 1"):
            dice, effort = _held_out(example, model, folder / "round_1" / "before", truth,
                                     device)
        reviewed: list[int] = []
        for k in range(1, n_rounds + 1):
            seconds: dict[str, float] = {}
            rdir = folder / f"round_{k}"
            pool = [str(e) for e in example.pool_ids if e not in reviewed]
            with timed(f"round {k}: suggest", seconds):
                ranked = suggest(example.project, model, n=SLIDES_PER_ROUND, entries=pool,
                                 device=device, work_dir=pred_dir)
            picked = [int(s.entry_id) for s in ranked.suggested if s.entry_id is not None]
            simulated = dict.fromkeys(_EDIT_KINDS, 0)
            with timed(f"round {k}: review", seconds):
                for eid in picked:
                    ai = [o for o in read_geojson(pred_dir / f"{eid}.geojson")
                          if is_ai_object(o)]
                    corr = correct_from_truth(
                        ai, read_geojson(example.ground_truth / f"{eid}.geojson"), mpp=0.5,
                        seed=eid)
                    write_geojson(qp / "annotations" / f"{eid}.geojson", corr.final,
                                  backup=False)
                    for key, v in corr.counts.items():
                        simulated[key] += v
            reviewed += picked
            with timed(f"round {k}: evaluate-edits --history", seconds):
                edits = evaluate_edits(example.project, rdir / "edits")
                records: list[Any] = []
                for found in rounds_from_edits(edits):
                    records, _ = record_round(example.project, found)
                write_history_report(rdir / "edits", records)
            sha = ranked.model_sha256
            rec = next((r for r in records if r.model_sha256 == sha), None)
            if rec is None:
                from qpseg.errors import QpsegError

                raise QpsegError(f"round {k}: the history has no round for model {sha[:12]}",
                                 qp / "rounds.csv")
            nxt = folder / f"model_{k + 1}"
            with timed(f"round {k}: fine-tune", seconds):
                train(example.project, nxt, overrides={"init_from": str(model)},
                      device=device, callback=train_callback)
            with timed(f"round {k}: held-out Dice", seconds):
                after, effort_after = _held_out(example, nxt, rdir / "after", truth, device)
            outcomes.append(RoundOutcome(
                k, model, sha, picked,
                [{"entry_id": s.entry_id, "rank": s.rank, "score": round(s.score, 4)}
                 for s in ranked.scores], simulated, rec.row(), dice, after, seconds,
                effort, effort_after))
            model, dice, effort = nxt, after, effort_after
    return outcomes
