"""Scoring the matched slides of ``qpseg evaluate`` in this process or in worker processes.

Each job is one slide (:func:`qpseg.evaluation.scoring._score_pair`); a slide that fails
becomes its one-line reason, and a worker's warnings travel back to the parent with its
outcome.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence

from qpseg.errors import QpsegError
from qpseg.evaluation.inputs import InputItem
from qpseg.evaluation.scoring import SlideScore, _Options, _score_pair

_Job = tuple[InputItem, InputItem, str, str, _Options]
# (SlideScore, or the one-line reason the slide failed; warnings said while scoring it)
_Outcome = tuple["SlideScore | str", list[tuple[type[Warning], str]]]


def _score_job(job: _Job) -> SlideScore | str:
    """:func:`_score_pair`, with an input problem turned into the failed slide's reason."""
    import shapely

    try:
        return _score_pair(*job)
    except QpsegError as exc:
        return exc.one_line()
    except (ValueError, TypeError, shapely.errors.GEOSException, MemoryError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _score_job_recorded(job: _Job) -> _Outcome:
    """:func:`_score_job` in a worker process: its warnings go back to the parent."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = _score_job(job)
    return outcome, [(w.category, str(w.message)) for w in caught]


_MIN_JOBS_FOR_POOL = 4


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm or container limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _score_all(jobs: Sequence[_Job], workers: int) -> Iterator[_Outcome]:
    """Each job's outcome, in order: in this process, or spread over worker processes.

    Slides are independent and the work per slide is CPU-bound Python and GEOS (reading
    GeoJSON, polygon intersections), so processes, not threads, scale it. Workers are
    spawned (not forked): the parent may hold torch or other threaded state.
    """
    if workers == 0:  # auto: starting a worker costs about a second, a small slide less
        workers = usable_cpus() if len(jobs) >= _MIN_JOBS_FOR_POOL else 1
    n = min(len(jobs), workers)
    if n <= 1:
        for job in jobs:
            yield _score_job(job), []
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=n,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_score_job_recorded, jobs)
