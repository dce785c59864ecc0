"""``training_curves.png``: the loss and validation metrics of a run per epoch, drawn with Pillow.

One row of two panels per stage: the training and validation loss (left; a log scale when the
values span more than two decades) and the validation scores in [0, 1] (right: mean Dice, mean
IoU, accuracy and the Dice of every class). The training loop redraws it after every epoch
beside ``train_log.csv``; the model card links it. Pillow is a dependency already, so the plot
needs nothing more (matplotlib is not one).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["curve_series", "draw_training_curves"]

_W, _H = 560, 340  # one panel, px
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 62, 14, 30, 40
#: Line colours (Okabe & Ito 2008, distinguishable with colour-blindness), then greys.
_COLORS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0),
           (86, 180, 233), (240, 228, 66), (0, 0, 0), (120, 120, 120), (170, 170, 170)]
_LOSSES = ("train_loss", "val_loss")
_SCORES = ("val_mdice", "val_miou", "val_accuracy")


def _value(record: Mapping[str, Any], key: str) -> float | None:
    v = record.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def curve_series(records: Sequence[Mapping[str, Any]]
                 ) -> dict[str, tuple[dict[str, list[tuple[int, float]]],
                                      dict[str, list[tuple[int, float]]]]]:
    """Per stage (in order of appearance): (loss series, score series), each ``name ->
    [(epoch number from 1, value)]`` from ``kind: epoch`` records of ``train_log.jsonl``.
    Missing or non-finite values (no validation that epoch) are left out."""
    out: dict[str, tuple[dict[str, list[tuple[int, float]]],
                         dict[str, list[tuple[int, float]]]]] = {}
    for rec in records:
        if rec.get("kind", "epoch") != "epoch":
            continue
        stage = str(rec.get("stage", "train"))
        losses, scores = out.setdefault(stage, ({}, {}))
        epoch = int(rec.get("epoch", 0)) + 1
        for key in _LOSSES:
            v = _value(rec, key)
            if v is not None:
                losses.setdefault(key, []).append((epoch, v))
        keys = [*_SCORES, *sorted(k for k in rec if str(k).startswith("val_dice_"))]
        for key in keys:
            v = _value(rec, key)
            if v is not None:
                scores.setdefault(key, []).append((epoch, v))
    return out


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    out = []
    v = first
    while v <= hi + step * 1e-9:
        if v >= lo - step * 1e-9:
            out.append(round(v, 12))
        v += step
    return out


def _label(v: float) -> str:
    return f"{v:.3g}" if (v == 0 or 1e-3 <= abs(v) < 1e4) else f"{v:.1e}"


def _panel(draw: Any, font: Any, x0: int, y0: int, title: str,
           series: Mapping[str, list[tuple[int, float]]], epochs: int,
           fixed: tuple[float, float] | None) -> None:
    """One panel at (x0, y0): frame, ticks, lines with points, legend."""
    left, top = x0 + _PAD_L, y0 + _PAD_T
    right, bottom = x0 + _W - _PAD_R, y0 + _H - _PAD_B
    draw.rectangle([x0, y0, x0 + _W - 1, y0 + _H - 1], fill=(255, 255, 255))
    draw.text((left, y0 + 8), title, fill=(0, 0, 0), font=font)
    values = [v for pts in series.values() for _, v in pts]
    if not values:
        draw.text((left + 10, (top + bottom) // 2), "no values yet", fill=(120, 120, 120),
                  font=font)
        draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
        return
    log = False
    if fixed is not None:
        lo, hi = fixed
    else:
        lo, hi = min(values), max(values)
        if lo > 0 and hi / lo > 100:
            log = True
            lo, hi = math.log10(lo), math.log10(hi)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        margin = (hi - lo) * 0.05
        lo, hi = lo - margin, hi + margin

    def px(epoch: float, value: float) -> tuple[float, float]:
        v = math.log10(value) if log else value
        fx = 0.5 if epochs <= 1 else (epoch - 1) / (epochs - 1)
        return left + fx * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top)

    for t in _ticks(lo, hi):
        y = bottom - (t - lo) / (hi - lo) * (bottom - top)
        draw.line([left, y, right, y], fill=(230, 230, 230))
        text = _label(10 ** t if log else t)
        draw.text((x0 + 4, y - 6), text, fill=(60, 60, 60), font=font)
    for t in _ticks(1, max(1, epochs), 6):
        if abs(t - round(t)) > 1e-9 or t < 1:
            continue
        x, _ = px(t, lo if not log else 10 ** lo)
        draw.line([x, bottom, x, bottom + 4], fill=(0, 0, 0))
        draw.text((x - 4, bottom + 6), str(int(t)), fill=(60, 60, 60), font=font)
    draw.text(((left + right) // 2 - 14, bottom + 22), "epoch", fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    legend_y = top + 4
    for i, (name, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        xy = [px(e, v) for e, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=color)
        label = name.removeprefix("val_") if name.startswith("val_dice_") else name
        draw.rectangle([right - 154, legend_y - 1, right - 2, legend_y + 13], fill=(255, 255, 255))
        draw.line([right - 150, legend_y + 6, right - 132, legend_y + 6], fill=color, width=3)
        draw.text((right - 128, legend_y), label[:22], fill=(0, 0, 0), font=font)
        legend_y += 14


def draw_training_curves(records: Sequence[Mapping[str, Any]],
                         path: str | os.PathLike[str]) -> Path | None:
    """Draw the epoch ``records`` (``train_log.jsonl`` records of kind ``epoch``) into the PNG
    ``path`` (written atomically); None when there is no epoch yet."""
    from PIL import Image, ImageDraw, ImageFont

    from qpseg._io import atomic_write

    stages = curve_series(records)
    if not stages:
        return None
    img = Image.new("RGB", (2 * _W, _H * len(stages)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for row, (stage, (losses, scores)) in enumerate(stages.items()):
        epochs = max([e for pts in (*losses.values(), *scores.values()) for e, _ in pts],
                     default=1)
        prefix = f"{stage}: " if len(stages) > 1 or stage != "train" else ""
        _panel(draw, font, 0, row * _H, f"{prefix}loss", losses, epochs, None)
        _panel(draw, font, _W, row * _H, f"{prefix}validation scores", scores, epochs,
               (0.0, 1.0))
    target = Path(path)
    with atomic_write(target, "wb", backup=False) as fh:
        img.save(fh, format="PNG")
    return target
