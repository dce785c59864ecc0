"""Which tiles a stage trains on: the sampler the config names (uniform, focusing, boosting,
hierarchical), sharded by slide over the ranks, and khalil2022's boosting update at the end of
each round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError
from qpseg.training.batches import _loader, _raise_worker_error
from qpseg.training.validation import _unwrap

if TYPE_CHECKING:
    from qpseg.training.distributed import Dist
    from qpseg.training.stage import StageSpec
    from qpseg.training.task import Task


def _sampler(spec: StageSpec, dist: Dist, seed: int) -> tuple[Any, Any]:
    """(sampler, boosting weights or None) of a stage, sharded by slide over the ranks."""
    import numpy as np

    from qpseg.data.samplers import (
        BoostedSetSampler,
        BoostingWeights,
        DistributedSlideSampler,
        FocusingSampler,
        HierarchicalSampler,
        UniformTileSampler,
        rank_indices,
    )

    sa = spec.cfg["sampler"]
    tiles = spec.sampler_tiles
    name = sa["name"]
    per_epoch = sa["samples_per_epoch"]
    world, rank = dist.world_size, dist.rank
    subsets: list[list[int] | None] = [None]
    if world > 1:
        subsets = [rank_indices(tiles, world, r) for r in range(world)]
    mine = subsets[rank] if world > 1 else None
    frac = np.array([t.labelled_fraction for t in tiles])

    def eligible(sub: list[int] | None, low: float) -> int:
        idx = np.arange(len(tiles)) if sub is None else np.asarray(sub, dtype=np.int64)
        return int(((frac[idx] >= low) & (frac[idx] > 0)).sum()) if len(idx) else 0

    def count(low: float) -> int | None:
        if per_epoch is not None:
            return max(1, int(per_epoch) // world)
        if world == 1:
            return None
        return max(eligible(s, low) for s in subsets)

    boost = None
    if name == "uniform":
        if world > 1 and per_epoch is None:
            return DistributedSlideSampler(tiles, num_replicas=world, rank=rank, seed=seed), None
        return UniformTileSampler(tiles, num_samples=count(0.0), seed=seed, subset=mine), None
    if name == "focusing":
        return FocusingSampler(tiles, gamma=float(sa["gamma"]), num_samples=count(sa["gamma"]),
                               seed=seed, subset=mine), None
    if name == "boosting":
        if spec.task.output != "pixel":
            raise ConfigError("boosting (khalil2022) needs a dense (pixel) model")
        boost = BoostingWeights(tiles, gamma=float(sa["gamma"]), chi=float(sa["chi"]))
        # §3.2.3: an epoch is the enlarged training set T_h, every tile l_e times.
        shards = [s for s in subsets if s is not None] if world > 1 else None
        return BoostedSetSampler(boost, seed=seed, subsets=shards, rank=rank), boost
    # hierarchical (pedersen2022 §2.3)
    n = count(0.0)
    if n is None:
        n = len(tiles)
    return HierarchicalSampler(tiles, list(spec.slide_groups), num_samples=n, seed=seed,
                               subset=mine, min_class_pixels=int(sa["min_class_pixels"])), None


def _boost(boost: Any, spec: StageSpec, task: Task, model: Any, dist: Dist,
           state: dict[str, Any], batch_size: int, workers: int, amp_dtype: Any,
           device: Any) -> int:
    """khalil2022 eq. (2) after round h: error fractions of θ_h on the tiles (re-predicted, or
    recorded from the training batches), gathered over ranks, then ``l_e += χ``; returns how
    many tiles were hard."""
    import numpy as np
    import torch

    from qpseg.data.samplers import error_fractions

    if spec.cfg["sampler"]["boost_eval"] == "batches":
        pos, err = list(state["boost_pos"]), list(state["boost_err"])
        state["boost_pos"], state["boost_err"] = [], []
    else:
        eligible = [int(i) for i in np.nonzero(boost.weights > 0)[0]]
        mine = eligible[dist.rank::dist.world_size]
        pos, err = [], []
        net = _unwrap(model)
        net.eval()
        with torch.no_grad():
            for batch in _loader(spec.train_ds, mine, batch_size, workers, device.type == "cuda"):
                if "__error__" in batch:
                    _raise_worker_error(batch["__error__"])
                prep = task.prepare(batch, train=False)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    pred = net(*prep.inputs).argmax(1)
                pos.extend(int(i) for i in prep.positions)
                err.extend(float(e) for e in error_fractions(pred, prep.target, task.ignore))
        net.train()
    gathered = dist.all_gather((pos, err))
    all_pos = [p for g in gathered for p in g[0]]
    all_err = [e for g in gathered for e in g[1]]
    return int(boost.update(all_pos, all_err)) if all_pos else 0
