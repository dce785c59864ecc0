"""Benchmark of the commands a QuPath export with 10^4-10^6 annotations goes through.

The export is generated (vectorised): ``n`` 12-vertex annotations on a 20 px grid with radii of
4-14 px, so neighbours overlap; a tenth have a hole; classes Tumor / Stroma / Necrosis at
random, one in a hundred unclassified; one ``Region*`` over half the grid and one ``Ignore*``
strip across it. It is written as QuPath GeoJSON beside a one-slide generated project. Timed,
each size in a fresh process (its peak RSS is reported):

* ``read_geojson``: the lenient reader;
* ``class_areas``: the label rule's per-class areas (what the manifest records);
* ``import_project``: the whole ``qpseg import-project`` (reader, AI-object rule, label rule,
  manifest);
* ``validate``: ``qpseg validate`` on the GeoJSON file;
* ``rasterize_labels``: the label raster of the whole grid at 16 level-0 px per pixel;
* ``compare_edits``: ``qpseg evaluate-edits``' comparison, with the objects as the AI's
  predictions and a review that moved 2 %, deleted 2 %, added 2 % and lost the ids of 2 %.

With ``--reference-max N`` the per-class areas of sizes up to ``N`` are compared with the label
rule as first written (one growing union of everything painted above; quadratic), which must
agree to 1e-6 relative.

    python scripts/bench_import.py --sizes 10000 100000 --out bench_import.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from qpseg.qupath.geojson import QuPathObject

CLASSES = ("Tumor", "Stroma", "Necrosis")
SPACING = 20.0


def make_annotations(n: int, seed: int = 0) -> list[QuPathObject]:
    """``n`` overlapping annotations plus one ``Region*`` and one ``Ignore*`` (module doc)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    centre = np.stack(np.divmod(np.arange(n), side), axis=1)[:, ::-1] * SPACING + SPACING / 2
    centre += rng.uniform(-3, 3, centre.shape)
    radius = rng.uniform(4.0, 14.0, n)
    angle = np.linspace(0.0, 2 * np.pi, 12, endpoint=False)
    unit = np.stack([np.cos(angle), np.sin(angle)], axis=1)[None]
    geoms = shapely.polygons(np.round(centre[:, None, :] + radius[:, None, None] * unit, 2))
    holed = rng.random(n) < 0.1
    holes = shapely.polygons(centre[holed][:, None, :] + (radius[holed] / 3)[:, None, None]
                             * unit[:, ::-1])
    geoms[holed] = shapely.polygons(shapely.get_exterior_ring(geoms[holed]),
                                    holes=shapely.get_exterior_ring(holes)[:, None])
    cls = rng.integers(0, len(CLASSES), n)
    unclassified = rng.random(n) < 0.01
    objs = [QuPathObject(geometry=g, object_type="annotation",
                         classification=None if u else CLASSES[c])
            for g, c, u in zip(geoms.tolist(), cls.tolist(), unclassified.tolist(), strict=True)]
    extent = side * SPACING
    objs.append(QuPathObject(geometry=shapely.box(0, 0, extent, extent / 2),
                             object_type="annotation", classification="Region*"))
    objs.append(QuPathObject(geometry=shapely.box(0, extent * 0.4, extent, extent * 0.45),
                             object_type="annotation", classification="Ignore*"))
    return objs


def reference_areas(objects: list[QuPathObject], class_map: Any) -> dict[int, float]:
    """Per-class areas by the label rule as first written (quadratic; small inputs only)."""
    from shapely import union_all
    from shapely.geometry import Polygon

    from qpseg.labels import label_role
    from qpseg.qupath.geojson import repair_polygonal

    regions, classes, ignores = [], [], []
    for order, obj in enumerate(objects):
        geom = repair_polygonal(obj.geometry)
        if geom.is_empty:
            continue
        role = label_role(obj.classification)
        if role == "region":
            regions.append((geom, 0))
        elif role == "ignore":
            ignores.append((geom, class_map.ignore_index))
        elif role == "class":
            idx = class_map.index_of(obj.classification)
            if idx is not None:
                classes.append((-geom.area, order, geom, idx))
    classes.sort(key=lambda t: (t[0], t[1]))
    covered: Any = Polygon()
    out: dict[int, list[Any]] = {}
    for geom, value in reversed(regions + [(g, v) for _, _, g, v in classes] + ignores):
        visible = geom.difference(covered) if not covered.is_empty else geom
        if not visible.is_empty:
            out.setdefault(value, []).append(visible)
        covered = union_all([covered, geom])
    return {k: float(union_all(v).area) for k, v in out.items()}


def _review_copy(objs: list[QuPathObject], seed: int) -> tuple[list[QuPathObject],
                                                              list[QuPathObject]]:
    """(AI objects, the export after a simulated review) for ``compare_edits``."""
    import dataclasses
    import uuid

    rng = np.random.default_rng(seed)
    ai = [dataclasses.replace(o, id=str(uuid.UUID(int=i + 1, version=4)), object_type="detection",
                              metadata={"qpseg_model": "bench"})
          for i, o in enumerate(objs) if o.classification in CLASSES]
    final = []
    for o in ai:
        r = rng.random()
        if r < 0.02:
            continue  # deleted
        if r < 0.04:
            o = dataclasses.replace(o, geometry=shapely.affinity.translate(o.geometry, 3, 0))
        elif r < 0.06:
            o = dataclasses.replace(o, id=None)
        final.append(o)
    for o in ai[: len(ai) // 50]:
        final.append(QuPathObject(geometry=shapely.affinity.translate(o.geometry, 7, 7),
                                  object_type="annotation", classification="Tumor"))
    return ai, final


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def run_one(n: int, seed: int, workdir: Path, reference_max: int,
            skip: set[str]) -> dict[str, Any]:
    """Generate the export for ``n`` and time each stage (module doc) in this process."""
    import warnings

    from qpseg.edits import compare_edits
    from qpseg.labels import class_areas, rasterize_labels
    from qpseg.manifest import import_project
    from qpseg.qupath.geojson import read_geojson, write_geojson
    from qpseg.testing.projects import make_project
    from qpseg.validation import validate_paths

    warnings.simplefilter("ignore")
    res: dict[str, Any] = {"n": n, "seconds": {}}
    t = time.perf_counter()
    objs = make_annotations(n, seed)
    proj = make_project(workdir / f"p{n}", n_slides=1, width=256, height=256, annotations=False)
    target = proj.folder / "qpseg" / "annotations" / f"{proj.entry_ids[0]}.geojson"
    write_geojson(target, objs)
    res["setup_s"] = time.perf_counter() - t
    res["file_mb"] = target.stat().st_size / 2**20
    res["rss_after_setup_mb"] = _peak_rss_mb()
    del objs

    def timed(name: str, fn: Any) -> Any:
        if name in skip:
            return None
        t0 = time.perf_counter()
        out = fn()
        res["seconds"][name] = round(time.perf_counter() - t0, 3)
        return out

    objs = timed("read_geojson", lambda: read_geojson(target))
    if objs is None:
        objs = read_geojson(target)
    manifest = timed("import_project", lambda: import_project(proj.path, workdir / f"m{n}"))
    from qpseg.labels import ClassMap

    cm = manifest.class_map if manifest is not None else ClassMap.from_names(list(CLASSES))
    areas = timed("class_areas", lambda: class_areas(objs, cm))
    if areas is not None:
        res["class_areas"] = {cm.names[k] if k < len(cm) else "ignore": v
                              for k, v in sorted(areas.items())}
    reps = timed("validate", lambda: validate_paths([target]))
    if reps is not None:
        res["validate_ok"] = bool(reps[0].ok)
    extent = int(np.ceil(np.sqrt(n))) * SPACING
    px = int(np.ceil(extent / 16))
    timed("rasterize_labels",
          lambda: rasterize_labels(objs, (0.0, 0.0, px, px), 16.0, cm, base_mpp=1.0))
    if "compare_edits" not in skip:
        ai, final = _review_copy(objs, seed)
        timed("compare_edits", lambda: compare_edits(ai, final, tolerance_px=1.0))
    if areas is not None and n <= reference_max:
        t0 = time.perf_counter()
        ref = reference_areas(objs, cm)
        res["reference_s"] = round(time.perf_counter() - t0, 3)
        worst = max(abs(areas.get(k, 0.0) - v) / max(v, 1e-12) for k, v in ref.items())
        res["reference_max_rel_diff"] = worst
        res["reference_equal"] = bool(worst <= 1e-6 and set(ref) == set(areas))
    res["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return res


def main(argv: list[str] | None = None) -> int:
    """Run each size in a fresh process and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-max", type=int, default=500,
                    help="compare areas with the first-written rule up to this size")
    ap.add_argument("--skip", nargs="*", default=[], help="stages not to time")
    ap.add_argument("--out", type=Path, default=Path("bench_import.json"))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        res = run_one(args.one, args.seed, args.workdir, args.reference_max, set(args.skip))
        print(json.dumps(res))
        return 0
    report: dict[str, Any] = {
        "benchmark": "bench_import", "python": platform.python_version(),
        "shapely": shapely.__version__, "geos": ".".join(map(str, shapely.geos_version)),
        "cpu_count": os.cpu_count(), "targets": {"1e5_s": 10, "1e6_s": 100, "peak_rss_mb": 2048},
        "results": [],
    }
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--one", str(n), "--seed", str(args.seed),
                   "--reference-max", str(args.reference_max), "--workdir", tmp,
                   "--skip", *args.skip]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                report["results"].append({"n": n, "error": done.stderr[-2000:]})
            else:
                report["results"].append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(report["results"][-1]), file=sys.stderr)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
