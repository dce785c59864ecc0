"""Benchmark of qpseg.objects: polygonise + write 10⁵ objects (target: ≤ 10 s).

The map is a square grid of 10 x 10 px cells, one disc per cell (radius 2-4.5 px, two classes
at random, the first one a lesion class so every second object also gets a size category and a
name), with a (C, H, W) float32 probability stack, at 0.5 µm/px with a bounds offset. Timed:

* ``polygonise``: class map -> QuPath objects (trace, merge across blocks, measurements, size
  categories, probabilities, simplification, QuPath coordinates, provenance);
* ``write``: :func:`qpseg.objects.write_predictions` (qpseg's strict GeoJSON writer, atomic);
* ``reference_serialise``: the same features serialised with vectorised shapely
  (``shapely.to_geojson``) and one ``json.dumps`` per feature, no validation: a lower bound
  that shows how much of ``write`` is the strict writer's per-object work.

    python scripts/bench_objects.py --out bench_objects.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _bench import machine, peak_rss_mb, reference_serialise, write_report
from qpseg.labels import ClassMap
from qpseg.objects import (
    MapGeometry,
    polygonise,
    provenance,
    slide_summary,
    write_predictions,
)


def synthetic_map(n_objects: int, seed: int, cell: int = 10) -> np.ndarray:
    """uint8 class map with about ``n_objects`` discs (classes 1 and 2), vectorised."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_objects)))
    yy, xx = np.mgrid[0:cell, 0:cell] + 0.5
    d2 = (yy - cell / 2) ** 2 + (xx - cell / 2) ** 2
    r = rng.uniform(2.0, 4.5, (side, side))
    cls = rng.integers(1, 3, (side, side)).astype(np.uint8)
    stamp = (d2[None, None] <= (r * r)[:, :, None, None]) * cls[:, :, None, None]
    return stamp.transpose(0, 2, 1, 3).reshape(side * cell, side * cell).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-objects", type=int, default=100_000)
    ap.add_argument("--block-size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-probabilities", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cmap = synthetic_map(args.n_objects, args.seed)
    probs = None
    if not args.no_probabilities:
        rng = np.random.default_rng(args.seed + 1)
        probs = rng.uniform(0.5, 1.0, (3, *cmap.shape)).astype(np.float32)
    classes = ClassMap.from_names(["Tumor", "Stroma"])
    geometry = MapGeometry.from_mpp(0.5, 0.25, x0=-1024.0, y0=-2048.0)
    prov = provenance("bench", "0" * 64, mpp=0.5, run="bench",
                      thresholds={"probability_threshold": 0.5})
    t_gen = time.perf_counter() - t0

    t0 = time.perf_counter()
    objs = polygonise(cmap, geometry, classes, provenance=prov, probabilities=probs,
                      lesion_classes=["Tumor"], block_size=args.block_size,
                      as_type="detection")
    t_poly = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "1.geojson"
        t0 = time.perf_counter()
        summary = slide_summary(objs, lesion_classes=["Tumor"], classes=classes,
                                provenance=prov)
        n_written = write_predictions(out, objs, summary=summary)
        t_write = time.perf_counter() - t0
        size = out.stat().st_size
        ref = Path(tmp) / "ref.geojson"
        t0 = time.perf_counter()
        reference_serialise(objs, ref)
        t_ref = time.perf_counter() - t0
        ref_size = ref.stat().st_size

    total = t_poly + t_write
    result = {
        "benchmark": "qpseg.objects polygonise + write",
        "n_objects": len(objs),
        "n_written": n_written,
        "map_shape": list(cmap.shape),
        "block_size": args.block_size,
        "probabilities": probs is not None,
        "generate_s": round(t_gen, 3),
        "polygonise_s": round(t_poly, 3),
        "write_s": round(t_write, 3),
        "total_s": round(total, 3),
        "target_s": 10.0,
        "meets_target": total <= 10.0,
        "reference_serialise_s": round(t_ref, 3),
        "writer_overhead_s": round(t_write - t_ref, 3),
        "geojson_bytes": size,
        "reference_bytes": ref_size,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **machine("python", "platform", "cpus"),
    }
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
