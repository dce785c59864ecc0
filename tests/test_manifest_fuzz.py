"""read_manifest on arbitrary files: a Manifest or a LabelError, never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from qpseg.errors import LabelError
from qpseg.manifest import read_manifest

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["manifest_version", "project", "classes", "entries",
                                       "index", "name", "color", "entry_id", "ignore_index"]),
                      children, max_size=5),
    max_leaves=20,
)


def _check(payload: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "manifest.json"
        p.write_bytes(payload)
        try:
            read_manifest(p)
        except LabelError as exc:
            assert str(p) in str(exc)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_random_json(value: object) -> None:
    _check(json.dumps(value).encode())


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 3), json_values)
def test_mutated_valid_manifest(which: int, value: object) -> None:
    good = {"manifest_version": 1, "project": "/p", "ignore_index": 255,
            "classes": [{"index": 0, "name": "Background", "color": [0, 0, 0]},
                        {"index": 1, "name": "Tumor", "color": [200, 0, 0]}],
            "entries": []}
    key = ["project", "ignore_index", "classes", "entries"][which]
    good[key] = value
    _check(json.dumps(good).encode())
