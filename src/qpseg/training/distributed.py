"""One process or many: ``torchrun`` environment, process group, device, collectives.

Under ``torchrun --nproc-per-node N -m qpseg train ...`` every process reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` and joins a process group: NCCL when it trains on CUDA, gloo
on CPU (``QPSEG_DIST_BACKEND`` overrides). Without those variables the run is a single process
and every collective here is the identity, so the training loop has one code path.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from qpseg.devices import resolve_device
from qpseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["Dist", "resolve_device", "setup"]

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


@dataclass
class Dist:
    """This process's place in the run; with one process every collective is the identity."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and reports progress."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op for one process)."""
        if self.distributed:
            import torch.distributed as tdist

            tdist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place over all processes and return it."""
        if self.distributed:
            import torch.distributed as tdist

            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: T) -> list[T]:
        """Every process's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s ``obj`` on every process."""
        if not self.distributed:
            return obj
        import torch.distributed as tdist

        box: list[Any] = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def close(self) -> None:
        """Leave the process group if this process created it."""
        if self.initialized_here:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()
            self.initialized_here = False


def setup(device: str = "auto") -> Dist:
    """Join the ``torchrun`` process group (when ``WORLD_SIZE`` > 1) and pick the device."""
    import torch

    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    dev = resolve_device(device, local)
    out = Dist(rank=rank, world_size=world, local_rank=local, device=dev)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = os.environ.get("QPSEG_DIST_BACKEND") or (
                "nccl" if dev.type == "cuda" else "gloo")
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30))
            out.initialized_here = True
        elif dist.get_world_size() != world:
            raise ConfigError("the process group does not match WORLD_SIZE")
    return out
