"""The data loaders of training: qpseg errors carried out of loader workers as one-line
errors, mid-epoch resume without re-reading tiles, the number of loader workers, and this
rank's validation items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from qpseg.errors import QpsegError

if TYPE_CHECKING:
    from qpseg.training.distributed import Dist
    from qpseg.training.stage import StageSpec


class _SafeDataset:
    """Turns a qpseg error in a loader worker into a marker the main process re-raises as the
    same one-line error (DataLoader would re-raise it wrapped in the worker's traceback)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except QpsegError as exc:
            return {"__error__": (type(exc).__name__, exc.message,
                                  None if exc.path is None else str(exc.path))}


def _collate(items: list[Any]) -> Any:
    from torch.utils.data import default_collate

    for it in items:
        if isinstance(it, dict) and "__error__" in it:
            return {"__error__": it["__error__"]}
    return default_collate(items)


def _raise_worker_error(info: tuple[str, str, str | None]) -> None:
    import qpseg.errors as errors

    cls = getattr(errors, info[0], None)
    if not (isinstance(cls, type) and issubclass(cls, QpsegError)):
        cls = QpsegError
    raise cls(info[1], info[2])


class _SkipSampler:
    """Yields ``inner``'s indices after skipping the first ``skip`` (resuming mid-epoch without
    reading the tiles already trained on); ``limit`` caps how many are yielded."""

    def __init__(self, inner: Any, limit: int) -> None:
        self.inner = inner
        self.skip = 0
        self.limit = limit

    def __len__(self) -> int:
        return max(0, self.limit - self.skip)

    def __iter__(self) -> Any:
        import itertools

        return itertools.islice(iter(self.inner), self.skip, self.limit)


def _workers(value: Any, device: Any, world: int) -> int:
    """``data.workers``: an int, or ``auto``: 0 on CPU (decoding in the training process is
    fastest when the CPU also runs the model), else up to 8 per GPU process (pedersen2022
    §3.4 generated batches with eight workers)."""
    if value != "auto":
        return int(value)
    if device.type != "cuda":
        return 0
    import os

    return max(1, min(8, (os.cpu_count() or 2) // max(1, world) - 1))


def _val_indices(spec: StageSpec, dist: Dist, seed: int) -> list[int] | None:
    """This rank's validation items (a fixed subset when ``sampler.val_samples`` is set)."""
    import numpy as np

    if spec.val_ds is None or len(spec.val_ds) == 0:
        return None
    n = len(spec.val_ds)
    idx = np.arange(n)
    cap = spec.cfg["sampler"]["val_samples"]
    if cap is not None and cap < n:
        idx = np.sort(np.random.default_rng([seed, 7]).permutation(n)[: int(cap)])
    return [int(i) for i in idx[dist.rank::dist.world_size]]


def _loader(ds: Any, indices: Sequence[int], batch_size: int, workers: int, pin: bool) -> Any:
    import torch

    return torch.utils.data.DataLoader(
        cast(Any, _SafeDataset(ds)), batch_size=batch_size, sampler=list(indices),
        num_workers=workers,
        collate_fn=_collate, pin_memory=pin, drop_last=False,
        generator=torch.Generator().manual_seed(0))
