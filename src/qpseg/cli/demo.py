"""``qpseg demo``: the whole round trip on a generated example project."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from qpseg.demo import ReviewRound, RoundOutcome

STEPS = {
    "example": "Build the example QuPath project (generated slides, sparse annotations)",
    "import-project": "import-project: annotations -> manifest",
    "train": "train tiny_unet (fixed short budget)",
    "infer": "infer: predictions -> QuPath GeoJSON, overlays, heatmaps",
    "evaluate": "evaluate against the full ground truth",
    "review": "review round: simulated QuPath edits -> import-project, evaluate, evaluate-edits",
}


def demo(
    out: Path = typer.Option(
        Path("qpseg-demo"), "--out", envvar="QPSEG_DEMO_OUT",
        help="Folder for the example project and every output.",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    min_dice: float = typer.Option(
        0.8, "--min-dice", help="Exit 1 when the held-out tumour Dice is below this."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON at the end."),
    force: bool = typer.Option(
        False, "--force",
        help="Use --out even when it holds files the demo did not make (they may be replaced).",
    ),
    rounds: int = typer.Option(
        0, "--rounds", min=0,
        help="Then run N review rounds in OUT/rounds: suggest the 2 slides to review, a "
             "simulated pathologist corrects them, evaluate-edits --history, fine-tune; "
             "records held-out Dice and correction effort per round (a few minutes on CPU).",
    ),
) -> int:
    """Build an example project, then import -> train -> infer -> evaluate on it (a few minutes
    on a CPU), then one simulated review round in QuPath (keep, reshape, reclassify, delete,
    lock, add; re-export) read back by import-project, evaluate and evaluate-edits. Prints
    per-slide scores, the AI objects left out and kept, and how to open the result in QuPath.
    Exits 1 when the review round's counts are not the expected ones.

    --rounds N closes the loop N times on a project of its own (OUT/rounds): the model
    learns from the corrections round after round; demo_summary.json lists the rounds.

    --out must be new, empty or a folder an earlier demo made (it holds a .qpseg-demo file):
    the demo replaces its project/, labels/, model/, evaluation/ and review/ there."""
    import json
    import sys
    import time

    from rich.console import Console
    from rich.table import Table

    from qpseg.cli._progress import DemoProgress
    from qpseg.cli.groovy import SCRIPTS, write_scripts
    from qpseg.demo import claim_demo_folder, held_out_dice, run_demo

    # Refuse a folder the demo did not make before any progress bar or slow import.
    claim_demo_folder(out, force=force)

    stream = sys.stderr if as_json else sys.stdout
    # Logs and CI are not terminals: give tables room instead of Rich's 80-column default.
    console = Console(stderr=as_json, highlight=False,
                      width=None if stream.isatty() else 130)
    bars = DemoProgress(console, STEPS)

    start = time.perf_counter()
    with bars:
        result = run_demo(out, device=device, force=force, progress=bars.on_step,
                          train_callback=bars.on_train, infer_progress=bars.on_infer)
    wall = time.perf_counter() - start
    outcomes: list[RoundOutcome] = []
    if rounds:
        from qpseg.demo import run_rounds

        with bars:
            outcomes = run_rounds(out, rounds, device=device, progress=bars.on_step,
                                  train_callback=bars.on_round_train)
    dice = held_out_dice(result)

    table = Table(title="Per-slide scores (pixel Dice at 2 µm/px; lesions = Tumor regions)")
    for col in ("slide", "role", "Tumor", "Stroma", "Necrosis", "Background", "lesions found",
                "false pos.", "category (true/pred)"):
        table.add_column(col)
    for r in result.scores:
        def d(name: str, row: dict[str, Any] = r) -> str:
            v = row.get(f"dice_{name}")
            return "" if v is None or v != v else f"{v:.3f}"
        n_truth, n_det = r.get("lesion_n_truth"), r.get("lesion_n_detected")
        table.add_row(
            str(r["entry_id"]), r["role"], d("Tumor"), d("Stroma"), d("Necrosis"), d("Background"),
            f"{n_det}/{n_truth}" if n_truth is not None else "", str(r.get("lesion_n_fp", "")),
            f"{r.get('lesion_truth_category', '')}/{r.get('lesion_pred_category', '')}",
        )
    console.print(table)
    if result.review is not None:
        _print_review(console, result.review)
    ex = result.example
    assert ex is not None
    summary = {
        "wall_seconds": round(wall, 1),
        "steps_seconds": {k: round(v, 1) for k, v in result.steps.items()},
        "held_out_tumor_dice": dice,
        "scores": result.scores,
        "review_round": result.review.to_json() if result.review is not None else None,
        **({"rounds": [o.to_json() for o in outcomes]} if rounds else {}),
        "paths": {k: str(v) for k, v in result.paths.items()} | {"project": str(ex.project)},
    }
    from qpseg._io import write_json_atomic

    write_json_atomic(Path(out) / "demo_summary.json", summary, backup=False)
    # The folder is the demo's own: its copy of the QuPath scripts is simply refreshed.
    scripts = Path(out).resolve() / "groovy"
    write_scripts(scripts, overwrite=True)
    import_script = scripts / SCRIPTS[1]
    console.print(f"\nHeld-out tumour Dice: [bold]{dice:.3f}[/] (demo total {wall:.0f} s)")
    console.print(f"QuPath project:   {ex.project}")
    console.print(f"Predictions:      {result.paths['predictions']} (GeoJSON, overlays, heatmaps)")
    console.print(f"Metrics:          {result.paths['evaluation']}/per_slide.csv, summary.csv, "
                  "report.html")
    console.print(f"Model package:    {result.paths['model']}")
    if result.review is not None:
        console.print(f"Review round:     {result.paths.get('review', Path(out) / 'review')} "
                      "(labels/, evaluation/, edits/); the export before the review: "
                      f"{result.review.simulation.baseline}", soft_wrap=True, markup=False)
    # Whole paths on one line each (no wrapping, no markup), so they can be copied.
    console.print(f"QuPath scripts:   {scripts} (QuPath 0.5-0.7)", soft_wrap=True, markup=False)
    console.print("Open in QuPath:   File > Open project > the project above, then Automate > "
                  f"Script editor > File > Open > {import_script} > Run > Run for project",
                  soft_wrap=True, markup=False)
    if outcomes:
        _print_rounds(console, outcomes)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    failed = False
    if not dice >= min_dice:
        console.print(f"[red]held-out tumour Dice {dice:.3f} is below --min-dice {min_dice}[/]")
        failed = True
    if result.review is not None and not result.review.ok:
        console.print("[red]review round: the counts are not the expected ones:[/]")
        for line in result.review.mismatches():
            console.print(f"  {line}", soft_wrap=True, markup=False)
        failed = True
    return 1 if failed else 0


def _print_review(console: Console, rnd: ReviewRound) -> None:
    """The review round section: what the simulated pathologist did, then per class the AI
    objects left out / kept, expected and as each command reported them."""
    from rich.table import Table

    from qpseg.demo import TRUTH_READERS

    sim = rnd.simulation
    did = ", ".join(f"{len(ids)} {what}" for what, ids in sim.actions.items())
    console.print(f"\nReview round (simulated in QuPath on entry {sim.entry_id}, {sim.slide}): "
                  f"{did}; all {len(sim.exported)} entries re-exported; read back with "
                  "--ai-objects unreviewed-out", soft_wrap=True, markup=False)
    table = Table(title="AI objects left out / kept")
    table.add_column("class")
    for reader in TRUTH_READERS:
        table.add_column(reader)
    classes = sorted({c for r in TRUTH_READERS for side in (rnd.expected, rnd.observed)
                      for c in side.get(r, {})})

    def cell(reader: str, name: str) -> str:
        def text(row: dict[str, int] | None) -> str:
            return f"{row['left_out']} / {row['kept']}" if row else "-"
        seen = text(rnd.observed.get(reader, {}).get(name))
        wanted = text(rnd.expected.get(reader, {}).get(name))
        return seen if seen == wanted else f"[red]{seen} (expected {wanted})[/]"

    for cls in classes:
        table.add_row(cls, *(cell(r, cls) for r in TRUTH_READERS))
    console.print(table)
    if sim.no_truth:
        console.print(f"evaluate: entries {', '.join(map(str, sim.no_truth))} hold only "
                      "unreviewed AI objects: no truth to score (partial truth), their AI "
                      "objects still counted", soft_wrap=True, markup=False)
    e, o = rnd.expected.get("edits", {}), rnd.observed.get("edits", {})
    keys = ("n_kept", "n_accepted", "n_reshaped", "n_reclassified", "n_deleted", "n_added",
            "n_existing")
    console.print("evaluate-edits: " + ", ".join(
        f"{k[2:]} {o.get(k)}" + ("" if o.get(k) == e.get(k) else f" (expected {e.get(k)})")
        for k in keys), soft_wrap=True, markup=False)
    console.print("Review round counts: " + ("[green]as expected[/]" if rnd.ok
                                             else "[red]NOT as expected[/]"))


def _print_rounds(console: Console, outcomes: list[RoundOutcome]) -> None:
    """The review rounds: per round the slides reviewed, the corrections (per reviewed slide:
    rounds review different slides), and the held-out tumour Dice and the corrections the
    held-out slides would need, before and after fine-tuning on them."""
    from rich.table import Table

    table = Table(title="Review rounds (simulated pathologist, 2 slides per round)")
    for col in ("round", "reviewed", "accepted", "reshaped", "reclassified", "deleted", "added",
                "corrections", "per slide", "area changed mm²", "Dice AI vs final",
                "held-out Dice before", "after", "held-out corr./slide before", "after",
                "seconds"):
        table.add_column(col, justify="right")
    def num(v: float | None, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    for o in outcomes:
        r = o.to_json()
        area = r["area_changed_um2"]
        table.add_row(str(o.round), ", ".join(map(str, o.reviewed)), str(r["n_accepted"]),
                      str(r["n_reshaped"]), str(r["n_reclassified"]), str(r["n_deleted"]),
                      str(r["n_added"]), str(r["corrections"]),
                      num(r["corrections_per_slide"], ".1f"),
                      "" if area is None else f"{area / 1e6:.3f}",
                      num(r["dice_ai_vs_final"], ".3f"),
                      f"{o.held_out_tumor_dice_before:.3f}", f"{o.held_out_tumor_dice:.3f}",
                      num(r["held_out_corrections_per_slide_before"], ".1f"),
                      num(r["held_out_corrections_per_slide"], ".1f"),
                      f"{r['round_seconds']:.0f}")
    console.print(table)
    first, last = outcomes[0].held_out_tumor_dice, outcomes[-1].held_out_tumor_dice
    console.print(f"Held-out tumour Dice after round 1: {first:.3f}, after round "
                  f"{len(outcomes)}: {last:.3f}; corrections per reviewed slide per round: "
                  + " -> ".join(num(o.to_json()["corrections_per_slide"], ".1f")
                                for o in outcomes)
                  + "; per held-out slide: " + " -> ".join(
                      [num(outcomes[0].to_json()["held_out_corrections_per_slide_before"],
                           ".1f")]
                      + [num(o.to_json()["held_out_corrections_per_slide"], ".1f")
                         for o in outcomes])
                  + f"; history: {outcomes[-1].model.parent / 'project' / 'qpseg' / 'rounds.csv'}",
                  soft_wrap=True, markup=False)
