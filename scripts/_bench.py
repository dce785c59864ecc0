"""What the benchmark scripts (``scripts/bench_*.py``) share: the machine facts a report carries,
the process's peak memory, the JSON report's writing, and the no-checks GeoJSON serialiser the
writer benchmarks compare qpseg's writer with.

The scripts run as ``python scripts/bench_x.py``, which puts this folder on ``sys.path``, so
they import this module as ``_bench``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu() -> str:
    return platform.processor() or platform.machine()


#: Each fact a report may carry, by the key the reports write it under. ``cpus`` and
#: ``cpu_count`` are the same fact: older reports name it ``cpus``, and each keeps its key.
FACTS: dict[str, Callable[[], Any]] = {
    "python": platform.python_version,
    "platform": platform.platform,
    "cpu_count": os.cpu_count,
    "cpus": os.cpu_count,
    "cpu": _cpu,
    "loadavg": _loadavg,
}
DEFAULT_FACTS = ("python", "platform", "cpu_count", "loadavg")


def machine(*keys: str) -> dict[str, Any]:
    """The machine facts named by ``keys`` (``FACTS``' keys; by default ``DEFAULT_FACTS``),
    in that order, so a report keeps the keys it has always written."""
    unknown = [k for k in keys if k not in FACTS]
    if unknown:
        raise ValueError(f"unknown machine facts {unknown}; known: {sorted(FACTS)}")
    return {k: FACTS[k]() for k in keys or DEFAULT_FACTS}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (``ru_maxrss``: KiB on Linux, bytes
    on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def write_report(report: Mapping[str, Any], out: Path | None, *, echo: bool = True,
                 default: Callable[[Any], Any] | None = None) -> None:
    """Write ``report`` as indented JSON to ``out`` (when given) and print it (when ``echo``);
    ``default`` is ``json.dumps``' hook for values JSON has no type for."""
    text = json.dumps(report, indent=2, default=default)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
    if echo:
        print(text)


def reference_serialise(objs: Sequence[Any], path: Path) -> None:
    """Write ``objs`` (QuPath objects) as a GeoJSON FeatureCollection with vectorised geometry
    JSON, one plain ``json.dumps`` per feature and no checks: the lower bound a strict writer's
    time is compared with."""
    import numpy as np
    import shapely

    arr = np.empty(len(objs), dtype=object)
    arr[:] = [o.geometry for o in objs]
    geoms = shapely.to_geojson(arr)
    with path.open("w", encoding="utf-8") as fh:
        fh.write('{"type":"FeatureCollection","features":[')
        for i, (o, g) in enumerate(zip(objs, geoms, strict=True)):
            props: dict[str, Any] = {"objectType": o.object_type,
                                     "classification": {"name": o.classification,
                                                        "color": list(o.class_color or ())},
                                     "measurements": o.measurements, "metadata": o.metadata}
            if o.name:
                props["name"] = o.name
            fh.write(("," if i else "") + '{"type":"Feature","geometry":' + g
                     + ',"properties":' + json.dumps(props, ensure_ascii=False) + "}")
        fh.write("]}\n")
