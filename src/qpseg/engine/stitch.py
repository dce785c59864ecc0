"""Stitching tile outputs into on-disk maps, one band of rows at a time.

Tiles arrive in raster order (tile row by tile row, as :class:`~qpseg.engine.tiling.TilePlan`
lists them). A :class:`Stitcher` keeps only the rows the current tile row can still write (at
most one tile's height × the map width) and writes finished rows to the :class:`MapSet` files as
soon as the next tile row starts below them, so memory does not depend on the slide's height.

* ``"center"``: each tile's valid part (the output without its ``margin``) is copied; the
  valid parts partition the map, so the result is exactly the model's prediction in the middle
  of its field of view.
* ``"blend"``: the valid parts overlap by 50 % and are averaged with a Hann window
  ``sin²(π(u + ½)/valid)``; at 50 % overlap two windows sum to one, and the sum of weights is
  divided out, which also covers the map's borders.
* ``"instance"``: every tile's objects whose centroid lies in the tile's valid part are painted
  (whole, margins included) with a slide-wide id, never over an earlier object's pixels; an
  object seen by two tiles is kept once, by the tile that owns its centroid.

Pixels no tile wrote (no tissue) stay 0: Background, probability 0, no instance.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qpseg.engine.writers import MapFile

if TYPE_CHECKING:  # pragma: no cover
    from qpseg.engine.tiling import TilePlan
    from qpseg.tissue import TissueMask

__all__ = ["MapSet", "Stitcher", "hann_window", "resample_map"]


def hann_window(valid: int, margin: int) -> np.ndarray:
    """1-D weights over a tile output: 0 in the margins, ``sin²`` over the valid part."""
    u = np.arange(valid, dtype=np.float64)
    w = np.sin(math.pi * (u + 0.5) / valid) ** 2
    return np.concatenate([np.zeros(margin), w, np.zeros(margin)]).astype(np.float32)


@dataclass
class MapSet:
    """The map files of one slide: ``classes`` (uint8) and ``probs`` (uint8, ``(C, H, W)``,
    255 = 1) for pixel/patch models; ``instances`` (int32 ids), ``classes`` and ``scores``
    (uint8) for instance models. ``tissue`` is the tissue mask the tiles were planned over
    (None: every pixel counts), which the heatmap is read through."""

    folder: Path
    kind: str
    classes: MapFile
    probs: MapFile | None = None
    instances: MapFile | None = None
    scores: MapFile | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    tissue: TissueMask | None = None

    @classmethod
    def create(cls, folder: str | os.PathLike[str], shape: tuple[int, int], num_classes: int,
               kind: str) -> MapSet:
        """New zero maps of ``shape`` (H, W) in ``folder`` (``kind``: pixel or instance)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        h, w = shape
        cls_dtype = np.uint8 if num_classes <= 255 else np.uint16
        classes = MapFile.create(folder / "classes.npy", (h, w), cls_dtype)
        paths = {"classes": classes.path}
        if kind == "instance":
            inst = MapFile.create(folder / "instances.npy", (h, w), np.int32)
            scores = MapFile.create(folder / "scores.npy", (h, w), np.uint8)
            paths.update(instances=inst.path, scores=scores.path)
            return cls(folder, kind, classes, instances=inst, scores=scores, paths=paths)
        probs = MapFile.create(folder / "probs.npy", (num_classes, h, w), np.uint8)
        paths["probs"] = probs.path
        return cls(folder, kind, classes, probs=probs, paths=paths)

    @classmethod
    def open(cls, folder: str | os.PathLike[str], *, writable: bool = False) -> MapSet:
        """Open the maps of a folder (read-only unless ``writable``)."""
        folder = Path(folder)
        classes = MapFile.open(folder / "classes.npy", writable=writable)
        if (folder / "instances.npy").exists():
            return cls(folder, "instance", classes,
                       instances=MapFile.open(folder / "instances.npy", writable=writable),
                       scores=MapFile.open(folder / "scores.npy", writable=writable),
                       paths={n: folder / f"{n}.npy" for n in ("classes", "instances",
                                                              "scores")})
        return cls(folder, "pixel", classes,
                   probs=MapFile.open(folder / "probs.npy", writable=writable),
                   paths={n: folder / f"{n}.npy" for n in ("classes", "probs")})

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the maps."""
        return self.classes.height, self.classes.width

    def close(self) -> None:
        """Close every file."""
        for m in (self.classes, self.probs, self.instances, self.scores):
            if m is not None:
                m.close()


class Stitcher:
    """Writes tile outputs of a :class:`TilePlan` into a :class:`MapSet`, band by band."""

    def __init__(self, plan: TilePlan, maps: MapSet, num_classes: int,
                 rows: tuple[int, int] | None = None) -> None:
        """``rows``: write only map rows ``[r0, r1)`` (one rank's band of a shared slide,
        :meth:`TilePlan.row_bands`); every pixel there gets exactly what the whole-slide
        stitcher would give it, as long as the tiles of :meth:`TilePlan.for_rows` come."""
        self.plan = plan
        self.maps = maps
        self.num_classes = num_classes
        self.mode = plan.mode
        self.h, self.w = plan.map_height, plan.map_width
        if maps.shape != (self.h, self.w):
            raise ValueError(f"maps are {maps.shape}, the plan needs {(self.h, self.w)}")
        self.r_begin, self.r_end = (0, self.h) if rows is None else rows
        if not 0 <= self.r_begin <= self.r_end <= self.h:
            raise ValueError(f"rows {rows} are not within the map's {self.h} rows")
        if rows is not None and self.mode == "instance":
            raise ValueError("instance maps are stitched whole (objects cross bands)")
        self.cap = max(1, plan.write_end(0) - plan.write_start(0))
        self.base = self.r_begin
        self.row = -1
        self.next_id = 1
        shape = (self.cap, self.w)
        self.cls = np.zeros(shape, dtype=maps.classes.dtype)
        if self.mode == "instance":
            self.inst = np.zeros(shape, dtype=np.int32)
            self.score = np.zeros(shape, dtype=np.uint8)
        elif self.mode == "blend":
            self.acc = np.zeros((num_classes, *shape), dtype=np.float32)
            self.wsum = np.zeros(shape, dtype=np.float32)
            w1 = hann_window(plan.valid, plan.margin)
            self.window = np.outer(w1, w1)
        else:
            self.probs = np.zeros((num_classes, *shape), dtype=np.uint8)

    # -------------------------------------------------------------------------- rows
    def _advance(self, j: int) -> None:
        if j < self.row:
            raise ValueError(f"tiles must come in raster order (row {j} after {self.row})")
        if j > self.row:
            self._flush(min(max(self.plan.write_start(j), 0), self.r_end))
            self.row = j

    def _flush(self, upto: int) -> None:
        n = upto - self.base
        if n <= 0:
            return
        m = self.maps
        if self.mode == "blend":
            wsum = self.wsum[:n]
            probs = self.acc[:, :n] / np.maximum(wsum, 1e-12)
            probs[:, wsum <= 0] = 0.0
            cls = probs.argmax(axis=0).astype(self.cls.dtype)
            cls[wsum <= 0] = 0
            q = np.clip(np.floor(probs * 255.0 + 0.5), 0, 255).astype(np.uint8)
            m.classes.write_rows(self.base, cls)
            assert m.probs is not None
            for c in range(self.num_classes):
                m.probs.write_rows(self.base, q[c], channel=c)
            self._shift(self.acc, n)
            self._shift(self.wsum, n)
        elif self.mode == "instance":
            assert m.instances is not None and m.scores is not None
            m.classes.write_rows(self.base, self.cls[:n])
            m.instances.write_rows(self.base, self.inst[:n])
            m.scores.write_rows(self.base, self.score[:n])
            self._shift(self.cls, n)
            self._shift(self.inst, n)
            self._shift(self.score, n)
        else:
            assert m.probs is not None
            m.classes.write_rows(self.base, self.cls[:n])
            for c in range(self.num_classes):
                m.probs.write_rows(self.base, self.probs[c, :n], channel=c)
            self._shift(self.cls, n)
            self._shift(self.probs, n)
        self.base = upto

    @staticmethod
    def _shift(arr: np.ndarray, n: int) -> None:
        rows = arr.shape[-2]
        if n >= rows:
            arr[...] = 0
            return
        arr[..., :rows - n, :] = arr[..., n:, :]
        arr[..., rows - n:, :] = 0

    def _window(self, i: int, j: int, lo: int, hi: int) -> tuple[slice, slice, slice, slice]:
        """Buffer rows/cols and tile rows/cols of tile (i, j)'s output pixels [lo, hi)."""
        ox, oy = self.plan.origin(i, j)
        r0 = max(oy + lo, 0, self.base)
        r1 = max(min(oy + hi, self.r_end), r0)
        c0 = max(ox + lo, 0)
        c1 = max(min(ox + hi, self.w), c0)  # empty (not negative) beyond the map
        if r1 > self.base + self.cap:
            raise ValueError("tile writes beyond the band (tiles out of order?)")
        return (slice(r0 - self.base, r1 - self.base), slice(c0, c1),
                slice(r0 - oy, r1 - oy), slice(c0 - ox, c1 - ox))

    # -------------------------------------------------------------------------- tiles
    def add(self, i: int, j: int, probs: np.ndarray, classes: np.ndarray | None = None) -> None:
        """One pixel/patch tile: ``probs`` ``(C, P, P)`` (uint8 for center, float for blend)
        and, for center mode, its ``classes`` ``(P, P)`` (argmax)."""
        self._advance(j)
        p = self.plan
        if self.mode == "blend":
            br, bc, tr, tc = self._window(i, j, p.margin, p.margin + p.valid)
            wgt = self.window[tr, tc]
            self.acc[:, br, bc] += probs[:, tr, tc].astype(np.float32) * wgt
            self.wsum[br, bc] += wgt
            return
        br, bc, tr, tc = self._window(i, j, p.margin, p.margin + p.valid)
        self.probs[:, br, bc] = probs[:, tr, tc]
        if classes is None:
            classes = probs.argmax(axis=0)
        self.cls[br, bc] = classes[tr, tc]

    def add_instances(self, i: int, j: int, masks: np.ndarray, labels: np.ndarray,
                      scores: np.ndarray) -> int:
        """One instance tile: boolean ``masks`` ``(K, P, P)``, class ``labels`` and ``scores``
        in [0, 1]. Keeps the objects whose centroid is in the tile's valid part; returns how
        many were painted."""
        self._advance(j)
        p = self.plan
        ox, oy = p.origin(i, j)
        vx, vy = p.valid_start(i), p.valid_start(j)
        br, bc, tr, tc = self._window(i, j, 0, p.tile_out)
        kept = 0
        for k in range(masks.shape[0]):
            mk = masks[k]
            ys, xs = np.nonzero(mk)
            if len(xs) == 0:
                continue
            cx = math.floor(ox + xs.mean() + 0.5)
            cy = math.floor(oy + ys.mean() + 0.5)
            if not (vx <= cx < vx + p.valid and vy <= cy < vy + p.valid
                    and 0 <= cx < self.w and 0 <= cy < self.h):
                continue
            sub = mk[tr, tc]
            free = sub & (self.inst[br, bc] == 0)
            if not free.any():
                continue
            self.inst[br, bc][free] = self.next_id
            self.cls[br, bc][free] = int(labels[k])
            self.score[br, bc][free] = int(np.clip(np.floor(float(scores[k]) * 255 + 0.5),
                                                   0, 255))
            self.next_id += 1
            kept += 1
        return kept

    def finish(self) -> None:
        """Write every remaining row (of the band)."""
        self._flush(self.r_end)


def resample_map(arr: np.ndarray, src_ds: float, dst_shape: tuple[int, int],
                 dst_ds: float) -> np.ndarray:
    """Bilinear resampling of a ``(C, h, w)`` map whose pixel (c, r) covers level-0
    ``[c·src_ds, (c+1)·src_ds)`` onto a ``dst_shape`` grid of ``dst_ds`` pixels (edges
    clamped); H2G-Net's heatmap -> refinement input, in training and inference alike."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    src = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    h, w = arr.shape[-2:]
    dh, dw = dst_shape
    xs = ((torch.arange(dw, dtype=torch.float64) + 0.5) * dst_ds / src_ds) / w * 2 - 1
    ys = ((torch.arange(dh, dtype=torch.float64) + 0.5) * dst_ds / src_ds) / h * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None].float()
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    result: np.ndarray = out[0].numpy()
    return result
