"""What a training run records: :class:`TrainResult` (what :func:`~qpseg.training.run.train`
returns), ``run_metadata.json`` (started, then finished: versions, parameters, config, data
checksums, split, result) and ``train_config.json``, the ``training`` summary of the model
package, and the package itself (config.json + weights.pt).

Shared by the one-stage run (:mod:`qpseg.training.run`) and the two-stage H2G-Net run
(:mod:`qpseg.training.h2g`); it imports neither.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import OutputError

if TYPE_CHECKING:
    from qpseg.manifest import Manifest
    from qpseg.training.data import StageData
    from qpseg.training.distributed import Dist
    from qpseg.training.loop import StageResult

__all__ = ["TrainResult"]


@dataclass
class TrainResult:
    """What :func:`train` did. ``summary`` is the dataset summary (all that a dry run
    returns); ``model`` the trained module (None for a dry run)."""

    out_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    dry_run: bool = False
    model: Any = None
    stages: list[StageResult] = field(default_factory=list)
    package: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1


def _sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if limit is None:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(fh.read(limit))
            size = path.stat().st_size
            if size > 2 * limit:
                fh.seek(size - limit)
                h.update(fh.read(limit))
    return h.hexdigest()


def _slide_fingerprint(path: str) -> dict[str, Any]:
    """Size and SHA-256 of the first and last MiB of a slide (hashing whole multi-GB slides
    at every run would cost minutes; this catches a swapped or re-scanned file)."""
    p = Path(path)
    try:
        return {"size": p.stat().st_size, "sha256_head_tail": _sha256(p, 1 << 20)}
    except OSError as exc:
        return {"error": str(exc)}


def _versions() -> dict[str, Any]:
    import numpy as np
    import torch

    from qpseg import __version__

    out: dict[str, Any] = {"qpseg": __version__, "python": sys.version.split()[0],
                           "platform": platform.platform(), "torch": torch.__version__,
                           "numpy": np.__version__,
                           "cuda": torch.version.cuda if torch.cuda.is_available() else None}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        out["torchvision"] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def _data_record(manifest: Manifest, data: StageData) -> dict[str, Any]:
    slides = []
    for subset, recs in (("train", data.train_slides), ("val", data.val_slides)):
        for rec in recs:
            ann = rec.annotation_file
            slides.append({
                "key": rec.key, "subset": subset, "path": rec.path, "mpp": rec.mpp,
                "size": [rec.width, rec.height], **_slide_fingerprint(rec.path),
                "annotation_file": ann,
                "annotation_sha256": _sha256(Path(ann)) if ann and Path(ann).is_file() else None,
            })
    mpath = manifest.path
    return {
        "manifest": str(mpath) if mpath else None,
        "manifest_sha256": _sha256(mpath) if mpath and mpath.is_file() else None,
        "project": manifest.project,
        "classes": data.class_map.to_json(),
        "slides": slides,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _clean(value: Any) -> Any:
    """JSON-ready: NaN/inf -> None (undefined metrics), tuples -> lists, others -> str."""
    import math

    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return _clean(value.item())
    return str(value)


def _write_json(path: Path, data: Any) -> None:
    from qpseg._io import write_json_atomic

    try:
        write_json_atomic(path, _clean(data), backup=False)
    except OSError as exc:
        raise OutputError.from_os_error(exc, path) from exc


def _start_metadata(out: Path, cfg: Mapping[str, Any], arch: str, manifest: Manifest,
                    data: StageData, dist: Dist, params: Mapping[str, Any],
                    summary: Mapping[str, Any], source: Any, resume: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        previous: dict[str, Any] = {}
        if resume and (out / "run_metadata.json").is_file():
            try:
                previous = json.loads((out / "run_metadata.json").read_text(encoding="utf-8"))
            except ValueError:
                previous = {}
        meta = {
            "qpseg_run": "train",
            "created": previous.get("created") or _now(),
            "resumed": [*previous.get("resumed", []), _now()] if resume else [],
            "status": "running",
            "command": list(sys.argv),
            "params": dict(params),
            "source": str(source),
            "model": arch,
            "config": cfg,
            "versions": _versions(),
            "device": str(dist.device),
            "world_size": dist.world_size,
            "data": _data_record(manifest, data),
            "split": data.split.to_json(),
            "summary": summary,
        }
        try:
            data.split.save(out / "split.json")
        except OSError as exc:
            raise OutputError.from_os_error(exc, out / "split.json") from exc
        _write_json(out / "train_config.json", cfg)
        _write_json(out / "run_metadata.json", meta)
    if dist.is_main and dist.distributed:
        from qpseg.data.samplers import slide_shards

        shards = slide_shards(data.train.item_tiles, dist.world_size)
        meta["ranks"] = [{"rank": r, "train_slides": [data.train.slides[i].key for i in s]}
                         for r, s in enumerate(shards)]
        _write_json(out / "run_metadata.json", meta)
    return meta


def _finish_metadata(out: Path, meta: dict[str, Any], results: list[StageResult],
                     started: float) -> None:
    meta["status"] = "done"
    meta["finished"] = _now()
    meta["seconds"] = round(time.time() - started, 1)
    meta["result"] = {r.name: {"steps": r.steps, "epochs": r.epochs,
                               "stopped_early": r.stopped_early, "best": r.best}
                      for r in results}
    _write_json(out / "run_metadata.json", meta)


def _training_summary(cfg: Mapping[str, Any], data: StageData, results: list[StageResult],
                      weights: Any) -> dict[str, Any]:
    return {
        "split": data.split.to_json(),
        "classes": data.class_map.names,
        "mpp": data.mpp,
        "tile_px": data.tile_px,
        "tissue_method": data.tissue_method,
        "ai_objects": data.manifest.review.to_json(),  # AI objects left out of / kept in truth
        "target": data.target,
        "class_weights": weights,
        "slides": {"train": [s.key for s in data.train_slides],
                   "val": [s.key for s in data.val_slides]},
        "stages": {r.name: {"steps": r.steps, "epochs": r.epochs, "best": r.best,
                            "stopped_early": r.stopped_early,
                            "history": _curves(r.history)} for r in results},
        "config": cfg,
        "run_metadata": "run_metadata.json",
    }


#: Per-epoch values kept in the package's training summary (the model card's curves table).
_CURVE_KEYS = ("epoch", "step", "train_loss", "val_loss", "val_mdice", "val_miou")


def _curves(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The epoch records of a stage reduced to :data:`_CURVE_KEYS` (epochs counted from 1)."""
    out = []
    for rec in history:
        if rec.get("kind", "epoch") != "epoch":
            continue
        row = {k: rec[k] for k in _CURVE_KEYS if rec.get(k) is not None}
        if "epoch" in row:
            row["epoch"] = int(row["epoch"]) + 1
        out.append(row)
    return out


def _save(out: Path, module: Any, data: StageData, training: Mapping[str, Any],
          stage_normalization: Any = None, mean: Any = None, std: Any = None) -> Path:
    from qpseg.models import save_package
    from qpseg.models.contract import default_inference_rules, get_contract

    training = {**training, "initialisation": getattr(module, "qpseg_init", None)}
    # the tissue rule and object type inference follows (the same rule as training's tiles)
    inference = default_inference_rules(get_contract(module), training).to_json()
    names = data.class_map.names
    colors = [c.color for c in data.class_map.classes]
    # the colour normaliser every training tile went through: inference applies it too
    normalizer: Any = getattr(data.train, "normalizer", None)
    stain = normalizer.to_json() if hasattr(normalizer, "to_json") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return save_package(out, module.cpu(), class_names=names, class_colors=colors,
                            mpp=data.mpp, mean=mean if mean is not None else data.mean,
                            std=std if std is not None else data.std,
                            ignore_index=data.class_map.ignore_index, training=_clean(training),
                            stage_normalization=stage_normalization, overwrite=True,
                            inference=inference, stain_normalization=stain)
