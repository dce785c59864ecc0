"""The options of an inference run (:class:`InferenceParams`, the ``qpseg infer`` flags) and
the bounds they must keep: each option's range (:meth:`InferenceParams.validate`) and the
memory one batch of tiles needs (:func:`check_memory`), both checked before any slide is read.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qpseg.models.contract import ModelContract

TISSUE_CHOICES: tuple[str, ...] = ("auto", "otsu", "otsu_od", "hsv", "none")
# Memory of one tile-reading worker process (Python + torch + a slide handle) before it reads.
_WORKER_BYTES = 256 << 20


@dataclass(frozen=True)
class InferenceParams:
    """Options of a run (the ``qpseg infer`` flags). ``None`` means "the model's / machine's
    default": ``workers`` 0 on CPU (a reader thread), up to 8 processes on CUDA; ``tissue``
    (``auto`` too), ``min_tissue`` and ``as_type`` the package's inference rules
    (:class:`~qpseg.models.contract.InferenceRules`; packages without them: the rules of
    their output type, :func:`~qpseg.models.contract.default_inference_rules`); ``precision``
    bf16 on CUDA, fp32
    elsewhere; ``lesion_classes`` the package's ``training.lesion_classes`` or the classes
    named like tumour/metastasis; ``heatmap_class`` the first lesion class or class 1."""

    device: str = "auto"
    batch_size: int = 8
    workers: int | None = None
    tissue: str | None = None
    min_tissue: float | None = None
    stitch: str = "center"
    min_area_um2: float | None = None   # None: qpseg.objects.REVIEW_DEFAULTS per output type
    fill_holes_um2: float | None = None
    simplify_um: float | None = None
    as_type: str | None = None
    lesion_classes: tuple[str, ...] | None = None
    heatmap: bool = False
    heatmap_class: str | None = None
    overlay: bool = False
    overwrite: bool = False
    keep_maps: bool = False
    mpp: float | None = None
    mpp_override: bool = False  # --mpp replaces a slide's (or project's) known pixel size
    precision: str | None = None
    channels_last: bool | None = None
    compile: bool = False
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    instance_margin: int = 16
    cell_expansion_um: float = 0.0
    max_upsample: float = 1.25
    tile_px: int | None = None
    run_id: str | None = None
    shard: str | None = None

    def validate(self) -> InferenceParams:
        """ConfigError for out-of-range values; returns self."""
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, not {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, not {self.workers}")
        if self.tissue is not None and self.tissue not in TISSUE_CHOICES:
            raise ConfigError(f"--tissue must be one of {', '.join(TISSUE_CHOICES)}, not "
                              f"{self.tissue!r}")
        if self.stitch not in ("center", "blend"):
            raise ConfigError(f"--stitch must be 'center' or 'blend', not {self.stitch!r}")
        kind = None if self.as_type is None else self.as_type.strip().lower().rstrip("s")
        if kind not in (None, "annotation", "detection"):
            raise ConfigError(f"--as must be 'annotations' or 'detections', not "
                              f"{self.as_type!r}")
        if self.min_tissue is not None and not (math.isfinite(self.min_tissue)
                                                and 0 <= self.min_tissue < 1):
            raise ConfigError(f"--min-tissue must be a fraction in [0, 1), not "
                              f"{self.min_tissue!r}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, not {self.precision!r}")
        for name in ("min_area_um2", "fill_holes_um2", "cell_expansion_um", "min_tissue"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, not {v!r}")
        if self.simplify_um is not None and not (math.isfinite(self.simplify_um)
                                                 and self.simplify_um >= 0):
            raise ConfigError(f"--simplify-um must be >= 0, not {self.simplify_um!r}")
        if self.mpp is not None:  # the one pixel-size plausibility rule (qpseg.slide)
            from qpseg.slide import check_mpp

            check_mpp(self.mpp, "--mpp", error=ConfigError)
        if self.mpp_override and self.mpp is None:
            raise ConfigError("--mpp-override needs --mpp (the pixel size that replaces the "
                              "slides' own)")
        if not 0 <= self.score_threshold <= 1 or not 0 <= self.mask_threshold <= 1:
            raise ConfigError("score and mask thresholds must be between 0 and 1")
        if not self.max_upsample >= 1:
            raise ConfigError("max_upsample must be >= 1")
        return replace(self, as_type=kind, tissue=None if self.tissue == "auto" else self.tissue)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready copy (for run_metadata.json)."""
        data = asdict(self)
        data["lesion_classes"] = None if self.lesion_classes is None else list(
            self.lesion_classes)
        return data


def _host_memory() -> tuple[int, str]:
    """Bytes of memory this process may use, and what limits it (RAM or a cgroup limit)."""
    total, where = 0, "this machine's memory"
    with contextlib.suppress(AttributeError, ValueError, OSError):
        total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    for limit_file in ("/sys/fs/cgroup/memory.max",
                       "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text(encoding="ascii").strip()
            limit = int(text)
        except (OSError, ValueError):
            continue
        if 0 < limit < (total or 1 << 62):
            total, where = limit, "the memory limit of this container (cgroup)"
    return (total or 8 << 30), where


def _device_memory(device: torch.device) -> tuple[int, str] | None:
    if device.type != "cuda":
        return None
    import torch

    try:
        props = torch.cuda.get_device_properties(device)
    except (RuntimeError, AssertionError):
        return None
    return int(props.total_memory), f"the memory of {device}"


def check_memory(contract: ModelContract, params: InferenceParams, workers: int,
                 device: torch.device, num_classes: int) -> None:
    """ConfigError when one batch of tiles cannot fit in memory, before anything is read.

    A lower bound is counted: uint8 tiles held by the readers (one batch per worker plus
    one in flight), the normalised float inputs, float and uint8 class probabilities, and
    :data:`_WORKER_BYTES` per reader process. It must fit in half the memory (host RAM or a
    container limit; a GPU's own memory for what lives there), since the model's activations
    need at least as much again. ``--tile-px 1000000000`` is refused here instead of meeting
    the OOM killer.
    """
    from qpseg.engine.tiling import inference_contract

    bs = params.batch_size

    def per_tile(c: ModelContract) -> tuple[int, int]:
        ins = sum(int(s.size_px) ** 2 for s in c.inputs)
        out = 1 if c.output == "patch" else int(c.output_px) ** 2
        host = 3 * ins + out * (num_classes + 1)  # uint8 reads; quantised probs + classes
        dev = 12 * ins + 8 * out * num_classes    # float inputs; float probabilities (x2)
        return host, dev

    readers = max(workers, 1) + 1
    host_mem, host_where = _host_memory()
    dev = _device_memory(device)

    def fits(c: ModelContract, batch: int) -> tuple[bool, int, int, str]:
        host_t, dev_t = per_tile(c)
        host_need = batch * host_t * readers + workers * _WORKER_BYTES
        if dev is None:
            need = host_need + batch * dev_t
            return need <= host_mem // 2, need, host_mem, host_where
        if host_need > host_mem // 2:
            return False, host_need, host_mem, host_where
        need = batch * dev_t
        return need <= dev[0] // 2, need, dev[0], dev[1]

    ok, need, mem, where = fits(contract, bs)
    if ok:
        return
    gib = 1 << 30
    tile = contract.tile_px
    hint = ""
    if workers and workers * _WORKER_BYTES > mem // 2:
        hint = f"use fewer --workers (each reader process needs about " \
               f"{_WORKER_BYTES >> 20} MiB)"
    else:
        lo, hi = 0, bs
        while lo < hi:  # the largest batch of these tiles that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(contract, mid)[0] else (lo, mid - 1)
        if lo >= 1:
            hint = f"use --batch-size {lo} or less at {tile} px tiles"
        else:
            step = max(1, contract.size_multiple)
            lo_t, hi_t = 0, tile // step
            while lo_t < hi_t:  # the largest tile size (in steps) of which one tile fits
                mid = (lo_t + hi_t + 1) // 2
                try:
                    c = inference_contract(contract, mid * step)
                except ModelError:
                    c = None
                lo_t, hi_t = (mid, hi_t) if c is not None and fits(c, 1)[0] else \
                    (lo_t, mid - 1)
            hint = f"use --tile-px {lo_t * step} or less with --batch-size 1" if lo_t else \
                "this model's tiles cannot fit"
    raise ConfigError(
        f"--tile-px {tile} with --batch-size {bs} (--workers {workers}) needs at least "
        f"{need / gib:.1f} GiB for one batch of tiles and their class probabilities, more "
        f"than half of {where} ({mem / gib:.1f} GiB; the model's activations need the "
        f"rest): {hint}")
