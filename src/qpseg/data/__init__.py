"""The training data pipeline: slides + annotations -> tiles -> samples.

Modules (import them directly; this package imports nothing heavy by itself):

* :mod:`qpseg.data.grid`: :class:`~qpseg.data.grid.SlideRecord` (one slide and its annotations),
  tile grids over the labelled area and/or tissue (:func:`~qpseg.data.grid.tile_grid`).
* :mod:`qpseg.data.dataset`: :class:`~qpseg.data.dataset.TileDataset`, a torch ``Dataset`` that
  reads tiles on the fly (multi-magnification views, semantic labels or nuclei instance maps).
* :mod:`qpseg.data.samplers`: uniform, khalil2022 focusing and boosting, pedersen2022
  hierarchical, ho2021 class balancing, and by-slide distributed sampling.
* :mod:`qpseg.data.splits`: slide-level train/val/test splits from a seed, saved as JSON.
* :mod:`qpseg.data.augment`: batched torch augmentation (rotations, flips, colour, HSV, elastic,
  stain) that runs on the GPU when the batch is there.
* :mod:`qpseg.data.stain`: Macenko stain matrices, Macenko/Reinhard normalisation, stain
  augmentation.
* :mod:`qpseg.data.weights`: ho2021 class weights and pedersen2022 cluster weights.
"""

from __future__ import annotations

from qpseg.errors import QpsegWarning

__all__ = ["DataWarning"]


class DataWarning(QpsegWarning):
    """A slide or tile was skipped (unreadable, no labels) while building or reading data."""
