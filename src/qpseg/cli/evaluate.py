"""``qpseg evaluate`` and ``qpseg evaluate-edits``: metrics CSVs, a report, and edit counts."""

from __future__ import annotations

from pathlib import Path

import typer


def evaluate(
    truth: Path = typer.Option(
        ..., "--truth",
        help="Ground truth: a QuPath project (its exported annotations in qpseg/annotations), "
             "a folder of GeoJSON files, or a folder of label masks.",
    ),
    pred: Path = typer.Option(
        ..., "--pred",
        help="Predictions: a QuPath project (qpseg/predictions/<entryID>.geojson, as written "
             "by `qpseg infer`), a folder of GeoJSON files, or a folder of label masks.",
    ),
    out: Path = typer.Option(..., "--out", help="Folder for the CSVs and report.html."),
    classes: str | None = typer.Option(
        None, "--classes",
        help="Comma-separated classes to evaluate, in index order (mask index 1 = the first). "
             "Default: the truth's classes.",
    ),
    mpp: float | None = typer.Option(
        None, "--mpp", help="µm per level-0 pixel of slides that have none (neither in the slide "
                            "nor set in QuPath); needed for GeoJSON folders."
    ),
    mpp_override: bool = typer.Option(
        False, "--mpp-override", help="Let --mpp replace every slide's own pixel size (each "
                                      "change is printed as old -> new)."
    ),
    eval_mpp: float | None = typer.Option(
        None, "--eval-mpp",
        help="µm per pixel of the raster on which pixel and lesion metrics are computed "
             "(default: the finest pixel size the predictions record as made at, else 2).",
    ),
    truth_mode: str = typer.Option(
        "exhaustive", "--truth-mode",
        help="exhaustive: every unannotated pixel of the image is Background (inside Region* "
             "annotations only, where a slide has them) and a slide without annotations is "
             "all-negative; partial: only the truth's labelled area is scored.",
    ),
    mask_mpp: float | None = typer.Option(
        None, "--mask-mpp", help="µm per pixel of label masks (default: from the slide size)."
    ),
    lesion_class: str | None = typer.Option(
        None, "--lesion-class",
        help="Class of the lesion metrics (default: Tumor/Tumour/Metastasis if present; "
             "'none' turns them off).",
    ),
    instances: bool | None = typer.Option(
        None, "--instances/--no-instances",
        help="Instance metrics (default: when the truth has detections, cells or instance "
             "masks).",
    ),
    no_report: bool = typer.Option(False, "--no-report", help="Write the CSVs only."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap confidence intervals."),
    workers: int = typer.Option(
        0, "--workers", min=0,
        help="Processes scoring slides in parallel (0: one per usable CPU when there are 4 "
             "or more slides). Results do not depend on it.",
    ),
    ai_objects: str = typer.Option(
        "unreviewed-out", "--ai-objects",
        help="Which objects qpseg wrote count as truth: unreviewed-out (all but those left "
             "unchanged and unlocked in the review), all-out (none) or all-in (all).",
    ),
    model: Path | None = typer.Option(
        None, "--model",
        help="The model package that made the predictions (default: the one their folder's "
             "run_metadata.json records): the report names it and marks the slides of its "
             "training split.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> int:
    """Score predictions against ground truth per slide: pixels, lesions and instances.

    Writes per_slide.csv, slides.csv, summary.csv (mean, std, 95 % bootstrap CI, pooled),
    confusion.csv, lesions.csv, instances.csv, unmatched.csv, failed.csv and report.html.
    --truth-mode exhaustive (the default) scores every pixel of the image, unannotated ones
    as Background; partial scores only the truth's labelled area. Objects qpseg wrote that
    the pathologist left unchanged (and did not lock) are unreviewed predictions, not truth
    (--ai-objects); the counts left out and kept per class are printed and in ai_objects.csv.
    Pixel size: the slide's own, else the one set in QuPath, else --mpp.
    Exits 1 when some slides failed.
    """
    import sys

    from qpseg.cli._common import print_json
    from qpseg.cli._progress import StepProgress
    from qpseg.evaluate import evaluate as run_evaluate

    class_list = [c for c in classes.split(",")] if classes else None
    with StepProgress("scoring slides") as progress:
        ev = run_evaluate(truth, pred, out, classes=class_list, mpp=mpp, eval_mpp=eval_mpp,
                          mask_mpp=mask_mpp, lesion_class=lesion_class, instances=instances,
                          report=not no_report, seed=seed, workers=workers,
                          ai_objects=ai_objects, mpp_override=mpp_override,
                          truth_mode=truth_mode, model=model, progress=progress)
    for s, old, new in ev.mpp_changes:
        # stderr, so --json output stays one JSON document
        print(f"pixel size replaced: {s.slide}: {old:g} -> {new:g} µm/px (--mpp-override)",
              file=sys.stderr)
    code = 1 if ev.failed else 0
    if as_json:
        print_json(ev.summary())
        return code
    from rich.table import Table

    from qpseg.cli._common import console

    c = console()
    c.print(f"truth mode: {ev.truth_mode}; pixel metrics at {ev.eval_mpp:g} µm/px "
            f"({ev.eval_mpp_source})", highlight=False)
    if ev.pixel.per_slide:
        pooled = ev.pixel.pooled()
        table = Table(title=f"{len(ev.slides)} slide(s) scored at {ev.eval_mpp:g} µm/px, "
                            f"{ev.truth_mode} truth (pooled over slides)")
        for col in ("class", "Dice", "IoU", "precision", "recall", "Dice, slide mean"):
            table.add_column(col, justify="left" if col == "class" else "right")
        per = [m.f1 for m in ev.pixel.per_slide]
        for i, name in enumerate(ev.class_names):
            vals = [float(v[i]) for v in per if v[i] == v[i]]
            mean = f"{sum(vals) / len(vals):.3f}" if vals else "–"
            table.add_row(name, _f(pooled.f1[i]), _f(pooled.iou[i]), _f(pooled.precision[i]),
                          _f(pooled.recall[i]), mean)
        table.add_row("mean", _f(pooled.mf1), _f(pooled.miou), _f(pooled.mprecision),
                      _f(pooled.mrecall), "")
        c.print(table)
    summary = ev.summary()
    if "lesion" in summary:
        les = summary["lesion"]
        c.print(f"lesions ({ev.lesion_class}): {les['n_detected']}/{les['n_truth']} detected, "
                f"{les['n_fp']} false positive(s), slide category agreement "
                f"{_f(les['category_agreement'])}")
    if "instance" in summary:
        ins = summary["instance"]
        c.print(f"instances: AJI {_f(ins['aji_pooled'])} pooled over slides, "
                f"{_f(ins['aji_image_mean'])} per-image mean; pooled mAP {_f(ins['map'])}, "
                f"PQ {_f(ins['pq'])}, F1@0.5 {_f(ins['f1_50'])}")
    for line in ev.review.lines():
        c.print(line, highlight=False)
    for note in ev.notes:
        c.print(f"note: {note}")
    for u in ev.unmatched:
        c.print(f"unmatched ({u.side}): {u.slide}: {u.reason}")
    for f in ev.failed:
        c.print(f"[red]failed[/]: {f.slide}: {f.reason}")
    c.print(f"results: {out}")
    return code


def _f(value: object) -> str:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    return "–" if v != v else f"{v:.3f}"


def evaluate_edits(
    project: Path = typer.Argument(..., help="project.qpproj (or the folder holding it)."),
    out: Path = typer.Option(..., "--out", help="Folder for edits.csv and the other CSVs."),
    predictions: Path | None = typer.Option(
        None, "--predictions", help="AI objects (default: <project>/qpseg/predictions)."
    ),
    annotations: Path | None = typer.Option(
        None, "--annotations",
        help="Annotation export after the review (default: <project>/qpseg/annotations).",
    ),
    baseline: Path | None = typer.Option(
        None, "--baseline",
        help="Annotation export from before the review: its objects are not counted as added.",
    ),
    tolerance_px: float = typer.Option(
        1.0, "--tolerance-px", help="Mean outline shift (level-0 px) still counted as kept."
    ),
    mpp: float | None = typer.Option(
        None, "--mpp", help="µm per pixel for the µm² columns of slides that have none "
                            "(neither in the slide nor set in QuPath)."
    ),
    mpp_override: bool = typer.Option(
        False, "--mpp-override", help="Let --mpp replace every slide's own pixel size (each "
                                      "change is printed as old -> new)."
    ),
    ai_objects: str = typer.Option(
        "unreviewed-out", "--ai-objects",
        help="Which AI objects of the export are truth: unreviewed-out (all but those left "
             "unchanged and unlocked), all-out (none) or all-in (all).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the per-slide rows as JSON."),
    history: bool = typer.Option(
        False, "--history",
        help="Record this review round in <project>/qpseg/rounds.csv (the same model again "
             "replaces its round) and plot correction effort per round (OUT/rounds.html).",
    ),
) -> int:
    """Count what the pathologist kept, reshaped, reclassified, deleted and added of the AI
    objects, and the Dice between the AI's and the final areas per class.

    The final objects are the truth of the review rule: an AI object left unchanged and
    unlocked is an unreviewed prediction, left out of both sides of the Dice by default
    (lock an object in QuPath to accept it). Pixel size of the µm² columns: the slide's own,
    else the one set in QuPath, else --mpp. Exits 1 when some entries could not be read.
    """
    import sys

    from qpseg.cli._common import print_json
    from qpseg.cli._progress import StepProgress
    from qpseg.edits import evaluate_edits as run_edits

    with StepProgress("comparing entries") as progress:
        res = run_edits(project, out, predictions_dir=predictions, annotations_dir=annotations,
                        baseline_dir=baseline, tolerance_px=tolerance_px, mpp=mpp,
                        ai_objects=ai_objects, mpp_override=mpp_override, progress=progress)
    for s, old, new in res.mpp_changes:
        # stderr, so --json output stays one JSON document
        print(f"pixel size replaced: {s.slide}: {old:g} -> {new:g} µm/px (--mpp-override)",
              file=sys.stderr)
    code = 1 if res.failed else 0
    from qpseg.rounds import RoundRecord  # light: the history's row type

    rounds: list[RoundRecord] = []
    if history:
        from qpseg.rounds import record_round, rounds_from_edits, write_history_report

        for found in rounds_from_edits(res):  # one per model; the newest model's last
            rounds, this_round = record_round(project, found)
        write_history_report(out, rounds)
    if as_json:
        print_json({"slides": res.rows(), "summary": res.summary_rows(),
                    "skipped": res.skipped, "failed": res.failed,
                    "ai_objects": res.review.to_json(),
                    **({"rounds": [r.row() for r in rounds]} if history else {})})
        return code
    from rich.table import Table

    from qpseg.cli._common import console

    c = console()
    table = Table(title=f"{len(res.slides)} slide(s) compared")
    cols = ("slide", "AI", "kept", "accepted", "reshaped", "reclassified", "deleted", "added",
            "Dice")
    for col in cols:
        table.add_column(col, justify="left" if col == "slide" else "right")
    for r in res.rows():
        table.add_row(str(r["slide"]), str(r["n_ai"]), str(r["n_kept"]), str(r["n_accepted"]),
                      str(r["n_reshaped"]), str(r["n_reclassified"]), str(r["n_deleted"]),
                      str(r["n_added"]), _f(r["dice"]))
    c.print(table)
    for line in res.review.lines():
        c.print(line, highlight=False)
    for s in res.slides:
        for note in s.notes:
            c.print(f"note: {s.slide}: {note}")
    for name, reason in res.failed:
        c.print(f"[red]failed[/]: {name}: {reason}")
    if history:
        c.print(f"review round {this_round.round} recorded: {this_round.corrections} "
                f"corrections on {len(this_round.entries)} reviewed slide(s); correction "
                f"effort per round: {' -> '.join(str(r.corrections) for r in rounds)} "
                f"({out / 'rounds.html'})", soft_wrap=True, markup=False)
    c.print(f"results: {out}")
    return code
