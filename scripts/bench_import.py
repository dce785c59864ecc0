"""Benchmark of the commands a QuPath export with 10^4-10^6 annotations goes through.

The export is generated (vectorised): ``n`` 12-vertex annotations on a 20 px grid with radii of
4-14 px, so neighbours overlap; a tenth have a hole; classes Tumor / Stroma / Necrosis at
random, one in a hundred unclassified; one ``Region*`` over half the grid and one ``Ignore*``
strip across it. It is streamed to QuPath GeoJSON (chunks of features, never all objects at
once) beside a one-slide generated project. Each stage then runs in a fresh process of its own,
which reports its seconds and its peak RSS (``ru_maxrss``; ``rss_base_mb`` is the same process
after its imports, before the stage):

* ``read_geojson``: the lenient reader;
* ``import_project``: the whole ``qpseg import-project`` (reader, AI-object rule, label rule,
  manifest);
* ``validate``: ``qpseg validate`` on the GeoJSON file;
* ``class_areas``: the label rule's per-class areas (what the manifest records);
* ``rasterize_labels``: the label raster of the whole grid at 16 level-0 px per pixel;
* ``compare_edits``: ``qpseg evaluate-edits``' comparison, with the objects as the AI's
  predictions and a review that moved 2 %, deleted 2 %, added 2 % and lost the ids of 2 %.

The last three read the file first (untimed, but inside the peak RSS: a command reads it too).

With ``--reference-max N`` the per-class areas of sizes up to ``N`` are compared with the label
rule as first written (one growing union of everything painted above; quadratic), which must
agree to 1e-6 relative.

    python scripts/bench_import.py --sizes 10000 100000 --out bench_import.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from _bench import machine, peak_rss_mb, write_report
from qpseg.qupath.geojson import QuPathObject
from qpseg.testing.reference import reference_class_geometries

CLASSES = ("Tumor", "Stroma", "Necrosis")
SPACING = 20.0
CHUNK = 20_000  # features generated and written at a time
STAGES = ("read_geojson", "import_project", "validate", "class_areas", "rasterize_labels",
          "compare_edits")


def annotation_chunks(n: int, seed: int = 0, chunk: int = CHUNK
                      ) -> Iterator[list[QuPathObject]]:
    """The ``n`` annotations plus one ``Region*`` and one ``Ignore*`` (module doc), ``chunk``
    objects at a time; the same objects whatever ``chunk`` is."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    centres = np.stack(np.divmod(np.arange(n), side), axis=1)[:, ::-1] * SPACING + SPACING / 2
    centres = centres + rng.uniform(-3, 3, centres.shape)
    radii = rng.uniform(4.0, 14.0, n)
    holed_all = rng.random(n) < 0.1
    cls_all = rng.integers(0, len(CLASSES), n)
    unclassified_all = rng.random(n) < 0.01
    angle = np.linspace(0.0, 2 * np.pi, 12, endpoint=False)
    unit = np.stack([np.cos(angle), np.sin(angle)], axis=1)[None]
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        centre, radius, holed = centres[sl], radii[sl], holed_all[sl]
        geoms = shapely.polygons(np.round(centre[:, None, :] + radius[:, None, None] * unit, 2))
        holes = shapely.polygons(centre[holed][:, None, :] + (radius[holed] / 3)[:, None, None]
                                 * unit[:, ::-1])
        geoms[holed] = shapely.polygons(shapely.get_exterior_ring(geoms[holed]),
                                        holes=shapely.get_exterior_ring(holes)[:, None])
        yield [QuPathObject(geometry=g, object_type="annotation",
                            classification=None if u else CLASSES[c])
               for g, c, u in zip(geoms.tolist(), cls_all[sl].tolist(),
                                  unclassified_all[sl].tolist(), strict=True)]
    extent = side * SPACING
    yield [QuPathObject(geometry=shapely.box(0, 0, extent, extent / 2),
                        object_type="annotation", classification="Region*"),
           QuPathObject(geometry=shapely.box(0, extent * 0.4, extent, extent * 0.45),
                        object_type="annotation", classification="Ignore*")]


def make_annotations(n: int, seed: int = 0) -> list[QuPathObject]:
    """All of :func:`annotation_chunks` in one list (small ``n`` only)."""
    return [o for part in annotation_chunks(n, seed) for o in part]


def write_export(path: Path, n: int, seed: int) -> int:
    """Stream the export of ``n`` annotations to ``path`` (a FeatureCollection written chunk
    by chunk with the module's own feature writer); returns the number of features."""
    import orjson

    from qpseg.qupath.geojson import to_feature_collection

    written = 0
    with open(path, "wb") as fh:
        fh.write(b'{"type":"FeatureCollection","features":[')
        for part in annotation_chunks(n, seed):
            features = to_feature_collection(part)["features"]
            if written and features:
                fh.write(b",")
            fh.write(orjson.dumps(features)[1:-1])
            written += len(features)
        fh.write(b"]}\n")
    return written


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


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak so far is the best there is
        return peak_rss_mb()


def setup(n: int, seed: int, workdir: Path) -> dict[str, Any]:
    """Write the project and the streamed export for ``n`` into ``workdir``."""
    from qpseg.testing.projects import make_project

    t = time.perf_counter()
    proj = make_project(workdir / "project", n_slides=1, width=256, height=256,
                        annotations=False)
    target = proj.folder / "qpseg" / "annotations" / f"{proj.entry_ids[0]}.geojson"
    target.parent.mkdir(parents=True, exist_ok=True)
    n_features = write_export(target, n, seed)
    (workdir / "export.json").write_text(json.dumps({"project": str(proj.path),
                                                     "geojson": str(target)}))
    return {"setup_s": round(time.perf_counter() - t, 3), "n_features": n_features,
            "file_mb": round(target.stat().st_size / 2**20, 1),
            "setup_peak_rss_mb": round(peak_rss_mb(), 1)}


def run_stage(stage: str, n: int, seed: int, workdir: Path,
              reference_max: int) -> dict[str, Any]:
    """Time one stage (module doc) in this process; its peak RSS is this process's."""
    import warnings

    from qpseg.edits import compare_edits
    from qpseg.labels import ClassMap, class_areas, rasterize_labels
    from qpseg.manifest import import_project
    from qpseg.qupath.geojson import read_geojson
    from qpseg.validation import validate_paths

    warnings.simplefilter("ignore")
    paths = json.loads((workdir / "export.json").read_text())
    target = Path(paths["geojson"])
    cm = ClassMap.from_names(list(CLASSES))
    res: dict[str, Any] = {"stage": stage}
    res["rss_base_mb"] = round(_current_rss_mb(), 1)
    objs = read_geojson(target) if stage in ("class_areas", "rasterize_labels",
                                             "compare_edits") else None
    t0 = time.perf_counter()
    if stage == "read_geojson":
        res["n_objects"] = len(read_geojson(target))
    elif stage == "import_project":
        manifest = import_project(paths["project"], workdir / "manifest")
        res["n_annotations"] = manifest.entries[0].n_annotations
    elif stage == "validate":
        res["validate_ok"] = bool(validate_paths([target])[0].ok)
    elif stage == "class_areas":
        assert objs is not None
        areas = class_areas(objs, cm)
        res["class_areas"] = {cm.names[k] if k < len(cm) else "ignore": v
                              for k, v in sorted(areas.items())}
    elif stage == "rasterize_labels":
        assert objs is not None
        px = int(np.ceil(int(np.ceil(np.sqrt(n))) * SPACING / 16))
        rasterize_labels(objs, (0.0, 0.0, px, px), 16.0, cm, base_mpp=1.0)
    elif stage == "compare_edits":
        assert objs is not None
        ai, final = _review_copy(objs, seed)
        t0 = time.perf_counter()  # the simulated review is setup, not the command
        compare_edits(ai, final, tolerance_px=1.0)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    if stage == "class_areas" and n <= reference_max:
        assert objs is not None
        t0 = time.perf_counter()
        ref = {k: float(g.area) for k, g in reference_class_geometries(objs, cm).items()}
        res["reference_s"] = round(time.perf_counter() - t0, 3)
        worst = max(abs(areas.get(k, 0.0) - v) / max(v, 1e-12) for k, v in ref.items())
        res["reference_max_rel_diff"] = worst
        res["reference_equal"] = bool(worst <= 1e-6 and set(ref) == set(areas))
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return res


def _child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    """Run each size (and each of its stages) in fresh processes and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-max", type=int, default=500,
                    help="compare areas with the first-written rule up to this size")
    ap.add_argument("--skip", nargs="*", default=[], help="stages not to time")
    ap.add_argument("--out", type=Path, default=Path("bench_import.json"))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        if args.stage is None:
            res = setup(args.one, args.seed, args.workdir)
        else:
            res = run_stage(args.stage, args.one, args.seed, args.workdir, args.reference_max)
        print(json.dumps(res))
        return 0
    report: dict[str, Any] = {
        "benchmark": "bench_import", "shapely": shapely.__version__,
        "geos": ".".join(map(str, shapely.geos_version)), **machine("python", "cpu_count"),
        "targets": {"1e5_s": 10, "1e6_s": 100, "peak_rss_mb": 2048},
        "results": [],
    }
    common = ["--seed", str(args.seed), "--reference-max", str(args.reference_max)]
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            res: dict[str, Any] = {"n": n}
            res.update(_child(["--one", str(n), "--workdir", tmp, *common]))
            res["seconds"], res["peak_rss_mb"], res["stages"] = {}, {}, {}
            for stage in STAGES:
                if stage in args.skip or "error" in res:
                    continue
                out = _child(["--one", str(n), "--stage", stage, "--workdir", tmp, *common])
                res["stages"][stage] = out
                if "error" not in out:
                    res["seconds"][stage] = out["seconds"]
                    res["peak_rss_mb"][stage] = out["peak_rss_mb"]
                print(json.dumps({"n": n, **out}), file=sys.stderr)
            report["results"].append(res)
        write_report(report, args.out, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
