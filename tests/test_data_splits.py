"""Slide-level splits: disjoint, reproducible from a seed, stratified, JSON round trip."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpseg.data.splits import Split, load_split, split_slides
from qpseg.errors import ConfigError, QpsegError

KEYS = [f"slide_{i:03d}.svs" for i in range(20)]


def test_split_is_a_partition_with_the_requested_sizes() -> None:
    s = split_slides(KEYS, val=0.15, test=0.15, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (14, 3, 3)
    assert sorted(s.train + s.val + s.test) == KEYS
    assert not set(s.train) & set(s.val) and not set(s.val) & set(s.test)
    assert s.subset_of(s.val[0]) == "val" and s.subset_of("nope") is None


def test_reproducible_from_the_seed_and_independent_of_order() -> None:
    a = split_slides(KEYS, seed=7)
    assert split_slides(list(reversed(KEYS)), seed=7) == a
    assert split_slides(KEYS, seed=8) != a


def test_small_projects() -> None:
    one = split_slides(["a"])
    assert one.train == ("a",) and not one.val and not one.test
    two = split_slides(["a", "b"])
    assert len(two.train) == 1 and len(two.val) == 1 and not two.test
    three = split_slides(["a", "b", "c"])
    assert (len(three.train), len(three.val), len(three.test)) == (1, 1, 1)
    assert split_slides(["a", "b", "c"], val=0.0, test=0.0).train == ("a", "b", "c")


def test_stratified_by_group() -> None:
    groups = {k: "I" if i < 10 else "III" for i, k in enumerate(KEYS)}
    s = split_slides(KEYS, val=0.2, test=0.2, seed=1, groups=groups)
    for subset in (s.train, s.val, s.test):
        assert {groups[k] for k in subset} == {"I", "III"}
    assert len(s.val) == len(s.test) == 4


def test_json_round_trip(tmp_path: Path) -> None:
    s = split_slides(KEYS, seed=3)
    path = s.save(tmp_path / "split.json")
    assert load_split(path) == s
    data = json.loads(path.read_text())
    assert data["seed"] == 3 and data["split_version"] == 1
    (tmp_path / "bad.json").write_text('{"split_version": 1, "train": ["a"], "val": ["a"], '
                                       '"test": []}')
    with pytest.raises(ConfigError, match="both train and val"):
        load_split(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not found"):
        load_split(tmp_path / "missing.json")


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError):
        split_slides(KEYS, val=0.6, test=0.5)
    with pytest.raises(ConfigError):
        split_slides(["a", "a"])
    with pytest.raises(ConfigError):
        split_slides([])


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_fuzz_split_reader(text: str) -> None:
    try:
        data = json.loads(text)
    except ValueError:
        return
    try:
        s = Split.from_json(data)
    except QpsegError:
        return
    assert isinstance(s.train, tuple)


@given(st.dictionaries(st.sampled_from(["split_version", "train", "val", "test", "seed"]),
                       st.one_of(st.integers(-2, 2), st.lists(st.text(max_size=3), max_size=3),
                                 st.none(), st.text(max_size=3))))
@settings(max_examples=200, deadline=None)
def test_fuzz_split_fields(data: dict[str, object]) -> None:
    with contextlib.suppress(QpsegError):
        Split.from_json(data)
