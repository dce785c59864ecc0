"""Fuzzing the model-package reader: any config.json or weights file ends in a package or a
ModelError, never another exception."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qpseg.errors import ModelError
from qpseg.models import ModelPackage, create_model, load_package, save_package


@pytest.fixture(scope="module")
def base_package() -> Iterator[Path]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("tiny_unet", 3, base_filters=4, depth=2, tile_px=32)
    with tempfile.TemporaryDirectory() as tmp:
        yield save_package(Path(tmp) / "pkg", model, class_names=["bg", "a", "b"], mpp=0.5,
                           training={"slides": 1})


json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(
    allow_nan=True, allow_infinity=True) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
KEYS = ["format", "format_version", "qpseg_version", "architecture", "architecture_kwargs",
        "class_names", "class_colors", "ignore_index", "mpp", "input_mpp", "tile_px",
        "normalization", "training", "weights", "weights_sha256", "stage_normalization"]
# Plausible values that keep the model small when they happen to be accepted.
plausible = {
    "architecture": st.sampled_from(["tiny_unet", "tiny_unet", "dmmn_s1", "otsu_watershed",
                                     "nope"]),
    "architecture_kwargs": st.fixed_dictionaries({}, optional={
        "base_filters": st.integers(-2, 6), "depth": st.integers(-1, 3),
        "tile_px": st.sampled_from([0, 16, 32, 33, 64]), "in_channels": st.integers(0, 4),
        "pretrained": st.text(max_size=5), "bogus": json_scalars}),
    "tile_px": st.sampled_from([32, 64, -1, 0, 2**40]),
    "class_names": st.lists(st.sampled_from(["bg", "a", "b", "", "c"]), max_size=4),
    "ignore_index": st.integers(-3, 300),
    "input_mpp": st.none() | st.lists(st.none() | st.floats(-1, 4), max_size=3),
}


def _write_and_load(base: Path, config: Any, raw: bytes | None = None) -> ModelPackage | None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "pkg"
        directory.mkdir()
        shutil.copy(base / "weights.pt", directory / "weights.pt")
        if raw is None:
            (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
        else:
            (directory / "config.json").write_bytes(raw)
        try:
            return load_package(directory)
        except ModelError as exc:
            assert "\n" not in str(exc)
            return None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_config_is_package_or_model_error(base_package: Path, data: Any) -> None:
    config = json.loads((base_package / "config.json").read_text())
    for key in data.draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True)):
        action = data.draw(st.sampled_from(["drop", "random", "plausible"]))
        if action == "drop":
            config.pop(key, None)
        elif action == "plausible" and key in plausible:
            config[key] = data.draw(plausible[key])
        else:
            config[key] = data.draw(json_values)
    pkg = _write_and_load(base_package, config)
    event("loaded" if pkg is not None else "ModelError")
    if pkg is not None:
        assert pkg.architecture == config["architecture"]
        assert pkg.num_classes == len(config["class_names"])


@settings(max_examples=100, deadline=None)
@given(config=json_values)
def test_arbitrary_json_is_model_error(base_package: Path, config: Any) -> None:
    assert _write_and_load(base_package, config) is None


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_are_model_error(base_package: Path, raw: bytes) -> None:
    assert _write_and_load(base_package, None, raw) is None


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=400), keep=st.integers(0, 4000))
def test_corrupt_weights_are_model_error(base_package: Path, blob: bytes, keep: int) -> None:
    original = (base_package / "weights.pt").read_bytes()
    config = json.loads((base_package / "config.json").read_text())
    config.pop("weights_sha256")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "config.json").write_text(json.dumps(config))
        # a prefix of the real file followed by junk: truncated zips, bad records, random bytes
        (directory / "weights.pt").write_bytes(original[:keep] + blob)
        try:
            load_package(directory)
        except ModelError as exc:
            assert exc.path == directory / "weights.pt"


class _Payload:
    """Pickles as a call of ``fn(*args)``: what a hostile weights file runs when unpickled."""

    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, 3), protocol=st.sampled_from(["torch", 0, 2, 4, 5]),
       extra=json_values)
def test_pickled_payload_weights_never_run(base_package: Path, which: int, protocol: Any,
                                           extra: Any) -> None:
    import builtins
    import os
    import pickle

    config = json.loads((base_package / "config.json").read_text())
    config.pop("weights_sha256")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "pkg"
        directory.mkdir()
        marker = Path(tmp) / "pwned"
        payload = [_Payload(exec, (f"open({str(marker)!r}, 'w').close()",)),
                   _Payload(os.system, (f"touch '{marker}'",)),
                   _Payload(builtins.open, (str(marker), "w")),
                   _Payload(Path.touch, (marker,))][which]
        state = {"head.weight": payload, "extra": extra}
        (directory / "config.json").write_text(json.dumps(config))
        if protocol == "torch":
            torch.save(state, directory / "weights.pt")
        else:
            with open(directory / "weights.pt", "wb") as fh:
                pickle.dump(state, fh, protocol=protocol)
        with pytest.raises(ModelError) as err:
            load_package(directory)
        assert not marker.exists()
        msg = err.value.one_line()
        assert err.value.path == directory / "weights.pt" and "\n" not in msg
        assert "never runs pickled code" in msg and "False" not in msg
