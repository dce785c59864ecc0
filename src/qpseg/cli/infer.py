"""``qpseg infer``: run a model package over a QuPath project's slides (or loose slides)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer


def _is_main_rank() -> bool:
    """True unless this is a torchrun rank other than 0 (rank 0 does the talking)."""
    return os.environ.get("RANK", "0") in ("", "0")


def _progress_display(quiet: bool) -> Any:
    """The progress display of the run (slides, tiles/s with ETA, polygonising; rich), or None
    when quiet or on a torchrun rank other than 0."""
    if quiet or not _is_main_rank():
        return None
    from qpseg.cli._progress import InferProgress

    return InferProgress()


def infer(
    inputs: list[Path] = typer.Argument(
        ..., metavar="PROJECT_OR_SLIDES",
        help="A QuPath project (.qpproj or its folder), or slide files / folders of slides."),
    model: Path = typer.Option(..., "--model", "-m",
                               help="Model package folder (config.json + weights)."),
    entries: str | None = typer.Option(
        None, "--entries", help="Comma-separated entry IDs or image names (projects only; "
                                "default: every entry)."),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default for a project: "
                            "<project>/qpseg/predictions; required for loose slides)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo finished slides (the previous outputs are kept as "
                                   "numbered .bak files). Slides finished by another model "
                                   "package or other output options are redone anyway."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps."),
    batch_size: int = typer.Option(8, "--batch-size", help="Tiles per forward pass."),
    shard: str | None = typer.Option(
        None, "--shard", help="i/n: run only share i (0-based) of n, e.g. a Slurm array task."),
    min_area_um2: float | None = typer.Option(
        None, "--min-area-um2",
        help="Drop objects smaller than this (µm²); 0 keeps every object. Default per output "
             "type, sizes a pathologist can review: lesions 50 (about one tumour cell, so "
             "isolated tumour cells stay), tissue classes 1000 (a region about 30 µm across, "
             "the smallest outlined at 10x), nuclei 10 (QuPath's cell detection minimum)."),
    simplify_um: float | None = typer.Option(
        None, "--simplify-um", help="Outline simplification tolerance in µm (default: one "
                                    "output pixel)."),
    fill_holes_um2: float | None = typer.Option(
        None, "--fill-holes-um2",
        help="Fill holes smaller than this (µm²); 0 fills none. Default per output type: "
             "lesions 50 (smaller than one cell), tissue classes 1000 (as the minimum area), "
             "nuclei 400 (QuPath's largest nucleus: nuclei have no holes)."),
    as_type: str | None = typer.Option(
        None, "--as", help="annotations (lesions, tissue regions) or detections (many small "
                           "objects); default: the model package's (one detection per nucleus "
                           "for nuclei models, annotations otherwise); instance models always "
                           "write cells."),
    tissue: str = typer.Option(
        "auto", "--tissue",
        help="Tissue detection: auto (the model package's rule: none for nuclei and instance "
             "models, the training's method for the others, else otsu_od; patch classifiers "
             "hsv), otsu, otsu_od, hsv or none (every tile)."),
    min_tissue: float | None = typer.Option(
        None, "--min-tissue",
        help="Run only tiles with more than this tissue fraction (default: the model "
             "package's: 0.25 for patch classifiers as in training, pedersen2022; else 0, "
             "every tile with any tissue)."),
    mpp: float | None = typer.Option(
        None, "--mpp", help="Pixel size (µm/px at full resolution) for slides that have none "
                            "(neither in the slide nor set in QuPath)."),
    mpp_override: bool = typer.Option(
        False, "--mpp-override", help="Let --mpp replace every slide's own pixel size (each "
                                      "change is printed as old -> new; a finished slide is "
                                      "redone at the new size)."),
    stitch: str = typer.Option("center", "--stitch",
                               help="center (centre crop) or blend (50 % overlap, Hann "
                                    "window)."),
    lesion_classes: str | None = typer.Option(
        None, "--lesion-classes",
        help="Comma-separated classes that get the khalil2022 size category (ITC / micro / "
             "macro) and lesion summary; 'none' for no lesions (default: the model's, else "
             "classes named like tumour/metastasis)."),
    heatmap: bool = typer.Option(False, "--heatmap",
                                 help="Also write <key>.heatmap.ome.tif (pyramidal probability "
                                      "map QuPath opens)."),
    heatmap_class: str | None = typer.Option(
        None, "--heatmap-class", help="Class of the heatmap (default: the lesion class)."),
    overlay: bool = typer.Option(False, "--overlay",
                                 help="Also write <key>.overlay.png (thumbnail + classes)."),
    tile_px: int | None = typer.Option(
        None, "--tile-px", help="Tile side at the model's resolution (models that are not "
                                "fixed-size; default: the package's, enlarged when its "
                                "margins would waste more than half)."),
    workers: int | None = typer.Option(
        None, "--workers", help="Tile-reading processes (default: 0 = a reader thread on CPU, "
                                "up to 8 on CUDA)."),
    keep_maps: bool = typer.Option(False, "--keep-maps",
                                   help="Keep the class/probability maps (.npy) in OUT/maps."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    run_id: str | None = typer.Option(
        None, "--run-id", help="Run tag stored in every object (default: the UTC start time; "
                               "give all shards of one job the same tag)."),
    write_to_project: bool = typer.Option(
        False, "--write-to-project",
        help="Also put the objects into the project's data.qpdata via paquo (needs a QuPath "
             "installation): earlier unlocked qpseg objects are replaced, user annotations "
             "never touched; data.qpdata.bak keeps the previous data."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display or table."),
    as_json: bool = typer.Option(False, "--json", help="Print the per-slide results as JSON."),
) -> int:
    """Predict every selected slide and write QuPath objects to OUT/<entryID>.geojson.

    Also writes <entryID>.metadata.json (summary for groovy/import_predictions.groovy),
    summary.csv and run_metadata.json. Pixel size: the slide's own, else the one set in
    QuPath, else --mpp (--mpp-override replaces known values). Finished slides are skipped
    unless --overwrite; a run killed mid-slide redoes only that slide. Multi-GPU: torchrun
    --nproc-per-node N -m qpseg infer ... spreads slides over the ranks, and a slide bigger
    than a fair share is split by rows across all of them. Exits 1 when some slides failed.
    """
    if not quiet and _is_main_rank():
        # at once, before the engine, torch and the model load (seconds on a cold start);
        # stderr, so stdout keeps only the results
        print("qpseg infer: loading torch and the model...", file=sys.stderr, flush=True)
    from qpseg.engine import (
        InferenceParams,
        is_project_path,
        jobs_from_paths,
        jobs_from_project,
        run_inference,
    )
    from qpseg.engine.run import check_output_dir
    from qpseg.errors import ConfigError

    projects = [p for p in inputs if is_project_path(p)]
    if projects and len(inputs) > 1:
        raise ConfigError("give either one QuPath project or slides, not both")
    entry_list = [e for e in entries.split(",")] if entries else None
    if write_to_project:
        from qpseg.engine.project_writeback import check_write_back

        check_write_back(projects[0] if projects else None, shard)
    if projects:
        jobs, out_dir = jobs_from_project(projects[0], out, entry_list)
    else:
        if entry_list:
            raise ConfigError("--entries selects entries of a QuPath project; no project given")
        if out is None:
            raise ConfigError("--out is required for slides outside a QuPath project")
        jobs, out_dir = jobs_from_paths(inputs, out), out
    lesions: tuple[str, ...] | None = None
    if lesion_classes is not None:
        lesions = () if lesion_classes.strip().lower() == "none" else tuple(
            c.strip() for c in lesion_classes.split(",") if c.strip())
    params = InferenceParams(
        device=device, batch_size=batch_size, workers=workers, tissue=tissue,
        min_tissue=min_tissue,
        stitch=stitch, min_area_um2=min_area_um2, fill_holes_um2=fill_holes_um2,
        simplify_um=simplify_um, as_type=as_type, heatmap=heatmap, heatmap_class=heatmap_class,
        overlay=overlay, overwrite=overwrite, keep_maps=keep_maps, mpp=mpp,
        mpp_override=mpp_override, compile=compile_model, run_id=run_id, shard=shard,
        tile_px=tile_px, lesion_classes=lesions)
    # Before the model loads or a slide is read: bad options, a folder that cannot take the
    # outputs (or the project's annotation export folder) fail now, in one line.
    params.validate()
    check_output_dir(out_dir)
    display = _progress_display(quiet or as_json)
    if display is None:
        result = run_inference(jobs, model, out_dir, params)
    else:
        with display:
            result = run_inference(jobs, model, out_dir, params, progress=display)
    code = 1 if result.failed else 0
    if not _is_main_rank():
        return code
    for r in result.results:
        if r.mpp_replaced is not None and r.mpp is not None:
            what = f"entry {r.entry_id} ({r.name})" if r.entry_id is not None else r.name
            # stderr, so --json output stays one JSON document
            print(f"pixel size replaced: {what}: {r.mpp_replaced:g} -> {r.mpp:g} µm/px "
                  "(--mpp-override)", file=sys.stderr)
    written: list[Any] = []
    if write_to_project:
        from qpseg.engine.project_writeback import write_back

        written = write_back(projects[0], result.results)
        if any(w.error for w in written):
            code = 1
    if as_json:
        from qpseg.cli._common import print_json

        print_json({"out": str(result.out_dir), "counts": result.counts(),
                    "summary_csv": str(result.summary_csv),
                    "run_metadata": str(result.run_metadata),
                    "slides": [r.to_json() for r in result.results],
                    **({"written_to_project": [vars(w) for w in written]}
                       if write_to_project else {})})
        return code
    if quiet:
        for r in result.failed:
            print(f"failed: {r.key} ({r.name}): {r.reason}", file=sys.stderr)
        for w in written:
            if w.error:
                print(f"not written to the project: {w.key}: {w.error}", file=sys.stderr)
        return code
    from rich.table import Table

    from qpseg.cli._common import console

    counts = result.counts()
    table = Table(title=f"{counts['done']} done, {counts['skipped']} skipped, "
                        f"{counts['failed']} failed")
    numeric = ("objects", "tissue", "tiles", "low tissue", "s")
    for col in ("key", "image", "status", "objects", "tissue", "tiles", "low tissue", "s",
                "reason"):
        table.add_column(col, justify="right" if col in numeric else "left")
    for r in result.results:
        status = {"failed": "[red]failed[/]", "skipped": "[yellow]skipped[/]"}.get(r.status,
                                                                                 r.status)
        tissue_txt = "" if r.tissue_fraction is None else f"{100 * r.tissue_fraction:.0f} %"
        table.add_row(r.key, r.name, status, str(r.n_objects), tissue_txt, str(r.tiles),
                      str(r.tiles_low_tissue), f"{r.seconds:.1f}", r.reason)
    c = console()
    c.print(table)
    c.print(f"outputs: {result.out_dir}  (summary: {result.summary_csv})")
    for w in written:
        if w.error:
            c.print(f"[red]not written to the project[/]: {w.key}: {w.error}")
        else:
            c.print(f"written to the project: entry {w.entry_id}: {w.describe()}")
    return code
