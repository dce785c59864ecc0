"""What one training stage is given and what it gives back: :class:`StageSpec` (the module to
train, its task, datasets, sampler tiles, config and output paths), :class:`TrainEvent` (the
progress a run reports to its callback), :class:`StageResult` (the trained module, counters and
history). Pure data: importing this module imports neither torch nor numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qpseg.data.grid import Tile
    from qpseg.labels import ClassMap
    from qpseg.training.task import Task

__all__ = ["Callback", "StageResult", "StageSpec", "TrainEvent"]

Callback = Callable[["TrainEvent"], None]


@dataclass
class TrainEvent:
    """Progress of a run (what the CLI renders): ``kind`` is ``start``, ``step``, ``epoch``,
    ``checkpoint``, ``stage`` (a stage begins), ``resumed``, ``stopped`` (early stopping) or
    ``done``. An exception raised by the callback aborts the run (the last checkpoint stays).

    ``step`` events come after every optimizer step: ``loss`` is that step's loss on this
    process (averaged over all processes on the steps written to ``train_log.jsonl``, every
    ``train.log_every``), ``eta_s`` the seconds left at the average pace of this stage so far
    (validation and checkpoints included)."""

    kind: str
    stage: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    tiles_per_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    eta_s: float | None = None


@dataclass
class StageResult:
    """What a stage produced: the trained module (best weights when selected), counters and
    the per-epoch history."""

    name: str
    model: Any
    steps: int
    epochs: int
    history: list[dict[str, Any]]
    best: dict[str, Any]
    stopped_early: bool
    finished: bool


@dataclass
class StageSpec:
    """One stage to train (a single-stage model has one)."""

    name: str
    cfg: Mapping[str, Any]
    model: Any  # the module trained (a stage of a pipeline, or the whole model)
    task: Task
    train_ds: Any
    val_ds: Any
    sampler_tiles: Sequence[Tile]
    slide_groups: Sequence[str | None]
    ckpt_dir: Path
    class_map: ClassMap
    log_path: Path
    csv_path: Path
