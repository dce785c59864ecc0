"""The ``torchrun`` environment and the collectives training and inference share.

``torchrun`` gives every process ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the
run is one process and every collective below is the identity, so callers have one code path.
Training (:mod:`qpseg.training.distributed`) and inference (:mod:`qpseg.engine.distributed`)
each add what they need on top: the device and NCCL/gloo choice, or the slide shares.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from qpseg.errors import ConfigError

__all__ = ["Collectives", "env_int", "torchrun_env"]

T = TypeVar("T")


def env_int(name: str, default: int) -> int:
    """An integer environment variable (``default`` when unset or empty); ConfigError if not
    an integer."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def torchrun_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` without
    it); ConfigError when they are inconsistent."""
    world = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local = env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


class Collectives:
    """Object collectives over the default process group, the identity for one process.

    Subclasses (dataclasses) provide ``rank``, ``world_size`` and ``initialized_here`` (True
    when this process created the group and so must destroy it).
    """

    rank: int
    world_size: int
    initialized_here: bool

    @property
    def distributed(self) -> bool:
        """True when several processes cooperate through a process group."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes the run's files and reports progress."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process."""
        if self.distributed:
            import torch.distributed as tdist

            tdist.barrier()

    def all_gather(self, value: T) -> list[T]:
        """Every process's ``value``, in rank order (``[value]`` for one process)."""
        if not self.distributed:
            return [value]
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, value)
        return out

    def broadcast(self, value: T, src: int = 0) -> T:
        """Rank ``src``'s ``value`` on every process."""
        if not self.distributed:
            return value
        import torch.distributed as tdist

        box: list[Any] = [value]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def close(self) -> None:
        """Leave the process group if this process created it."""
        if self.initialized_here:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()
            self.initialized_here = False
