"""Sharding slides over processes (``torchrun``) and machines (``--shard i/n``).

Under ``torchrun --nproc-per-node N -m qpseg infer ...`` every process reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment, joins a ``gloo`` process group (only
small Python objects are exchanged, so gloo serves CPU and GPU runs alike) and takes its share
of the slides; rank 0 gathers the per-slide results and writes the summary. A slide bigger
than a fair share (the shard's total over the number of ranks) is run by all ranks together:
each stitches its band of map rows into shared map files and rank 0 writes the objects
(``qpseg.engine.pipeline._process_shared``); every other slide is run whole by one rank. The
outputs are those of a single process either way.

``--shard i/n`` (0 <= i < n, e.g. a Slurm array index) splits the slides over independent
runs without any communication; combined with torchrun, shard ``i`` is split again over the
ranks. Slides are assigned by size (largest first, to the least loaded share; ties by
position), so shares finish at about the same time and the assignment depends only on the
slide list.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from qpseg._torchrun import Collectives, torchrun_env
from qpseg.errors import ConfigError

__all__ = [
    "DistContext",
    "assign_shares",
    "parse_shard",
    "setup_distributed",
]

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; None -> ``(0, 1)``. ConfigError otherwise."""
    if text is None or str(text).strip() == "":
        return 0, 1
    m = _SHARD_RE.match(str(text))
    if not m:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/4), not {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= i < n")
    return i, n


def assign_shares(sizes: Sequence[float], count: int) -> list[list[int]]:
    """Indices of ``sizes`` split into ``count`` shares, largest first to the lightest share.

    Deterministic: ties go to the lower index and the lower share. Each share lists its indices
    in increasing order (the order the slides were given).
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    loads = [0.0] * count
    shares: list[list[int]] = [[] for _ in range(count)]
    for idx in sorted(range(len(sizes)), key=lambda k: (-float(sizes[k]), k)):
        s = min(range(count), key=lambda q: (loads[q], q))
        shares[s].append(idx)
        loads[s] += max(float(sizes[idx]), 1.0)
    return [sorted(s) for s in shares]


@dataclass
class DistContext(Collectives):
    """Where this process stands: its rank among ``world_size`` processes and its machine
    shard (collectives from :class:`qpseg._torchrun.Collectives`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    shard: tuple[int, int] = (0, 1)
    initialized_here: bool = False

    @property
    def share_index(self) -> int:
        """This process's share among ``shard[1] * world`` shares."""
        return self.shard[0] * self.world_size + self.rank

    @property
    def share_count(self) -> int:
        """Total number of shares."""
        return self.shard[1] * self.world_size

    def my_indices(self, sizes: Sequence[float]) -> list[int]:
        """Indices of the slides this process runs. The ``--shard`` split comes first (over
        the whole list), then the split of that shard over the ranks, so all ranks of shard
        ``i`` together run exactly what one process of shard ``i`` would run."""
        shard_i, shard_n = self.shard
        mine = assign_shares(sizes, shard_n)[shard_i]
        if self.world_size == 1:
            return mine
        sub = assign_shares([sizes[k] for k in mine], self.world_size)[self.rank]
        return [mine[k] for k in sub]

    def plan_work(self, sizes: Sequence[float], *, splittable: bool = True
                  ) -> tuple[list[int], list[int]]:
        """``(together, mine)``: slides every rank of this shard runs together (their tiles
        split by rows), and the slides this rank runs alone.

        Without ``splittable`` (or with one rank) this is ``([], my_indices(sizes))``.
        Otherwise a slide of this shard bigger than the shard's total divided by the number
        of ranks - which would leave the other ranks idle while one works through it - is
        shared; the rest are spread over the ranks as :meth:`my_indices` does.
        """
        if not splittable or self.world_size == 1:
            return [], self.my_indices(sizes)
        shard_i, shard_n = self.shard
        shard = assign_shares(sizes, shard_n)[shard_i]
        fair = sum(max(float(sizes[k]), 1.0) for k in shard) / self.world_size
        together = [k for k in shard if float(sizes[k]) > fair]
        alone = [k for k in shard if k not in together]
        sub = assign_shares([sizes[k] for k in alone], self.world_size)[self.rank]
        return together, [alone[k] for k in sub]


def setup_distributed(shard: str | tuple[int, int] | None = None, *,
                      timeout_s: float = 7200.0) -> DistContext:
    """The :class:`DistContext` of this process; joins a gloo process group under torchrun.

    ``timeout_s`` bounds how long a rank waits for the others at the final gather (one slide
    can take a while on a slow machine).
    """
    sh = shard if isinstance(shard, tuple) else parse_shard(shard)
    if not (0 <= sh[0] < sh[1]):
        raise ConfigError(f"shard {sh} must satisfy 0 <= i < n")
    rank, world, local = torchrun_env()
    ctx = DistContext(rank, world, local, sh)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                raise ConfigError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set "
                                  "(start with torchrun)")
            dist.init_process_group("gloo", rank=rank, world_size=world,
                                    timeout=_dt.timedelta(seconds=timeout_s))
            ctx.initialized_here = True
    return ctx
