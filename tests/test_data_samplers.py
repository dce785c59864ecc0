"""Samplers with known answers: focusing, boosting, hierarchical, class balancing, sharding."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from qpseg.data.grid import Tile
from qpseg.data.samplers import (
    BOOST_CHI,
    BoostedSetSampler,
    BoostingWeights,
    DistributedSlideSampler,
    FocusingSampler,
    HierarchicalSampler,
    UniformTileSampler,
    WeightedTileSampler,
    class_balance_items,
    error_fractions,
    rank_indices,
    slide_shards,
)
from qpseg.errors import ConfigError


def tile(slide: int, labelled: float, hist: tuple[int, ...] = (0, 1)) -> Tile:
    return Tile(slide, 0.0, 0.0, labelled, hist)


FRACTIONS = [0.0, 0.01, 0.049, 0.05, 0.2, 0.5, 1.0, 0.0499999]
TILES = [tile(i % 3, f) for i, f in enumerate(FRACTIONS)]


def test_uniform_each_labelled_tile_once_per_epoch() -> None:
    s = UniformTileSampler(TILES, seed=1)
    labelled = [i for i, f in enumerate(FRACTIONS) if f > 0]
    first = list(s)
    assert sorted(first) == labelled and len(s) == len(labelled)
    assert list(s) == first  # same epoch, same order
    s.set_epoch(1)
    second = list(s)
    assert sorted(second) == labelled and second != first
    # Resume: a fresh sampler with the saved state continues identically.
    t = UniformTileSampler(TILES, seed=99)
    t.load_state_dict(s.state_dict())
    assert list(t) == second
    more = UniformTileSampler(TILES, seed=0, num_samples=20)
    assert len(list(more)) == 20 and set(more) <= set(labelled)
    with pytest.raises(ConfigError):
        UniformTileSampler([tile(0, 0.0)])


def test_focusing_never_yields_a_tile_below_gamma() -> None:
    s = FocusingSampler(TILES, seed=0)
    assert s.gamma == 0.05
    for epoch in range(20):
        s.set_epoch(epoch)
        drawn = list(s)
        assert all(FRACTIONS[i] >= 0.05 for i in drawn)
        assert sorted(drawn) == [3, 4, 5, 6]
    many = FocusingSampler(TILES, seed=0, num_samples=500)
    assert set(many) == {3, 4, 5, 6}
    assert sorted(FocusingSampler(TILES, gamma=0.3)) == [5, 6]
    with pytest.raises(ConfigError):
        FocusingSampler(TILES, gamma=1.5)


def test_error_fraction_khalil_eq2() -> None:
    label = torch.tensor([[[1, 1], [255, 0]], [[0, 0], [0, 0]]])
    pred = torch.tensor([[[1, 0], [1, 1]], [[0, 0], [0, 0]]])
    # Tile 0: two wrong labelled pixels (the ignore pixel never counts) of U x U = 4.
    assert error_fractions(pred, label).tolist() == [0.5, 0.0]
    assert error_fractions(pred.numpy(), label.numpy()).tolist() == [0.5, 0.0]
    with pytest.raises(ConfigError):
        error_fractions(pred[0], label)


def test_boosting_weights() -> None:
    b = BoostingWeights(TILES)
    # Eq. (1): 1 where the labelled fraction ϑ >= γ = 0.05, else 0.
    assert b.weights.tolist() == [0, 0, 0, 1, 1, 1, 1, 0]
    assert BOOST_CHI == 1.0
    # Eq. (2): + χ for tiles whose error fraction >= γ (tile 4 seen twice: boosted once).
    n = b.update([3, 4, 5, 4, 1], [0.049, 0.05, 0.6, 0.9, 0.8])
    assert n == 2
    assert b.weights.tolist() == [0, 0, 0, 1, 2, 2, 1, 0]  # tile 1 stays excluded
    sampler = b.sampler(num_samples=6000, seed=0)
    p = sampler.probabilities()
    assert p.tolist() == pytest.approx([0, 0, 0, 1 / 6, 2 / 6, 2 / 6, 1 / 6, 0])
    counts = Counter(sampler)
    assert set(counts) == {3, 4, 5, 6}
    assert counts[4] / 6000 == pytest.approx(2 / 6, abs=0.03)
    # The sampler follows the live weights.
    b.update([6], [1.0])
    assert sampler.probabilities()[6] == pytest.approx(2 / 7)
    state = b.state_dict()
    fresh = BoostingWeights(TILES, chi=0.5)
    fresh.load_state_dict(state)
    assert fresh.weights.tolist() == b.weights.tolist() and fresh.chi == 1.0
    chi = BoostingWeights(TILES, chi=0.25)
    chi.update([3], [0.2])
    assert chi.weights[3] == 1.25
    with pytest.raises(ConfigError):
        b.update([1, 2], [0.1])
    with pytest.raises(ConfigError):
        BoostingWeights([tile(0, 0.01)])


def test_weighted_sampler_validation() -> None:
    with pytest.raises(ConfigError):
        list(WeightedTileSampler([0.0, 0.0], num_samples=3))
    with pytest.raises(ConfigError):
        list(WeightedTileSampler([1.0, -1.0], num_samples=3))
    s = WeightedTileSampler([1.0, 1.0, 1.0], num_samples=50, subset=[2])
    assert set(s) == {2}


def _hier_tiles() -> tuple[list[Tile], list[str | None]]:
    # Grade A: slide 0 (5 tumour tiles, 1 of them also stroma; 2 stroma-only tiles) and
    # slide 1 (1 tumour tile). Grade B: slide 2 (40 stroma tiles). Classes: 1 tumour, 2 stroma.
    tiles = [tile(0, 1, (0, 10, 0)) for _ in range(4)] + [tile(0, 1, (0, 5, 5))]
    tiles += [tile(0, 1, (0, 0, 8)) for _ in range(2)]
    tiles += [tile(1, 1, (0, 3, 0))]
    tiles += [tile(2, 1, (0, 0, 9)) for _ in range(40)]
    tiles += [tile(2, 0.0, (0, 0, 0))]  # nothing labelled: never drawn
    return tiles, ["A", "A", "B"]


def test_hierarchical_probabilities_known_answer() -> None:
    tiles, groups = _hier_tiles()
    s = HierarchicalSampler(tiles, groups, num_samples=10)
    p = s.probabilities()
    # Grade 1/2, slide 1/2 in A, class 1/2 in slide 0, tile 1/5 (tumour) or 1/3 (stroma).
    assert p[0] == pytest.approx(1 / 2 * 1 / 2 * 1 / 2 * 1 / 5)
    assert p[4] == pytest.approx(1 / 2 * 1 / 2 * 1 / 2 * (1 / 5 + 1 / 3))
    assert p[5] == pytest.approx(1 / 2 * 1 / 2 * 1 / 2 * 1 / 3)
    assert p[7] == pytest.approx(1 / 4)  # the only tile of slide 1
    assert p[8] == pytest.approx(1 / 2 / 40)
    assert p[-1] == 0
    assert p.sum() == pytest.approx(1.0)
    # Classes restricted to tumour: slide 2 has none, so group B disappears.
    only = HierarchicalSampler(tiles, groups, num_samples=10, classes=[1]).probabilities()
    assert only[7] == pytest.approx(1 / 2) and only[8:].sum() == 0


def test_hierarchical_frequencies_converge_to_uniform_over_groups() -> None:
    tiles, groups = _hier_tiles()
    n = 200_000
    s = HierarchicalSampler(tiles, groups, num_samples=n, seed=3)
    counts = np.bincount(np.fromiter(s, dtype=np.int64), minlength=len(tiles)) / n
    # Group B has 40 tiles, group A 8, but each group is drawn half of the time.
    assert counts[8:].sum() == pytest.approx(0.5, abs=0.005)
    assert counts[7] == pytest.approx(0.25, abs=0.005)
    p = s.probabilities()
    sigma = np.sqrt(p * (1 - p) / n)
    assert (np.abs(counts - p) <= 5 * sigma + 1e-12).all()
    # None is a group of its own.
    ungrouped = HierarchicalSampler(tiles, [None, None, "B"], num_samples=1).probabilities()
    assert ungrouped[8:].sum() == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        HierarchicalSampler(tiles, ["A"], num_samples=1)  # no group for slides 1 and 2


def test_class_balance_items_ho2021() -> None:
    # Classes: 1 carcinoma, 2 benign epithelial, 3 stroma. Benign epithelial has the highest
    # order, then carcinoma (ho2021 §3: r_2 = 10, r_1 = 2, stroma 0).
    tiles = [tile(0, 1, (0, 5, 0, 0)), tile(0, 1, (0, 5, 5, 0)), tile(0, 1, (0, 0, 0, 7)),
             tile(0, 0.0, (0, 0, 0, 0))]
    items = class_balance_items(tiles, {1: 2, 2: 10, 3: 0}, class_order=[2, 1, 3])
    copies = Counter(t for t, c in items if c > 0)
    assert copies == {0: 2, 1: 10}
    assert [c for t, c in items if t == 1] == list(range(11))
    assert sum(1 for _, c in items if c == 0) == 4
    # Default order: by decreasing rate, the same here.
    assert class_balance_items(tiles, [0, 2, 10, 0]) == items
    with pytest.raises(ConfigError):
        class_balance_items(tiles, {1: 1.5})


def test_by_slide_sharding_covers_every_slide_once() -> None:
    tiles = [tile(s, 1.0) for s, n in enumerate([5, 1, 3, 2, 4]) for _ in range(n)]
    shards = slide_shards(tiles, 2)
    assert sorted(shards[0] + shards[1]) == [0, 1, 2, 3, 4]
    assert not set(shards[0]) & set(shards[1])
    assert shards == [[0, 1, 3], [2, 4]]  # greedy: 5 | 4, 3 -> rank 1, 2 -> 0, 1 -> 0
    samplers = [DistributedSlideSampler(tiles, num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    assert len(samplers[0]) == len(samplers[1]) == 8
    drawn = [list(s) for s in samplers]
    slides = [{tiles[i].slide for i in d} for d in drawn]
    assert slides[0] == set(shards[0]) and slides[1] == set(shards[1])
    assert set(drawn[0]) | set(drawn[1]) == set(range(len(tiles)))  # every tile of the epoch
    assert sorted(drawn[0]) == sorted(i for i, t in enumerate(tiles) if t.slide in shards[0])
    assert len(drawn[1]) == 8 and len(set(drawn[1])) == 7  # padded by repeating its own tile
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != drawn[0]
    assert rank_indices(tiles, 2, 1) == [i for i, t in enumerate(tiles) if t.slide in (2, 4)]
    foc = FocusingSampler(tiles, subset=rank_indices(tiles, 2, 0))
    assert {tiles[i].slide for i in foc} == {0, 1, 3}
    with pytest.raises(ConfigError):
        slide_shards(tiles, 6)
    with pytest.raises(ConfigError):
        DistributedSlideSampler(tiles, num_replicas=2, rank=2)
    single = DistributedSlideSampler(tiles)  # no process group: one replica
    assert single.num_replicas == 1 and sorted(single) == list(range(len(tiles)))


def test_samplers_drive_a_dataloader() -> None:
    class Echo:
        def __len__(self) -> int:
            return len(TILES)

        def __getitem__(self, i: int) -> int:
            return i

    loader = torch.utils.data.DataLoader(Echo(), sampler=FocusingSampler(TILES, seed=0),
                                         batch_size=2)
    assert sorted(int(v) for b in loader for v in b) == [3, 4, 5, 6]


def test_boosted_set_enlarges_training_set() -> None:
    # khalil2022 §3.2.2-§3.2.3: T_h holds every tile l_e times; boosting grows the epoch instead
    # of re-weighting a fixed-size draw (where boosting most tiles drifts back to uniform).
    b = BoostingWeights(TILES)  # weights [0, 0, 0, 1, 1, 1, 1, 0]
    s = BoostedSetSampler(b, seed=3)
    assert len(s) == 4 and Counter(s) == {3: 1, 4: 1, 5: 1, 6: 1}
    b.update([3, 4, 5], [0.5, 0.5, 0.5])  # 3 of 4 hard: l = 2, 2, 2, 1
    assert len(s) == 7 and Counter(s) == {3: 2, 4: 2, 5: 2, 6: 1}
    b.update([3, 4, 5], [0.5, 0.5, 0.5])  # hard again in round 2: l = 3, 3, 3, 1
    assert len(s) == 10 and Counter(s) == {3: 3, 4: 3, 5: 3, 6: 1}
    # The order is a function of (seed, epoch).
    s.set_epoch(1)
    first = list(s)
    assert first == list(s) and first != list(BoostedSetSampler(b, seed=4).__iter__())
    # Fractional χ: floor(l) copies plus one with probability frac(l).
    frac = BoostingWeights(TILES, chi=0.5)
    frac.update([3], [1.0])  # l_3 = 1.5
    extra = []
    for epoch in range(400):
        fs = BoostedSetSampler(frac, seed=0)
        fs.set_epoch(epoch)
        extra.append(Counter(fs)[3] - 1)
    assert set(extra) == {0, 1} and np.mean(extra) == pytest.approx(0.5, abs=0.08)


def test_boosted_set_shards_pad_to_the_largest() -> None:
    b = BoostingWeights(TILES)
    b.update([3], [1.0])  # l_3 = 2
    shards = [[3, 4], [5, 6]]
    sizes = [len(BoostedSetSampler(b, subsets=shards, rank=r)) for r in (0, 1)]
    assert sizes == [3, 3]
    assert Counter(BoostedSetSampler(b, subsets=shards, rank=0)) == {3: 2, 4: 1}
    items = list(BoostedSetSampler(b, subsets=shards, rank=1))
    assert len(items) == 3 and set(items) == {5, 6}
