"""The writer's vectorised path: GeoJSON geometry for many valid polygons at once.

:func:`_polygonal_json_batch` gives, for each valid Polygon or MultiPolygon, exactly what the
per-object writer in :mod:`qpseg.qupath.geojson_write` would (oriented rings, ints for whole
rings), optionally as JSON text printed by GEOS; :func:`_uuid4_strings` makes new feature ids in
bulk. Everything else is left to the per-object path.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported lazily: the CLI must start fast
    import numpy as np

__all__: list[str] = []


_UUID_HEX_COLUMNS = [*range(0, 8), *range(9, 13), *range(14, 18), *range(19, 23),
                     *range(24, 36)]


def _uuid4_strings(n: int) -> list[str]:
    """``n`` new ``str(uuid.uuid4())`` values, made in bulk (one ``os.urandom`` call)."""
    import numpy as np

    if n <= 0:
        return []
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40   # version 4, as uuid.UUID(..., version=4) sets it
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80   # RFC 4122 variant
    nibbles = np.empty((n, 32), dtype=np.uint8)
    nibbles[:, 0::2] = raw >> 4
    nibbles[:, 1::2] = raw & 0x0F
    chars = np.full((n, 36), ord("-"), dtype=np.uint8)
    chars[:, _UUID_HEX_COLUMNS] = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles]
    text = chars.tobytes().decode("ascii")
    return [text[k:k + 36] for k in range(0, 36 * n, 36)]


def _polygonal_json_batch(geoms: list[Any], as_text: bool = False
                          ) -> list[dict[str, Any] | str | None]:
    """For each geometry, what ``_geometry_json(_prepare_geometry(g, ...).geometry)`` gives,
    worked out for all of them at once with vectorised shapely; None where the per-object path
    must decide.

    Only the common case is done here: an exact shapely Polygon or MultiPolygon that is valid,
    not empty, without empty parts and with finite coordinates. :func:`_prepare_geometry` writes
    such a geometry unchanged and without a warning, only oriented (exteriors counter-clockwise,
    holes clockwise, per part) and with a one-part MultiPolygon written as a Polygon; rings
    whose values are all integral are written with ints (see :func:`_xy`). Everything else
    (repairs, points, lines, collections, warnings) is left to the per-object path.

    With ``as_text``, a geometry without whole rings (so all its numbers are floats) is given
    as compact JSON text printed by GEOS, which is much faster than Python printing floats
    (see ``_GEOS_TEXT_HIGH``); the others are still dicts.
    """
    import numpy as np
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    out: list[dict[str, Any] | str | None] = [None] * len(geoms)
    take = [i for i, g in enumerate(geoms) if type(g) is Polygon or type(g) is MultiPolygon]
    if not take:
        return out
    arr = np.empty(len(take), dtype=object)
    arr[:] = [geoms[i] for i in take]
    try:
        keep = np.flatnonzero(shapely.is_valid(arr) & ~shapely.is_empty(arr))
        polys, owner = shapely.get_parts(arr[keep], return_index=True)
        orient_polygons = getattr(shapely, "orient_polygons", None)
        if orient_polygons is not None:  # shapely >= 2.1; orient() calls the same GEOS code
            polys = orient_polygons(polys, exterior_cw=False)
        else:  # pragma: no cover - shapely 2.0
            from shapely.geometry.polygon import orient

            polys = np.array([orient(p, 1.0) for p in polys], dtype=object)
        rings, ring_poly = shapely.get_rings(polys, return_index=True)
        coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    except (ValueError, TypeError, shapely.errors.GEOSException):
        return out  # the per-object path reports what is wrong, object by object

    n_geoms, n_polys, n_rings = len(keep), len(polys), len(rings)
    finite = np.isfinite(coords).all(axis=1)
    skip = np.zeros(n_geoms, dtype=bool)
    skip[owner[ring_poly[ring_of[~finite]]]] = True  # GEOS calls these invalid; be sure
    skip[owner[shapely.is_empty(polys)]] = True

    # A ring is written with ints when all its values are whole (and exactly representable).
    magnitude = np.abs(coords)
    whole = (coords == np.floor(coords)).all(axis=1) & (magnitude < 2**53).all(axis=1)
    ring_whole = np.bincount(ring_of[~whole], minlength=n_rings) == 0
    ring_len = np.bincount(ring_of, minlength=n_rings)
    ring_start = np.cumsum(ring_len) - ring_len
    poly_rings = np.bincount(ring_poly, minlength=n_polys)

    geom_text = np.zeros(n_geoms, dtype=bool)
    if as_text and _geos_text_agrees():
        # parts without whole rings, 2-D, every value below _GEOS_TEXT_HIGH
        part_ok = np.bincount(ring_poly[ring_whole], minlength=n_polys) == 0
        big = ring_of[~(magnitude < _GEOS_TEXT_HIGH).all(axis=1)]
        part_ok[ring_poly[big]] = False
        part_ok &= ~shapely.has_z(polys)
        has_m = getattr(shapely, "has_m", None)
        if has_m is not None:
            part_ok &= ~has_m(polys)
        geom_text = np.bincount(owner[~part_ok], minlength=n_geoms) == 0
    part_text = geom_text[owner]

    poly_json: list[Any] = [None] * n_polys
    list_parts = np.flatnonzero(~part_text)
    if len(list_parts):
        ring_json = _ring_coordinate_lists(coords, ring_whole, ring_len, ring_start,
                                           np.flatnonzero(~part_text[ring_poly]))
        counts = poly_rings[list_parts]
        for k, s, c in zip(list_parts.tolist(), (np.cumsum(counts) - counts).tolist(),
                           counts.tolist(), strict=True):
            poly_json[k] = ring_json[s:s + c]
    text_parts = np.flatnonzero(part_text)
    if len(text_parts):  # '{"type":"Polygon","coordinates":[...]}' for each part
        for k, text in zip(text_parts.tolist(), shapely.to_geojson(polys[text_parts]).tolist(),
                           strict=True):
            poly_json[k] = text

    geom_parts = np.bincount(owner, minlength=n_geoms)
    geom_start = np.cumsum(geom_parts) - geom_parts
    for j, s, c, bad, is_text in zip(keep.tolist(), geom_start.tolist(), geom_parts.tolist(),
                                     skip.tolist(), geom_text.tolist(), strict=True):
        if bad or c == 0:
            continue
        if is_text:
            cut = len(_GEOS_POLYGON_PREFIX)
            out[take[j]] = poly_json[s] if c == 1 else (
                '{"type":"MultiPolygon","coordinates":['
                + ",".join(t[cut:-1] for t in poly_json[s:s + c]) + "]}")
        else:
            out[take[j]] = ({"type": "Polygon", "coordinates": poly_json[s]} if c == 1
                            else {"type": "MultiPolygon", "coordinates": poly_json[s:s + c]})
    return out


def _ring_coordinate_lists(coords: np.ndarray, ring_whole: np.ndarray, ring_len: np.ndarray,
                           ring_start: np.ndarray, which: np.ndarray) -> list[list[list[Any]]]:
    """The ``[[x, y], ...]`` lists of the rings ``which`` (ints for whole rings, as ``_xy``)."""
    import numpy as np

    lens = ring_len[which]
    first = np.cumsum(lens) - lens
    rows = np.repeat(ring_start[which] - first, lens) + np.arange(int(lens.sum()))
    is_whole = ring_whole[which]
    row_whole = np.repeat(is_whole, lens)
    ints = coords[rows[row_whole]].astype(np.int64).tolist()
    floats = coords[rows[~row_whole]].tolist()
    len_int = np.where(is_whole, lens, 0)
    len_float = lens - len_int
    start = np.where(is_whole, np.cumsum(len_int) - len_int, np.cumsum(len_float) - len_float)
    return [(ints if w else floats)[s:s + c] for w, s, c in
            zip(is_whole.tolist(), start.tolist(), lens.tolist(), strict=True)]


# GEOS's GeoJSON writer (nlohmann json) prints doubles in Python repr's notation below 1e15
# (fixed point from 1e-4, e-notation under it; from 1e15 it uses e-notation where Python waits
# until 1e16) and whole values as "12.0", as Python prints a float. Its digits (Grisu2) always
# read back as the same double and are Python's own shortest digits in all but about 1 value
# in 1000, which get one digit more.
_GEOS_TEXT_HIGH = 1e15
_GEOS_POLYGON_PREFIX = '{"type":"Polygon","coordinates":'
_GEOS_TEXT_CHECK: list[bool] = []


def _geos_text_agrees() -> bool:
    """Whether this GEOS prints polygons as ``_GEOS_TEXT_HIGH`` describes (checked once per
    process, on values of every notation that matters)."""
    if not _GEOS_TEXT_CHECK:
        ok = False
        try:
            import shapely
            from shapely.geometry import Polygon

            xy = [(0.0, -0.0), (0.1, 1 / 3), (123456.789, 1e-4), (99999999999999.5, -2.5e-4),
                  (-7.0, 3.0)]
            text = str(shapely.to_geojson(Polygon(xy)))
            expected = [[x, y] for x, y in (*xy, xy[0])]
            ok = (text.startswith(_GEOS_POLYGON_PREFIX + "[[[0.0,-0.0],[0.1,0.3333")
                  and "[-7.0,3.0]" in text and "e" not in text[len(_GEOS_POLYGON_PREFIX):]
                  and json.loads(text)["coordinates"] == [expected])
        except Exception:  # any failure (old GEOS without GeoJSON) means: do not use it
            ok = False
        _GEOS_TEXT_CHECK.append(ok)
    return _GEOS_TEXT_CHECK[0]
