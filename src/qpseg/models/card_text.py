"""The Markdown text of a model card (``MODEL_CARD.md``), made from what a model package
records: the architecture and its paper (the registry), the classes and their QuPath colours,
the pixel size and tile, the ``training`` summary in ``config.json`` (split, slides,
initialisation, validation scores of the packaged weights) and, when the training run left
them in the package folder, ``run_metadata.json`` (labelled pixels per class and subset) and
``training_curves.png``.

It reads the package's config through :class:`CardConfig` (what
:class:`qpseg.models.package.PackageConfig` provides) and never imports the package module,
which writes the card when it saves a package. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

__all__ = ["CURVES_NAME", "MODEL_CARD_NAME", "CardConfig", "model_card"]

MODEL_CARD_NAME = "MODEL_CARD.md"
CURVES_NAME = "training_curves.png"
_RUN_METADATA = "run_metadata.json"
_MAX_READ = 16 << 20  # a card or run_metadata.json larger than this is not read


class CardConfig(Protocol):
    """What a model card reads of a package's ``config.json``
    (:class:`qpseg.models.package.PackageConfig`)."""

    @property
    def architecture(self) -> str: ...
    @property
    def architecture_kwargs(self) -> dict[str, Any]: ...
    @property
    def class_names(self) -> tuple[str, ...]: ...
    @property
    def class_colors(self) -> tuple[tuple[int, int, int], ...]: ...
    @property
    def ignore_index(self) -> int: ...
    @property
    def mpp(self) -> float: ...
    @property
    def tile_px(self) -> int: ...
    @property
    def mean(self) -> tuple[float, ...]: ...
    @property
    def std(self) -> tuple[float, ...]: ...
    @property
    def qpseg_version(self) -> str: ...
    @property
    def input_mpp(self) -> tuple[float | None, ...] | None: ...
    @property
    def training(self) -> dict[str, Any]: ...
    @property
    def weights(self) -> str | None: ...
    @property
    def weights_sha256(self) -> str | None: ...



def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _cell(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def _read_json_inside(directory: Path, name: str) -> Any:
    """A JSON file of the package folder (None when absent, unreadable, too large, or a link
    out of the folder)."""
    path = directory / name
    try:
        if not path.is_file() or path.stat().st_size > _MAX_READ:
            return None
        if not path.resolve(strict=True).is_relative_to(directory.resolve(strict=True)):
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError, RecursionError):
        return None


def _architecture(name: str) -> tuple[str, str]:
    """(summary, paper) of a registered architecture, read without importing torch."""
    from qpseg.models.registry import catalog

    for entry in catalog():
        if entry.name == name:
            return entry.summary, entry.paper
    return "", ""


def _slides(training: Mapping[str, Any]) -> dict[str, list[str]]:
    slides = training.get("slides")
    split = training.get("split")
    out: dict[str, list[str]] = {}
    for subset in ("train", "val", "test"):
        for source in (slides, split):
            if isinstance(source, Mapping) and isinstance(source.get(subset), list):
                out[subset] = [str(s) for s in source[subset]]
                break
    return out


def _pixel_counts(run: Any) -> dict[str, dict[str, Any]]:
    """subset -> class -> labelled pixels, from run_metadata.json's data summary."""
    summary = run.get("summary") if isinstance(run, Mapping) else None
    out: dict[str, dict[str, Any]] = {}
    if not isinstance(summary, Mapping):
        return out
    for subset in ("train", "val", "test"):
        part = summary.get(subset)
        classes = part.get("classes") if isinstance(part, Mapping) else None
        if isinstance(classes, Mapping):
            out[subset] = {str(c): (v.get("pixels") if isinstance(v, Mapping) else v)
                           for c, v in classes.items()}
    return out


def _initialisation(init: Any) -> list[str]:
    if not isinstance(init, Mapping) or not init:
        return ["not recorded in this package"]
    lines = []
    pre = init.get("pretrained")
    if isinstance(pre, Mapping):
        files = pre.get("files")
        names = ", ".join(str(f.get("weights") or f.get("file"))
                          for f in (files if isinstance(files, list) else [])
                          if isinstance(f, Mapping))
        lines.append(f"pretrained weights: {pre.get('source', '?')}"
                     + (f" ({names})" if names else ""))
    pkg = init.get("init_from")
    if isinstance(pkg, Mapping):
        sha = str(pkg.get("sha256", ""))[:16]
        lines.append(f"started from the model package {pkg.get('package', '?')} "
                     f"({pkg.get('architecture', '?')}, SHA-256 {sha}…)")
    if not lines:
        lines.append("random initialisation" if init.get("random", True) else _cell(init))
    if init.get("warning"):
        lines.append(f"note: {init['warning']}")
    return lines


def _scores(training: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    stages = training.get("stages")
    out = []
    if isinstance(stages, Mapping):
        for name, stage in stages.items():
            if isinstance(stage, Mapping) and isinstance(stage.get("best"), Mapping):
                out.append((str(name), stage))
    return out


def _intended_use(cfg: CardConfig, n_train: int | None) -> str:
    targets = ", ".join(cfg.class_names[1:]) or cfg.class_names[0]
    trained = (f"It was trained on {n_train} slide{'s' if n_train != 1 else ''}"
               if n_train else "Its training data are not recorded in this package")
    return (f"Research use: segmenting {targets} in H&E whole-slide images, read at "
            f"{cfg.mpp:g} µm/px (`qpseg infer` reads any scan at that pixel size), with the "
            "results reviewed in QuPath. " + trained + "; how it does on other scanners, "
            "stains, tissues or laboratories is unknown until it is evaluated there "
            "(`qpseg evaluate`). It is not a medical device and not for diagnosis.")


_CURVE_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "val_mdice", "val_miou")
_CURVE_ROWS = 25  # longer runs show every k-th epoch and the last


def _curves_section(training: Mapping[str, Any], image: bool) -> list[str]:
    """``## Training curves``: the plot (when the package folder has it) and the loss and
    validation scores per epoch of every stage (``training.stages.<stage>.history``)."""
    found = training.get("stages")
    stages: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    tables: list[str] = []
    for stage, info in stages.items():
        history = info.get("history") if isinstance(info, Mapping) else None
        if not isinstance(history, list) or not history:
            continue
        rows = [r for r in history if isinstance(r, Mapping)]
        if len(rows) > _CURVE_ROWS:
            k = math.ceil(len(rows) / (_CURVE_ROWS - 1))
            rows = rows[::k] + ([rows[-1]] if (len(rows) - 1) % k else [])
        cols = [c for c in _CURVE_COLUMNS if any(c in r for r in rows)]
        tables += ["", f"Stage `{stage}`:" if len(stages) > 1 else "",
                   "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        tables += ["| " + " | ".join(_num(r[c]) if c in r else "" for c in cols) + " |"
                   for r in rows]
    if not tables and not image:
        return []
    out = ["", "## Training curves", ""]
    if image:
        out.append(f"![training curves]({CURVES_NAME})")
    return out + tables


def model_card(cfg: CardConfig, directory: str | os.PathLike[str] | None = None) -> str:
    """The Markdown model card of a package whose ``config.json`` is ``cfg`` (``directory``:
    the package folder, for its ``run_metadata.json`` and training curves)."""
    folder = Path(directory) if directory is not None else None
    training = cfg.training if isinstance(cfg.training, Mapping) else {}
    run = _read_json_inside(folder, _RUN_METADATA) if folder is not None else None
    summary, paper = _architecture(cfg.architecture)
    name = folder.name if folder is not None else cfg.architecture
    lines = [f"# Model card: {name}", ""]
    lines.append(f"- **Architecture:** `{cfg.architecture}`" + (f": {summary}" if summary else ""))
    if cfg.architecture_kwargs:
        opts = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(cfg.architecture_kwargs.items()))
        lines.append(f"- **Options:** {opts}")
    lines.append(f"- **Paper:** {paper or 'none recorded'}")
    inputs = ""
    if cfg.input_mpp and len(cfg.input_mpp) > 1:
        each = ", ".join("whole slide" if m is None else f"{m:g}" for m in cfg.input_mpp)
        inputs = f" (inputs: {each})"
    lines.append(f"- **Pixel size:** {cfg.mpp:g} µm/px{inputs}; tile {cfg.tile_px} px")
    lines.append(f"- **Normalisation:** mean {list(cfg.mean)}, std {list(cfg.std)}")
    lines.append(f"- **Weights:** `{cfg.weights or '?'}`, SHA-256 `{cfg.weights_sha256 or '?'}`")
    lines.append(f"- **Written by:** qpseg {cfg.qpseg_version}")
    lines += ["", "## Classes", "", "| index | class | colour (QuPath) |", "|---|---|---|"]
    for i, (n, c) in enumerate(zip(cfg.class_names, cfg.class_colors, strict=True)):
        lines.append(f"| {i} | {_cell(n)} | #{c[0]:02x}{c[1]:02x}{c[2]:02x} "
                     f"(rgb {c[0]}, {c[1]}, {c[2]}) |")
    lines.append(f"\nLabel {cfg.ignore_index} was ignored in training (unlabelled pixels).")

    lines += ["", "## Training data", ""]
    slides = _slides(training)
    if slides:
        for subset, label in (("train", "Training"), ("val", "Validation"), ("test", "Test")):
            if subset in slides:
                names = ", ".join(slides[subset]) or "none"
                lines.append(f"- **{label} slides ({len(slides[subset])}):** {_cell(names)}")
    else:
        lines.append("- Slides: not recorded in this package")
    for key, label in (("tissue_method", "Tissue detection"), ("target", "Target")):
        if training.get(key) is not None:
            lines.append(f"- **{label}:** {_cell(training[key])}")
    counts = _pixel_counts(run)
    if counts:
        subsets = [s for s in ("train", "val", "test") if s in counts]
        lines += ["", "Labelled pixels per class (at the training pixel size):", "",
                  "| class | " + " | ".join(subsets) + " |",
                  "|---|" + "---|" * len(subsets)]
        for n in cfg.class_names:
            lines.append(f"| {_cell(n)} | "
                         + " | ".join(_num(counts[s].get(n, 0)) for s in subsets) + " |")
    lines += ["", "## Initialisation", ""]
    lines += [f"- {t}" for t in _initialisation(training.get("initialisation"))]

    lines += ["", "## Validation scores", ""]
    scores = _scores(training)
    if not scores:
        lines.append("Not recorded in this package.")
    for stage, info in scores:
        best = info["best"]
        where = ", ".join(f"{k} {best[k]}" for k in ("epoch", "step") if k in best)
        chosen = f"{best.get('metric', '?')} ({best.get('mode', '?')})"
        lines.append(f"Stage `{stage}`: weights chosen by {chosen}"
                     + (f" at {where}" if where else "")
                     + (f"; {info['epochs']} epochs, {info['steps']} steps"
                        if "epochs" in info and "steps" in info else "")
                     + (", stopped early" if info.get("stopped_early") else "") + ".")
        metrics = best.get("last_metrics")
        if isinstance(metrics, Mapping) and metrics:
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [f"| {_cell(k)} | {_num(v)} |" for k, v in metrics.items()]
        lines.append("")
    lines += _curves_section(training, folder is not None and (folder / CURVES_NAME).is_file())
    n_train = len(slides["train"]) if "train" in slides else None
    lines += ["", "## Intended use", "", _intended_use(cfg, n_train), ""]
    return "\n".join(line.rstrip() for line in lines).replace("\n\n\n", "\n\n")
