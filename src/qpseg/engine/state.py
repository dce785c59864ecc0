"""Per-slide state of an inference run's output folder: the state files (``running`` /
``done`` / ``failed``) and locks in ``<out>/.qpseg_state`` (:class:`_State`), the options
recorded with a finished slide (:func:`output_params`), and the skip / redo decision
(:func:`_decide`: finished, stale and why, or being processed by another run).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.engine.context import _pixel_size, _reason
from qpseg.engine.results import SlideResult
from qpseg.errors import QpsegError

if TYPE_CHECKING:  # pragma: no cover
    from qpseg._io import FileLock
    from qpseg.engine.context import _Context
    from qpseg.engine.jobs import SlideJob
    from qpseg.slide import PixelSize

STATE_DIR = ".qpseg_state"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class _State:
    """The per-slide state files (``running`` / ``done``) and locks in ``<out>/.qpseg_state``."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir / STATE_DIR
        self._locks: dict[str, tuple[FileLock, int]] = {}

    def acquire(self, key: str) -> bool:
        """Take the slide's lock (re-entrant within this run); False when another run
        (process or thread) holds it."""
        from qpseg._io import FileLock

        if key in self._locks:
            lock, depth = self._locks[key]
            self._locks[key] = (lock, depth + 1)
            return True
        lock = FileLock(self.dir / f"{key}.lock")
        if not lock.acquire():
            return False
        self._locks[key] = (lock, 1)
        return True

    def release(self, key: str) -> None:
        """Undo one :meth:`acquire`."""
        lock, depth = self._locks[key]
        if depth > 1:
            self._locks[key] = (lock, depth - 1)
        else:
            del self._locks[key]
            lock.release()

    def holder(self, key: str) -> str:
        """Who holds (or last held) the slide's lock, for messages."""
        from qpseg._io import FileLock

        return FileLock(self.dir / f"{key}.lock").holder()

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def read(self, key: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write(self, key: str, data: Mapping[str, Any]) -> None:
        from qpseg._io import write_json_atomic

        write_json_atomic(self.path(key), dict(data), backup=False)

    def mark(self, job: SlideJob, run_id: str, status: str, **fields: Any) -> None:
        """Record that ``job`` is ``running`` (with its start time) or ``done`` / ``failed``
        (with its end time and ``fields``). A ``running`` or ``failed`` record keeps what
        made the last finished outputs (``last_done``: model and options), since a failed
        attempt leaves those outputs in place."""
        when = "started" if status == "running" else "finished"
        data: dict[str, Any] = {"status": status, "slide": str(job.slide), "run": run_id,
                                when: _now(), **fields}
        if status != "done":
            last = self.last_done(job.key)
            if last is not None:
                data["last_done"] = last
        self.write(job.key, data)

    def last_done(self, key: str) -> dict[str, Any] | None:
        """Model and options of the slide's last finished outputs (None: unknown)."""
        state = self.read(key)
        if state is None:
            return None
        done = state if state.get("status") == "done" else state.get("last_done")
        if not isinstance(done, dict):
            return None
        return {k: done[k] for k in ("model_sha256", "params", "run") if k in done}


def output_params(ctx: _Context, slide_mpp: float | None) -> dict[str, Any]:
    """The options that shape a slide's outputs, as recorded in its done state.

    A finished slide is redone when any of these differ (:func:`_redo_reason`). The tissue
    rule, the model's output type, the object type and the post-processing are the resolved
    :func:`inference_rules`. The pixel size is the one the slide was read at (``slide_mpp``,
    decided by the pixel-size rule), not
    the options that lead to it: ``--mpp`` for a slide with its own value changes nothing,
    ``--mpp-override`` or a new project calibration for a slide without one does. Options that
    only change how fast the same answer comes (device, batch size, workers, compile, channels
    last, arithmetic precision) are left out, so resuming a GPU run on another machine does
    not redo finished slides. ``heatmap`` / ``overlay`` count only when asked for and missing.
    """
    p = ctx.params
    pkg = ctx.pkg
    r = ctx.rules
    data: dict[str, Any] = {
        "model_mpp": pkg.mpp, "classes": list(pkg.class_names), "output": pkg.contract.output,
        "slide_mpp": slide_mpp, "tile_px": ctx.tile_px, "stitch": p.stitch,
        "tissue": r.tissue, "min_tissue": r.min_tissue,
        "max_upsample": p.max_upsample, "min_area_um2": r.min_area_um2,
        "fill_holes_um2": r.fill_holes_um2, "simplify_um": p.simplify_um,
        "as_type": r.objects, "nuclei": r.nuclei, "threshold": r.threshold,
        "lesion_classes": list(ctx.lesions),
        "score_threshold": p.score_threshold, "mask_threshold": p.mask_threshold,
        "instance_margin": p.instance_margin, "cell_expansion_um": p.cell_expansion_um,
        "heatmap": p.heatmap, "overlay": p.overlay,
    }
    if p.heatmap:
        data["heatmap_class"] = pkg.class_names[ctx.heat_channel]
    return dict(json.loads(json.dumps(data)))


def _fmt(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def _param_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``name old -> new`` for each recorded option that differs (options missing from
    ``old``, recorded by an older qpseg, are not compared)."""
    changes = []
    for key, value in new.items():
        if key not in old:
            continue
        was = old[key]
        if key in ("heatmap", "overlay"):  # an extra output asked for now
            if value and not was:
                changes.append(f"{key} off -> on")
        elif was != value:
            changes.append(f"{key} {_fmt(was)} -> {_fmt(value)}")
    return changes


def _redo_reason(ctx: _Context, job: SlideJob,
                 state: _State) -> tuple[str, PixelSize | None]:
    """Why a finished slide's outputs are stale ("" when they are current or their origin is
    unknown, e.g. a GeoJSON made elsewhere), and the pixel size the rule gives the slide now
    when it had to be compared (None otherwise)."""
    done = state.last_done(job.key)
    if done is None:
        return "", None
    sha = done.get("model_sha256")
    if isinstance(sha, str) and sha != ctx.pkg.sha256:
        return f"model changed (package SHA-256 {sha[:12]} -> {ctx.pkg.sha256[:12]})", None
    old = done.get("params")
    chosen: PixelSize | None = None
    if isinstance(old, dict):
        if "slide_mpp" in old:  # what the pixel-size rule gives now
            try:
                chosen = _pixel_size(ctx, job)
            except (QpsegError, OSError) as exc:  # redone: the run reports the real failure
                return f"pixel size cannot be decided ({_reason(exc, job)})", None
        changes = _param_changes(old, output_params(ctx, None if chosen is None
                                                    else chosen.mpp))
        if changes:
            return "parameters changed: " + ", ".join(changes), chosen
    return "", chosen


def _decide(ctx: _Context, job: SlideJob,
            state: _State) -> tuple[bool, str, PixelSize | None]:
    """``(run, reason, pixel size)``: whether the slide is (re)done, why it is skipped or
    redone, and its pixel size when deciding needed it."""
    if slide_status(job, ctx.out_dir) != "finished":
        return True, "", None
    if ctx.params.overwrite:
        return True, "--overwrite", None
    why, chosen = _redo_reason(ctx, job, state)
    if why:
        return True, why, chosen
    return False, "finished earlier (--overwrite replaces it)", chosen


def _busy(job: SlideJob, state: _State) -> SlideResult:
    holder = state.holder(job.key)
    return SlideResult(job.key, job.name, str(job.slide or ""), str(job.output), "skipped",
                       reason="being processed by another run" + (
                           f" ({holder})" if holder else ""), entry_id=job.entry_id)


def slide_status(job: SlideJob, out_dir: str | os.PathLike[str]) -> str:
    """``finished``, ``interrupted`` (a run was killed while writing it) or ``todo``."""
    state = _State(Path(out_dir)).read(job.key)
    running = state is not None and state.get("status") == "running"
    if running:
        return "interrupted"
    return "finished" if job.output.is_file() else "todo"


def _read_existing_summary(job: SlideJob) -> dict[str, Any]:
    from qpseg.objects import metadata_path

    try:
        data = json.loads(metadata_path(job.output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return dict(data) if isinstance(data, dict) else {}


def _mark_done(ctx: _Context, job: SlideJob, state: _State, result: SlideResult) -> None:
    state.mark(job, ctx.run_id, "done", outputs=result.outputs, model_sha256=ctx.pkg.sha256,
               params=output_params(ctx, result.mpp))


def _mark_failed(ctx: _Context, job: SlideJob, state: _State, reason: str) -> None:
    """Record a failure if the disk allows (the slide's own reason is what gets reported)."""
    with contextlib.suppress(QpsegError, OSError):
        state.mark(job, ctx.run_id, "failed", reason=reason)
