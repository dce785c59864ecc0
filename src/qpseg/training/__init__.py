"""Training: from a QuPath project (or its manifest) to a model package.

* :func:`train` (``qpseg train``): data, model, loop, package, logs and run metadata
  (:mod:`qpseg.training.run`);
* :mod:`qpseg.training.config`: configuration sections, the papers' defaults, YAML/JSON files;
* :mod:`qpseg.training.data`: manifest -> split -> tiles -> datasets of a stage;
* :mod:`qpseg.training.loop`: the loop of one stage (AMP, accumulation, DDP, validation,
  checkpoints and exact resume, early stopping, boosting);
* :mod:`qpseg.training.h2g`: pedersen2022's two-stage H2G-Net training;
* :mod:`qpseg.training.optim`, :mod:`~qpseg.training.checkpoint`,
  :mod:`~qpseg.training.distributed`, :mod:`~qpseg.training.clusters`;
* losses live in :mod:`qpseg.losses`.

Importing this package imports neither torch nor numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qpseg.training.loop import TrainEvent
    from qpseg.training.run import TrainResult, train

__all__ = ["TrainEvent", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult"):
        from qpseg.training import run

        return getattr(run, name)
    if name == "TrainEvent":
        from qpseg.training.loop import TrainEvent

        return TrainEvent
    raise AttributeError(name)
