"""The CLI's progress displays (Rich), one small class per kind of long work.

- :class:`StepProgress`: one bar for one long step (slides scored, entries imported, ...); on
  stderr, only when stderr is a terminal, transient.
- :class:`InferProgress`: ``qpseg infer``'s slides done/total, tiles/s with ETA and the
  polygonising of each slide's map; on stderr, always, lines kept.
- :class:`TrainProgress`: ``qpseg train``'s steps, loss, tiles/s and ETA, and a line per epoch;
  on the command's stdout console, lines kept.
- :class:`DemoProgress`: ``qpseg demo``'s one bar per step, filled by the training steps and
  the slides inferred; on the demo's own console.

Each keeps the stream and the terminal-only-or-always rule of the command it serves. Rich is
imported inside the classes, never at load time (``qpseg --help`` does not need it).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


def stderr_is_terminal() -> bool:
    """True when stderr is an interactive terminal (where a progress bar belongs)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class StepProgress:
    """A Rich progress bar on stderr for one long step (slides scored, entries imported, ...).

    Shown only when stderr is a terminal (a log or a pipe gets no bar), transient (it leaves
    no line behind: the command's own summary follows), and never on stdout, so ``--json``
    output stays one JSON document. Use as a context manager; the instance is the library's
    ``progress(done, total, item)`` callback.
    """

    def __init__(self, description: str, *, enabled: bool = True) -> None:
        self.description = description
        self.enabled = enabled and stderr_is_terminal()
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> StepProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                TextColumn("{task.fields[item]}"),
                console=Console(stderr=True, force_terminal=True, soft_wrap=True),
                transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=None, item="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def __call__(self, done: int, total: int, item: str = "") -> None:
        if self._progress is None:
            return
        label = item if len(item) <= 40 else item[:37] + "..."
        self._progress.update(self._task, completed=done, total=total, item=label)


def _rate_column() -> Any:
    """A Rich column showing a task's speed in its ``unit`` field per second (blank without a
    unit); built on call, since it subclasses a Rich class."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            unit = task.fields.get("unit", "")
            return Text(f"{speed:.1f} {unit}/s" if speed and unit else "")

    return RateColumn()


class InferProgress:
    """A context manager + callback of :class:`~qpseg.engine.ProgressEvent` objects showing
    slides done/total, tiles/s with ETA and the polygonising of each slide's map (blocks done,
    objects found); on stderr, lines kept, a failed slide printed in red."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            _rate_column(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True, soft_wrap=True), transient=False)
        self.slides: Any = None
        self.tiles: Any = None
        self.polygons: Any = None

    def __enter__(self) -> InferProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def _drop_slide_tasks(self) -> None:
        for task in (self.tiles, self.polygons):
            if task is not None:
                self.progress.remove_task(task)
        self.tiles = self.polygons = None

    def __call__(self, ev: Any) -> None:
        p = self.progress
        if ev.kind == "run_start":
            self.slides = p.add_task("slides", total=ev.total, unit="")
        elif ev.kind == "slide_start":
            self._drop_slide_tasks()
            label = ev.name if len(ev.name) <= 40 else ev.name[:37] + "..."
            self.tiles = p.add_task(f"  {label}", total=None, unit="tiles")
        elif ev.kind == "tiles" and self.tiles is not None:
            p.update(self.tiles, total=ev.tiles_total, completed=ev.tiles_done)
        elif ev.kind == "polygonise":
            # blocks of the map traced; the count is of pieces until the last event
            desc = f"  polygonising: {ev.objects:,} objects"
            if self.polygons is None:
                self.polygons = p.add_task(desc, total=ev.blocks_total, unit="blocks")
            p.update(self.polygons, description=desc, total=ev.blocks_total,
                     completed=ev.blocks_done)
        elif ev.kind == "slide_end" and self.slides is not None:
            p.advance(self.slides)
            self._drop_slide_tasks()
            if ev.status == "failed":
                p.console.print(f"[red]failed[/]: {ev.name}: {ev.message}",
                                markup=True, highlight=False)


def _clock(seconds: float | None) -> str:
    """``H:MM:SS`` of a number of seconds (``-:--:--`` when unknown)."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-:--:--"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class TrainProgress:
    """Renders :class:`~qpseg.training.loop.TrainEvent` objects with rich."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from qpseg.cli._common import console

        self.quiet = quiet
        self.console = console()
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tiles/s"),
            TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"), console=self.console,
            disable=quiet, transient=False)
        self.task: Any = None

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        self.progress.__exit__(*args)

    def __call__(self, ev: Any) -> None:
        if ev.kind in ("start", "resumed"):
            desc = f"{ev.stage}"
            if self.task is None or self.progress.tasks[self.task].description != desc:
                self.task = self.progress.add_task(desc, total=ev.total_steps, loss="-",
                                                   rate="-", eta="-:--:--")
            self.progress.update(self.task, completed=ev.step, total=ev.total_steps)
            if ev.kind == "resumed" and not self.quiet:
                self.progress.console.print(f"resumed {ev.stage} at step {ev.step} from "
                                            f"{ev.message}")
        elif ev.kind == "step" and self.task is not None:
            self.progress.update(self.task, completed=ev.step, loss=f"{ev.loss:.4g}",
                                 rate=f"{ev.tiles_per_s:.1f}", eta=_clock(ev.eta_s))
        elif ev.kind == "epoch" and not self.quiet:
            parts = [f"{ev.stage} epoch {ev.epoch + 1}/{ev.epochs}", f"step {ev.step}",
                     f"train loss {ev.loss:.4g}"]
            m = ev.metrics
            if m.get("val_loss") is not None and m.get("val_loss") == m.get("val_loss"):
                parts.append(f"val loss {m['val_loss']:.4g}")
            if "val_mdice" in m:
                parts.append(f"val mDice {m['val_mdice']:.3f}")
            dice = {k[9:]: v for k, v in m.items() if k.startswith("val_dice_")}
            if dice:
                parts.append("Dice " + " ".join(f"{k} {v:.3f}" for k, v in dice.items()
                                                if v == v))
            self.progress.console.print(" | ".join(parts))
        elif ev.kind in ("stage", "stopped") and not self.quiet:
            self.progress.console.print(ev.message)


class DemoProgress:
    """The demo's step bars on its console: one bar per step (``progress(step, info)``:
    ``info["event"] == "start"`` adds it, any other event fills it with the step's time),
    filled as the training steps (``on_train``, ``on_round_train`` for the review rounds'
    trainings) and the slides inferred (``on_infer``) go by. ``labels`` names the steps.
    Use as a context manager, once per run of steps."""

    def __init__(self, console: Any, labels: Mapping[str, str]) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.labels = labels
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(),
                             TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                             console=console)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> DemoProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def on_step(self, step: str, info: dict[str, Any]) -> None:
        bars, tasks = self.bars, self.tasks
        if info.get("event") == "start":
            tasks[step] = bars.add_task(self.labels.get(step, step), total=None, info="")
        else:
            bars.update(tasks[step], total=1, completed=1,
                        info=f"done in {info.get('seconds', 0):.1f} s")

    def on_train(self, event: Any) -> None:
        bars, tasks = self.bars, self.tasks
        if "train" in tasks and event.kind == "step" and event.total_steps:
            bars.update(tasks["train"], total=event.total_steps, completed=event.step,
                        info=f"loss {event.loss:.3f}" if event.loss is not None else "")

    def on_infer(self, event: Any) -> None:
        bars, tasks = self.bars, self.tasks
        if "infer" in tasks and event.kind in ("slide_start", "slide_end"):
            done = event.index + (1 if event.kind == "slide_end" else 0)
            bars.update(tasks["infer"], total=event.total, completed=done,
                        info=f"slide {done}/{event.total}")

    def on_round_train(self, event: Any) -> None:
        bars, tasks = self.bars, self.tasks
        for step, task in tasks.items():
            if step.endswith(("train model 1", "fine-tune")) and event.kind == "step" \
                    and event.total_steps and not bars.tasks[task].finished:
                bars.update(task, total=event.total_steps, completed=event.step,
                            info=f"loss {event.loss:.3f}" if event.loss is not None else "")
