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
from typing import TYPE_CHECKING

from qpseg._torchrun import Collectives, torchrun_env
from qpseg.devices import resolve_device
from qpseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["Dist", "resolve_device", "setup"]


@dataclass
class Dist(Collectives):
    """This process's place in the run and its device (collectives from
    :class:`qpseg._torchrun.Collectives`; the identity for one process)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool = False

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place over all processes and return it."""
        if self.distributed:
            import torch.distributed as tdist

            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor


def setup(device: str = "auto") -> Dist:
    """Join the ``torchrun`` process group (when ``WORLD_SIZE`` > 1) and pick the device."""
    import torch

    rank, world, local = torchrun_env()
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
