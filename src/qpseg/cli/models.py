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
    from qpseg.models.registry import catalog

    rows = []
    for entry in catalog():  # read from the model modules' source: no torch unless --details
        row: dict[str, object] = {"name": entry.name, "paper": entry.paper,
                                  "summary": entry.summary}
        if details:
            from qpseg.models import model_info

            info = model_info(entry.name)
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
    """Print a package's model card (MODEL_CARD.md, or one made from its config.json), then
    validate it: config, weights, checksum, a forward pass."""
    from qpseg.cli._common import print_json
    from qpseg.models.card import model_card, read_model_card
    from qpseg.models.package import read_package_config

    cfg = read_package_config(package)  # no torch: the card comes at once
    card = read_model_card(package) or model_card(cfg, package)
    if not as_json:
        typer.echo(card.rstrip("\n"))
        typer.echo("")
        what = "weights and a forward pass" if not no_forward else "weights"
        typer.echo(f"Checking the {what}…")
    from qpseg.models import describe_package, validate_package

    pkg = validate_package(package, forward=not no_forward)
    info = describe_package(pkg)
    if as_json:
        print_json({**info, "model_card": card})
        return 0
    checked = "config, weights and forward pass" if not no_forward else "config and weights"
    typer.echo(f"{info['path']}: {checked} OK — {info['architecture']} "
               f"({info['parameters'] / 1e6:.2f} M parameters), weights {info['weights']} "
               f"sha256 {info['sha256'][:16]}…")
    return 0
