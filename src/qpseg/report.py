"""``report.html`` for ``qpseg evaluate``: one self-contained page a person would rather read.

No plotting library and no script: charts are inline SVG written here, error maps are images
(Pillow) embedded as base64 ``data:`` URIs, so the file opens offline and can be mailed or
archived alone. Sections: inputs and counts, the model that made the predictions (name,
weights SHA-256, run, and its training split when the package is found: slides it was trained
on are marked everywhere), the slides by image name with a link to each one's overlay PNG,
the pooled per-class table, per-class Dice and IoU across slides (box and strip plots),
the confusion-matrix heatmap (row-normalised, counts in the cells), Dice per slide, lesion
detection by size category (ITC / micro / macro) with FROC-style points, instance metrics
with F1 across IoU thresholds (when scored), the objects qpseg wrote that the truth held and
what the review rule did with them (kept / left out per class under the ``--ai-objects``
policy, as in ``ai_objects.csv``), pixel sizes that ``--mpp-override`` replaced, error maps
over the slide (TP / FN / FP in a colour per class and outcome, with a legend), and the
unmatched and failed slides with their reasons.

About 800 lines and kept whole: it is one page, each section beside the chart it draws; the
charts are small SVG writers used nowhere else.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from qpseg.evaluation.results import Evaluation
    from qpseg.metrics.instance import InstanceMetrics
    from qpseg.metrics.lesion import LesionAccumulator

__all__ = [
    "MAP_MIN_SIDE",
    "OUTCOMES",
    "bar_chart_svg",
    "confusion_svg",
    "error_map_image",
    "froc_points",
    "froc_svg",
    "instance_svg",
    "outcome_colors",
    "render_report",
    "strip_plot_svg",
    "write_report",
]

#: outcomes of the codes of :func:`qpseg.evaluation.raster._overlay_codes` that carry a class
OUTCOMES: tuple[tuple[int, str, str], ...] = (
    (2, "TP", "correct"),
    (3, "FN", "missed (predicted Background)"),
    (4, "FP", "predicted here, truth is another class or Background"),
)
#: hue ranges (degrees) of each outcome's colours: greens TP, blues FN, reds/oranges FP
_HUES = {2: (85.0, 165.0), 3: (185.0, 265.0), 4: (335.0, 405.0)}
_UNLABELLED = (255, 255, 255)
_CORRECT_BACKGROUND = (226, 226, 226)
MAP_MIN_SIDE = 512   # error maps are shown at least this many pixels on the longer side
_MAX_BAR_SLIDES = 200
_MAX_THUMBNAILS = 200
_MAX_FROC_POINTS = 60


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _e(value)
    if math.isnan(v):
        return "–"
    if v.is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    return f"{v:.{digits}f}"


def _heat(fraction: float) -> str:
    """White -> dark blue for 0..1; light grey for undefined."""
    if math.isnan(fraction):
        return "#f0f0f0"
    f = min(max(fraction, 0.0), 1.0)
    r, g, b = (round(255 + (t - 255) * f) for t in (8, 48, 107))
    return f"#{r:02x}{g:02x}{b:02x}"


def confusion_svg(matrix: np.ndarray, names: Sequence[str], title: str = "") -> str:
    """Heatmap of a confusion matrix (truth rows, prediction columns), coloured by the row
    fraction, each cell labelled with its count and percentage."""
    import numpy as np

    cm = np.asarray(matrix, dtype=np.float64)
    k = len(names)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)
    cell, left, top = 74, 130, 120
    width, height = left + k * cell + 20, top + k * cell + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12" role="img">']
    if title:
        out.append(f'<text x="4" y="16" font-weight="bold">{_e(title)}</text>')
    out.append(f'<text x="{left + k * cell / 2}" y="34" text-anchor="middle">prediction</text>')
    out.append(f'<text x="14" y="{top + k * cell / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + k * cell / 2})">truth</text>')
    for j, name in enumerate(names):
        x = left + j * cell + cell / 2
        out.append(f'<text x="{x}" y="{top - 8}" text-anchor="start" '
                   f'transform="rotate(-40 {x} {top - 8})">{_e(name)}</text>')
    for i, name in enumerate(names):
        y = top + i * cell
        out.append(f'<text x="{left - 6}" y="{y + cell / 2 + 4}" text-anchor="end">'
                   f'{_e(name)}</text>')
        for j in range(k):
            x = left + j * cell
            f = float(frac[i, j])
            colour = "#ffffff" if not math.isnan(f) and f > 0.55 else "#000000"
            out.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" '
                       f'fill="{_heat(f)}" stroke="#999"/>')
            pct = "" if math.isnan(f) else f"{100 * f:.1f}%"
            out.append(f'<text x="{x + cell / 2}" y="{y + cell / 2 - 2}" text-anchor="middle" '
                       f'fill="{colour}">{pct}</text>')
            out.append(f'<text x="{x + cell / 2}" y="{y + cell / 2 + 13}" text-anchor="middle" '
                       f'font-size="10" fill="{colour}">{int(cm[i, j]):,}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart_svg(labels: Sequence[str], series: Sequence[str], values: np.ndarray,
                  colors: Sequence[tuple[int, int, int]], title: str = "") -> str:
    """Horizontal grouped bars: one group per label (slide), one bar per series (class),
    values in 0..1 (``NaN`` bars are left out and marked "–")."""
    import numpy as np

    vals = np.asarray(values, dtype=np.float64).reshape(len(labels), len(series))
    bar, gap, left, plot_w = 9, 8, 200, 420
    group = bar * len(series) + gap
    legend_h = 20 * math.ceil(len(series) / 4)
    top = 30 + legend_h
    width, height = left + plot_w + 70, top + group * len(labels) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11" role="img">']
    if title:
        out.append(f'<text x="4" y="16" font-weight="bold" font-size="12">{_e(title)}</text>')
    for s, (name, rgb) in enumerate(zip(series, colors, strict=True)):
        lx, ly = 4 + (s % 4) * 160, 26 + 20 * (s // 4)
        out.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="rgb{tuple(rgb)}"/>'
                   f'<text x="{lx + 16}" y="{ly + 10}">{_e(name)}</text>')
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + t * plot_w
        out.append(f'<line x1="{x}" y1="{top - 4}" x2="{x}" y2="{height - 24}" stroke="#ddd"/>'
                   f'<text x="{x}" y="{height - 10}" text-anchor="middle">{t:g}</text>')
    for g, label in enumerate(labels):
        y0 = top + g * group
        short = label if len(label) <= 30 else label[:28] + "…"
        out.append(f'<text x="{left - 6}" y="{y0 + group / 2}" text-anchor="end">'
                   f'<title>{_e(label)}</title>{_e(short)}</text>')
        for s, rgb in enumerate(colors):
            v = float(vals[g, s])
            y = y0 + s * bar
            if math.isnan(v):
                out.append(f'<text x="{left + 3}" y="{y + bar - 1}" font-size="9" '
                           f'fill="#999">–</text>')
                continue
            w = max(0.0, min(v, 1.0)) * plot_w
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 1}" '
                       f'fill="rgb{tuple(rgb)}"><title>{_e(label)} · {_e(series[s])}: '
                       f'{v:.3f}</title></rect>')
    out.append("</svg>")
    return "".join(out)


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((h % 360.0) / 360.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def outcome_colors(n_classes: int) -> dict[tuple[int, int], tuple[int, int, int]]:
    """``{(outcome, class index): RGB}`` for the classes ``1..n_classes-1`` (0 is Background):
    TP greens, FN blues, FP reds and oranges, one shade per class (hues spread over the
    outcome's range, every other class darker), so each class and outcome has its own colour
    and the outcome reads at a glance."""
    k = max(1, n_classes - 1)
    out: dict[tuple[int, int], tuple[int, int, int]] = {}
    for outcome, (lo, hi) in _HUES.items():
        for c in range(1, k + 1):
            hue = lo + (hi - lo) * ((c - 1) / (k - 1) if k > 1 else 0.5)
            dark = (c - 1) % 2 == 1
            out[(outcome, c)] = _hsv(hue, 0.85 if dark else 0.75, 0.62 if dark else 0.92)
    return out


def error_map_image(codes: np.ndarray, n_classes: int, tissue: np.ndarray | None = None,
                    min_side: int = MAP_MIN_SIDE) -> Image.Image:
    """The error map of one slide as an RGB image: ``codes`` (:func:`qpseg.evaluation.raster.
    _overlay_codes`) enlarged to ``tissue``'s size (or to ``min_side``), painted over the
    slide's pixels ``tissue`` when given: TP/FN/FP in :func:`outcome_colors`, correct
    Background shows the tissue, unlabelled pixels are washed out (white without tissue)."""
    import numpy as np
    from PIL import Image

    codes = np.asarray(codes)
    h, w = codes.shape[:2]
    if tissue is not None:
        th, tw = tissue.shape[:2]
        rows = np.minimum((np.arange(th) * h) // th, h - 1)
        cols = np.minimum((np.arange(tw) * w) // tw, w - 1)
        big = codes[rows][:, cols]
        base = np.asarray(tissue, dtype=np.float64)[..., :3]
    else:
        f = max(1, math.ceil(min_side / max(h, w, 1)))
        big = np.repeat(np.repeat(codes, f, axis=0), f, axis=1)
        base = np.empty((*big.shape, 3), dtype=np.float64)
        base[:] = _CORRECT_BACKGROUND
    outcome = (big >> 8).astype(np.int64)
    cls = (big & 0xFF).astype(np.int64)
    out = base.copy()
    unl = outcome == 0
    out[unl] = 0.35 * base[unl] + 0.65 * np.array(_UNLABELLED, dtype=np.float64)
    lut = np.zeros((5, 256, 3), dtype=np.float64)
    alpha = np.zeros(5, dtype=np.float64)
    for (o, c), rgb in outcome_colors(n_classes).items():
        lut[o, c] = rgb
    alpha[2], alpha[3], alpha[4] = 0.55, 0.8, 0.8
    if tissue is None:
        alpha[2:] = 1.0
    painted = outcome >= 2
    a = alpha[outcome[painted]][:, None]
    out[painted] = (1 - a) * out[painted] + a * lut[outcome[painted], cls[painted]]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def _image_uri(im: Image.Image, photo: bool) -> str:
    """``data:`` URI of an image: JPEG for maps over tissue (small), else PNG (exact)."""
    buf = io.BytesIO()
    if photo:
        im.save(buf, format="JPEG", quality=88)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def strip_plot_svg(values: np.ndarray, names: Sequence[str], slides: Sequence[str],
                   colors: Sequence[tuple[int, int, int]], title: str = "",
                   marked: Sequence[bool] | None = None) -> str:
    """Box and strip plot of a 0..1 metric: one column per class (``values`` is slides x
    classes, ``NaN`` left out), the box spans the quartiles with the median line and whiskers
    to the extremes, each slide a dot (its name and value in the tooltip); ``marked`` slides
    (in the model's training split) are drawn as hollow diamonds."""
    import numpy as np

    vals = np.asarray(values, dtype=np.float64).reshape(len(slides), len(names))
    marks = list(marked) if marked is not None else [False] * len(slides)
    col, left, top, plot_h = 96, 44, 34, 260
    width, height = left + col * len(names) + 20, top + plot_h + 70
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11" role="img">']
    if title:
        out.append(f'<text x="4" y="16" font-weight="bold" font-size="12">{_e(title)}</text>')

    def y_of(v: float) -> float:
        return top + (1.0 - min(max(v, 0.0), 1.0)) * plot_h

    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y_of(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" '
                   f'stroke="#e4e4e4"/><text x="{left - 4}" y="{y + 4:.1f}" '
                   f'text-anchor="end">{t:g}</text>')
    for j, (name, rgb) in enumerate(zip(names, colors, strict=True)):
        cx = left + j * col + col / 2
        v = vals[:, j]
        ok = ~np.isnan(v)
        label = name if len(name) <= 14 else name[:13] + "…"
        out.append(f'<text x="{cx}" y="{top + plot_h + 16}" text-anchor="middle">'
                   f'<title>{_e(name)}</title>{_e(label)}</text>'
                   f'<text x="{cx}" y="{top + plot_h + 30}" text-anchor="middle" '
                   f'fill="#666">n={int(ok.sum())}</text>')
        if not ok.any():
            continue
        q1, med, q3 = (float(x) for x in np.percentile(v[ok], [25, 50, 75]))
        lo, hi = float(v[ok].min()), float(v[ok].max())
        out.append(f'<line x1="{cx}" y1="{y_of(hi):.1f}" x2="{cx}" y2="{y_of(lo):.1f}" '
                   f'stroke="#777"/>'
                   f'<rect x="{cx - 22}" y="{y_of(q3):.1f}" width="44" '
                   f'height="{max(y_of(q1) - y_of(q3), 1):.1f}" fill="rgb{tuple(rgb)}" '
                   f'fill-opacity="0.25" stroke="#555"><title>{_e(name)}: median {med:.3f}, '
                   f'quartiles {q1:.3f}–{q3:.3f}</title></rect>'
                   f'<line x1="{cx - 22}" y1="{y_of(med):.1f}" x2="{cx + 22}" '
                   f'y2="{y_of(med):.1f}" stroke="#222" stroke-width="2"/>')
        for i in (int(k) for k in np.flatnonzero(ok)):
            jitter = ((i * 0.6180339887) % 1.0 - 0.5) * 30  # fixed spread, no randomness
            x, y = cx + jitter, y_of(float(v[i]))
            tip = (f'<title>{_e(slides[i])}: {float(v[i]):.3f}'
                   f'{" (training split)" if marks[i] else ""}</title>')
            if marks[i]:
                out.append(f'<path d="M{x:.1f} {y - 5:.1f} L{x + 5:.1f} {y:.1f} L{x:.1f} '
                           f'{y + 5:.1f} L{x - 5:.1f} {y:.1f} Z" fill="none" '
                           f'stroke="rgb{tuple(rgb)}" stroke-width="1.5">{tip}</path>')
            else:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="rgb{tuple(rgb)}" '
                           f'stroke="#333" stroke-width="0.5">{tip}</circle>')
    out.append("</svg>")
    return "".join(out)


def froc_points(lesion: LesionAccumulator) -> list[dict[str, float]]:
    """FROC-style operating points of binary lesion predictions: the first keeps every
    predicted lesion, each next one only those larger (largest diameter) than the next
    predicted diameter in turn, down to none; per point the false positives per slide and the
    sensitivity overall and per size category (a truth lesion is detected when a kept
    predicted lesion overlaps it). Keys: ``min_diameter_um`` (0, else kept lesions are larger),
    ``fp_per_slide``, ``sensitivity``, and ``sensitivity_<itc|micro|macro>`` (``NaN`` without
    truth lesions of that size)."""
    import numpy as np

    from qpseg.metrics.lesion import CATEGORIES

    per = list(lesion.per_slide)
    if not per:
        return []
    diams = sorted({les.diameter_um for m in per for les in m.pred})
    if len(diams) > _MAX_FROC_POINTS:
        idx = np.unique(np.linspace(0, len(diams) - 1, _MAX_FROC_POINTS).round().astype(int))
        diams = [diams[i] for i in idx]
    points = []
    for thr in [0.0, *diams]:
        fp = 0
        hit = {c: 0 for c in CATEGORIES}
        total = {c: 0 for c in CATEGORIES}
        for m in per:
            kept = {les.label for les in m.pred if thr == 0.0 or les.diameter_um > thr}
            fp += sum(1 for les in m.pred if les.label in kept and not les.hit)
            for t in m.truth:
                total[t.category] += 1
                hit[t.category] += any(o in kept for o in t.overlaps)
        n = sum(total.values())
        row = {"min_diameter_um": float(thr), "fp_per_slide": fp / len(per),
               "sensitivity": sum(hit.values()) / n if n else math.nan}
        for c in CATEGORIES:
            row[f"sensitivity_{c}"] = hit[c] / total[c] if total[c] else math.nan
        points.append(row)
    return points


_CATEGORY_STYLE = {"sensitivity": ("all lesions", (20, 20, 20)),
                   "sensitivity_itc": ("ITC (≤ 0.2 mm)", (230, 120, 20)),
                   "sensitivity_micro": ("micrometastases (≤ 2 mm)", (40, 120, 200)),
                   "sensitivity_macro": ("macrometastases (> 2 mm)", (170, 40, 150))}


def froc_svg(points: Sequence[dict[str, float]], title: str = "") -> str:
    """Sensitivity against false positives per slide, one series per size category (points
    of :func:`froc_points`; the first point, every predicted lesion kept, is ringed)."""
    fps = [p["fp_per_slide"] for p in points]
    xmax = max([*fps, 0.0]) * 1.1 or 1.0
    left, top, pw, ph = 56, 34, 420, 240
    width, height = left + pw + 230, top + ph + 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11" role="img">']
    if title:
        out.append(f'<text x="4" y="16" font-weight="bold" font-size="12">{_e(title)}</text>')

    def xy(fp: float, sens: float) -> tuple[float, float]:
        return left + fp / xmax * pw, top + (1 - sens) * ph

    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = xy(0, t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" '
                   f'stroke="#e4e4e4"/><text x="{left - 4}" y="{y + 4:.1f}" '
                   f'text-anchor="end">{t:g}</text>')
    for i in range(5):
        v = xmax * i / 4
        x, _ = xy(v, 0)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{v:.2g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" '
               f'stroke="#999"/><text x="{left + pw / 2}" y="{top + ph + 34}" '
               f'text-anchor="middle">false positives per slide</text>'
               f'<text x="14" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">sensitivity</text>')
    row = 0
    for key, (label, rgb) in _CATEGORY_STYLE.items():
        pts = [(p["fp_per_slide"], p[key], p["min_diameter_um"]) for p in points
               if not math.isnan(p[key])]
        if not pts:
            continue
        coords = sorted((xy(fp, s), fp, s, d) for fp, s, d in pts)
        path = " ".join(f"{'M' if k == 0 else 'L'}{c[0][0]:.1f} {c[0][1]:.1f}"
                        for k, c in enumerate(coords))
        colour = f"rgb{tuple(rgb)}"
        out.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-opacity="0.5"/>')
        for (x, y), fp, sens, d in coords:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}">'
                       f'<title>{_e(label)}: sensitivity {sens:.3f} at {fp:.3g} FP/slide '
                       f'(predicted lesions &gt; {d:.0f} µm)</title></circle>')
        x0, y0 = xy(pts[0][0], pts[0][1])
        out.append(f'<circle cx="{x0:.1f}" cy="{y0:.1f}" r="7" fill="none" '
                   f'stroke="{colour}"/>')
        ly = top + 10 + 18 * row
        out.append(f'<circle cx="{left + pw + 20}" cy="{ly}" r="4" fill="{colour}"/>'
                   f'<text x="{left + pw + 30}" y="{ly + 4}">{_e(label)}</text>')
        row += 1
    ly = top + 10 + 18 * row
    out.append(f'<circle cx="{left + pw + 20}" cy="{ly}" r="7" fill="none" stroke="#333"/>'
               f'<text x="{left + pw + 32}" y="{ly + 4}">all predicted lesions kept</text>')
    out.append("</svg>")
    return "".join(out)


def instance_svg(pooled: InstanceMetrics, per_slide: Sequence[InstanceMetrics],
                 title: str = "") -> str:
    """F1 against the IoU threshold of matching: pooled over slides (bold) and per slide
    (grey), the thresholds of the mAP and F1@0.5 / F1@0.7."""
    import numpy as np

    th = np.asarray(pooled.thresholds, dtype=np.float64)
    lo, hi = float(th.min()), float(th.max())
    span = hi - lo or 1.0
    left, top, pw, ph = 56, 34, 420, 220
    width, height = left + pw + 30, top + ph + 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11" role="img">']
    if title:
        out.append(f'<text x="4" y="16" font-weight="bold" font-size="12">{_e(title)}</text>')

    def xy(t: float, v: float) -> tuple[float, float]:
        return left + (t - lo) / span * pw, top + (1 - min(max(v, 0.0), 1.0)) * ph

    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = xy(lo, t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" '
                   f'stroke="#e4e4e4"/><text x="{left - 4}" y="{y + 4:.1f}" '
                   f'text-anchor="end">{t:g}</text>')
    for t in th[:: max(1, len(th) // 6)]:
        x, _ = xy(float(t), 0)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{t:.2f}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" '
               f'stroke="#999"/><text x="{left + pw / 2}" y="{top + ph + 34}" '
               f'text-anchor="middle">IoU threshold of a match</text>'
               f'<text x="14" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">F1</text>')

    def line(m: InstanceMetrics, stroke: str, w: float) -> str:
        f1 = np.asarray(m.f1, dtype=np.float64)
        pts = [xy(float(t), float(v)) for t, v in zip(m.thresholds, f1, strict=True)
               if not math.isnan(float(v))]
        if not pts:
            return ""
        d = " ".join(f"{'M' if k == 0 else 'L'}{x:.1f} {y:.1f}" for k, (x, y) in enumerate(pts))
        return (f'<path d="{d}" fill="none" stroke="{stroke}" stroke-width="{w}">'
                f'<title>{_e(m.slide)}</title></path>')

    for m in per_slide[:_MAX_BAR_SLIDES]:
        out.append(line(m, "#bbbbbb", 1))
    out.append(line(pooled, "#1f4e9c", 2.5))
    out.append("</svg>")
    return "".join(out)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _class_colors(names: Sequence[str]) -> list[tuple[int, int, int]]:
    from qpseg.labels import ClassMap

    cm = ClassMap.from_names(list(names))
    return [(150, 150, 150) if c.index == 0 else c.color for c in cm.classes]


_POLICY_TEXT = {
    "unreviewed-out": "objects left unchanged and unlocked in the review are unreviewed "
                      "predictions and are left out; edited, accepted (locked) and unproven "
                      "ones count as truth",
    "all-out": "no object qpseg wrote counts as truth",
    "all-in": "every object qpseg wrote counts as truth",
}


_TRUTH_MODE_TEXT = {
    "exhaustive": "exhaustive: unannotated pixels of the image are Background (inside Region* "
                  "annotations only, where a slide has them); slides without annotations are "
                  "all-negative",
    "partial": "partial: only the truth's labelled area is scored",
}


def _ai_objects_section(ev: Evaluation) -> list[str]:
    """The truth rule's counts (:mod:`qpseg.review`): per object type and class, the AI
    objects found in the truth by status and how many were kept or left out."""
    counts = ev.review
    policy = counts.policy
    intro = (f"<p>--ai-objects {_e(policy)}: {_e(_POLICY_TEXT.get(policy, ''))}. Objects qpseg "
             "wrote (metadata <code>qpseg_model</code>) found in the truth, compared with the "
             "predictions qpseg saved; per slide in ai_objects.csv.</p>")
    if not counts.counts:
        return ["<h2>AI objects in the truth</h2>", intro,
                "<p>The truth holds no objects qpseg wrote.</p>"]
    statuses = ("unreviewed", "accepted", "edited", "unproven")
    rows = []
    for r in counts.rows():
        what = r["class_name"] or "unclassified"
        rows.append([_e(what), _e(r["object_type"]), *(_fmt(r[k]) for k in statuses),
                     _fmt(r["kept"]), _fmt(r["left_out"])])
    rows.append(["<b>all</b>", "", *(_fmt(counts.total(k)) for k in statuses),
                 _fmt(counts.total("kept")), _fmt(counts.total("left_out"))])
    return ["<h2>AI objects in the truth</h2>", intro,
            _table(["class", "object type", *statuses, "kept (truth)", "left out"], rows)]


def _pixel_size_rows(ev: Evaluation) -> list[list[str]]:
    """Header rows: where the slides' pixel sizes came from, and what was replaced."""
    sources: dict[str, int] = {}
    for s in ev.slides:
        if s.mpp_source is not None:
            sources[s.mpp_source] = sources.get(s.mpp_source, 0) + 1
    if not sources:
        return []
    out = [["slide pixel size from", _e(", ".join(f"{k}: {v}" for k, v in sources.items()))]]
    changes = ev.mpp_changes
    if changes:
        out.append(["pixel size replaced (--mpp-override)", "<br>".join(
            _e(f"{s.slide}: {old:g} -> {new:g} µm/px") for s, old, new in changes)])
    return out


def _model_rows(ev: Evaluation) -> list[list[str]]:
    """Header rows: the model that made the predictions and its training split."""
    info = ev.model
    if info is None:
        return [["model", "not recorded (the predictions carry no qpseg provenance; pass "
                          "--model DIR to name the package)"]]
    what = ", ".join(info.names) or "unnamed"
    if info.architecture:
        what += f" ({info.architecture})"
    rows = [["model", _e(what)],
            ["model SHA-256", "<br>".join(f"<code>{_e(s)}</code>" for s in info.sha256) or "—"]]
    if info.runs:
        shown = ", ".join(info.runs[:5]) + (" …" if len(info.runs) > 5 else "")
        rows.append(["inference run", _e(shown)])
    if info.package is not None:
        counts = ", ".join(f"{len(info.split[k])} {k}" for k in ("train", "val", "test")
                           if k in info.split) or "none recorded"
        rows.append(["model package", _e(info.package)])
        rows.append(["training split", _e(counts) + (
            f"<br>training slides: {_e(', '.join(info.split['train']))}"
            if info.split.get("train") else "")])
    else:
        rows.append(["training split", "unknown: the model package was not found (pass "
                                       "--model DIR to mark the slides it was trained on)"])
    return rows


def _subset(ev: Evaluation, slide: str) -> str | None:
    return ev.model.subset_of(slide) if ev.model is not None else None


def _split_mark(subset: str | None) -> str:
    if subset in ("train", "val"):
        return f"<span class='trained' title='in the model&#39;s {subset} split'>{subset}</span>"
    return _e(subset or "")


def _overlay_link(path: str | None, report_dir: Path | None) -> str:
    if not path:
        return ""
    target = Path(path)
    href = target.as_uri() if target.is_absolute() else str(target)
    if report_dir is not None:
        with contextlib.suppress(ValueError):  # another drive (Windows): keep the URI
            href = Path(os.path.relpath(target, report_dir)).as_posix()
    return f"<a href='{_e(href)}'>overlay</a>"


def _slides_section(ev: Evaluation, report_dir: Path | None) -> list[str]:
    per = {s.slide: m for s, m in zip(ev.pixel_slides, ev.pixel.per_slide, strict=True)}
    rows = []
    for s in ev.slides:
        m = per.get(s.slide)
        rows.append([_e(s.slide), _fmt(s.entry_id), _split_mark(_subset(ev, s.slide)),
                     _fmt(m.mf1) if m is not None else "", _fmt(m.miou) if m is not None else "",
                     _fmt(s.base_mpp), _overlay_link(s.overlay, report_dir)])
    trained = sum(_subset(ev, s.slide) in ("train", "val") for s in ev.slides)
    note = (f"<p class='note'>{trained} slide(s) were in the model's training or validation "
            "split (marked): their scores are not held-out results.</p>" if trained else "")
    return ["<h2>Slides</h2>", note,
            _table(["slide", "entry", "model split", "mean Dice", "mean IoU", "µm/px",
                    "prediction"], rows)]


def _lesion_section(ev: Evaluation) -> list[str]:
    from qpseg.metrics.lesion import CATEGORIES

    assert ev.lesion is not None
    pr = ev.lesion.pooled_row()
    rows = [[_e(r.slide) + (" " + _split_mark(sub) if (sub := _subset(ev, r.slide)) else ""),
             _fmt(r.n_truth), _fmt(r.n_detected), _fmt(r.sensitivity), _fmt(r.n_fp),
             _e(r.truth_category), _e(r.pred_category), _fmt(r.category_agrees)]
            for r in ev.lesion.per_slide]
    rows.append(["<b>pooled</b>", _fmt(pr["n_truth"]), _fmt(pr["n_detected"]),
                 _fmt(pr["sensitivity"]), _fmt(pr["n_fp"]), "", "",
                 _fmt(pr["category_agreement"])])
    cat_rows = []
    labels = {"itc": "ITC (≤ 0.2 mm)", "micro": "micrometastasis (≤ 2 mm)",
              "macro": "macrometastasis (> 2 mm)"}
    for cat in CATEGORIES:
        counts = [m.by_category()[cat] for m in ev.lesion.per_slide]
        n_t = int(sum(c["n_truth"] for c in counts))
        det = int(sum(c["n_detected"] for c in counts))
        cat_rows.append([_e(labels[cat]), _fmt(n_t), _fmt(det),
                         _fmt(det / n_t if n_t else math.nan),
                         _fmt(int(sum(c["n_pred"] for c in counts))),
                         _fmt(int(sum(c["n_fp"] for c in counts)))])
    points = froc_points(ev.lesion)
    return [f"<h2>Lesions ({_e(ev.lesion_class)})</h2>",
            "<p>ITC ≤ 0.2 mm, micrometastasis ≤ 2 mm, macrometastasis &gt; 2 mm (largest "
            "diameter); a truth lesion is detected when a predicted lesion overlaps it. "
            "Per-lesion rows in lesions.csv.</p>",
            _table(["size category", "truth lesions", "detected", "sensitivity",
                    "predicted lesions", "false positives"], cat_rows),
            froc_svg(points, "Lesion detection: sensitivity against false positives per "
                             "slide (predicted lesions kept from a minimum diameter up)"),
            _table(["slide", "truth lesions", "detected", "sensitivity", "false positives",
                    "truth category", "predicted category", "agree"], rows)]


def _instance_section(ev: Evaluation) -> list[str]:
    assert ev.instance is not None
    items = [*ev.instance.per_slide, ev.instance.pooled()]
    rows = []
    for r in items:
        rows.append([_e(r.slide), _fmt(r.n_true), _fmt(r.n_pred), _fmt(r.aji),
                     _fmt(r.map), _fmt(r.at(0.5)["f1"]), _fmt(r.at(0.7)["f1"]), _fmt(r.pq)])
    rows[-1][0] = "<b>pooled over slides</b>"
    rows.append(["<b>per-image mean</b>", "", "", _fmt(ev.instance.image_mean("aji")),
                 _fmt(ev.instance.image_mean("map")), _fmt(ev.instance.image_mean("f1_50")),
                 _fmt(ev.instance.image_mean("f1_70")), _fmt(ev.instance.image_mean("pq"))])
    return ["<h2>Instances</h2>",
            "<p>AJI pooled over slides sums intersections and unions over every slide "
            "(large slides weigh more); the per-image mean averages each slide's AJI "
            "(the nuclei papers' protocol).</p>",
            _table(["slide", "truth", "predicted", "AJI", "mAP", "F1@0.5", "F1@0.7", "PQ"],
                   rows),
            instance_svg(ev.instance.pooled(), ev.instance.per_slide,
                         "Instance F1 by IoU threshold (pooled bold, slides grey)")]


def _error_map_section(ev: Evaluation, names: Sequence[str],
                       report_dir: Path | None) -> list[str]:
    thumbs = [s for s in ev.slides if s.thumbnail is not None][:_MAX_THUMBNAILS]
    if not thumbs:
        return []
    colours = outcome_colors(len(names))
    legend_rows = []
    for c, name in enumerate(names):
        if c == 0:
            continue
        cells = "".join(f"<span style='background:rgb{colours[(o, c)]}'></span>{short} "
                        f"<small>({_e(what)})</small>" for o, short, what in OUTCOMES)
        legend_rows.append(f"<div><b>{_e(name)}</b>: {cells}</div>")
    legend_rows.append(
        f"<div><span style='background:rgb{_CORRECT_BACKGROUND}'></span>correct Background "
        f"(the tissue shows through) <span style='background:rgb{_UNLABELLED}'></span>"
        "unlabelled (not scored; washed out)</div>")
    figs = []
    no_tissue = 0
    for s in thumbs:
        assert s.thumbnail is not None
        im = error_map_image(s.thumbnail, len(s.class_names) if s.class_names else len(names),
                             s.tissue)
        no_tissue += s.tissue is None
        sub = _subset(ev, s.slide)
        caption = _e(s.slide) + (" " + _split_mark(sub) if sub else "")
        link = _overlay_link(s.overlay, report_dir)
        figs.append(f"<figure><img alt='error map of {_e(s.slide)}' width='{im.width}' "
                    f"height='{im.height}' src='{_image_uri(im, s.tissue is not None)}'>"
                    f"<figcaption>{caption}{' · ' + link if link else ''}</figcaption>"
                    "</figure>")
    note = ""
    if no_tissue:
        note = (f"<p class='note'>{no_tissue} map(s) are drawn without the tissue: the slide "
                "is reachable only when the truth or the prediction is a QuPath project whose "
                "image is found.</p>")
    return ["<h2>Errors per slide</h2>",
            "<p>Each block shows its worst outcome (FP over FN over TP); colours per class and "
            "outcome:</p>", f"<div class='legend'>{''.join(legend_rows)}</div>", note,
            f"<div class='thumbs'>{''.join(figs)}</div>"]


_CSS = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.thumbs{display:flex;flex-wrap:wrap;gap:16px}.thumbs figure{margin:0;font-size:13px}
.thumbs img{border:1px solid #ccc;max-width:100%;height:auto}
.legend{font-size:13px;line-height:22px}
.legend span{display:inline-block;width:14px;height:14px;margin:0 4px 0 12px;
border:1px solid #999;vertical-align:middle}
.trained{background:#fde68a;border-radius:3px;padding:0 4px;font-weight:bold}
.figs{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.note{color:#844}
"""


def render_report(ev: Evaluation, report_dir: str | os.PathLike[str] | None = None) -> str:
    """The report page as one HTML string (``report_dir``: where it will be written, so links
    to the overlays are relative to it)."""
    import numpy as np

    from qpseg import __version__

    where = Path(report_dir) if report_dir is not None else None
    names = list(ev.class_names)
    parts: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>qpseg evaluation</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>qpseg evaluation</h1>",
        _table(["", ""], [
            ["truth", _e(ev.truth)], ["prediction", _e(ev.pred)],
            *_model_rows(ev),
            ["classes", _e(", ".join(names))],
            ["truth mode", _e(_TRUTH_MODE_TEXT.get(ev.truth_mode, ev.truth_mode))],
            ["evaluation pixel size",
             _e(f"{_fmt(ev.eval_mpp)} µm/px from {ev.eval_mpp_source} (label masks: their "
                "grid)")],
            ["slides scored / failed / unmatched",
             f"{len(ev.slides)} / {len(ev.failed)} / {len(ev.unmatched)}"],
            ["lesion class", _e(ev.lesion_class or "—")],
            ["AI objects (--ai-objects)",
             _e(f"{ev.review.policy}: {ev.review.total('kept')} kept, "
                f"{ev.review.total('left_out')} left out")],
            *_pixel_size_rows(ev),
            ["written", _e(f"{datetime.now(UTC).isoformat(timespec='seconds')} by qpseg "
                           f"{__version__}")],
        ]),
    ]
    for note in [*ev.notes, *(ev.model.notes if ev.model is not None else [])]:
        parts.append(f"<p class='note'>{_e(note)}</p>")
    parts += _slides_section(ev, where)

    per = ev.pixel.per_slide
    if per:
        pooled = ev.pixel.pooled()
        dice_by_slide = np.array([m.f1 for m in per], dtype=np.float64)
        iou_by_slide = np.array([m.iou for m in per], dtype=np.float64)
        rows = []
        for i, name in enumerate(names):
            vals = dice_by_slide[:, i]
            vals = vals[~np.isnan(vals)]
            sd = float(vals.std(ddof=1)) if vals.size > 1 else math.nan
            mean = float(vals.mean()) if vals.size else math.nan
            rows.append([_e(name), _fmt(int(pooled.n_truth[i])), _fmt(float(pooled.f1[i])),
                         _fmt(float(pooled.iou[i])), _fmt(float(pooled.precision[i])),
                         _fmt(float(pooled.recall[i])), f"{_fmt(mean)} ± {_fmt(sd)}"])
        rows.append(["<b>mean over classes</b>", "", _fmt(pooled.mf1), _fmt(pooled.miou),
                     _fmt(pooled.mprecision), _fmt(pooled.mrecall), ""])
        slide_names = [s.slide for s in ev.pixel_slides]
        marked = [_subset(ev, n) in ("train", "val") for n in slide_names]
        colours = _class_colors(names)
        legend = ("<p>Boxes: quartiles and median across slides; dots: slides"
                  + (" (hollow diamonds: in the model's training split)" if any(marked)
                     else "") + ".</p>")
        parts += [
            "<h2>Pixels</h2>",
            "<p>Pooled over slides (every pixel weighs the same); the last column is the "
            "per-slide mean ± standard deviation of Dice. Confidence intervals are in "
            "summary.csv.</p>",
            _table(["class", "truth pixels", "Dice", "IoU", "precision", "recall",
                    "Dice per slide"], rows),
            legend, "<div class='figs'>",
            strip_plot_svg(dice_by_slide, names, slide_names, colours,
                           "Dice per class across slides", marked),
            strip_plot_svg(iou_by_slide, names, slide_names, colours,
                           "IoU per class across slides", marked),
            confusion_svg(pooled.confusion, names, "Confusion matrix (pooled, row-normalised)"),
            "</div>",
        ]
        shown = per[:_MAX_BAR_SLIDES]
        parts.append(bar_chart_svg(
            [m.slide for m in shown], names, np.array([m.f1 for m in shown]),
            colours, "Dice per slide and class"))
        if len(per) > len(shown):
            parts.append(f"<p>First {len(shown)} of {len(per)} slides shown.</p>")

    if ev.lesion is not None and len(ev.lesion):
        parts += _lesion_section(ev)
    if ev.instance is not None and len(ev.instance):
        parts += _instance_section(ev)
    parts += _ai_objects_section(ev)
    parts += _error_map_section(ev, names, where)

    if ev.unmatched:
        parts += ["<h2>Unmatched</h2>", _table(
            ["side", "slide", "file", "reason"],
            [[_e(u.side), _e(u.slide), _e(u.path), _e(u.reason)] for u in ev.unmatched])]
    if ev.failed:
        parts += ["<h2>Failed</h2>", _table(
            ["slide", "reason"], [[_e(f.slide), _e(f.reason)] for f in ev.failed])]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(ev: Evaluation, path: str | os.PathLike[str]) -> Path:
    """Write :func:`render_report` to ``path`` atomically."""
    from qpseg._io import atomic_write

    p = Path(path)
    text = render_report(ev, p.parent)
    with atomic_write(p, "w", backup=False) as fh:
        fh.write(text)
    return p
