"""Benchmark of qpseg.metrics: instance + pixel metrics on generated slides.

Target: 100 slides with 10⁴ nuclei each evaluated in <= 60 s on the 2-core dev machine.

Each generated "slide" is a square grid of cells, one disc-shaped nucleus per cell (radius
5-7.5 px, centre jittered), i.e. 10⁴ nuclei on 2000 x 2000 px (a 1 x 1 mm field at 0.5 mpp).
The prediction perturbs it: centre/radius noise, 4 % missed nuclei, 2 % displaced ones,
2 % merged with their right neighbour, 2 % split in two; ids are non-contiguous. The pixel
metrics use a 3-class map derived from the same images (background, two nucleus classes) with
an ignored strip. Only the metric calls are timed; generation is reported separately.

    python scripts/bench_metrics.py --out bench_metrics.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from _bench import machine, write_report
from qpseg.metrics.instance import InstanceAccumulator
from qpseg.metrics.pixel import PixelAccumulator


def synthetic_slide(
    rng: np.random.Generator, n_side: int = 100, cell: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """(truth, prediction) uint32 instance images of ``n_side**2`` nuclei, vectorised."""
    n = n_side * n_side
    yy, xx = np.mgrid[0:cell, 0:cell].astype(np.float32) + 0.5
    cy = cell / 2 + rng.uniform(-2, 2, n).astype(np.float32)
    cx = cell / 2 + rng.uniform(-2, 2, n).astype(np.float32)
    r = rng.uniform(5.0, 7.5, n).astype(np.float32)

    def stamp(cy: np.ndarray, cx: np.ndarray, r: np.ndarray, ids: np.ndarray) -> np.ndarray:
        d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
        lab = np.where(d2 <= (r * r)[:, None, None], ids[:, None, None], 0).astype(np.uint32)
        return lab.reshape(n_side, n_side, cell, cell).transpose(0, 2, 1, 3).reshape(
            n_side * cell, n_side * cell
        )

    truth_ids = rng.permutation(3 * n)[:n].astype(np.uint32) + 1  # non-contiguous ids
    truth = stamp(cy, cx, r, truth_ids)

    pred_ids = rng.permutation(4 * n)[:n].astype(np.uint32) + 1
    pcy = cy + rng.normal(0, 0.7, n).astype(np.float32)
    pcx = cx + rng.normal(0, 0.7, n).astype(np.float32)
    pr = np.clip(r * rng.uniform(0.85, 1.15, n).astype(np.float32), 2, cell / 2 - 0.5)
    kind = rng.random(n)
    pred_ids[kind < 0.04] = 0  # missed
    moved = (kind >= 0.04) & (kind < 0.06)
    pcy[moved] += 5.0
    pcx[moved] += 5.0
    merged = (kind >= 0.06) & (kind < 0.08) & (np.arange(n) % n_side < n_side - 1)
    nxt = np.flatnonzero(merged) + 1
    pred_ids[nxt[pred_ids[nxt] > 0]] = pred_ids[np.flatnonzero(merged)[pred_ids[nxt] > 0]]
    pred = stamp(pcy, pcx, pr, pred_ids)
    split = np.flatnonzero((kind >= 0.08) & (kind < 0.10) & (pred_ids > 0))
    if split.size:  # the left half of these nuclei gets a new id
        new_ids = (4 * n + 1 + np.arange(split.size)).astype(np.uint32)
        lut_from = np.zeros(int(pred.max()) + 1, dtype=np.uint32)
        lut_from[pred_ids[split]] = new_ids
        cols = np.arange(pred.shape[1]) % cell
        left = (cols[None, :] < cell / 2) & (lut_from[pred] > 0)
        pred[left] = lut_from[pred[left]]
    return truth, pred


def class_map(instances: np.ndarray) -> np.ndarray:
    """Three classes: 0 background, 1 and 2 nuclei by id parity."""
    return np.where(instances > 0, 1 + (instances % 2), 0).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=100)
    ap.add_argument("--side", type=int, default=100, help="nuclei per grid side (side² nuclei)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=float, default=60.0, help="target seconds for the metrics")
    ap.add_argument("--out", type=Path, help="write the JSON result here")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    inst = InstanceAccumulator()
    pix = PixelAccumulator(("Background", "Nucleus A", "Nucleus B"))
    t_gen = t_inst = t_pix = 0.0
    shape: tuple[int, ...] = ()
    for i in range(args.slides):
        t0 = time.perf_counter()
        truth, pred = synthetic_slide(rng, args.side)
        ct, cp = class_map(truth), class_map(pred)
        ct[: ct.shape[0] // 20] = 255  # an unlabelled strip
        shape = truth.shape
        t1 = time.perf_counter()
        inst.add(truth, pred, slide=f"slide{i:03d}")
        t2 = time.perf_counter()
        pix.add(ct, cp, slide=f"slide{i:03d}")
        t3 = time.perf_counter()
        t_gen += t1 - t0
        t_inst += t2 - t1
        t_pix += t3 - t2
    t4 = time.perf_counter()
    pooled_i = inst.pooled().summary_row()
    pooled_p = pix.pooled().summary_row()
    _ = inst.summary_rows(), pix.summary_rows()
    t_sum = time.perf_counter() - t4
    total = t_inst + t_pix + t_sum
    result = {
        "benchmark": "qpseg.metrics instance + pixel",
        "slides": args.slides,
        "image_shape": list(shape),
        "nuclei_per_slide_truth": int(np.mean([r.n_true for r in inst])),
        "nuclei_per_slide_pred": int(np.mean([r.n_pred for r in inst])),
        "seconds_instance": round(t_inst, 3),
        "seconds_pixel": round(t_pix, 3),
        "seconds_summaries": round(t_sum, 3),
        "seconds_metrics_total": round(total, 3),
        "seconds_generation_untimed": round(t_gen, 3),
        "ms_per_slide": round(1000 * total / max(args.slides, 1), 1),
        "limit_seconds": args.limit,
        "within_limit": total <= args.limit,
        "pooled_instance": {k: pooled_i[k] for k in ("aji", "aji_plus", "map", "pq", "f1_50")},
        "pooled_pixel": {k: pooled_p[k] for k in ("miou", "mrecall", "mprecision")},
        **machine("cpus", "python"),
        "numpy": np.__version__,
    }
    write_report(result, args.out)
    return 0 if result["within_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())
