"""Training throughput: tiles/s of the data loader alone vs loader + model step.

A generated project (pyramidal TIFF slides with known tumour/stroma/necrosis regions) is
imported and the training data of ``tiny_unet`` built exactly as ``qpseg train`` builds it
(:func:`qpseg.training.data.prepare_data`). For every worker count, the same ``DataLoader`` is
iterated for a fixed number of batches twice: once alone, once with the full training step
(batch to the device, augmentation, normalisation, forward, loss, backward, optimizer step;
bf16 autocast on GPU). The ratio step/loader says how close the loader is to being the
bottleneck (well below 1: the model is the limit; near 1: the loader is).

    python scripts/bench_train.py --out bench_train.json [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench import machine, write_report


def _loader(data: Any, *, workers: int, batch: int, batches: int, seed: int) -> Any:
    import torch

    from qpseg.data.samplers import UniformTileSampler
    from qpseg.training.loop import _collate, _SafeDataset

    sampler = UniformTileSampler(data.train.item_tiles, num_samples=batch * batches, seed=seed)
    return torch.utils.data.DataLoader(
        _SafeDataset(data.train), batch_size=batch, sampler=sampler, num_workers=workers,
        collate_fn=_collate, drop_last=True, pin_memory=torch.cuda.is_available(),
        persistent_workers=False)


def bench(data: Any, task: Any, model: Any, opt: Any, device: Any, *, workers: int,
          batch: int, batches: int, step: bool) -> dict[str, Any]:
    """Iterate ``batches`` batches (with the training step when ``step``); tiles/s."""
    import torch

    loader = _loader(data, workers=workers, batch=batch, batches=batches, seed=1)
    amp = torch.bfloat16 if device.type == "cuda" else None
    n = 0
    start = time.perf_counter()
    for b in loader:
        if step:
            prep = task.prepare(b, train=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, _ = task.forward_loss(model, prep)
            loss.backward()
            opt.step()
        n += int(b["image"].shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"workers": workers, "with_model_step": step, "tiles": n,
            "seconds": round(seconds, 3), "tiles_per_s": round(n / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (or write) the JSON report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--size", type=int, default=2048, help="slide side in pixels")
    parser.add_argument("--slides", type=int, default=3)
    parser.add_argument("--tile", type=int, default=128, help="tile side in pixels")
    parser.add_argument("--mpp", type=float, default=1.0, help="training pixel size (µm/px)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--base-filters", type=int, default=8, help="tiny_unet width")
    args = parser.parse_args(argv)

    import torch

    from qpseg.manifest import import_project
    from qpseg.models import create_model
    from qpseg.testing.projects import make_project
    from qpseg.training.config import resolve_config
    from qpseg.training.data import prepare_data
    from qpseg.training.distributed import resolve_device
    from qpseg.training.loop import Task
    from qpseg.training.optim import build_optimizer

    device = resolve_device(args.device)
    report: dict[str, Any] = {
        "benchmark": "bench_train", **machine("python", "platform", "cpu_count"),
        "torch": torch.__version__, "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "params": vars(args) | {"out": str(args.out) if args.out else None},
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proj = make_project(Path(tmp) / "p", n_slides=args.slides, width=args.size,
                            height=args.size, seed=5)
        manifest = import_project(proj.path, Path(tmp) / "m", use_paquo=False)
        report["generate_seconds"] = round(time.perf_counter() - t0, 2)
        cfg = resolve_config("tiny_unet", {
            "model_kwargs": {"tile_px": args.tile, "base_filters": args.base_filters},
            "data": {"mpp": args.mpp, "stride_px": args.tile // 2},
            "split": {"val": 0.0, "test": 0.0},
            "augment": {"preset": "khalil2022"}})
        model = create_model("tiny_unet", len(manifest.class_map),
                             **cfg["model_kwargs"]).to(device)
        t0 = time.perf_counter()
        data = prepare_data(manifest, cfg, model.contract, seed=0)
        report["tiles"] = len(data.train)
        report["grid_seconds"] = round(time.perf_counter() - t0, 2)
        from qpseg.losses import LossSpec

        task = Task(output="pixel", contract=model.contract, class_map=data.class_map,
                    loss=LossSpec("ce"), mean=data.mean, std=data.std, device=device,
                    augment=cfg["augment"], seed=0, patch_labels=None, val_patch_labels=None,
                    extents=data.train.view_extents)
        opt = build_optimizer(model.parameters(), cfg["optimizer"])
        model.train()
        bench(data, task, model, opt, device, workers=0, batch=args.batch, batches=2,
              step=True)  # warm-up
        results = []
        for w in args.workers:
            alone = bench(data, task, model, opt, device, workers=w, batch=args.batch,
                          batches=args.batches, step=False)
            full = bench(data, task, model, opt, device, workers=w, batch=args.batch,
                         batches=args.batches, step=True)
            results.append({"workers": w, "loader": alone, "loader_and_step": full,
                            "ratio_step_over_loader": round(
                                full["tiles_per_s"] / alone["tiles_per_s"], 3)})
        report["results"] = results
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
