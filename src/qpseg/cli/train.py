"""``qpseg train``: a QuPath project (or its manifest) -> a trained model package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def _split_option(value: str | None, name: str) -> float | list[str] | None:
    """``--val`` / ``--test``: a share of the slides (``0.2``) or slide names (``a,b``)."""
    if value is None:
        return None
    text = value.strip()
    try:
        share = float(text)
    except ValueError:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise typer.BadParameter("give a share of the slides (0.2) or slide names "
                                     "(name1,name2)", param_hint=name) from None
        return names
    if not 0 <= share < 1:
        raise typer.BadParameter(f"a share of the slides must be in [0, 1), not {text}",
                                 param_hint=name)
    return share


def _split_overrides(val: str | None, test: str | None) -> dict[str, Any]:
    """The ``split`` section that ``--val`` / ``--test`` set."""
    v, t = _split_option(val, "--val"), _split_option(test, "--test")
    out: dict[str, Any] = {}
    if isinstance(v, list):
        out["val_slides"] = v
        if isinstance(t, float):
            raise typer.BadParameter("with validation slides named, name the test slides too "
                                     "(or leave --test out: no test slides)",
                                     param_hint="--test")
        out["test_slides"] = t or []
    elif isinstance(t, list):
        raise typer.BadParameter("name the validation slides too (--val NAME,...) when naming "
                                 "test slides", param_hint="--val")
    else:
        if v is not None:
            out["val"] = v
        if t is not None:
            out["test"] = t
    return out


def _overrides(epochs: int | None, steps: int | None, batch_size: int | None, seed: int | None,
               workers: int | None, ai_objects: str | None = None,
               tensorboard: bool = False) -> dict[str, Any]:
    train: dict[str, Any] = {}
    if tensorboard:
        train["tensorboard"] = True
    if epochs is not None:
        train["epochs"] = epochs
    if steps is not None:
        train["steps"] = steps
    if batch_size is not None:
        train["batch_size"] = batch_size
    if seed is not None:
        train["seed"] = seed
    out: dict[str, Any] = {"train": train} if train else {}
    data: dict[str, Any] = {}
    if workers is not None:
        data["workers"] = workers
    if ai_objects is not None:
        data["ai_objects"] = ai_objects
    if data:
        out["data"] = data
    return out


def _review_lines(summary: dict[str, Any]) -> list[str]:
    """The truth rule's per-class counts of AI objects (left out / kept), as import-project
    prints them; from the summary of a one-stage model or the first stage of a two-stage one."""
    from qpseg.review import ReviewCounts

    found = summary.get("ai_objects")
    if found is None:
        found = next((s["ai_objects"] for s in summary.values()
                      if isinstance(s, dict) and "ai_objects" in s), None)
    return ReviewCounts.from_json(found).lines() if found is not None else []


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    from qpseg.cli._common import console

    c = console()
    stages = {k: v for k, v in summary.items() if isinstance(v, dict) and "split" in v}
    if not stages:
        stages = {"": summary}
    model = summary.get("model", {})
    c.print(f"model: {model.get('architecture', '?')} ({model.get('output', '?')} output)")
    for name, s in stages.items():
        title = f"{name + ': ' if name else ''}{s['tile_px']} px tiles at {s['mpp']:g} µm/px"
        if s.get("scales") and len(s["scales"]) > 1:
            title += f", views at {', '.join(f'{v:g}' for v in s['scales'])}x"
        table = Table(title=title)
        table.add_column("subset")
        table.add_column("slides", justify="right")
        table.add_column("tiles", justify="right")
        for cls in s["classes"]:
            table.add_column(f"{cls} tiles / px", justify="right")
        table.add_column("ignored", justify="right")
        for subset in ("train", "val"):
            sub = s.get(subset)
            if not sub:
                table.add_row(subset, "0", "0", *[""] * len(s["classes"]), "")
                continue
            cells = [f"{sub['classes'][cls]['tiles']:,} / {sub['classes'][cls]['pixels']:,}"
                     for cls in s["classes"]]
            items = f"{sub['items']:,}" + (f" ({sub['tiles']:,} tiles)"
                                           if sub["items"] != sub["tiles"] else "")
            table.add_row(subset, str(sub["slides"]), items, *cells,
                          f"{sub['ignored_fraction']:.1%}")
        c.print(table)
        for subset in ("train", "val"):
            patches = s.get(f"{subset}_patches")
            if patches:
                c.print(f"{subset} patch labels: " + ", ".join(f"{k} {v:,}"
                                                               for k, v in patches.items()))
        split = s["split"]
        c.print(f"split (seed {split['seed']}): {len(split['train'])} train, "
                f"{len(split['val'])} val, {len(split['test'])} test slide(s)")
    for line in _review_lines(summary):
        c.print(line, highlight=False)
    refine = summary.get("refine")
    if refine:
        c.print(f"refine: {len(refine['train_slides'])} train / {len(refine['val_slides'])} val "
                f"slide(s), {refine['tile_px']} px whole-slide inputs")


def train(
    source: Path = typer.Argument(..., help="manifest.json (or its folder) or a QuPath project "
                                  "(.qpproj, imported into OUT first)."),
    out: Path = typer.Option(..., "--out", help="Folder for the model package, checkpoints "
                             "and logs."),
    model: str | None = typer.Option(None, "--model", help="Architecture ('qpseg models' "
                                     "lists them); default: the config's model."),
    config: Path | None = typer.Option(None, "--config", help="Training config (YAML or JSON); "
                                       "the paper's settings of the model are the defaults."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its "
                                "newest checkpoint."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the dataset summary (slides, "
                                 "tiles per class, ignored fraction) and exit."),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu or cuda."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Number of epochs."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Stop after N optimizer "
                                     "steps (overrides --epochs)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Tiles per "
                                          "batch (per process)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the split, sampling, "
                                    "augmentation and initialisation."),
    workers: int | None = typer.Option(None, "--workers", min=0, help="DataLoader worker "
                                       "processes."),
    init_from: Path | None = typer.Option(None, "--init-from", help="Start from the weights of "
                                          "another qpseg model package (tensors matched by "
                                          "name and shape, classes by name)."),
    ai_objects: str | None = typer.Option(
        None, "--ai-objects",
        help="Importing a project: which objects qpseg wrote count as annotations: "
             "unreviewed-out (all but those left unchanged and unlocked in the review), all-out "
             "(none) or all-in (all). Default: the config's data.ai_objects, else "
             "unreviewed-out. A manifest keeps the rule it was imported with."),
    val: str | None = typer.Option(None, "--val", help="Validation slides: a share of the "
                                   "slides (0.2) or their QuPath image names (name1,name2; "
                                   "every other slide trains). Sets split.val / "
                                   "split.val_slides."),
    test: str | None = typer.Option(None, "--test", help="Test slides (never trained on): a "
                                    "share (0.1) or image names, like --val."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also log to TensorBoard "
                                     "(OUT/tensorboard; pip install 'qpseg[tensorboard]')."),
    allow_changed_annotations: bool = typer.Option(
        False, "--allow-changed-annotations",
        help="With --resume: continue although annotation files changed since the run "
             "started (without it, resuming on changed annotations is refused)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the summary as "
                                 "JSON."),
) -> int:
    """Train a model on the labelled annotations of a QuPath project.

    Works unchanged on one CPU, one GPU or several with torchrun
    (torchrun --nproc-per-node 4 -m qpseg train ...). Unlabelled pixels are ignored by the loss.
    """
    import os
    import sys

    quiet = quiet or os.environ.get("RANK", "0") not in ("", "0")  # torchrun: rank 0 reports
    if not quiet:
        # at once: torch, the data and the model take seconds to load on a cold start;
        # stderr, so --json output stays one JSON document
        print("qpseg train: loading torch and the data...", file=sys.stderr, flush=True)

    from qpseg.training import train as run_train

    if ai_objects is not None:
        from qpseg.review import check_policy

        ai_objects = check_policy(ai_objects)

    params = {"source": str(source), "out": str(out), "model": model,
              "config": None if config is None else str(config), "resume": resume,
              "dry_run": dry_run, "device": device, "epochs": epochs, "steps": steps,
              "batch_size": batch_size, "seed": seed, "workers": workers,
              "init_from": None if init_from is None else str(init_from),
              "ai_objects": ai_objects, "val": val, "test": test, "tensorboard": tensorboard,
              "allow_changed_annotations": allow_changed_annotations}
    overrides = _overrides(epochs, steps, batch_size, seed, workers, ai_objects, tensorboard)
    split = _split_overrides(val, test)
    if split:
        overrides["split"] = split
    if init_from is not None:
        overrides["init_from"] = str(init_from)
    if dry_run:
        result = run_train(source, out, model=model, config=config, overrides=overrides,
                           resume=resume, dry_run=True, device=device, params=params)
        if result.rank == 0:
            if as_json:
                from qpseg.cli._common import print_json

                print_json(result.summary)
            else:
                _print_summary(result.summary)
        return 0
    from qpseg.cli._progress import TrainProgress

    with TrainProgress(quiet) as progress:
        result = run_train(source, out, model=model, config=config, overrides=overrides,
                           resume=resume, device=device, callback=progress, params=params,
                           allow_changed_annotations=allow_changed_annotations)
    if result.rank == 0 and not quiet:
        m = result.metrics
        from qpseg.cli._common import console

        line = f"model package: {result.package}"
        if m.get("val_mdice") is not None:
            line += f" (val mDice {m['val_mdice']:.3f})"
        c = console()
        for review_line in _review_lines(result.summary):
            c.print(review_line, highlight=False)
        c.print(line)
    return 0
