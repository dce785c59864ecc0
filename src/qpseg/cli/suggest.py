"""``qpseg suggest``: rank unreviewed slides by how much a review would teach the model."""

from __future__ import annotations

from pathlib import Path

import typer


def suggest(
    project: Path = typer.Argument(..., help="project.qpproj (or the folder holding it)."),
    model: Path = typer.Option(..., "--model", help="Model package (a folder with config.json)."),
    n: int = typer.Option(5, "-n", "--number", min=1, help="How many slides to suggest."),
    entries: str | None = typer.Option(
        None, "--entries", help="Comma-separated entry IDs or image names to rank (default: "
                                "every entry not reviewed yet)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    work: Path | None = typer.Option(
        None, "--work", help="Folder for the model's predictions while ranking (default: "
                             "<project>/qpseg/suggest)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Rank and print; write nothing into "
                                 "the project."),
    as_json: bool = typer.Option(False, "--json", help="Print the ranking as JSON."),
) -> int:
    """Rank the slides nobody reviewed yet by the model's uncertainty (mean predictive entropy
    of its class probabilities over tissue; also the low-confidence area) and store the top N
    in the QuPath project as entry metadata (qpseg_review_rank 1 = review first,
    qpseg_review_score), plus qpseg/suggestions.csv. Sort QuPath's project list by
    qpseg_review_rank to open them in order; with the project open in QuPath, run
    import_predictions.groovy (it sets the ranking from suggestions.csv, since QuPath rewrites
    the project file when it saves). Exits 1 when some slides could not be scored."""
    from qpseg.suggest import suggest as run_suggest

    picked = [e.strip() for e in entries.split(",") if e.strip()] if entries else None
    res = run_suggest(project, model, n=n, entries=picked, device=device, work_dir=work,
                      write_project=not dry_run)
    code = 1 if res.failed else 0
    if as_json:
        from qpseg.cli._common import print_json

        print_json({"model_sha256": res.model_sha256, "n": res.n,
                    "slides": [s.row(res.n, res.model_sha256) for s in res.scores],
                    "failed": [{"slide": s, "reason": r} for s, r in res.failed],
                    "files": {k: str(v) for k, v in res.files.items()}})
        return code
    from rich.table import Table

    from qpseg.cli._common import console

    c = console()
    table = Table(title=f"{len(res.scores)} slide(s) ranked (top {res.n} suggested)")
    for col in ("rank", "entry", "image", "entropy", "low-confidence", "low-conf. mm²"):
        table.add_column(col, justify="left" if col == "image" else "right")
    for s in res.scores:
        style = "bold" if s in res.suggested else None
        table.add_row(str(s.rank), str(s.entry_id if s.entry_id is not None else ""), s.image,
                      f"{s.score:.3f}", f"{s.low_confidence_fraction:.1%}",
                      f"{s.low_confidence_um2 / 1e6:.3f}", style=style)
    c.print(table)
    for slide, reason in res.failed:
        c.print(f"not scored: {slide}: {reason}", soft_wrap=True, markup=False)
    if res.files:
        c.print(f"ranking written to {res.files['project']} (entry metadata qpseg_review_rank) "
                f"and {res.files['suggestions.csv']}", soft_wrap=True, markup=False)
    return code
