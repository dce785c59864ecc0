"""Reading a large map block by block and joining the pieces of objects across blocks.

A map (any 2-D array-like with slicing: numpy, memmap, zarr, h5py) and its probability maps are
read one block at a time; each block's components (class maps) or instance ids (instance maps)
are traced into exact polygons, with pixel counts and fixed-point probability sums, and the
pieces of one object in adjacent blocks are joined and merged into one canonical geometry, so
the result does not depend on the block size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError, LabelError
from qpseg.labels import ClassMap
from qpseg.objects_trace import _polygons, _trace

if TYPE_CHECKING:  # numpy/shapely/scipy are imported lazily: the CLI must start fast
    import numpy as np

__all__ = ["DEFAULT_BLOCK_SIZE", "MAX_BLOCK_SIZE", "PolygoniseProgress"]

DEFAULT_BLOCK_SIZE = 2048

#: ``progress(blocks_done, blocks_total, objects)`` for progress displays: called with
#: ``(0, n, 0)`` before the first of the map's ``n`` blocks, after each block (row by row)
#: with the pieces found so far (a piece is one connected component within one block, so an
#: object crossing block borders counts once per block until the pieces are joined), and once
#: more, ``(n, n, objects)``, with the number of objects returned. An exception it raises
#: aborts the polygonising.
PolygoniseProgress = Callable[[int, int, int], None]


# ------------------------------------------------------------------------------- map access


def _shape2d(arr: Any, what: str) -> tuple[int, int]:
    shape = getattr(arr, "shape", None)
    if shape is None or len(shape) != 2:
        raise LabelError(f"{what} must be a 2-D array, not of shape {shape}")
    return int(shape[0]), int(shape[1])


def _read_block(arr: Any, r0: int, r1: int, c0: int, c1: int, what: str) -> np.ndarray:
    import numpy as np

    try:
        blk = np.asarray(arr[r0:r1, c0:c1])
    except Exception as exc:  # any array-like: an I/O error of zarr/h5py is not ours to type
        raise LabelError(f"cannot read {what} block [{r0}:{r1}, {c0}:{c1}] ({exc})") from exc
    if blk.shape != (r1 - r0, c1 - c0):
        raise LabelError(f"{what} block [{r0}:{r1}, {c0}:{c1}] has shape {blk.shape}")
    if blk.dtype.kind not in "biu":
        raise LabelError(f"{what} must hold integers, not {blk.dtype}")
    return blk


class _Probs:
    """Probability maps in any accepted form, read block by block as float64 in [0, 1]."""

    def __init__(self, probs: Any, classes: ClassMap, shape: tuple[int, int]) -> None:
        self.single: Any = None              # one 2-D map used for every class
        self.by_class: dict[int, Any] = {}   # class index -> 2-D map or (stack, index)
        self.stack: Any = None
        if probs is None:
            return
        if isinstance(probs, Mapping):
            for key, value in probs.items():
                idx = classes.index_of(key) if isinstance(key, str) else key
                if not isinstance(idx, int) or not 0 <= idx < len(classes):
                    raise ConfigError(f"probability map for unknown class {key!r}")
                self._check(value, shape, f"probability map of class {key!r}")
                self.by_class[idx] = value
            return
        pshape = getattr(probs, "shape", None)
        if pshape is None:
            raise ConfigError("probabilities must be an array or a mapping class -> array")
        if len(pshape) == 2:
            self._check(probs, shape, "probability map")
            self.single = probs
        elif len(pshape) == 3:
            if tuple(pshape[1:]) != shape or pshape[0] != len(classes):
                raise ConfigError(f"probabilities have shape {tuple(pshape)}; expected "
                                  f"({len(classes)}, {shape[0]}, {shape[1]})")
            self.stack = probs
            self.by_class = {i: None for i in range(len(classes))}
        else:
            raise ConfigError(f"probabilities must be 2-D or 3-D, not of shape {tuple(pshape)}")

    @staticmethod
    def _check(arr: Any, shape: tuple[int, int], what: str) -> None:
        s = getattr(arr, "shape", None)
        if s is None or tuple(s) != shape:
            raise ConfigError(f"{what} has shape {s}; the map has {shape}")

    @property
    def given(self) -> bool:
        return self.single is not None or bool(self.by_class)

    def channels(self) -> list[int]:
        """Class indices with a map (``[-1]`` for a single map used for every class)."""
        return [-1] if self.single is not None else sorted(self.by_class)

    def read(self, cls: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray | None:
        import numpy as np

        if self.single is not None:
            raw = self.single[r0:r1, c0:c1]
        elif cls not in self.by_class:
            return None
        elif self.stack is not None:
            raw = self.stack[cls, r0:r1, c0:c1]
        else:
            raw = self.by_class[cls][r0:r1, c0:c1]
        arr = np.asarray(raw)
        if arr.dtype == np.uint8:  # 8-bit storage of [0, 1]
            return arr.astype(np.float64) / 255.0
        if arr.dtype.kind not in "fiub":
            raise ConfigError(f"probabilities must be numbers, not {arr.dtype}")
        return arr.astype(np.float64, copy=False)


# --------------------------------------------------------------------------------- scanning


@dataclass
class _Pieces:
    """What the block scan found: one entry per piece (a component within one block)."""

    geom: np.ndarray     # object array of exact polygons in map pixels
    key: np.ndarray      # class index (class maps) or instance id (instance maps)
    npix: np.ndarray
    first: np.ndarray    # raster index in the whole map of the first pixel
    psum: np.ndarray     # (n, k) int64 sums of probabilities in units of 2^-24 (exact)
    pcnt: np.ndarray     # (n, k) finite probability values counted
    hist: np.ndarray     # (n, C) class histogram (instance maps; (n, 0) otherwise)
    group: np.ndarray    # object id of each piece


def _blocks(h: int, w: int, size: int) -> list[tuple[int, int, int, int, int, int]]:
    return [(bi, bj, r0, min(r0 + size, h), c0, min(c0 + size, w))
            for bi, r0 in enumerate(range(0, h, size)) for bj, c0 in enumerate(range(0, w, size))]


MAX_BLOCK_SIZE = 16384  # keeps per-block label and fixed-point probability sums exact


def _check_block_size(block_size: int) -> int:
    if (isinstance(block_size, bool) or not isinstance(block_size, int)
            or not 1 <= block_size <= MAX_BLOCK_SIZE):
        raise ConfigError(f"block size must be an integer 1-{MAX_BLOCK_SIZE}, not "
                          f"{block_size!r}")
    return block_size


def _class_labels(blk: np.ndarray, classes: ClassMap, connectivity: int,
                  where: str) -> tuple[np.ndarray, list[int]]:
    """Connected components of every class in a block: (labels int32, class of each label)."""
    import numpy as np
    from scipy import ndimage

    n_classes, ignore = len(classes), classes.ignore_index
    vmin, vmax = int(blk.min()), int(blk.max())
    if vmin < 0 or vmax > max(ignore, n_classes - 1):
        bad = vmin if vmin < 0 else vmax
        raise LabelError(f"{where}: value {bad} is neither a class index (0-{n_classes - 1}) "
                         f"nor the ignore index {ignore}")
    counts = np.bincount(blk.ravel(), minlength=n_classes)
    bad_values = [v for v in np.flatnonzero(counts[n_classes:]) + n_classes if v != ignore]
    if bad_values:
        raise LabelError(f"{where}: value {bad_values[0]} is neither a class index "
                         f"(0-{n_classes - 1}) nor the ignore index {ignore}")
    structure = ndimage.generate_binary_structure(2, connectivity)
    lab = np.zeros(blk.shape, dtype=np.int32)
    keys: list[int] = []
    for c in range(1, n_classes):
        if c == ignore or counts[c] == 0:
            continue
        part, k = ndimage.label(blk == c, structure=structure)
        on = part > 0
        lab[on] = part[on] + len(keys)
        keys.extend([c] * k)
    return lab, keys


def _instance_labels(blk: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Block-local labels 1..n of the instance ids in a block, and the id of each label."""
    import numpy as np

    if blk.size and int(blk.min()) < 0:
        raise LabelError(f"{where}: negative instance id {int(blk.min())}")
    vmax = int(blk.max()) if blk.size else 0
    if vmax <= 4 * blk.size + 65536:  # a lookup table beats sorting every pixel
        present = np.flatnonzero(np.bincount(blk.ravel(), minlength=vmax + 1))
        present = present[present > 0]
        lut = np.zeros(vmax + 1, dtype=np.int32)
        lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
        return lut[blk], present.astype(np.int64)
    ids, inv = np.unique(blk, return_inverse=True)
    lab = inv.reshape(blk.shape).astype(np.int32)
    if ids[0] == 0:
        return lab, ids[1:].astype(np.int64)
    return lab + 1, ids.astype(np.int64)


_PROB_UNIT = float(1 << 24)


def _fixed_sum(lab: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    """Per-label sums of ``p`` in fixed point (2^-24 units) as int64: exact, so the mean does
    not depend on how blocks split an object. Values are clipped to [0, 1] first."""
    import numpy as np

    q = np.rint(np.clip(p, 0.0, 1.0) * _PROB_UNIT)
    # < 2^53 per block (a block has far fewer than 2^29 pixels): float sums are exact integers
    return np.bincount(lab, weights=q, minlength=n + 1)[1:].astype(np.int64)


def _scan(values: Any, *, classes: ClassMap, instances: bool, connectivity: int,
          block_size: int, probs: _Probs, class_map: Any = None,
          progress: PolygoniseProgress | None = None) -> _Pieces:
    """Polygonise every block, then group pieces that form one object across block borders."""
    import numpy as np
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    what = "instance map" if instances else "class map"
    h, w = _shape2d(values, what)
    if class_map is not None and _shape2d(class_map, "class map") != (h, w):
        raise LabelError(f"class map has shape {class_map.shape}; the instance map {(h, w)}")
    chans = probs.channels() if probs.given else []
    n_classes = len(classes)
    geoms: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    npix: list[np.ndarray] = []
    firsts: list[np.ndarray] = []
    psums: list[np.ndarray] = []
    pcnts: list[np.ndarray] = []
    hists: list[np.ndarray] = []
    edges: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
    total = 0
    blocks = _blocks(h, w, block_size)
    if progress is not None:
        progress(0, len(blocks), 0)
    for done, (bi, bj, r0, r1, c0, c1) in enumerate(blocks, 1):
        where = f"{what} block [{r0}:{r1}, {c0}:{c1}]"
        blk = _read_block(values, r0, r1, c0, c1, what)
        if instances:
            lab, key = _instance_labels(blk, where)
        else:
            lab, klist = _class_labels(blk, classes, connectivity, where)
            key = np.asarray(klist, dtype=np.int64)
        n = len(key)
        if n:
            rings = _trace(lab, n)
            geoms.append(_polygons(rings, n, (c0, r0)))
            first = rings.first[1:]
            firsts.append((first // (c1 - c0) + r0) * w + first % (c1 - c0) + c0)
            flat = lab.ravel()
            npix.append(np.bincount(flat, minlength=n + 1)[1:].astype(np.int64))
            keys.append(key)
            ps = np.zeros((n, max(1, len(chans)) if instances else 1), dtype=np.int64)
            pc = np.zeros_like(ps)
            if chans and not instances:
                for c in np.unique(key):
                    p = probs.read(int(c), r0, r1, c0, c1)
                    if p is None:
                        continue
                    on = (blk == c) & np.isfinite(p)
                    ps[:, 0] += _fixed_sum(lab[on], p[on], n)
                    pc[:, 0] += np.bincount(lab[on], minlength=n + 1)[1:]
            elif chans:
                on_obj = lab > 0
                for k, c in enumerate(chans):
                    p = probs.read(c, r0, r1, c0, c1)
                    assert p is not None
                    on = on_obj & np.isfinite(p)
                    ps[:, k] = _fixed_sum(lab[on], p[on], n)
                    pc[:, k] = np.bincount(lab[on], minlength=n + 1)[1:]
            psums.append(ps)
            pcnts.append(pc)
            if instances:
                hist = np.zeros((n, n_classes), dtype=np.int64)
                if class_map is not None:
                    cblk = _read_block(class_map, r0, r1, c0, c1, "class map")
                    on = (lab > 0) & (cblk > 0) & (cblk < n_classes)
                    hist += np.bincount(
                        lab[on].astype(np.int64) * n_classes + cblk[on],
                        minlength=(n + 1) * n_classes,
                    ).reshape(n + 1, n_classes)[1:]
                hists.append(hist)
        if not instances:  # edge rows/columns, as global piece ids (-1: none)
            g = np.where(lab > 0, lab.astype(np.int64) - 1 + total, -1)
            edges[(bi, bj)] = (g[0].copy(), g[-1].copy(), g[:, 0].copy(), g[:, -1].copy())
        total += n
        del lab, blk
        if progress is not None:
            progress(done, len(blocks), total)

    width = max(1, len(chans)) if instances else 1
    if total == 0:
        empty = np.empty(0, dtype=np.int64)
        return _Pieces(np.empty(0, dtype=object), empty, empty, empty, np.zeros((0, width)),
                       np.zeros((0, width)), np.zeros((0, n_classes), np.int64), empty)
    piece_key = np.concatenate(keys)
    group: np.ndarray
    if instances:
        _, group = np.unique(piece_key, return_inverse=True)
    else:
        a_list: list[np.ndarray] = []
        b_list: list[np.ndarray] = []

        def link(a: np.ndarray, b: np.ndarray) -> None:
            ok = (a >= 0) & (b >= 0)
            a, b = a[ok], b[ok]
            same = piece_key[a] == piece_key[b]
            a_list.append(a[same])
            b_list.append(b[same])

        for (bi, bj), (_top, bottom, _left, right) in edges.items():
            for nb, mine, theirs in (((bi, bj + 1), right, 2), ((bi + 1, bj), bottom, 0)):
                if nb not in edges:
                    continue
                other_edge = edges[nb][theirs]
                link(mine, other_edge)
                if connectivity == 2:
                    link(mine[:-1], other_edge[1:])
                    link(mine[1:], other_edge[:-1])
            if connectivity == 2:  # blocks meeting only at a corner
                if (bi + 1, bj + 1) in edges:
                    link(bottom[-1:], edges[(bi + 1, bj + 1)][0][:1])
                if (bi + 1, bj - 1) in edges:
                    link(bottom[:1], edges[(bi + 1, bj - 1)][0][-1:])
        a = np.concatenate(a_list) if a_list else np.empty(0, np.int64)
        b = np.concatenate(b_list) if b_list else np.empty(0, np.int64)
        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(total, total))
        _, group = connected_components(graph, directed=False)
    geom = np.concatenate(geoms)
    # canonical exact form, so the result does not depend on the blocks: merge, drop the
    # collinear vertices merging leaves on block borders, normalise ring order and start
    sizes = np.bincount(group)
    if (sizes > 1).any():
        order = np.argsort(group, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for gid in np.flatnonzero(sizes > 1):
            members = order[starts[gid]:starts[gid + 1]]
            merged = shapely.simplify(shapely.union_all(geom[members]), 0.0)
            geom[members[0]] = merged
            geom[members[1:]] = None
    return _Pieces(geom, piece_key, np.concatenate(npix), np.concatenate(firsts),
                   np.concatenate(psums), np.concatenate(pcnts),
                   np.concatenate(hists) if hists else np.zeros((total, n_classes), np.int64),
                   group)


@dataclass
class _Objects:
    """Merged objects (one per group), in raster order of their first pixel."""

    geom: np.ndarray     # exact canonical geometry in map pixels
    key: np.ndarray
    npix: np.ndarray
    first: np.ndarray
    psum: np.ndarray
    pcnt: np.ndarray
    hist: np.ndarray


def _merge(p: _Pieces) -> _Objects:
    import numpy as np
    import shapely

    n = int(p.group.max()) + 1 if len(p.group) else 0
    geom = np.empty(n, dtype=object)
    keep = np.array([g is not None for g in p.geom], dtype=bool)
    geom[p.group[keep]] = p.geom[keep]
    key = np.zeros(n, dtype=np.int64)
    key[p.group] = p.key
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, p.group, p.first)

    def gsum(a: np.ndarray) -> np.ndarray:
        out = np.zeros((n, *a.shape[1:]), dtype=a.dtype)
        np.add.at(out, p.group, a)
        return out

    order = np.argsort(first)
    geom = shapely.normalize(geom)
    return _Objects(geom[order], key[order], gsum(p.npix)[order], first[order],
                    gsum(p.psum)[order], gsum(p.pcnt)[order], gsum(p.hist)[order])
