"""Fuzz the project and classes readers: any input ends in a result or a ProjectError."""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpseg.errors import ProjectError, QpsegWarning
from qpseg.qupath import compat
from qpseg.qupath.classes import read_classes
from qpseg.qupath.project import QuPathProject, resolve_image_uri

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

PAQUO = "uw-loci__PaQuO_test__qppaquo-v0.5.0rc2-pyramidize-backup-v0.4.3"

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=15,
)

# Keys QuPath uses, so random dicts often look like projects/entries/builders.
_KEYS = ["version", "createTimestamp", "modifyTimestamp", "uri", "lastID", "images",
         "serverBuilder", "builderType", "providerClassName", "args", "metadata", "builder",
         "rotation", "entryID", "imageName", "randomizedName", "description", "tags",
         "pixelCalibration", "pixelWidth", "pixelHeight", "value", "unit", "width", "height",
         "levels", "magnification", "pathClasses", "name", "color"]
_URIS = ["file:/C:/a%20b/x.svs", "file:///D:/y.svs", "file:/home/x.svs", "https://o/?show=1",
         "file:////server/share/x", "file://server/s/x", "file:/E:/%C5%9E/%ZZ.svs", "", "file:",
         "file:/tmp/%00x", "C:\\x.svs", "/tmp/x", "file:/D:/old/proj/project.qpproj"]
keyed_values = st.recursive(
    json_scalars | st.sampled_from(_URIS) | st.sampled_from(["uri", "pyramidize", "rotated",
                                                             "ROTATE_90", "µm", "px"]),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=5), children, max_size=5),
    max_leaves=12,
)

# Entry- and builder-shaped objects with random field values, so the per-entry code runs.
_builder_fields = {
    "builderType": st.sampled_from(["uri", "pyramidize", "rotated", "sparse"]) | json_scalars,
    "providerClassName": st.sampled_from(["x.OpenslideServerBuilder", "BioFormatsServer"])
    | json_scalars,
    "uri": st.sampled_from(_URIS) | json_scalars,
    "args": st.lists(st.text(max_size=5) | json_scalars, max_size=3) | json_scalars,
    "rotation": st.sampled_from(["ROTATE_90", "ROTATE_270", "ROTATE_NONE"]) | json_scalars,
    "metadata": keyed_values | st.fixed_dictionaries({}, optional={
        "width": json_scalars, "height": json_scalars, "magnification": json_scalars,
        "pixelCalibration": st.fixed_dictionaries({}, optional={
            "pixelWidth": st.fixed_dictionaries({}, optional={
                "value": json_scalars, "unit": st.sampled_from(["µm", "px", "um"])}),
            "pixelHeight": keyed_values})}),
}
builder_like = st.recursive(
    st.fixed_dictionaries({}, optional=_builder_fields),
    lambda inner: st.fixed_dictionaries({"builder": inner}, optional=_builder_fields),
    max_leaves=4,
)
entry_like = st.fixed_dictionaries(
    {"entryID": st.integers(min_value=-2, max_value=8),  # junk IDs come from keyed_values
     "serverBuilder": builder_like},
    optional={"imageName": json_scalars, "description": json_scalars,
              "metadata": keyed_values, "tags": keyed_values, "randomizedName": json_scalars},
)


@contextmanager
def _tmpdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _dump(value: Any) -> str:
    return json.dumps(value, allow_nan=True, ensure_ascii=False)


def _load_checked(pf: Path) -> QuPathProject | None:
    """Load; return the project, or None after a ProjectError. Warnings must be ours."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            project = QuPathProject.load(pf)
        except ProjectError as exc:
            assert "\n" not in str(exc)
            project = None
    for w in record:
        assert issubclass(w.category, QpsegWarning), w
    return project


def _check_project(pf: Path) -> None:
    project = _load_checked(pf)
    if project is None:
        return
    for e in project.entries:  # every property answers without raising
        _ = (e.uri, e.uri_path, e.is_remote, e.image_found, e.data_dir, e.mpp, e.mpp_xy,
             e.dimensions, e.magnification, e.provider, e.provider_class, e.to_json())
    _ = project.missing_images()
    ids = [e.entry_id for e in project.entries]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            project.save()
    except ProjectError:
        return
    again = _load_checked(pf)
    assert again is not None
    assert [e.entry_id for e in again.entries] == ids


def _write_and_check(content: str | bytes) -> None:
    with _tmpdir() as d:
        pf = d / "project.qpproj"
        if isinstance(content, bytes):
            pf.write_bytes(content)
        else:
            pf.write_text(content, encoding="utf-8", errors="surrogatepass")
        _check_project(pf)


@FUZZ
@given(json_values)
def test_arbitrary_json_as_project(value: Any) -> None:
    _write_and_check(_dump(value))


@FUZZ
@given(st.dictionaries(st.sampled_from(_KEYS), keyed_values, max_size=6))
def test_project_shaped_json(value: dict[str, Any]) -> None:
    _write_and_check(_dump(value))


@FUZZ
@given(st.lists(entry_like | keyed_values, max_size=6),
       st.sampled_from(_URIS) | st.text(max_size=10))
def test_entry_lists(images: list[Any], uri: str) -> None:
    _write_and_check(_dump({"version": "0.5.1", "uri": uri, "lastID": 1, "images": images}))


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_as_project(data: bytes) -> None:
    _write_and_check(data)


def _check_classes(content: str | bytes) -> None:
    with _tmpdir() as d:
        p = d / "classes.json"
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8", errors="surrogatepass")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            try:
                classes = read_classes(p)
            except ProjectError:
                classes = []
        for w in record:
            assert issubclass(w.category, QpsegWarning)
        for c in classes:
            assert isinstance(c.argb, int) and -(1 << 31) <= c.argb < (1 << 31)
            assert all(0 <= v <= 255 for v in c.color)


@FUZZ
@given(json_values | st.dictionaries(st.just("pathClasses"), keyed_values, max_size=1)
       | st.builds(lambda items: {"pathClasses": items}, st.lists(keyed_values, max_size=6)))
def test_arbitrary_json_as_classes(value: Any) -> None:
    _check_classes(_dump(value))


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_as_classes(data: bytes) -> None:
    _check_classes(data)


# --------------------------------------------------------------------------------------------
# mutations of a real project
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_project(qupath_fixtures: Path) -> dict[str, Any]:
    """The pyramidize backup project (uri, pyramidize and no-metadata builders, lastID gap)."""
    text = (qupath_fixtures / PAQUO / "project.qpproj.backup").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (sequence of keys/indexes) to a value inside ``node``."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _mutate(data: Any, path: tuple[Any, ...], action: str, value: Any) -> Any:
    if not path:
        return value if action == "replace" else data
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "drop":
        if isinstance(parent, dict):
            del parent[last]
        else:
            parent.pop(last)
    else:
        parent[last] = value
    return data


@FUZZ
@given(st.data())
def test_mutated_real_project(real_project: dict[str, Any], data: st.DataObject) -> None:
    doc: Any = copy.deepcopy(real_project)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        paths = _paths(doc)
        path = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["drop", "replace"]))
        value = data.draw(keyed_values)
        doc = _mutate(doc, path, action, value)
    _write_and_check(_dump(doc))


@FUZZ
@given(st.text(max_size=60) | st.sampled_from(_URIS), st.text(max_size=40)
       | st.sampled_from(_URIS) | st.none())
def test_resolve_image_uri_never_raises(uri: str, project_uri: str | None) -> None:
    result = resolve_image_uri(uri, Path("/nonexistent/qpseg/project.qpproj"), project_uri)
    assert result is None or (isinstance(result, Path) and result.exists())
    p = compat.file_uri_to_pure_path(uri)
    if p is not None and p.is_absolute():
        back = compat.path_to_file_uri(p)
        assert back.startswith("file:")
