"""What an inference run reports: :class:`ProgressEvent` (steps, for progress displays),
:class:`SlideResult` (one slide: status, reason, pixel size, work done, outputs; a row of
``summary.csv``) and :class:`RunResult` (the slides of a run and its files).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ProgressEvent:
    """A step of a run, for progress displays.

    ``kind``: ``run_start``, ``slide_start``, ``tiles`` (after each batch), ``polygonise``
    (the slide's map turned into objects: ``blocks_done`` of ``blocks_total`` map blocks and
    ``objects`` found so far, as :data:`qpseg.objects.PolygoniseProgress` reports them; only
    ``key`` and ``name`` of the slide fields are set), ``slide_end`` (with ``status``
    done/skipped/failed and ``message``) and ``run_end``. ``index`` and ``total`` count this
    process's slides.
    """

    kind: str
    index: int = 0
    total: int = 0
    key: str = ""
    name: str = ""
    tiles_done: int = 0
    tiles_total: int = 0
    status: str = ""
    message: str = ""
    blocks_done: int = 0
    blocks_total: int = 0
    objects: int = 0


ProgressFn = Callable[[ProgressEvent], None]


@dataclass
class SlideResult:
    """What happened to one slide.

    ``mpp`` is the slide's pixel size used (µm/px), ``mpp_source`` where it came from
    (``slide``, ``project``, ``option`` or ``override``; :class:`qpseg.slide.PixelSize`) and
    ``mpp_replaced`` the known value ``--mpp-override`` replaced. For a slide skipped as
    finished, ``mpp`` is the value its outputs were made with, when recorded.
    """

    key: str
    name: str
    slide: str
    output: str
    status: str
    reason: str = ""
    entry_id: int | None = None
    seconds: float = 0.0
    tiles: int = 0
    tiles_low_tissue: int = 0  # tiles with some tissue, not more than the least fraction
    tissue_fraction: float | None = None
    tissue_mpx: float = 0.0
    n_objects: int = 0
    map_mpp: float | None = None
    mpp: float | None = None
    mpp_source: str = ""
    mpp_replaced: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    maps: str | None = None
    rank: int = 0
    ranks: int = 1  # processes that ran its tiles (> 1: a slide shared by torchrun ranks)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (run_metadata.json)."""
        return asdict(self)

    def row(self) -> dict[str, Any]:
        """One summary-CSV row: identity, status, and the per-slide summary measurements."""
        row: dict[str, Any] = {
            "key": self.key, "entry_id": "" if self.entry_id is None else self.entry_id,
            "image": self.name, "slide": self.slide, "status": self.status,
            "reason": self.reason, "seconds": round(self.seconds, 3), "tiles": self.tiles,
            "tiles_low_tissue": self.tiles_low_tissue,
            "tissue_fraction": "" if self.tissue_fraction is None else
            round(self.tissue_fraction, 6),
            "n_objects": self.n_objects,
            "mpp": "" if self.mpp is None else self.mpp, "mpp_source": self.mpp_source,
            "mpp_replaced": "" if self.mpp_replaced is None else self.mpp_replaced,
        }
        for k, v in self.summary.items():
            if k.startswith(("qpseg_count_", "qpseg_area_um2_")) or k in (
                    "qpseg_n_lesions", "qpseg_lesion_area_um2", "qpseg_largest_lesion_um",
                    "qpseg_slide_category"):
                row[k[len("qpseg_"):]] = v
        return row


@dataclass
class RunResult:
    """The slides of a run (all of them on rank 0; this rank's elsewhere) and its files."""

    results: list[SlideResult]
    out_dir: Path
    summary_csv: Path | None = None
    run_metadata: Path | None = None

    @property
    def failed(self) -> list[SlideResult]:
        """Slides that failed."""
        return [r for r in self.results if r.status == "failed"]

    def counts(self) -> dict[str, int]:
        """Number of slides per status."""
        out = {"done": 0, "skipped": 0, "failed": 0}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out
