"""``qpseg demo --rounds N``: the review loop a lab runs, simulated on a generated example.

:func:`run_rounds` trains a first model on one sparsely annotated slide, then each round lets
``suggest`` pick pool slides, corrects them from the ground truth as a pathologist would
(:func:`correct_from_truth`), records the round with ``evaluate-edits --history`` and fine-tunes
the next model on the corrections (:class:`RoundOutcome`: one round's results).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpseg.demo_example import DEMO_TRAIN_CONFIG, Example, Progress, build_example

__all__ = ["MIN_ERROR_UM2", "REDRAW_FRACTION", "ROUNDS_FIRST_CONFIG", "SLIDES_PER_ROUND",
           "Correction", "RoundOutcome", "correct_from_truth", "run_rounds"]

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
