"""Throughput of the training data loader alone: tiles/s with 0 and 2 workers.

A generated project (pyramidal TIFF slides with known tumour/stroma/necrosis regions) is
imported, a tile grid over the labelled area is built, and a ``DataLoader`` over
:class:`qpseg.data.dataset.TileDataset` is iterated for a fixed number of batches per setting:
single-magnification 256 px tiles at the slides' base resolution and ho2021-style three-view
tiles (scales 1, 2, 4). Slide generation and grid building are timed separately; the loader
timing includes worker start-up (it is what an epoch pays).

    python scripts/bench_loader.py --out bench_loader.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench import machine, write_report


def bench(dataset: Any, *, workers: int, batch_size: int, batches: int,
          sampler: Any) -> dict[str, Any]:
    """Iterate ``batches`` batches; returns tiles, seconds and tiles/s."""
    import torch

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        persistent_workers=False, drop_last=True)
    n = 0
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        n += int(batch["image"].shape[0])
        if i + 1 >= batches:
            break
    seconds = time.perf_counter() - start
    return {"workers": workers, "tiles": n, "seconds": round(seconds, 3),
            "tiles_per_s": round(n / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (or write) the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--size", type=int, default=4096, help="slide side in pixels")
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args(argv)

    import torch

    from qpseg.data.dataset import TileDataset
    from qpseg.data.grid import build_tiles, slides_from_manifest
    from qpseg.data.samplers import UniformTileSampler
    from qpseg.manifest import import_project
    from qpseg.testing.projects import make_project

    torch.set_num_threads(1)
    report: dict[str, Any] = {
        "benchmark": "bench_loader",
        **machine("python", "platform", "cpus"),
        "torch": torch.__version__,
        "slide_px": args.size,
        "slides": args.slides,
        "tile_px": args.tile,
        "batch_size": args.batch,
        "batches": args.batches,
    }
    with tempfile.TemporaryDirectory(prefix="qpseg_bench_loader_") as tmp:
        t0 = time.perf_counter()
        proj = make_project(tmp, n_slides=args.slides, width=args.size, height=args.size,
                            seed=0)
        manifest = import_project(proj.path, use_paquo=False)
        report["generate_s"] = round(time.perf_counter() - t0, 3)
        slides = slides_from_manifest(manifest)
        base_mpp = slides[0].mpp
        results = []
        for name, scales in (("single", (1.0,)), ("dmmn_1_2_4", (1.0, 2.0, 4.0))):
            t0 = time.perf_counter()
            tiles = build_tiles(slides, manifest.class_map, tile_px=args.tile, mpp=base_mpp,
                                tissue_method="otsu_od", select="labelled")
            grid_s = time.perf_counter() - t0
            ds = TileDataset(slides, tiles, manifest.class_map, tile_px=args.tile,
                             mpp=base_mpp, scales=scales)
            n = args.batch * args.batches
            for w in args.workers:
                sampler = UniformTileSampler(ds.item_tiles, num_samples=n, seed=w)
                r = bench(ds, workers=w, batch_size=args.batch, batches=args.batches,
                          sampler=sampler)
                r.update({"setting": name, "scales": list(scales), "grid_tiles": len(tiles),
                          "grid_s": round(grid_s, 3)})
                results.append(r)
            ds.close()
        report["results"] = results
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
