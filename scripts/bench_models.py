#!/usr/bin/env python
"""Benchmark the model zoo: parameters, FLOPs per tile and per output pixel, forward throughput.

For every registered model (or ``--models a,b``):

* parameters of the paper-size model (``--tiny`` uses each model's small test configuration),
* FLOPs of one forward pass of one tile (``torch.utils.flop_counter.FlopCounterMode``; counted on
  the meta device when the model allows it, so even FCN-32s at 512 px costs nothing), and FLOPs
  per output pixel (per base-mpp pixel of the predicted region),
* forward throughput in megapixels of predicted region per second on the CPU (eval mode,
  ``torch.inference_mode``) and, when CUDA is available, on the GPU in float32, bfloat16
  autocast, bfloat16 + channels_last, and bfloat16 + channels_last + ``torch.compile``.

Writes JSON (``--out``, default ``bench_models.json``) and prints a Markdown table.

Examples::

    python scripts/bench_models.py --tile 128 --cpu-batch 1 --repeats 2      # quick CPU run
    python scripts/bench_models.py --models fcn32s_vgg16 --gpu-batch 16      # on a GPU box
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _bench import machine, write_report
from qpseg.models import create_model, get_entry, list_models, make_inputs
from qpseg.models._base import QpsegModule, count_parameters


def _tile_kwargs(name: str, tile: int | None, tiny: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(get_entry(name).tiny) if tiny else {}
    if tile is None:
        return kwargs
    params = inspect.signature(get_entry(name).builder).parameters
    if "tile_px" in params:
        kwargs["tile_px"] = tile
    elif name == "h2g_net":
        kwargs["refine_kwargs"] = {**kwargs.get("refine_kwargs", {}), "tile_px": tile}
    return kwargs


def count_flops(name: str, num_classes: int, kwargs: dict[str, Any]) -> int | None:
    """FLOPs of one forward pass of one tile (batch 1); None when nothing countable runs."""
    from torch.utils.flop_counter import FlopCounterMode

    def run(meta: bool) -> int:
        model = create_model(name, num_classes, meta=meta, **kwargs).eval()
        inputs = make_inputs(model.contract, 1, device="meta" if meta else "cpu")
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(*inputs)
        return int(counter.get_total_flops())

    try:
        flops = run(meta=True)
    except Exception:  # data-dependent ops (NMS, numpy in the classical baselines)
        flops = run(meta=False)
    return flops or None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(fn: Callable[[], Any], device: torch.device, warmup: int,
                 repeats: int) -> float:
    """Median seconds per call of ``fn``."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def throughput(model: QpsegModule, batch: int, device: torch.device, warmup: int,
               repeats: int, *, bf16: bool = False, channels_last: bool = False,
               compile_model: bool = False) -> dict[str, Any]:
    """Megapixels of predicted region per second for one configuration."""
    c = model.contract
    model = model.to(device).eval()
    inputs = make_inputs(c, batch, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        inputs = tuple(x.contiguous(memory_format=torch.channels_last) for x in inputs)
    fwd: Callable[..., Any] = model
    if compile_model:
        fwd = torch.compile(model)

    def call() -> Any:
        if bf16:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fwd(*inputs)
        return fwd(*inputs)

    sec = time_forward(call, device, warmup, repeats)
    pixels = batch * c.tile_px * c.tile_px
    return {"batch": batch, "ms_per_batch": round(sec * 1e3, 3),
            "megapixels_per_s": round(pixels / sec / 1e6, 4)}


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from qpseg.errors import ModelError

    kwargs = _tile_kwargs(name, args.tile, args.tiny)
    torch.manual_seed(0)
    try:
        model = create_model(name, args.num_classes, **kwargs).eval()
    except ModelError:  # the requested tile does not fit this architecture: use its own
        kwargs = _tile_kwargs(name, None, args.tiny)
        model = create_model(name, args.num_classes, **kwargs).eval()
    c = model.contract
    flops = count_flops(name, args.num_classes, kwargs) if not args.no_flops else None
    out_area = c.tile_px * c.tile_px
    row: dict[str, Any] = {
        "model": name,
        "kwargs": kwargs,
        "parameters": count_parameters(model),
        "output": c.output,
        "inputs": [[s.size_px, s.scale] for s in c.inputs],
        "tile_px": c.tile_px,
        "flops_per_tile": flops,
        "flops_per_output_px": None if flops is None else round(flops / out_area, 1),
    }
    if not args.no_cpu:
        row["cpu"] = throughput(model, args.cpu_batch, torch.device("cpu"), args.warmup,
                                args.repeats)
    if torch.cuda.is_available() and not args.no_gpu:
        dev = torch.device("cuda")
        gpu: dict[str, Any] = {}
        variants: list[tuple[str, dict[str, bool]]] = [
            ("fp32", {}), ("bf16", {"bf16": True}),
            ("bf16_channels_last", {"bf16": True, "channels_last": True})]
        if not args.no_compile and c.output != "instance" and c.trainable:
            variants.append(("bf16_channels_last_compile",
                             {"bf16": True, "channels_last": True, "compile_model": True}))
        for label, opts in variants:
            try:
                torch.manual_seed(0)
                fresh = create_model(name, args.num_classes, **kwargs)
                gpu[label] = throughput(fresh, args.gpu_batch, dev, args.warmup + 2,
                                        args.repeats, **opts)
            except Exception as exc:  # report, keep benchmarking the others
                gpu[label] = {"error": " ".join(str(exc).split())[:200]}
            torch.cuda.empty_cache()
        row["gpu"] = gpu
    return row


def _fmt(x: float | None, unit: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x / unit:.{digits}f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    gpu = any("gpu" in r for r in rows)
    head = ["model", "params (M)", "tile", "GFLOPs/tile", "kFLOPs/out px", "CPU MP/s"]
    if gpu:
        head += ["GPU fp32 MP/s", "GPU bf16 MP/s", "GPU bf16+CL MP/s", "GPU +compile MP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], _fmt(r["parameters"], 1e6), str(r["tile_px"]),
                 _fmt(r["flops_per_tile"], 1e9, 1), _fmt(r["flops_per_output_px"], 1e3, 1),
                 _fmt(r.get("cpu", {}).get("megapixels_per_s"), 1, 3)]
        if gpu:
            g = r.get("gpu", {})
            for key in ("fp32", "bf16", "bf16_channels_last", "bf16_channels_last_compile"):
                cells.append(_fmt(g.get(key, {}).get("megapixels_per_s"), 1, 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated names (default: all registered)")
    ap.add_argument("--tiny", action="store_true", help="use each model's small test config")
    ap.add_argument("--tile", type=int, help="override the tile size where the model allows")
    ap.add_argument("--num-classes", type=int, default=2)
    ap.add_argument("--cpu-batch", type=int, default=1)
    ap.add_argument("--gpu-batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--no-cpu", action="store_true")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench_models.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else list_models()
    rows = []
    for name in names:
        t0 = time.perf_counter()
        row = bench_model(name, args)
        row["bench_seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(f"{name}: {json.dumps({k: row[k] for k in row if k != 'kwargs'})}",
              file=sys.stderr, flush=True)
    result = {
        "torch": torch.__version__,
        **machine("python", "cpu"),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": rows,
    }
    write_report(result, args.out, echo=False)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
