"""Reading the tiles of a :class:`~qpseg.engine.tiling.TilePlan` in the background.

:class:`TileDataset` reads every input of one tile through :meth:`Slide.read_region_mpp` (so
non-integer downsamples and bounds offsets are handled in one place) and returns them as uint8
``(H, W, 3)`` tensors: the upload to the GPU stays 4x smaller than float, and ``permute`` of a
stacked ``(N, H, W, 3)`` batch *is* a channels-last tensor. The slide is opened lazily in the
process that reads (one handle per DataLoader worker, never shared across a fork).

:func:`iterate_batches` yields ``(indices, inputs)`` batches in plan order: with ``workers > 0``
through a torch ``DataLoader`` (decoding in worker processes, pinned memory on CUDA), with
``workers == 0`` from one background thread (OpenSlide and Pillow release the GIL while they
decode, so reading still overlaps the model). Read errors come back as one-line
:class:`~qpseg.errors.SlideError`, not as a worker's traceback.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from qpseg.errors import QpsegError, SlideError

if TYPE_CHECKING:  # pragma: no cover
    from qpseg.engine.tiling import TilePlan
    from qpseg.slide import Slide

__all__ = ["Opener", "TileDataset", "collate_tiles", "iterate_batches"]

Opener = Callable[[Path, "float | None"], "Slide"]
#: Upper bound of the bytes of tile batches read ahead of the model.
PREFETCH_BYTES = 1 << 30


def _default_opener(path: Path, mpp: float | None) -> Slide:
    from qpseg.slide import open_slide

    return open_slide(path, mpp=mpp)


class TileDataset(Dataset[tuple[int, str, tuple[torch.Tensor, ...]]]):
    """The tiles of a plan: item ``k`` is ``(k, error, inputs)`` with one uint8 ``(S, S, 3)``
    tensor per model input (``error`` is "" or the one-line reason the read failed)."""

    def __init__(self, slide_path: str | os.PathLike[str], plan: TilePlan, *,
                 mpp: float | None = None, opener: Opener | None = None) -> None:
        self.path = Path(slide_path)
        self.plan = plan
        self.mpp = mpp
        self.opener = opener or _default_opener
        self._slide: Slide | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.plan.n_tiles

    def _open(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():
            self._slide = self.opener(self.path, self.mpp)
            self._pid = os.getpid()
        return self._slide

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slide"] = None  # a handle never crosses a process boundary
        state["_pid"] = -1
        return state

    def read(self, k: int) -> tuple[torch.Tensor, ...]:
        """The inputs of tile ``k`` (raises SlideError)."""
        i, j = (int(v) for v in self.plan.tiles[k])
        slide = self._open()
        out = []
        for x, y, size, mpp in self.plan.reads(i, j):
            out.append(torch.from_numpy(slide.read_region_mpp(x, y, size, size, mpp)))
        return tuple(out)

    def __getitem__(self, k: int) -> tuple[int, str, tuple[torch.Tensor, ...]]:
        try:
            return k, "", self.read(k)
        except QpsegError as exc:
            blank = tuple(torch.zeros((r.size_px, r.size_px, 3), dtype=torch.uint8)
                          for r in self.plan.inputs)
            return k, " ".join(str(exc.message).split()) or type(exc).__name__, blank

    def close(self) -> None:
        """Close this process's slide handle."""
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def collate_tiles(items: list[tuple[int, str, tuple[torch.Tensor, ...]]]
                  ) -> tuple[torch.Tensor, list[str], tuple[torch.Tensor, ...]]:
    """Stack items into ``(indices, errors, inputs)`` with ``(N, S, S, 3)`` uint8 inputs."""
    idx = torch.tensor([it[0] for it in items], dtype=torch.int64)
    errors = [it[1] for it in items if it[1]]
    n_inputs = len(items[0][2])
    inputs = tuple(torch.stack([it[2][m] for it in items]) for m in range(n_inputs))
    return idx, errors, inputs


def _thread_batches(dataset: TileDataset, batch_size: int, pin: bool, depth: int
                    ) -> Iterator[tuple[torch.Tensor, list[str], tuple[torch.Tensor, ...]]]:
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for a in range(0, len(dataset), batch_size):
                if stop.is_set():
                    return
                batch = collate_tiles([dataset[k] for k in
                                       range(a, min(len(dataset), a + batch_size))])
                q.put(batch)
            q.put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            q.put(exc)

    t = threading.Thread(target=produce, name="qpseg-tile-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            if pin:
                idx, errors, inputs = item
                item = (idx, errors, tuple(x.pin_memory() for x in inputs))
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)
        dataset.close()


def iterate_batches(dataset: TileDataset, *, batch_size: int, workers: int = 0,
                    pin_memory: bool = False, prefetch: int = 4
                    ) -> Generator[tuple[torch.Tensor, tuple[torch.Tensor, ...]], None, None]:
    """Batches ``(indices, inputs)`` of the dataset in order; a failed read raises SlideError.

    At most ``prefetch`` batches per worker (and :data:`PREFETCH_BYTES` in all) are read
    ahead of the consumer.
    """
    if len(dataset) == 0:
        return
    # Batches waiting in memory stay under PREFETCH_BYTES whatever the tile size.
    batch_bytes = batch_size * sum(3 * r.size_px ** 2 for r in dataset.plan.inputs)
    source: Any
    if workers > 0:
        per_worker = max(1, min(prefetch, PREFETCH_BYTES // max(1, workers * batch_bytes)))
        source = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                            num_workers=workers, collate_fn=collate_tiles,
                            pin_memory=pin_memory, prefetch_factor=per_worker,
                            persistent_workers=False)
    else:
        depth = max(1, min(prefetch, PREFETCH_BYTES // max(1, batch_bytes)))
        source = _thread_batches(dataset, batch_size, pin_memory, depth)
    try:
        for idx, errors, inputs in source:
            if errors:
                raise SlideError(errors[0], dataset.path)
            yield idx, inputs
    finally:
        close = getattr(source, "close", None)
        if callable(close):
            close()
