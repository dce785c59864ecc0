"""``qpseg models`` and ``qpseg model-info``: the model registry and model packages."""

from __future__ import annotations

from pathlib import Path

import typer


def models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    details: bool = typer.Option(
        False, "--details", help="Also build each model on the meta device to count parameters."
    ),
) -> int:
    """List the registered architectures (name, paper, what it is)."""
    from qpseg.cli._common import print_json
    from qpseg.models import get_entry, list_models, model_info

    rows = []
    for name in list_models():
        entry = get_entry(name)
        row: dict[str, object] = {"name": name, "paper": entry.paper, "summary": entry.summary}
        if details:
            info = model_info(name)
            row["parameters"] = info["parameters"]
            row["output"] = info["contract"].get("output")
        rows.append(row)
    if as_json:
        print_json(rows)
        return 0
    width = max(len(str(r["name"])) for r in rows)
    for r in rows:
        params = f"{int(r['parameters']) / 1e6:8.2f} M  " if details else ""  # type: ignore[call-overload]
        typer.echo(f"{r['name']!s:{width}}  {params}{r['summary']}  [{r['paper']}]")
    return 0


def model_info(
    package: Path = typer.Argument(..., help="Model package folder (config.json + weights)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    no_forward: bool = typer.Option(
        False, "--no-forward", help="Skip the test forward pass on a dummy tile."
    ),
) -> int:
    """Validate a model package (config, weights, checksum, a forward pass) and describe it."""
    from qpseg.cli._common import print_json
    from qpseg.models import describe_package, validate_package

    pkg = validate_package(package, forward=not no_forward)
    info = describe_package(pkg)
    if as_json:
        print_json(info)
        return 0
    typer.echo(f"{info['path']}: {info['architecture']} ({info['parameters'] / 1e6:.2f} M "
               f"parameters), weights {info['weights']} sha256 {info['sha256'][:16]}…")
    typer.echo(f"  mpp {info['mpp']} (inputs {info['input_mpp']}), tile {info['tile_px']} px, "
               f"ignore index {info['ignore_index']}")
    typer.echo("  classes: " + ", ".join(f"{c['index']}={c['name']}" for c in info["classes"]))
    norm = info["normalization"]
    typer.echo(f"  normalisation: mean {norm['mean']} std {norm['std']}")
    return 0
