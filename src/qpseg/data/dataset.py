"""A torch ``Dataset`` that reads training tiles from the slides on the fly.

Each item is a dict:

* ``"image"``: ``(3, S, S)`` float32 in [0, 1] (or normalised with ``mean``/``std``), the first
  view: ``S = tile_px + 2 * context_px`` at ``mpp``, centred on the target tile;
* ``"inputs"``: a list with one such tensor per entry of ``scales``, all centred on the target
  (``inputs[0]`` is ``image``). ho2021 §2.2: the DMMN target is 256 px at 20x, and its inputs are
  the central 256 px at 20x, the central 512 px at 10x and the whole 1024 px region at 5x, each
  256 px: ``scales=(1, 2, 4)`` reads view ``k`` at ``mpp * scales[k]``, ``tile_px`` pixels wide,
  so ``model(*batch["inputs"])`` matches the model contract's input order;
* ``"label"``: ``(tile_px, tile_px)`` int64 class indices of the target, ``ignore_index`` (255)
  where unlabelled (:func:`qpseg.labels.rasterize_labels`);
* ``"instances"`` (``target="instance"`` only): ``(tile_px, tile_px)`` int64 instance ids
  (0 = background, 1..K in object order) from cells/detections (the nucleus geometry when the
  object has one); ``"label"`` then holds each nucleus's class (``default_instance_class`` for
  unclassified ones) and 0 elsewhere;
* ``"meta"``: ``index``, ``tile``, ``slide``, ``x``, ``y`` (QuPath level-0 top-left of the target),
  ``elastic`` (an ho2021 §2.3 class-balancing copy still to be deformed) and ``skipped``.

Slides are opened lazily in the process that reads them and cached per process (at most
``max_open`` handles), so the dataset is safe with ``DataLoader`` workers, fork or spawn: a
forked worker never uses its parent's handles. A slide that fails to read raises
:class:`~qpseg.errors.SlideError` naming the slide (``on_error="raise"``), or is skipped with a
:class:`~qpseg.data.DataWarning` and another tile is returned (``on_error="skip"``). Foreign
exceptions are never let out of ``__getitem__``.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError, LabelError, QpsegError, SlideError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from qpseg.data.grid import SlideRecord, Tile
    from qpseg.labels import ClassMap
    from qpseg.qupath.geojson import QuPathObject
    from qpseg.slide import Slide

__all__ = ["ON_ERROR", "TARGETS", "TileDataset", "rasterize_instances"]

ON_ERROR: tuple[str, ...] = ("raise", "skip")
TARGETS: tuple[str, ...] = ("semantic", "instance")
#: ImageNet statistics, the usual normalisation of pretrained encoders.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rasterize_instances(
    objects: Sequence[QuPathObject],
    region: tuple[float, float, int, int],
    mpp: float,
    class_map: ClassMap,
    *,
    base_mpp: float,
    default_class: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance id map (int32, 0 = background, 1..K) and class map (uint8) of nuclei.

    ``region`` follows :func:`qpseg.labels.rasterize_labels` (QuPath level-0 top-left, output
    size at ``mpp``); a pixel belongs to an object when its centre lies inside the object's
    nucleus geometry (or geometry when it has none). Later objects win where they overlap.
    Objects whose class is not in ``class_map`` get ``default_class``.
    """
    import numpy as np
    from shapely.geometry import box

    from qpseg.labels import fill_mask

    x0, y0, width, height = region
    if width <= 0 or height <= 0:
        raise LabelError(f"instance region must have a positive size, got {width}x{height}")
    ds = float(mpp) / float(base_mpp)
    shape = (int(height), int(width))
    inst = np.zeros(shape, dtype=np.int32)
    cls = np.zeros(shape, dtype=np.uint8)
    window = box(x0 - ds, y0 - ds, x0 + (width + 1) * ds, y0 + (height + 1) * ds)
    k = 0
    for obj in objects:
        geom = obj.nucleus_geometry if obj.nucleus_geometry is not None else obj.geometry
        if geom is None or geom.is_empty or not geom.intersects(window):
            continue
        if not geom.is_valid:
            from shapely import make_valid

            geom = make_valid(geom)
        m = fill_mask(shape, geom.intersection(window), x0, y0, ds)
        if not m.any():
            continue
        k += 1
        inst[m] = k
        idx = class_map.index_of(obj.classification)
        cls[m] = default_class if idx is None or idx == 0 else idx
    return inst, cls


class TileDataset:
    """Training tiles read on the fly (see the module docstring for the item layout).

    Args:
        slides: the slides (``Tile.slide`` indexes this list).
        tiles: the tiles (:func:`qpseg.data.grid.build_tiles`).
        class_map: label classes.
        tile_px, mpp: target tile size (pixels) and pixel size (µm/px).
        scales: pixel size of each view relative to ``mpp`` (``(1, 2, 4)`` for DMMN).
        context_px: extra pixels on each side of view 0 (FCN-32s with context: 100).
        target: ``"semantic"`` (class labels) or ``"instance"`` (nuclei instance maps).
        mean, std: per-channel normalisation applied last (None: keep [0, 1]).
        normalizer: ``uint8 (H, W, 3) -> uint8 (H, W, 3)`` colour normaliser run on every view
            (e.g. :meth:`qpseg.data.stain.MacenkoNormalizer.transform`).
        transform: ``sample -> sample`` run last on CPU (e.g. a per-sample augmentation).
        elastic: deformation applied here to class-balancing copies (ho2021 §2.3); without
            it copies are only flagged (``meta["elastic"]``) for a batched GPU augmentation.
        items: ``(tile_index, copy)`` pairs to serve (default: every tile once, copy 0); copies
            > 0 are elastic copies (:func:`qpseg.data.samplers.class_balance_items`).
        on_error: ``"raise"`` or ``"skip"`` (see module docstring).
        max_open: slide handles kept open per process.
        default_instance_class: class of unclassified nuclei in instance mode.
    """

    def __init__(
        self,
        slides: Sequence[SlideRecord],
        tiles: Sequence[Tile],
        class_map: ClassMap,
        *,
        tile_px: int,
        mpp: float,
        scales: Sequence[float] = (1.0,),
        context_px: int = 0,
        target: str = "semantic",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        normalizer: Callable[[np.ndarray], np.ndarray] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        elastic: Callable[..., Any] | None = None,
        items: Sequence[tuple[int, int]] | None = None,
        on_error: str = "raise",
        max_open: int = 32,
        default_instance_class: int = 1,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if target not in TARGETS:
            raise ConfigError(f"target must be one of {TARGETS}, got {target!r}")
        if tile_px < 1 or context_px < 0:
            raise ConfigError(f"tile_px must be >= 1 and context_px >= 0, got {tile_px}, "
                              f"{context_px}")
        from qpseg.slide import check_mpp

        mpp = check_mpp(mpp, "tile pixel size (mpp)", error=ConfigError)
        scales = tuple(float(s) for s in scales)
        if not scales or any(not (math.isfinite(s) and s > 0) for s in scales):
            raise ConfigError(f"scales must be positive numbers, got {scales!r}")
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std, or neither")
        if std is not None and any(s <= 0 for s in std):
            raise ConfigError(f"std must be positive, got {std!r}")
        for tile in tiles:
            if not 0 <= tile.slide < len(slides):
                raise ConfigError(f"tile refers to slide {tile.slide}, but there are "
                                  f"{len(slides)} slides")
        self.slides = list(slides)
        self.tiles = list(tiles)
        self.class_map = class_map
        self.tile_px = int(tile_px)
        self.mpp = float(mpp)
        self.scales = scales
        self.context_px = int(context_px)
        self.target = target
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        self.normalizer = normalizer
        self.transform = transform
        self.elastic = elastic
        self.items: list[tuple[int, int]] = (
            [(i, 0) for i in range(len(self.tiles))] if items is None
            else [(int(t), int(c)) for t, c in items])
        for t, _ in self.items:
            if not 0 <= t < len(self.tiles):
                raise ConfigError(f"item refers to tile {t}, but there are {len(self.tiles)}")
        self.on_error = on_error
        self.max_open = max(1, int(max_open))
        self.default_instance_class = int(default_instance_class)
        self._reset_process_state()

    # ------------------------------------------------------------------ per-process state
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._handles: OrderedDict[int, Slide] = OrderedDict()
        self._trees: dict[tuple[int, str], Any] = {}
        self._bad: set[int] = set()

    def _check_process(self) -> None:
        # A forked worker inherits the parent's handles: drop (never close) them and reopen.
        if os.getpid() != self._pid:
            self._reset_process_state()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        state["_trees"] = {}
        state["_bad"] = set()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def close(self) -> None:
        """Close the slide handles this process opened."""
        self._check_process()
        while self._handles:
            _, slide = self._handles.popitem()
            with contextlib.suppress(SlideError):
                slide.close()

    def _slide(self, index: int) -> Slide:
        from qpseg.slide import open_slide

        handle = self._handles.get(index)
        if handle is not None:
            self._handles.move_to_end(index)
            return handle
        rec = self.slides[index]
        handle = open_slide(rec.path, mpp=rec.mpp)
        self._handles[index] = handle
        while len(self._handles) > self.max_open:
            _, old = self._handles.popitem(last=False)
            with contextlib.suppress(SlideError):
                old.close()
        return handle

    def _objects_near(self, index: int, kind: str, window: Any) -> list[QuPathObject]:
        """Objects of a slide whose bounding box meets ``window``, in file order."""
        import numpy as np
        from shapely import STRtree

        rec = self.slides[index]
        objs = rec.annotations if kind == "annotations" else rec.detections
        if len(objs) < 8:
            return list(objs)
        key = (index, kind)
        tree = self._trees.get(key)
        if tree is None:
            tree = STRtree([o.geometry for o in objs])
            self._trees[key] = tree
        hits = np.sort(np.asarray(tree.query(window), dtype=np.int64))
        return [objs[int(i)] for i in hits]

    # ------------------------------------------------------------------------- geometry
    @property
    def input_sizes(self) -> tuple[int, ...]:
        """Side in pixels of every view (view 0 includes the context)."""
        return tuple(self.tile_px + 2 * self.context_px if k == 0 else self.tile_px
                     for k in range(len(self.scales)))

    @property
    def view_extents(self) -> tuple[float, ...]:
        """Side of every view relative to the target tile (physical size), e.g. (1, 2, 4)."""
        return tuple(size * s / self.tile_px for size, s in zip(self.input_sizes, self.scales,
                                                                 strict=True))

    @property
    def item_tiles(self) -> list[Tile]:
        """The tile of every item (what the samplers take: positions are item indices)."""
        return [self.tiles[t] for t, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    # ---------------------------------------------------------------------------- reading
    def _read(self, item: int, tile_index: int, copy: int) -> dict[str, Any]:
        import numpy as np
        import torch
        from shapely.geometry import box

        from qpseg.labels import rasterize_labels

        tile = self.tiles[tile_index]
        rec = self.slides[tile.slide]
        slide = self._slide(tile.slide)
        ds = self.mpp / rec.mpp
        side = self.tile_px * ds
        cx, cy = tile.x + side / 2, tile.y + side / 2
        views: list[torch.Tensor] = []
        for size, scale in zip(self.input_sizes, self.scales, strict=True):
            half = size * scale * ds / 2
            rgb = slide.read_region_mpp(cx - half, cy - half, size, size, self.mpp * scale)
            if self.normalizer is not None:
                rgb = np.asarray(self.normalizer(rgb), dtype=np.uint8)
            views.append(self._to_tensor(rgb))
        window = box(tile.x - ds, tile.y - ds, tile.x + side + ds, tile.y + side + ds)
        region = (tile.x, tile.y, self.tile_px, self.tile_px)
        sample: dict[str, Any] = {}
        if self.target == "instance":
            objs = self._objects_near(tile.slide, "detections", window)
            inst, cls = rasterize_instances(objs, region, self.mpp, self.class_map,
                                            base_mpp=rec.mpp,
                                            default_class=self.default_instance_class)
            sample["instances"] = torch.from_numpy(inst.astype(np.int64))
            label = cls
        else:
            anns = self._objects_near(tile.slide, "annotations", window)
            label = rasterize_labels(anns, region, self.mpp, self.class_map, base_mpp=rec.mpp)
        sample["image"] = views[0]
        sample["inputs"] = views
        sample["label"] = torch.from_numpy(label.astype(np.int64))
        sample["meta"] = {"index": item, "tile": tile_index, "slide": tile.slide,
                          "x": float(tile.x), "y": float(tile.y), "elastic": copy > 0,
                          "skipped": False}
        if copy > 0 and self.elastic is not None:
            sample = self._deform(sample)
        return sample

    def _to_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        import torch

        t = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean).view(-1, 1, 1)
            std = torch.tensor(self.std).view(-1, 1, 1)
            t = (t - mean) / std
        return t

    def _deform(self, sample: dict[str, Any]) -> dict[str, Any]:
        assert self.elastic is not None
        inputs = [v.unsqueeze(0) for v in sample["inputs"]]
        label = sample["label"].unsqueeze(0)
        extra = sample.get("instances")
        out_inputs, out_label, out_extra = self.elastic(
            inputs, label, extents=self.view_extents,
            instances=None if extra is None else extra.unsqueeze(0))
        sample["inputs"] = [v[0] for v in out_inputs]
        sample["image"] = sample["inputs"][0]
        sample["label"] = out_label[0]
        if out_extra is not None:
            sample["instances"] = out_extra[0]
        sample["meta"]["elastic"] = False  # done
        return sample

    def _fallback(self, item: int, attempt: int) -> int | None:
        """Another tile (from a slide not known to be bad), deterministic in (item, attempt)."""
        n = len(self.tiles)
        start = (self.items[item][0] + 1 + attempt * 7919) % n
        for step in range(n):
            t = (start + step) % n
            if self.tiles[t].slide not in self._bad:
                return t
        return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        from qpseg.data import DataWarning

        self._check_process()
        if not -len(self.items) <= index < len(self.items):
            raise IndexError(f"item {index} out of range ({len(self.items)} items)")
        index %= len(self.items)
        tile_index, copy = self.items[index]
        skipped = False
        for attempt in range(len(self.slides) + 1):
            tile = self.tiles[tile_index]
            rec = self.slides[tile.slide]
            cause: Exception
            try:
                sample = self._read(index, tile_index, copy)
            except QpsegError as exc:
                err: QpsegError = exc
                cause = exc
                if isinstance(exc, LabelError) and exc.path is None:
                    err = LabelError(exc.message, rec.annotation_file or rec.path)
            except Exception as exc:  # never let a foreign exception out of a worker
                cause = exc
                err = SlideError(
                    f"cannot read tile at ({tile.x:g}, {tile.y:g}): {type(exc).__name__}: "
                    f"{' '.join(str(exc).split())}", rec.path)
            else:
                if self.transform is not None:
                    sample = self.transform(sample)
                sample["meta"]["skipped"] = skipped
                return sample
            if err.path is None:  # every QpsegError subclass takes (message, path)
                err = type(err)(err.message, rec.path)
            if self.on_error == "raise":
                if err is cause:
                    raise err
                raise err from cause
            if tile.slide not in self._bad:
                self._bad.add(tile.slide)
                warnings.warn(f"{rec.path}: slide skipped for the rest of this run: "
                              f"{err.message}", DataWarning, stacklevel=2)
            nxt = self._fallback(index, attempt)
            if nxt is None:
                break
            tile_index, copy, skipped = nxt, 0, True
        raise QpsegError("every slide failed to read; nothing left to train on",
                         self.slides[self.tiles[self.items[index][0]].slide].path)

    # --------------------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        """Dataset summary for ``--dry-run``: slides, tiles, labelled pixels per class, the
        ignored fraction (from the tile grid's coarse histograms; nothing is read)."""
        n_classes = len(self.class_map)
        pixels = [0] * n_classes
        tiles_with = [0] * n_classes
        labelled = 0.0
        for tile_index, _ in self.items:
            t = self.tiles[tile_index]
            labelled += t.labelled_fraction
            for c, n in enumerate(t.class_hist[:n_classes]):
                pixels[c] += n
                tiles_with[c] += n > 0
        n = len(self.items)
        return {
            "slides": len({self.tiles[t].slide for t, _ in self.items}),
            "tiles": len(self.tiles),
            "items": n,
            "tile_px": self.tile_px,
            "mpp": self.mpp,
            "scales": list(self.scales),
            "context_px": self.context_px,
            "classes": {c.name: {"pixels": pixels[c.index], "tiles": tiles_with[c.index]}
                        for c in self.class_map.classes},
            "ignored_fraction": 1.0 - labelled / n if n else 0.0,
        }
