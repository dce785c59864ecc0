"""Slide-level train/validation/test splits, reproducible from a seed and saved as JSON.

Tiles of one slide never end up in two subsets: the split is over slide keys (image names).
The result depends only on the set of keys, the fractions, the seed and the optional groups
(keys are sorted before shuffling), so the same project and seed always give the same split.
With ``groups`` (e.g. histological grade, pedersen2022 §2.1 split ~70/15/15) each group is split
on its own so every subset sees every group where counts allow.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpseg.errors import ConfigError

__all__ = ["SPLIT_VERSION", "Split", "load_split", "split_slides"]

SPLIT_VERSION = 1
SUBSETS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Slide keys per subset, and how the split was made."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for name in SUBSETS:
            for key in getattr(self, name):
                if key in seen:
                    raise ConfigError(f"slide {key!r} is in both {seen[key]} and {name}")
                seen[key] = name

    def subset_of(self, key: str) -> str | None:
        """``"train"``, ``"val"``, ``"test"`` or None for a slide not in the split."""
        for name in SUBSETS:
            if key in getattr(self, name):
                return name
        return None

    def to_json(self) -> dict[str, Any]:
        """JSON form (what :meth:`save` writes)."""
        return {"split_version": SPLIT_VERSION, "seed": self.seed,
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
                "train": list(self.train), "val": list(self.val), "test": list(self.test)}

    @classmethod
    def from_json(cls, data: Any, path: str | os.PathLike[str] | None = None) -> Split:
        """Inverse of :meth:`to_json`; raises :class:`~qpseg.errors.ConfigError` if malformed."""
        try:
            if data.get("split_version") != SPLIT_VERSION:
                raise ConfigError(f"unsupported split_version {data.get('split_version')!r}",
                                  path)
            lists = {}
            for name in SUBSETS:
                value = data[name]
                if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
                    raise ConfigError(f"split field {name!r} must be a list of strings", path)
                lists[name] = tuple(value)
            return cls(lists["train"], lists["val"], lists["test"], int(data.get("seed", 0)),
                       float(data.get("val_fraction", 0.15)),
                       float(data.get("test_fraction", 0.15)))
        except ConfigError as exc:
            raise ConfigError(exc.message, path) from None
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed split: {type(exc).__name__}: {exc}", path) from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the split as JSON (atomically)."""
        from qpseg._io import write_json_atomic

        p = Path(path)
        write_json_atomic(p, self.to_json(), backup=False)
        return p


def load_split(path: str | os.PathLike[str]) -> Split:
    """Read a split written by :meth:`Split.save`; ConfigError when missing or malformed."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("split file not found", p) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read split: {exc}", p) from None
    return Split.from_json(data, p)


def _counts(n: int, val: float, test: float) -> tuple[int, int]:
    """How many of ``n`` slides go to val and test: rounded, but with at least one each when
    the fraction is positive and at least one slide remains for training."""
    n_val = round(n * val)
    n_test = round(n * test)
    if val > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    if test > 0 and n_test == 0 and n - n_val >= 2:
        n_test = 1
    while n_val + n_test >= n and (n_val or n_test):
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def split_slides(
    keys: Sequence[str],
    *,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    groups: Mapping[str, str | None] | None = None,
) -> Split:
    """Split slide keys into train/val/test (pedersen2022 used ~70/15/15).

    At least one slide stays in train; val/test get at least one slide each when their
    fraction is positive and there are enough slides. ``groups`` maps keys to a stratum.
    """
    import numpy as np

    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1) or math.isnan(val + test):
        raise ConfigError(f"val and test fractions must be >= 0 with val + test < 1, got "
                          f"{val} and {test}")
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if list(keys).count(k) > 1})
        raise ConfigError(f"duplicate slide keys: {', '.join(dup[:5])}")
    if not keys:
        raise ConfigError("no slides to split")
    strata: dict[str, list[str]] = {}
    for k in sorted(keys):
        g = (groups or {}).get(k)
        strata.setdefault("" if g is None else f"g:{g}", []).append(k)
    train: list[str] = []
    vals: list[str] = []
    tests: list[str] = []
    for i, name in enumerate(sorted(strata)):
        members = strata[name]
        rng = np.random.default_rng([int(seed), i])
        order = [members[j] for j in rng.permutation(len(members))]
        n_val, n_test = _counts(len(order), val, test)
        vals.extend(order[:n_val])
        tests.extend(order[n_val:n_val + n_test])
        train.extend(order[n_val + n_test:])
    return Split(tuple(sorted(train)), tuple(sorted(vals)), tuple(sorted(tests)), int(seed),
                 float(val), float(test))
