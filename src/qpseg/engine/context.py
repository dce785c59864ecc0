"""What every step of an inference run shares: the run's resolved settings and model runners
(:class:`_Context`), the exception that carries a progress callback's error out of a slide
(:class:`_Abort`), opening a slide at the pixel size the one rule gives it (:func:`_open`,
:func:`_record_mpp`), and the one-line reason a slide failed (:func:`_reason`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.engine.runner import _Runner
from qpseg.engine.tiling import InferenceWarning
from qpseg.errors import OutputError, QpsegError, os_error_reason

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qpseg.engine.jobs import SlideJob
    from qpseg.engine.loader import Opener
    from qpseg.engine.params import InferenceParams
    from qpseg.engine.results import ProgressEvent, ProgressFn, SlideResult
    from qpseg.labels import ClassMap
    from qpseg.models.contract import InferenceRules
    from qpseg.models.package import ModelPackage
    from qpseg.slide import PixelSize, Slide


class _Abort(Exception):
    """Carries an exception raised by the progress callback through the per-slide handler."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


@dataclass
class _Context:
    pkg: ModelPackage
    params: InferenceParams
    out_dir: Path
    device: torch.device
    precision: str
    channels_last: bool
    workers: int
    classes: ClassMap
    lesions: tuple[str, ...]
    heat_channel: int
    rules: InferenceRules
    run_id: str
    run_date: str
    opener: Opener | None
    progress: ProgressFn | None
    tile_px: int | None = None  # the tile size run (None: two-stage models)
    runners: dict[int, _Runner] = field(default_factory=dict)

    @property
    def tissue_method(self) -> str:
        """The tissue detection of the run (``none``: every tile)."""
        return self.rules.tissue

    def runner(self, stage: int | None) -> _Runner:
        key = -1 if stage is None else stage
        if key not in self.runners:
            module: Any = self.pkg.model if stage is None else \
                self.pkg.model.stages[stage]  # type: ignore[index]
            self.runners[key] = _Runner(module, self.pkg, stage, self.device, self.precision,
                                        self.channels_last, self.params.compile)
        return self.runners[key]

    def emit(self, event: ProgressEvent) -> None:
        if self.progress is None:
            return
        try:
            self.progress(event)
        except BaseException as exc:
            raise _Abort(exc) from exc


def _open(ctx: _Context, job: SlideJob) -> tuple[Slide, PixelSize]:
    """Open the slide and decide its pixel size by the one rule
    (:meth:`qpseg.slide.Slide.choose_mpp`: the slide's own, else the entry's calibration,
    else ``--mpp``; ``--mpp-override`` replaces a known value), which the slide uses from
    now on. SlideError when no plausible pixel size is known."""
    assert job.slide is not None
    if ctx.opener is not None:
        slide = ctx.opener(job.slide, None)
    else:
        from qpseg.slide import open_slide

        slide = open_slide(job.slide)
    try:
        p = ctx.params
        chosen = slide.choose_mpp(job.mpp, p.mpp, override=p.mpp_override)
    except BaseException:
        slide.close()
        raise
    return slide, chosen


def _pixel_size(ctx: _Context, job: SlideJob) -> PixelSize:
    """The pixel size the rule gives ``job``'s slide now (opens the slide's metadata only)."""
    slide, chosen = _open(ctx, job)
    slide.close()
    return chosen


def _reader_mpp(chosen: PixelSize) -> float | None:
    """The pixel size the tile readers, which open the slide again, must be given: None for
    the slide's own (they read it themselves), else the value chosen."""
    return None if chosen.source == "slide" else chosen.mpp


def _record_mpp(job: SlideJob, result: SlideResult, chosen: PixelSize,
                warn: bool = True) -> None:
    """Put the pixel size used into ``result``; warn about what the user should hear (a
    stored value that was skipped, slide and project that disagree)."""
    result.mpp, result.mpp_source, result.mpp_replaced = (
        float(chosen.mpp), chosen.source, chosen.replaced)
    if warn:
        where = f"entry {job.entry_id} ({job.name})" if job.entry_id is not None else job.name
        for note in chosen.notes:
            warnings.warn(f"{where}: {note}", InferenceWarning, stacklevel=2)


def _reason(exc: BaseException, job: SlideJob) -> str:
    """The one-line reason a slide failed."""
    if isinstance(exc, QpsegError):
        return exc.message if exc.path in (None, job.slide) else exc.one_line()
    if isinstance(exc, OSError):  # a file that could not be read or written: name it
        name = exc.filename if exc.filename is not None else job.output
        return OutputError(os_error_reason(exc), os.fsdecode(name)).one_line()
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
