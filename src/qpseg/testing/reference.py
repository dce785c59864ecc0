"""Reference implementations that fast code is checked against (tests and benchmarks).

:func:`reference_class_geometries` is :func:`qpseg.labels.class_geometries` as first written:
quadratic (one growing union of everything painted above), so for small inputs only, but
obviously right; ``tests/test_labels.py`` and ``scripts/bench_import.py`` compare the fast rule
with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from qpseg.labels import ClassMap
    from qpseg.qupath.geojson import QuPathObject

__all__ = ["reference_class_geometries"]


def reference_class_geometries(objects: Iterable[QuPathObject], class_map: ClassMap
                               ) -> dict[int, BaseGeometry]:
    """Per label value, the geometry the label rule paints with it (Region* -> 0, classes by
    area, smaller on top, Ignore* last), by explicit differences and unions."""
    from shapely import union_all
    from shapely.geometry import Polygon

    from qpseg.labels import label_role
    from qpseg.qupath.geojson import repair_polygonal

    regions: list[tuple[Any, int]] = []
    classes: list[tuple[float, int, Any, int]] = []
    ignores: list[tuple[Any, int]] = []
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
    painted = regions + [(g, v) for _, _, g, v in classes] + ignores
    covered: Any = Polygon()
    out: dict[int, list[Any]] = {}
    for geom, value in reversed(painted):
        visible = geom.difference(covered) if not covered.is_empty else geom
        if not visible.is_empty:
            out.setdefault(value, []).append(visible)
        covered = union_all([covered, geom])
    return {k: union_all(v) for k, v in out.items()}
