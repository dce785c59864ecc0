"""``report.html`` for ``qpseg evaluate``: one self-contained page a person would rather read.

No plotting library: charts are inline SVG written here, thumbnails are PNG (Pillow) embedded
as base64 ``data:`` URIs, so the file can be mailed or archived alone. Sections: inputs and
counts, pooled per-class table, confusion-matrix heatmap (row-normalised, counts in the cells),
per-slide Dice bar chart, lesion and instance tables (when scored), FP/FN overlay thumbnails
per slide (green = TP, red = FP, blue = FN, grey = correct Background, white = unlabelled), the
objects qpseg wrote that the truth held and what the review rule did with them (kept / left
out per class under the ``--ai-objects`` policy, as in ``ai_objects.csv``), pixel sizes that
``--mpp-override`` replaced, and the unmatched and failed slides with their reasons.
"""

from __future__ import annotations

import base64
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

    from qpseg.evaluate import Evaluation

__all__ = [
    "OVERLAY_COLORS",
    "bar_chart_svg",
    "confusion_svg",
    "overlay_png",
    "render_report",
    "write_report",
]

#: RGB of the overlay codes of :func:`qpseg.evaluate._overlay_codes`
OVERLAY_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),  # 0 unlabelled
    (222, 222, 222),  # 1 correct Background
    (30, 160, 60),    # 2 TP
    (40, 90, 240),    # 3 FN
    (225, 35, 35),    # 4 FP
)
_MAX_BAR_SLIDES = 200
_MAX_THUMBNAILS = 200


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


def overlay_png(codes: np.ndarray, min_side: int = 160) -> bytes:
    """PNG bytes of an overlay code map (colours :data:`OVERLAY_COLORS`), enlarged with
    nearest-neighbour sampling when it is small."""
    import numpy as np
    from PIL import Image

    lut = np.array(OVERLAY_COLORS, dtype=np.uint8)
    rgb = lut[np.clip(np.asarray(codes), 0, len(OVERLAY_COLORS) - 1)]
    im = Image.fromarray(rgb, "RGB")
    side = max(im.size)
    if 0 < side < min_side:
        f = max(1, min_side // side)
        im = im.resize((im.width * f, im.height * f), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


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


_CSS = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.thumbs{display:flex;flex-wrap:wrap;gap:12px}.thumbs figure{margin:0;font-size:12px}
.thumbs img{image-rendering:pixelated;border:1px solid #ccc;max-width:260px}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;
border:1px solid #999;vertical-align:middle}
.note{color:#844}
"""


def render_report(ev: Evaluation) -> str:
    """The report page as one HTML string."""
    import numpy as np

    from qpseg import __version__

    names = list(ev.class_names)
    parts: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>qpseg evaluation</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>qpseg evaluation</h1>",
        _table(["", ""], [
            ["truth", _e(ev.truth)], ["prediction", _e(ev.pred)],
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
    for note in ev.notes:
        parts.append(f"<p class='note'>{_e(note)}</p>")

    per = ev.pixel.per_slide
    if per:
        pooled = ev.pixel.pooled()
        dice_by_slide = np.array([m.f1 for m in per], dtype=np.float64)
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
        parts += [
            "<h2>Pixels</h2>",
            "<p>Pooled over slides (every pixel weighs the same); the last column is the "
            "per-slide mean ± standard deviation of Dice. Confidence intervals are in "
            "summary.csv.</p>",
            _table(["class", "truth pixels", "Dice", "IoU", "precision", "recall",
                    "Dice per slide"], rows),
            confusion_svg(pooled.confusion, names, "Confusion matrix (pooled, row-normalised)"),
        ]
        shown = per[:_MAX_BAR_SLIDES]
        parts.append(bar_chart_svg(
            [m.slide for m in shown], names, np.array([m.f1 for m in shown]),
            _class_colors(names), "Dice per slide and class"))
        if len(per) > len(shown):
            parts.append(f"<p>First {len(shown)} of {len(per)} slides shown.</p>")

    if ev.lesion is not None and len(ev.lesion):
        pr = ev.lesion.pooled_row()
        rows = [[_e(r.slide), _fmt(r.n_truth), _fmt(r.n_detected), _fmt(r.sensitivity),
                 _fmt(r.n_fp), _e(r.truth_category), _e(r.pred_category),
                 _fmt(r.category_agrees)] for r in ev.lesion.per_slide]
        rows.append(["<b>pooled</b>", _fmt(pr["n_truth"]), _fmt(pr["n_detected"]),
                     _fmt(pr["sensitivity"]), _fmt(pr["n_fp"]), "", "",
                     _fmt(pr["category_agreement"])])
        parts += [f"<h2>Lesions ({_e(ev.lesion_class)})</h2>",
                  "<p>ITC ≤ 0.2 mm, micrometastasis ≤ 2 mm, macrometastasis &gt; 2 mm "
                  "(largest diameter); per-lesion rows in lesions.csv.</p>",
                  _table(["slide", "truth lesions", "detected", "sensitivity",
                          "false positives", "truth category", "predicted category",
                          "agree"], rows)]

    if ev.instance is not None and len(ev.instance):
        items = [*ev.instance.per_slide, ev.instance.pooled()]
        rows = []
        for r in items:
            at50 = r.at(0.5)
            rows.append([_e(r.slide), _fmt(r.n_true), _fmt(r.n_pred), _fmt(r.aji),
                         _fmt(r.map), _fmt(at50["f1"]), _fmt(r.at(0.7)["f1"]), _fmt(r.pq)])
        rows[-1][0] = "<b>pooled over slides</b>"
        rows.append(["<b>per-image mean</b>", "", "", _fmt(ev.instance.image_mean("aji")),
                     _fmt(ev.instance.image_mean("map")), _fmt(ev.instance.image_mean("f1_50")),
                     _fmt(ev.instance.image_mean("f1_70")), _fmt(ev.instance.image_mean("pq"))])
        parts += ["<h2>Instances</h2>",
                  "<p>AJI pooled over slides sums intersections and unions over every slide "
                  "(large slides weigh more); the per-image mean averages each slide's AJI "
                  "(the nuclei papers' protocol).</p>",
                  _table(["slide", "truth", "predicted", "AJI", "mAP", "F1@0.5", "F1@0.7",
                          "PQ"], rows)]

    parts += _ai_objects_section(ev)

    thumbs = [s for s in ev.slides if s.thumbnail is not None][:_MAX_THUMBNAILS]
    if thumbs:
        legend = "".join(
            f"<span style='background:rgb{c}'></span>{label}" for c, label in zip(
                OVERLAY_COLORS, ("unlabelled", "correct Background", "TP", "FN (missed)",
                                 "FP (wrong class)"), strict=True))
        figs = "".join(
            f"<figure><img alt='{_e(s.slide)}' src='{_data_uri(overlay_png(s.thumbnail))}'>"
            f"<figcaption>{_e(s.slide)}</figcaption></figure>"
            for s in thumbs if s.thumbnail is not None)
        parts += ["<h2>Errors per slide</h2>", f"<p class='legend'>{legend}</p>",
                  f"<div class='thumbs'>{figs}</div>"]

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
    text = render_report(ev)
    with atomic_write(p, "w", backup=False) as fh:
        fh.write(text)
    return p
