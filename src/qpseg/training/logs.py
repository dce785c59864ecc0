"""The logs of a training stage, written by rank 0: ``train_log.jsonl`` (every record),
``train_log.csv`` (one row per epoch), ``training_curves.png`` beside it, and optional
TensorBoard scalars.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError, OutputError

if TYPE_CHECKING:
    from qpseg.training.stage import StageSpec

__all__ = ["CURVES_NAME", "TENSORBOARD_DIR", "tensorboard_writer"]

#: Beside ``train_log.csv``: the loss and validation scores per epoch (qpseg.training.curves).
CURVES_NAME = "training_curves.png"
#: Under the run folder, one subfolder per stage: TensorBoard event files (train.tensorboard).
TENSORBOARD_DIR = "tensorboard"


def tensorboard_writer(log_dir: Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` writing into ``log_dir``; ConfigError when
    the optional ``tensorboard`` package is missing (``pip install 'qpseg[tensorboard]'``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard (--tensorboard) needs the tensorboard package: "
                          "pip install 'qpseg[tensorboard]'") from None
    try:
        return SummaryWriter(log_dir=str(log_dir))
    except OSError as exc:
        raise OutputError.from_os_error(exc, log_dir) from exc


class _Logger:
    """train_log.jsonl (every record), train_log.csv (one row per epoch) and
    training_curves.png beside it (redrawn every epoch), rank 0 only; with ``tensorboard`` (a
    SummaryWriter) the same numbers as TensorBoard scalars."""

    def __init__(self, spec: StageSpec, enabled: bool, tensorboard: Any = None) -> None:
        self.spec = spec
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self.others: list[dict[str, Any]] = []  # epoch records of the run's other stages
        self.tensorboard = tensorboard if enabled else None

    def truncate(self, step: int, epoch: int) -> None:
        """Drop records a resumed run will write again (after checkpoint ``step``/``epoch``)."""
        if not self.enabled or not self.spec.log_path.is_file():
            return
        kept = []
        for line in self.spec.log_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("stage") != self.spec.name:
                kept.append(line)
                if rec.get("kind") == "epoch":
                    self.others.append(rec)
                continue
            if rec.get("kind") == "step" and int(rec.get("step", 0)) > step:
                continue
            if rec.get("kind") in ("epoch", "boost") and int(rec.get("epoch", 0)) >= epoch:
                continue
            kept.append(line)
            if rec.get("kind") == "epoch":
                self.history.append(rec)
        try:
            self.spec.log_path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        except OSError as exc:
            raise OutputError.from_os_error(exc, self.spec.log_path) from exc

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = _finite(record)
        try:
            self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spec.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(clean, allow_nan=False) + "\n")
        except OSError as exc:  # disk full, folder made read-only mid-run, ...
            raise OutputError.from_os_error(exc, self.spec.log_path) from exc
        if self.tensorboard is not None:
            self._scalars(clean)
        if record.get("kind") == "epoch":
            self.history.append(clean)
            self._write_csv()
            self._write_curves()

    def _scalars(self, record: Mapping[str, Any]) -> None:
        """A step record's loss, lr and speed, an epoch record's losses and validation
        scores, as TensorBoard scalars at the record's optimizer step."""
        board = self.tensorboard
        if board is None:
            return
        step = int(record.get("step", 0))
        if record.get("kind") == "step":
            tags = {"loss": "train/loss_step", "lr": "train/lr", "tiles_per_s": "train/tiles_per_s"}
        elif record.get("kind") == "epoch":
            tags = {"train_loss": "train/loss_epoch"}
            tags.update({k: "val/" + k[4:] for k in record if str(k).startswith("val_")
                         and k != "val_pixels"})
        else:
            return
        for key, tag in tags.items():
            value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                board.add_scalar(tag, float(value), step)
        board.flush()

    def close(self) -> None:
        """Close the TensorBoard writer (when there is one)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def _write_curves(self) -> None:
        from qpseg.training.curves import draw_training_curves

        path = self.spec.csv_path.with_name(CURVES_NAME)
        try:
            draw_training_curves([*self.others, *self.history], path)
        except OSError as exc:
            raise OutputError.from_os_error(exc, path) from exc

    def _write_csv(self) -> None:
        import csv
        import io

        rows = [r for r in self.history if r.get("stage") == self.spec.name]
        cols: list[str] = []
        for r in rows:
            for k in r:
                if k not in cols and k != "kind":
                    cols.append(k)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        from qpseg._io import atomic_write

        try:
            with atomic_write(self.spec.csv_path, "w", backup=False) as fh:
                fh.write(buf.getvalue())
        except OSError as exc:
            raise OutputError.from_os_error(exc, self.spec.csv_path) from exc


def _finite(record: Mapping[str, Any]) -> dict[str, Any]:
    """NaN/inf -> None so the JSON log stays standard JSON."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out
