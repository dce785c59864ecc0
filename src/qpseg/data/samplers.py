"""Which tiles a training epoch draws: uniform, focusing, boosting, hierarchical, by-slide shards.

Samplers yield positions in a sequence of :class:`~qpseg.data.grid.Tile` records, one per
dataset item (``TileDataset.item_tiles``), and plug into ``DataLoader(sampler=...)``. They are
deterministic functions of ``(seed, epoch)`` (call ``set_epoch`` every epoch, as with
``DistributedSampler``) and save/restore their state with ``state_dict``/``load_state_dict``, so
a resumed run draws exactly what the uninterrupted one would have.

* :class:`UniformTileSampler`: every labelled tile once per epoch, shuffled.
* :class:`FocusingSampler`: khalil2022 §3.2.4 focusing sampling: only tiles whose labelled
  fraction is at least γ = 0.05 (eq. 1), so unlabelled tissue is never a negative sample.
* :class:`BoostingWeights` + :class:`BoostedSetSampler`: khalil2022 §3.2.2-§3.2.3: weights
  start at 1 where ϑ >= γ and 0 elsewhere (eq. 1) and grow by χ for tiles whose error fraction
  is at least γ after a round (eq. 2); the next round trains on the enlarged set T_{h+1} in
  which every tile appears ``l_e`` times (the copies differ by the boosted augmentation), so
  an epoch grows with the weights. :class:`WeightedTileSampler` draws in proportion to weights
  with a fixed epoch size (kept for other uses).
* :class:`HierarchicalSampler`: pedersen2022 §2.3: uniform over groups (histological grade),
  then slides of the group, then classes present in the slide, then tiles of that class.
* :func:`class_balance_items`: ho2021 §2.3: ``r_c`` elastic copies of every tile whose highest
  ordered class is ``c``.
* :class:`DistributedSlideSampler`: DDP sharding by slide: every slide belongs to exactly one
  rank, and every rank yields the same number of items.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qpseg.data.grid import FOCUS_GAMMA
from qpseg.errors import ConfigError

if TYPE_CHECKING:
    from qpseg.data.grid import Tile

__all__ = [
    "BOOST_CHI",
    "BoostedSetSampler",
    "BoostingWeights",
    "DistributedSlideSampler",
    "FocusingSampler",
    "HierarchicalSampler",
    "UniformTileSampler",
    "WeightedTileSampler",
    "class_balance_items",
    "error_fractions",
    "rank_indices",
    "slide_shards",
]

#: khalil2022 eq. (2) adds χ to a hard tile's weight but gives no value; 1 adds one more copy of
#: a hard tile to the enlarged training set T_{h+1} (§3.2.3) per round it is hard.
BOOST_CHI = 1.0


class _EpochSampler:
    """Base: a seed, an epoch, and positions restricted to ``subset``."""

    def __init__(self, n: int, *, seed: int = 0, subset: Sequence[int] | None = None) -> None:
        self.seed = int(seed)
        self.epoch = 0
        pool = np.arange(n) if subset is None else np.asarray(sorted(set(subset)), np.int64)
        if len(pool) and (pool.min() < 0 or pool.max() >= n):
            raise ConfigError(f"subset positions must lie in [0, {n})")
        self._pool = pool

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw ``__iter__`` yields (as ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the same sequence."""
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])


class UniformTileSampler(_EpochSampler):
    """Each eligible tile once per epoch in a shuffled order (``num_samples`` more than the
    eligible count draws with replacement). Eligible: labelled fraction >= ``min_labelled``
    (and > 0)."""

    def __init__(
        self,
        tiles: Sequence[Tile],
        *,
        num_samples: int | None = None,
        seed: int = 0,
        subset: Sequence[int] | None = None,
        min_labelled: float = 0.0,
    ) -> None:
        super().__init__(len(tiles), seed=seed, subset=subset)
        frac = np.array([t.labelled_fraction for t in tiles], dtype=np.float64)
        pool = self._pool
        self.indices = pool[(frac[pool] >= min_labelled) & (frac[pool] > 0)] if len(pool) \
            else pool
        if len(self.indices) == 0:
            raise ConfigError(f"no tile has a labelled fraction >= {min_labelled:g}")
        self.num_samples = len(self.indices) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = self._rng()
        n = len(self.indices)
        if self.num_samples <= n:
            order = rng.permutation(n)[: self.num_samples]
        else:
            order = rng.integers(0, n, self.num_samples)
        return iter(int(i) for i in self.indices[order])


class FocusingSampler(UniformTileSampler):
    """khalil2022 §3.2.4 focusing sampling: uniform over tiles with labelled fraction >= γ."""

    def __init__(
        self,
        tiles: Sequence[Tile],
        *,
        gamma: float = FOCUS_GAMMA,
        num_samples: int | None = None,
        seed: int = 0,
        subset: Sequence[int] | None = None,
    ) -> None:
        if not 0 <= gamma <= 1:
            raise ConfigError(f"gamma must be in [0, 1], got {gamma}")
        self.gamma = float(gamma)
        super().__init__(tiles, num_samples=num_samples, seed=seed, subset=subset,
                         min_labelled=gamma)


class WeightedTileSampler(_EpochSampler):
    """``num_samples`` draws with replacement, tile ``i`` with probability ``w_i / Σw``.

    ``weights`` is read at every ``__iter__``, so a live array (:class:`BoostingWeights`) steers
    the next epoch."""

    def __init__(
        self,
        weights: Sequence[float] | np.ndarray,
        *,
        num_samples: int,
        seed: int = 0,
        subset: Sequence[int] | None = None,
    ) -> None:
        w = np.asarray(weights, dtype=np.float64)
        super().__init__(len(w), seed=seed, subset=subset)
        self.weights = w
        if num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)

    def probabilities(self) -> np.ndarray:
        """Current draw probability of every tile (0 outside the subset)."""
        w = np.zeros_like(self.weights)
        w[self._pool] = self.weights[self._pool]
        if not (np.isfinite(w).all() and (w >= 0).all()):
            raise ConfigError("sampling weights must be finite and non-negative")
        total = w.sum()
        if total <= 0:
            raise ConfigError("every sampling weight is zero")
        result: np.ndarray = w / total
        return result

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        p = self.probabilities()
        draw = self._rng().choice(len(p), size=self.num_samples, replace=True, p=p)
        return iter(int(i) for i in draw)


def error_fractions(pred: Any, label: Any, ignore_index: int = 255) -> np.ndarray:
    """khalil2022 eq. (2): per tile, the number of labelled pixels predicted wrongly divided by
    all ``U x U`` pixels of the tile. ``pred``/``label``: ``(N, H, W)`` numpy or torch."""
    p = np.asarray(pred.detach().cpu() if hasattr(pred, "detach") else pred)
    t = np.asarray(label.detach().cpu() if hasattr(label, "detach") else label)
    if p.shape != t.shape or p.ndim != 3:
        raise ConfigError(f"pred and label must both be (N, H, W), got {p.shape} and {t.shape}")
    wrong = (p != t) & (t != ignore_index)
    result: np.ndarray = wrong.reshape(len(p), -1).mean(axis=1)
    return result


class BoostingWeights:
    """khalil2022 §3.2.2 instance weights ``l_e``.

    Eq. (1): ``l_e = 1`` when the tile's labelled fraction ϑ >= γ, else 0. Eq. (2): after an
    epoch, ``l_e += χ`` for every tile whose error fraction is >= γ. :meth:`sampler` draws tiles
    in proportion to the weights.
    """

    def __init__(self, tiles: Sequence[Tile], *, gamma: float = FOCUS_GAMMA,
                 chi: float = BOOST_CHI) -> None:
        if not 0 <= gamma <= 1:
            raise ConfigError(f"gamma must be in [0, 1], got {gamma}")
        if chi < 0:
            raise ConfigError(f"chi must be >= 0, got {chi}")
        self.gamma = float(gamma)
        self.chi = float(chi)
        frac = np.array([t.labelled_fraction for t in tiles], dtype=np.float64)
        self.weights = np.where(frac >= self.gamma, 1.0, 0.0)
        if not self.weights.any():
            raise ConfigError(f"no tile has a labelled fraction >= γ = {gamma:g}")

    def update(self, positions: Sequence[int] | np.ndarray, errors: Sequence[float] | np.ndarray
               ) -> int:
        """Apply eq. (2) for the tiles at ``positions`` with error fractions ``errors``; returns
        how many were boosted. A tile evaluated several times is boosted at most once."""
        pos = np.asarray(positions, dtype=np.int64).ravel()
        err = np.asarray(errors, dtype=np.float64).ravel()
        if pos.shape != err.shape:
            raise ConfigError(f"{len(pos)} positions but {len(err)} error fractions")
        if len(pos) and (pos.min() < 0 or pos.max() >= len(self.weights)):
            raise ConfigError("tile position out of range")
        hard = np.unique(pos[err >= self.gamma])
        # Tiles excluded by eq. (1) stay excluded.
        hard = hard[self.weights[hard] > 0]
        self.weights[hard] += self.chi
        return len(hard)

    def sampler(self, *, num_samples: int | None = None, seed: int = 0,
                subset: Sequence[int] | None = None) -> WeightedTileSampler:
        """A sampler that follows these (live) weights."""
        n = int((self.weights > 0).sum()) if num_samples is None else num_samples
        return WeightedTileSampler(self.weights, num_samples=n, seed=seed, subset=subset)

    def state_dict(self) -> dict[str, Any]:
        """Weights and parameters, for checkpoints."""
        return {"gamma": self.gamma, "chi": self.chi, "weights": self.weights.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (in place, so samplers built on it follow)."""
        w = np.asarray(state["weights"], dtype=np.float64)
        if w.shape != self.weights.shape:
            raise ConfigError(f"boosting state has {len(w)} weights, expected "
                              f"{len(self.weights)}")
        self.gamma, self.chi = float(state["gamma"]), float(state["chi"])
        self.weights[:] = w


class BoostedSetSampler(_EpochSampler):
    """khalil2022 §3.2.2-§3.2.3: one epoch over the enlarged training set T_h.

    "Iteratively for h = 1, ..., H, build a base model θ_h = η(T_h)" and "a boosted data
    augmentation based on the sample attention weights {l_e^{h+1}} [...] produced new data
    T_{h+1} [...] to enlarge the training set with additional synthetically modified data":
    tile ``e`` appears ``l_e`` times in T_h (once for ``l_e = 1``, not at all for 0), each
    appearance augmented independently by the training augmentation. A fractional weight (χ
    not an integer) gives ``floor(l_e)`` copies plus one more with probability ``frac(l_e)``,
    drawn once per ``(seed, epoch)``. The epoch size is ``Σ copies`` and grows as tiles are
    boosted, unlike a weighted resampling with a fixed epoch size, where boosting most tiles
    brings the draw back to uniform.

    ``weights`` is read live (a :class:`BoostingWeights` or its array). ``subsets`` (one list
    of positions per rank) with ``rank`` shards by slide for DDP: every rank yields the length
    of the largest shard, repeating its own items, so every rank takes the same step count.
    """

    def __init__(self, weights: BoostingWeights | Sequence[float] | np.ndarray, *,
                 seed: int = 0, subsets: Sequence[Sequence[int]] | None = None,
                 rank: int = 0) -> None:
        self._live = weights if isinstance(weights, BoostingWeights) else None
        w = self._live.weights if self._live is not None else np.asarray(weights, np.float64)
        self._static = w
        if subsets is not None and not 0 <= rank < len(subsets):
            raise ConfigError(f"rank must be in [0, {len(subsets)}), got {rank}")
        super().__init__(len(w), seed=seed, subset=None if subsets is None else subsets[rank])
        self._subsets = None if subsets is None else [
            np.asarray(sorted(set(s)), np.int64) for s in subsets]
        self.rank = int(rank)

    @property
    def weights(self) -> np.ndarray:
        """The current instance weights ``l_e`` (live)."""
        return self._live.weights if self._live is not None else self._static

    def copies(self) -> np.ndarray:
        """How many times each tile appears in this epoch's T_h (0 outside the subset)."""
        w = self.weights
        if not (np.isfinite(w).all() and (w >= 0).all()):
            raise ConfigError("boosting weights must be finite and non-negative")
        base = np.floor(w)
        extra = np.random.default_rng([self.seed, self.epoch, 1]).random(len(w)) < (w - base)
        return (base + extra).astype(np.int64)

    def _items(self, pool: np.ndarray, copies: np.ndarray) -> np.ndarray:
        return np.repeat(pool, copies[pool])

    def __len__(self) -> int:
        copies = self.copies()
        pools = self._subsets if self._subsets is not None else [self._pool]
        return max(int(copies[p].sum()) for p in pools)

    def __iter__(self) -> Iterator[int]:
        copies = self.copies()
        items = self._items(self._pool, copies)
        if len(items) == 0:
            raise ConfigError("every boosting weight of this process's tiles is zero")
        n = len(self)
        items = items[self._rng().permutation(len(items))]
        if len(items) < n:  # DDP: pad with this rank's own items
            items = np.tile(items, -(-n // len(items)))[:n]
        return iter(int(i) for i in items)


class HierarchicalSampler(WeightedTileSampler):
    """pedersen2022 §2.3: "(1) Randomly select a histological grade, (2) from the grade select a
    WSI, (3) from the WSI select a class label, (4) from the class label select a patch", each
    stage uniform.

    ``slide_groups[s]`` is the group of slide ``s`` (``None`` is a group of its own). A tile
    belongs to every class with at least ``min_class_pixels`` pixels in its histogram
    (``classes`` restricts which classes count). Draws are i.i.d., so sampling the tree is
    sampling each tile with its marginal probability (:meth:`probabilities`), which is what
    ``__iter__`` does.
    """

    def __init__(
        self,
        tiles: Sequence[Tile],
        slide_groups: Sequence[str | None] | Mapping[int, str | None],
        *,
        num_samples: int,
        seed: int = 0,
        subset: Sequence[int] | None = None,
        classes: Sequence[int] | None = None,
        min_class_pixels: int = 1,
    ) -> None:
        n = len(tiles)
        pool = range(n) if subset is None else sorted(set(subset))
        groups = dict(enumerate(slide_groups)) if not isinstance(slide_groups, Mapping) \
            else dict(slide_groups)
        allowed = None if classes is None else {int(c) for c in classes}
        tree: dict[str | None, dict[int, dict[int, list[int]]]] = {}
        for i in pool:
            if not 0 <= i < n:
                raise ConfigError(f"subset positions must lie in [0, {n})")
            t = tiles[i]
            if t.slide not in groups:
                raise ConfigError(f"no group given for slide {t.slide}")
            for c, count in enumerate(t.class_hist):
                if count >= min_class_pixels and (allowed is None or c in allowed):
                    tree.setdefault(groups[t.slide], {}).setdefault(t.slide, {}) \
                        .setdefault(c, []).append(i)
        if not tree:
            raise ConfigError("no tile has a labelled class to sample from")
        w = np.zeros(n, dtype=np.float64)
        for slides in tree.values():
            for per_class in slides.values():
                for members in per_class.values():
                    w[members] += 1.0 / (len(tree) * len(slides) * len(per_class) * len(members))
        self.tree = tree
        super().__init__(w, num_samples=num_samples, seed=seed, subset=subset)


def class_balance_items(
    tiles: Sequence[Tile],
    rates: Mapping[int, int] | Sequence[int],
    *,
    class_order: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """ho2021 §2.3 class balancing: dataset items ``(tile, copy)``, every tile once (copy 0) plus
    ``r_c`` elastic copies (1..r_c) of each tile whose class is ``c``.

    A tile's class is the first class of ``class_order`` (highest order first) that it
    contains; default order: classes by decreasing rate. Rates are non-negative integers
    (ho2021 used r = 10, 2, 3, 1, 0, 0 for benign epithelial, carcinoma, necrotic, background,
    stroma, adipose).
    """
    rate = dict(rates) if isinstance(rates, Mapping) else dict(enumerate(rates))
    for c, r in rate.items():
        if int(r) != r or r < 0:
            raise ConfigError(f"elastic rate of class {c} must be a non-negative integer, got {r}")
    order = list(class_order) if class_order is not None else sorted(
        rate, key=lambda c: (-rate[c], c))
    items: list[tuple[int, int]] = []
    for i, t in enumerate(tiles):
        items.append((i, 0))
        present = set(t.classes)
        cls = next((c for c in order if c in present), None)
        for k in range(int(rate.get(cls, 0)) if cls is not None else 0):
            items.append((i, k + 1))
    return items


# --------------------------------------------------------------------------- distribution
def slide_shards(tiles: Sequence[Tile], num_replicas: int) -> list[list[int]]:
    """Slides per rank: every slide with tiles on exactly one rank, balancing tile counts
    (largest slides first to the rank with the fewest tiles; deterministic)."""
    if num_replicas < 1:
        raise ConfigError(f"num_replicas must be >= 1, got {num_replicas}")
    counts: dict[int, int] = {}
    for t in tiles:
        counts[t.slide] = counts.get(t.slide, 0) + 1
    if len(counts) < num_replicas:
        raise ConfigError(f"{len(counts)} slide(s) cannot be shared by slide between "
                          f"{num_replicas} processes; use fewer processes or more slides")
    shards: list[list[int]] = [[] for _ in range(num_replicas)]
    load = [0] * num_replicas
    for slide in sorted(counts, key=lambda s: (-counts[s], s)):
        r = min(range(num_replicas), key=lambda k: (load[k], k))
        shards[r].append(slide)
        load[r] += counts[slide]
    return [sorted(s) for s in shards]


def rank_indices(tiles: Sequence[Tile], num_replicas: int, rank: int) -> list[int]:
    """Positions of the tiles that belong to ``rank``'s slides (for ``subset=`` of any sampler)."""
    if not 0 <= rank < num_replicas:
        raise ConfigError(f"rank must be in [0, {num_replicas}), got {rank}")
    mine = set(slide_shards(tiles, num_replicas)[rank])
    return [i for i, t in enumerate(tiles) if t.slide in mine]


def _dist_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is not None and rank is not None:
        return num_replicas, rank
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return (dist.get_world_size() if num_replicas is None else num_replicas,
                    dist.get_rank() if rank is None else rank)
    except ImportError:  # pragma: no cover
        pass
    return (1 if num_replicas is None else num_replicas, 0 if rank is None else rank)


class DistributedSlideSampler(_EpochSampler):
    """``DistributedSampler`` by slide: rank ``r`` yields only tiles of its slides
    (:func:`slide_shards`), shuffled per epoch, padded by repeating its own tiles so every rank
    yields ``len(self)`` items (DDP needs equal step counts). ``num_replicas``/``rank`` default
    to the initialised process group (else 1 / 0)."""

    def __init__(
        self,
        tiles: Sequence[Tile],
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(len(tiles), seed=seed)
        self.num_replicas, self.rank = _dist_defaults(num_replicas, rank)
        shards = slide_shards(tiles, self.num_replicas)
        if not 0 <= self.rank < self.num_replicas:
            raise ConfigError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")
        self.slides = shards[self.rank]
        mine = set(self.slides)
        self.indices = np.array([i for i, t in enumerate(tiles) if t.slide in mine], np.int64)
        per_rank = [sum(1 for t in tiles if t.slide in set(s)) for s in shards]
        self.num_samples = max(per_rank)
        self.shuffle = shuffle

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        idx = self.indices
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank])
            idx = idx[rng.permutation(len(idx))]
        reps = -(-self.num_samples // len(idx))
        out = np.tile(idx, reps)[: self.num_samples]
        return iter(int(i) for i in out)
