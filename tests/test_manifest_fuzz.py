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


# ------------------------------------------------------------------ annotation file names


_PARTS = st.sampled_from(["..", ".", "", "secret", "1", "annotations", "qpseg", "link", "x\0y",
                          "sub", "~", "\\..", "C:", "%2e%2e"])


@settings(max_examples=200, deadline=None)
@given(st.lists(_PARTS, min_size=1, max_size=6), st.sampled_from(["/", "\\"]),
       st.booleans(), st.integers(-3, 3))
def test_annotation_file_never_outside_its_folder(parts: list[str], sep: str, absolute: bool,
                                                  entry_id: int) -> None:
    """Whatever an entry's imageName and ID, the file found lies inside the folder searched
    (a planted ``secret.geojson`` beside it and a link leading to it are never returned)."""
    import warnings

    from qpseg.manifest import find_annotation_file
    from qpseg.qupath.project import ImageMetadata, QuPathProject

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        folder = root / "p" / "qpseg" / "annotations"
        (folder / "sub").mkdir(parents=True)
        for outside in (root / "secret.geojson", root / "p" / "secret.geojson",
                        root / "p" / "qpseg" / "secret.geojson"):
            outside.write_text("{}", encoding="utf-8")
        (folder / "link.geojson").symlink_to(root / "secret.geojson")
        (folder / "sub" / "secret.geojson").write_text("{}", encoding="utf-8")
        name = sep.join(parts)
        if absolute:
            name = str(root) + "/" + name
        project = QuPathProject(root / "p" / "project.qpproj")  # in memory, never saved
        entry = project.add_image(__file__, ImageMetadata(width=10, height=10, provider="imagej"))
        entry.entry_id, entry.image_name = entry_id, name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = find_annotation_file(entry, [folder])
        if found is not None:
            assert found.resolve().is_relative_to(folder.resolve()), (name, found)

