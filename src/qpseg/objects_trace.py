"""The pixel-edge (staircase) tracer: a label image -> one exact polygon per label.

Each label's polygon covers exactly its pixel squares (holes are interior rings). Maximal
straight runs of exposed pixel edges are linked into rings and ordered by pointer jumping, with
no Python loop per object; a ring that touches itself where two pixels of one label meet only
diagonally is repaired by :func:`qpseg.qupath.geojson.repair_polygonal`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy/shapely/scipy are imported lazily: the CLI must start fast
    import numpy as np

# direction codes of pixel-edge segments: east, south, west, north (image axes, y down)
_DX = (1, 0, -1, 0)
_DY = (0, 1, 0, -1)


def _runs(mask: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, ...]:
    """Maximal runs of exposed edges of one label along each line: (line, a0, a1, label)."""
    import numpy as np

    length = mask.shape[1]
    pair = mask[:, :-1] & mask[:, 1:] & (lab[:, :-1] == lab[:, 1:])
    start = mask.copy()
    start[:, 1:] &= ~pair
    end = mask.copy()
    end[:, :-1] &= ~pair
    s = np.flatnonzero(start)
    e = np.flatnonzero(end)
    return s // length, s % length, e % length + 1, lab.ravel()[s]


def _exposed_runs(lab: np.ndarray) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Runs (see :func:`_runs`) of the exposed edges above and below each row's pixels: edges
    where the pixel of a label (not 0) meets another label or the image border. Given the
    transposed image, the edges left and right of each column."""
    import numpy as np

    nz = lab != 0
    other = np.zeros_like(lab)
    other[1:] = lab[:-1]
    before = _runs(nz & (lab != other), lab)
    other[:] = 0
    other[:-1] = lab[1:]
    after = _runs(nz & (lab != other), lab)
    return before, after


@dataclass
class _Rings:
    coords: np.ndarray       # (M, 2) int64 ring vertices, rings concatenated
    offsets: np.ndarray      # (R + 1,) ring k is coords[offsets[k]:offsets[k+1]]
    label: np.ndarray        # (R,) label of each ring
    area2: np.ndarray        # (R,) twice the signed area: > 0 exterior, < 0 hole
    inner: np.ndarray        # (R, 2) a pixel centre just left of the ring (inside a hole)
    saddle: np.ndarray       # (n + 1,) bool: the label has a diagonal-only vertex
    first: np.ndarray        # (n + 1,) raster index (row * w + col) of the label's first pixel


def _trace(lab: np.ndarray, n: int) -> _Rings:
    """Pixel-edge rings of every label 1..n of ``lab`` (0 = nothing), vectorised.

    Segments are maximal straight runs of exposed pixel edges, oriented with the label on their
    right (image axes), so exteriors have positive shoelace area and holes negative. A segment
    is followed by the segment of the same label starting where it ends; where there are two
    (pixels of one label touching only at a corner) the right turn is taken (around the pixel).
    """
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    w = lab.shape[1]
    (tr, tc0, tc1, tl), (br, bc0, bc1, bl) = _exposed_runs(lab)  # top edges east, bottom west
    (lc, lr0, lr1, ll), (rc, rr0, rr1, rl) = _exposed_runs(      # left edges north, right south
        np.ascontiguousarray(lab.T))

    first = np.full(n + 1, -1, dtype=np.int64)
    ulab, uidx = np.unique(tl, return_index=True)  # top runs come in raster order
    first[ulab] = tr[uidx] * w + tc0[uidx]

    sx = np.concatenate([tc0, bc1, lc, rc + 1]).astype(np.int64)
    sy = np.concatenate([tr, br + 1, lr1, rr0]).astype(np.int64)
    ex = np.concatenate([tc1, bc0, lc, rc + 1]).astype(np.int64)
    ey = np.concatenate([tr, br + 1, lr0, rr1]).astype(np.int64)
    d = np.concatenate([np.zeros(len(tr), np.int64), np.full(len(br), 2, np.int64),
                        np.full(len(lc), 3, np.int64), np.ones(len(rc), np.int64)])
    lbl = np.concatenate([tl, bl, ll, rl]).astype(np.int64)
    m = len(lbl)
    saddle = np.zeros(n + 1, dtype=bool)
    if m == 0:
        return _Rings(np.empty((0, 2), np.int64), np.zeros(1, np.int64), np.empty(0, np.int64),
                      np.empty(0, np.int64), np.empty((0, 2)), saddle, first)

    # (start vertex, direction) identifies a segment: its label is the pixel on its right
    w1 = w + 1
    key = (sy * w1 + sx) * 4 + d
    order = np.argsort(key)
    skey = key[order]
    vend = (ey * w1 + ex) * 4

    def find(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(skey, k), m - 1)
        cand = order[pos]
        return cand, (skey[pos] == k) & (lbl[cand] == lbl)

    right, ok_right = find(vend + (d + 1) % 4)
    left, ok_left = find(vend + (d + 3) % 4)
    if not (ok_right | ok_left).all():  # pragma: no cover - every ring closes
        raise RuntimeError("pixel-edge tracing failed to close a ring")
    saddle[lbl[ok_right & ok_left]] = True
    succ = np.where(ok_right, right, left)

    # rings are the cycles of succ; order each by pointer jumping from its smallest segment
    graph = csr_matrix((np.ones(m, dtype=np.int8), (np.arange(m), succ)), shape=(m, m))
    n_rings, ring = connected_components(graph, directed=True, connection="weak")
    lengths = np.bincount(ring, minlength=n_rings)
    _, head = np.unique(ring, return_index=True)
    is_head = np.zeros(m, dtype=bool)
    is_head[head] = True
    nxt = succ.copy()
    tail = is_head[succ]
    nxt[tail] = np.flatnonzero(tail)
    dist = (~tail).astype(np.int64)
    for _ in range(max(1, int(lengths.max()) - 1).bit_length()):
        dist = dist + dist[nxt]
        nxt = nxt[nxt]
    seq = np.lexsort((lengths[ring] - 1 - dist, ring))

    xs, ys = sx[seq], sy[seq]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    nx = np.arange(1, m + 1)
    nx[offsets[1:] - 1] = offsets[:-1]
    area2 = np.add.reduceat(xs * ys[nx] - xs[nx] * ys, offsets[:-1])
    h0 = seq[offsets[:-1]]  # first segment of each ring
    dx, dy = np.take(_DX, d[h0]), np.take(_DY, d[h0])
    inner = np.stack([sx[h0] + 0.5 * dx + 0.5 * dy, sy[h0] + 0.5 * dy - 0.5 * dx], axis=1)
    return _Rings(np.stack([xs, ys], axis=1), offsets, lbl[h0], area2, inner, saddle, first)


def _polygons(rings: _Rings, n: int, offset: tuple[int, int]) -> np.ndarray:
    """Exact (valid) geometry of each label 1..n, as an object array indexed label - 1."""
    import numpy as np
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    from qpseg.qupath.geojson import repair_polygonal

    out = np.empty(n, dtype=object)
    n_rings = len(rings.label)
    if n_rings == 0:
        return out
    coords = rings.coords.astype(np.float64) + np.asarray(offset, dtype=np.float64)
    ring_of = np.repeat(np.arange(n_rings), np.diff(rings.offsets))
    lr = shapely.linearrings(coords, indices=ring_of)
    hole = rings.area2 < 0
    n_ext = np.bincount(rings.label[~hole], minlength=n + 1)
    simple = n_ext[rings.label] == 1
    sel = np.flatnonzero(simple)
    sel = sel[np.lexsort((hole[sel], rings.label[sel]))]
    if len(sel):
        labels = rings.label[sel]
        uniq, poly_of = np.unique(labels, return_inverse=True)
        out[uniq - 1] = shapely.polygons(lr[sel], indices=poly_of)
    multi = np.flatnonzero(n_ext > 1)
    if len(multi):  # labels with several exteriors: pixels touching only at corners
        in_multi = np.isin(rings.label, multi)
        shells = np.flatnonzero(in_multi & ~hole)
        holes = np.flatnonzero(in_multi & hole)
        shell_poly = shapely.polygons(lr[shells])
        owner = np.full(len(holes), -1)
        if len(holes):  # the innermost shell of the same label around a point of the hole
            tree = shapely.STRtree(shell_poly)
            pts = shapely.points(rings.inner[holes] + np.asarray(offset, dtype=np.float64))
            hi, si = tree.query(pts, predicate="within")
            ok = rings.label[holes[hi]] == rings.label[shells[si]]
            hi, si = hi[ok], si[ok]
            order = np.lexsort((-shapely.area(shell_poly[si]), hi))  # smallest last per hole
            hi, si = hi[order], si[order]
            last = np.append(hi[1:] != hi[:-1], True)
            owner[hi[last]] = si[last]
        hole_rings: list[list[Any]] = [[] for _ in shells]
        for h_i, s_i in zip(holes.tolist(), owner.tolist(), strict=True):
            if s_i >= 0:
                hole_rings[s_i].append(lr[h_i])
        parts: dict[int, list[Any]] = {}
        for k, s_i in enumerate(shells.tolist()):
            parts.setdefault(int(rings.label[s_i]), []).append(Polygon(lr[s_i], hole_rings[k]))
        for lab_id, polys in parts.items():
            out[lab_id - 1] = MultiPolygon(polys)
    check = np.flatnonzero(rings.saddle[1:])
    if len(check):
        bad = check[~shapely.is_valid(out[check])]
        for i in bad:
            out[i] = shapely.simplify(repair_polygonal(out[i]), 0.0)
    return out
