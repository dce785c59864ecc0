"""Benchmark of the whole ``qpseg evaluate`` path on GeoJSON folders (target: 100 slides ×
10⁴ nuclei in ≤ 60 s).

Generates ``--slides`` truth/prediction GeoJSON pairs (untimed), each a 1 x 1 mm field at
0.25 µm/px holding ``--side``² nuclei (12-gon cells, one per grid cell; the prediction jitters
them, misses 4 % and adds 2 % false ones, as detections) plus a Region* annotation over the
field and a tumour and a stroma annotation (the prediction shifts the tumour). Then times
``qpseg.evaluate.evaluate`` end to end: reading the GeoJSON, rasterising at 2 µm/px, pixel,
lesion and instance metrics, CSVs and report.html. Reading the files alone is timed too, to
show what part of the total is GeoJSON parsing, and the whole evaluation is repeated in one
process (``workers=1``) for the speed-up of the default worker processes.

    python scripts/bench_evaluate.py --out bench_evaluate.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from _bench import machine, write_report
from qpseg.evaluate import evaluate, usable_cpus
from qpseg.qupath.geojson import read_geojson

MPP = 0.25
SPACING = 40  # level-0 px between nuclei (10 µm)


def _polygon(cx: float, cy: float, r: float, n: int = 12) -> list[list[list[float]]]:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    pts = np.round(np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t)]), 2).tolist()
    return [[*pts, pts[0]]]


def _feature(coords: Any, kind: str, cls: str | None) -> dict[str, Any]:
    props: dict[str, Any] = {"objectType": kind}
    if cls:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": props}


def make_pair(rng: np.random.Generator, side: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(truth, prediction) FeatureCollections of one generated field."""
    size = side * SPACING
    n = side * side
    gy, gx = np.divmod(np.arange(n), side)
    cx = (gx + 0.5) * SPACING + rng.uniform(-6, 6, n)
    cy = (gy + 0.5) * SPACING + rng.uniform(-6, 6, n)
    r = rng.uniform(10, 15, n)
    box = [[[0, 0], [size, 0], [size, size], [0, size], [0, 0]]]
    tumour = _polygon(size * 0.35, size * 0.4, size * 0.22, 64)
    stroma = _polygon(size * 0.75, size * 0.7, size * 0.15, 64)
    truth = [_feature(box, "annotation", "Region*"), _feature(tumour, "annotation", "Tumor"),
             _feature(stroma, "annotation", "Stroma")]
    truth += [_feature(_polygon(x, y, rr), "cell", None) for x, y, rr in zip(cx, cy, r,
                                                                              strict=True)]
    pred = [_feature(_polygon(size * 0.37, size * 0.41, size * 0.21, 64), "annotation",
                     "Tumor"),
            _feature(stroma, "annotation", "Stroma")]
    keep = rng.random(n) >= 0.04
    px, py = cx + rng.normal(0, 1.5, n), cy + rng.normal(0, 1.5, n)
    pr = r * rng.uniform(0.85, 1.15, n)
    pred += [_feature(_polygon(x, y, rr), "detection", None)
             for x, y, rr in zip(px[keep], py[keep], pr[keep], strict=True)]
    extra = int(0.02 * n)
    ex, ey = rng.uniform(20, size - 20, extra), rng.uniform(20, size - 20, extra)
    pred += [_feature(_polygon(x, y, 8.0), "detection", None)
             for x, y in zip(ex, ey, strict=True)]
    return ({"type": "FeatureCollection", "features": truth},
            {"type": "FeatureCollection", "features": pred})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--slides", type=int, default=100)
    ap.add_argument("--side", type=int, default=100, help="nuclei per grid side (side² nuclei)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="keep the generated files here")
    ap.add_argument("--out", type=Path, help="write the JSON result here")
    ap.add_argument("--workers", type=int, default=0,
                    help="processes scoring slides (0: one per usable CPU, as the CLI does)")
    args = ap.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="qpseg_bench_eval_"))
    truth_dir, pred_dir, out_dir = work / "truth", work / "pred", work / "out"
    for d in (truth_dir, pred_dir):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for i in range(args.slides):
        t, p = make_pair(rng, args.side)
        (truth_dir / f"slide{i:03d}.geojson").write_text(json.dumps(t), encoding="utf-8")
        (pred_dir / f"slide{i:03d}.geojson").write_text(json.dumps(p), encoding="utf-8")
    t_gen = time.perf_counter() - t0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1 = time.perf_counter()
        ev = evaluate(truth_dir, pred_dir, out_dir, mpp=MPP, workers=args.workers)
        t_eval = time.perf_counter() - t1
        t_serial = None
        if args.workers != 1:  # the same run in one process, for the speed-up
            t3 = time.perf_counter()
            evaluate(truth_dir, pred_dir, work / "out_serial", mpp=MPP, workers=1)
            t_serial = time.perf_counter() - t3
        t2 = time.perf_counter()
        n_objects = sum(len(read_geojson(f)) for d in (truth_dir, pred_dir)
                        for f in sorted(d.iterdir()))
        t_read = time.perf_counter() - t2
    summary = ev.summary()
    result = {
        "benchmark": "qpseg evaluate, GeoJSON folders end to end",
        "slides": args.slides,
        "nuclei_per_slide": args.side ** 2,
        "objects_read": n_objects,
        "field_px": args.side * SPACING,
        "mpp": MPP,
        "eval_mpp": ev.eval_mpp,
        "workers": args.workers or usable_cpus(),
        "seconds_evaluate_total": round(t_eval, 2),
        "seconds_evaluate_one_process": None if t_serial is None else round(t_serial, 2),
        "seconds_reading_geojson_alone_one_process": round(t_read, 2),
        "seconds_generation_untimed": round(t_gen, 2),
        "ms_per_slide": round(1000 * t_eval / max(args.slides, 1), 1),
        "scored": len(ev.slides),
        "failed": len(ev.failed),
        "pixel": summary.get("pixel"),
        "instance": summary.get("instance"),
        "lesion": summary.get("lesion"),
        **machine("cpus", "python"),
    }
    write_report(result, args.out, default=str)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
