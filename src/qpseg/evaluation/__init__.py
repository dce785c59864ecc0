"""The parts of ``qpseg evaluate`` (:mod:`qpseg.evaluate` is the entry point and its public names).

inputs (what a path holds, matching slides, label masks), raster (objects to geometries and
label rasters), scoring (one slide's :class:`~qpseg.evaluation.scoring.SlideScore`), workers
(slides in worker processes), provenance (what made the predictions), results
(:class:`~qpseg.evaluation.results.Evaluation`, its CSVs and bootstrap intervals). Nothing here
imports :mod:`qpseg.evaluate` or :mod:`qpseg.report`.
"""
