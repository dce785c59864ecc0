"""Checkpoints never run code and training writes fail cleanly: hostile ``step-*.pt`` and
``best.pt`` files in an ``--out`` someone sent, fuzzing of the checkpoint loader, and full
disks, read-only folders and ``--out`` paths that cannot be folders."""

from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpseg.cli import main
from qpseg.errors import ConfigError, ModelError, OutputError
from qpseg.manifest import import_project
from qpseg.testing.projects import make_project
from qpseg.training import train
from qpseg.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    find_checkpoint,
    get_rng_state,
    load_best,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)

torch.set_num_threads(1)

#: A tiny tiny_unet on 32 px tiles at 4 µm/px (as in test_train.py): a step takes milliseconds.
CFG: dict[str, Any] = {
    "model_kwargs": {"tile_px": 32, "base_filters": 4, "depth": 2},
    "data": {"mpp": 4.0},
    "split": {"val": 0.25, "test": 0.0},
    "train": {"batch_size": 4, "log_every": 1, "checkpoint_every": 2, "steps": 4,
              "keep_checkpoints": 3},
}


class _Payload:
    """Pickles as a call of ``fn(*args)``: what a hostile file runs when it is unpickled."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


def _payloads(marker: Path) -> list[_Payload]:
    """Different ways a pickle can create ``marker``."""
    m = str(marker)
    return [
        _Payload(exec, (f"open({m!r}, 'w').close()",)),
        _Payload(eval, (f"__import__('pathlib').Path({m!r}).touch()",)),
        _Payload(os.system, (f"touch '{m}'",)),
        _Payload(subprocess.call, (["touch", m],)),
        _Payload(builtins.open, (m, "w")),
        _Payload(Path.touch, (marker,)),
    ]


def _write_pickle(path: Path, obj: Any, how: str) -> None:
    """``obj`` as torch's zip format, torch's legacy format, or a bare pickle (protocol n)."""
    if how == "zip":
        torch.save(obj, path)
    elif how == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=int(how))


HOW = ["zip", "legacy", "0", "2", "4", "5"]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], code: int) -> str:
    capsys.readouterr()
    assert main(argv) == code
    lines = capsys.readouterr().err.strip().splitlines()
    # The error is one line, the last; before it only the command's first line ("qpseg train:
    # loading ...") and one-line warnings may appear, never a traceback.
    assert lines and lines[-1].startswith("error: "), lines
    assert all(ln.startswith(("warning: ", "qpseg train: ")) for ln in lines[:-1]), lines
    return lines[-1]


# ----------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(manifest, a finished 4-step run with checkpoints at steps 2 and 4 and a best.pt)."""
    folder = tmp_path_factory.mktemp("ckptsec")
    proj = make_project(folder / "p", n_slides=4, width=1024, height=1024, seed=11)
    manifest = import_project(proj.path, folder / "m", use_paquo=False)
    assert manifest.path is not None
    out = folder / "run"
    train(manifest.path, out, model="tiny_unet", config=CFG)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["best.pt", "step-00000002.pt", "step-00000004.pt"], names
    return manifest.path, out


@pytest.fixture
def copy(run: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    manifest, out = run
    dst = tmp_path / "run"
    shutil.copytree(out, dst)
    return manifest, dst


def test_checkpoints_hold_only_what_weights_only_loads(run: tuple[Path, Path]) -> None:
    _, out = run
    for p in sorted((out / "checkpoints").glob("*.pt")):
        torch.load(p, map_location="cpu", weights_only=True)  # raises on anything pickled
    ck = load_checkpoint(out / "checkpoints" / "step-00000004.pt")
    assert ck["version"] == CHECKPOINT_VERSION and ck["stage"] == "train"
    assert isinstance(ck["rng"][0]["numpy"]["key"], torch.Tensor)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    random.seed(1)
    np.random.seed(2)
    np.random.standard_normal()  # a cached Gaussian is part of numpy's state too
    path = save_checkpoint(tmp_path, 1, {"rng": [get_rng_state(gen)]})
    expected = (random.random(), np.random.standard_normal(), np.random.rand(),
                torch.rand(2).tolist(), torch.rand(2, generator=gen).tolist())
    state = torch.load(path, map_location="cpu", weights_only=True)["rng"][0]
    set_rng_state(state, gen)
    got = (random.random(), np.random.standard_normal(), np.random.rand(),
           torch.rand(2).tolist(), torch.rand(2, generator=gen).tolist())
    assert got == expected


@pytest.mark.parametrize("how", ["zip", "2", "4"])
def test_resume_never_runs_a_pickled_checkpoint(copy: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                how: str) -> None:
    manifest, out = copy
    marker = tmp_path / "pwned"
    evil = out / "checkpoints" / "step-00000099.pt"  # the newest: the one --resume reads
    _write_pickle(evil, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                         "stage": "train", "model": _payloads(marker)[0]}, how)
    err = _one_line_error(capsys, ["train", str(manifest), "--out", str(out), "--resume", "-q"],
                          2)
    assert not marker.exists()
    assert err.startswith(f"error: {evil}: this checkpoint cannot be loaded safely: it holds "
                          "pickled Python objects"), err
    assert "never runs pickled code" in err and "False" not in err and "trust" not in err


def test_unreadable_newest_checkpoint_is_an_error_not_a_skip(copy: tuple[Path, Path]) -> None:
    manifest, out = copy
    newest = out / "checkpoints" / "step-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.raises(ConfigError) as err:
        train(manifest, out, resume=True)
    assert err.value.path == newest
    assert "cannot be loaded safely" in err.value.message


def test_hostile_best_weights_are_refused(copy: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, out = copy  # a finished run: resuming it loads best.pt again
    marker = tmp_path / "pwned"
    best = out / "checkpoints" / "best.pt"
    _write_pickle(best, {"model": _payloads(marker)[2]}, "zip")
    with pytest.raises(ConfigError) as err:
        train(manifest, out, resume=True)
    assert err.value.path == best and "cannot be loaded safely" in err.value.message
    assert not marker.exists()
    torch.save({"model": {"w": [1, 2]}}, best)  # loadable, but not a state dict of tensors
    with pytest.raises(ConfigError, match="no state dict of tensors"):
        load_best(best)


def _edit_rng(ck: dict[str, Any]) -> None:
    ck["rng"][0]["numpy"]["key"] = torch.zeros(3, dtype=torch.int64)


def _edit_python_rng(ck: dict[str, Any]) -> None:
    ck["rng"][0]["python"] = "not a state"


def _edit_rng_list(ck: dict[str, Any]) -> None:
    ck["rng"] = {"0": 1}


def _edit_loop_key(ck: dict[str, Any]) -> None:
    ck["loop"]["injected"] = 1


def _edit_loop_type(ck: dict[str, Any]) -> None:
    ck["loop"]["step"] = "4"


def _edit_sampler(ck: dict[str, Any]) -> None:
    ck["sampler"] = {}


def _edit_scheduler(ck: dict[str, Any]) -> None:
    ck["scheduler"] = [1, 2]


def _edit_model(ck: dict[str, Any]) -> None:
    ck["model"] = {"nope": torch.zeros(1)}


@pytest.mark.parametrize("edit", [_edit_rng, _edit_python_rng, _edit_rng_list, _edit_loop_key,
                                  _edit_loop_type, _edit_sampler, _edit_scheduler, _edit_model])
def test_checkpoint_that_does_not_fit_is_a_config_error(copy: tuple[Path, Path],
                                                        edit: Callable[[dict[str, Any]], None]
                                                        ) -> None:
    manifest, out = copy
    newest = out / "checkpoints" / "step-00000004.pt"
    ck = torch.load(newest, map_location="cpu", weights_only=True)
    ck["loop"]["finished"] = False  # so the run really restores everything
    edit(ck)
    torch.save(ck, newest)
    with pytest.raises(ConfigError) as err:
        train(manifest, out, resume=True)
    assert err.value.path == newest
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- fuzzing
def _outcome(path: Path) -> dict[str, Any] | None:
    """load_checkpoint's result, or None for a ConfigError/ModelError naming the file."""
    try:
        return load_checkpoint(path)
    except (ConfigError, ModelError) as exc:
        assert exc.path == path and "\n" not in str(exc)
        assert "False" not in exc.message and "trust" not in exc.message
        return None


@pytest.fixture(scope="module")
def real_checkpoint() -> Iterator[bytes]:
    from qpseg.models import create_model

    model = create_model("tiny_unet", 3, base_filters=4, depth=2, tile_px=32)
    opt = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 3, 32, 32)).sum().backward()
    opt.step()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(tmp, 3, {"stage": "train", "model": model.state_dict(),
                                        "optimizer": opt.state_dict(),
                                        "rng": [get_rng_state(torch.Generator())],
                                        "loop": {"step": 3, "best_value": None}})
        yield path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=600))
def test_fuzz_random_bytes_are_config_errors(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step-00000001.pt"
        path.write_bytes(raw)
        assert _outcome(path) is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.floats(0.0, 0.9999), flips=st.lists(st.tuples(st.floats(0, 0.9999),
                                                             st.integers(1, 255)), max_size=3),
       junk=st.binary(max_size=64))
def test_fuzz_damaged_real_checkpoints(real_checkpoint: bytes, cut: float,
                                       flips: list[tuple[float, int]], junk: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step-00000003.pt"
        damaged = real_checkpoint[: int(cut * len(real_checkpoint))] + junk
        path.write_bytes(damaged)
        # A zip cut near its end can still load (torch writes the central directory twice:
        # zip64 record and classic end record); either way it is a ConfigError or the real
        # checkpoint, never anything else.
        result = _outcome(path)
        assert result is None or result["format"] == CHECKPOINT_FORMAT
        if len(damaged) < len(real_checkpoint) // 2:
            assert result is None  # half a checkpoint never loads
        data = bytearray(real_checkpoint)
        for where, xor in flips:
            data[int(where * len(data))] ^= xor
        path.write_bytes(bytes(data))
        result = _outcome(path)  # a flipped tensor byte may still load; nothing else happens
        assert result is None or result["format"] == CHECKPOINT_FORMAT


_plain = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_objects = st.one_of(
    st.sets(st.integers(), max_size=3), st.frozensets(st.text(max_size=3), max_size=3),
    st.complex_numbers(), st.decimals(), st.fractions(), st.datetimes(), st.dates(),
    st.builds(Path, st.text(max_size=5)), st.binary(max_size=8).map(bytearray),
    st.integers(0, 9).map(range), st.sampled_from([len, print, os.getcwd, Path, dict, type,
                                                    slice(1, 2), Ellipsis, NotImplemented]),
    st.integers(1, 4).map(np.zeros), st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.floats(width=32).map(np.float32),
    st.lists(_plain, max_size=3).map(lambda v: np.array(v, dtype=object)),
    st.integers(0, 3).map(lambda n: torch.nn.Linear(n + 1, 1)),
    st.just(torch.device("cpu")), st.just(torch.float16))


def _tree(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=5), inner, max_size=3) | st.tuples(inner, inner), max_leaves=8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=_tree(_plain | _objects), how=st.sampled_from(HOW), wrap=st.booleans())
def test_fuzz_pickles_of_arbitrary_objects(obj: Any, how: str, wrap: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step-00000001.pt"
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "x": obj} \
            if wrap else obj
        try:
            _write_pickle(path, payload, how)
        except (pickle.PicklingError, TypeError, AttributeError, ValueError, RecursionError):
            return  # not every object pickles with every protocol
        result = _outcome(path)
        assert result is None or (wrap and result["format"] == CHECKPOINT_FORMAT)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, 5), how=st.sampled_from(HOW), wrap=st.booleans(),
       extra=_tree(_plain))
def test_fuzz_reduce_payloads_never_run(which: int, how: str, wrap: bool, extra: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "pwned"
        payload: Any = [extra, _payloads(marker)[which]]
        if wrap:
            payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                       "stage": "train", "model": payload}
        path = Path(tmp) / "step-00000001.pt"
        _write_pickle(path, payload, how)
        assert _outcome(path) is None
        assert not marker.exists()
        with pytest.raises(ConfigError):
            load_best(path)
        assert not marker.exists()


# ----------------------------------------------------------------------------- writing
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def _enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _writer_failed(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                       "writing file data/0: file write failed")


def test_checkpoint_write_failures_are_output_errors(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "step-00000007.pt"
    monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(OutputError) as err:
        save_checkpoint(tmp_path, 7, {"stage": "x"})
    assert err.value.one_line() == f"{path}: no space left on device"
    assert not list(tmp_path.iterdir())  # the temp file is gone
    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", _writer_failed)
    with pytest.raises(OutputError) as err2:
        save_checkpoint(tmp_path, 7, {"stage": "x"})
    assert err2.value.path == path and "PytorchStreamWriter" not in err2.value.message
    assert "write failed" in err2.value.message and not list(tmp_path.iterdir())

    def bug(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("something unrelated to writing")

    monkeypatch.setattr(torch, "save", bug)  # a bug stays a bug, but leaves no temp file
    with pytest.raises(RuntimeError, match="unrelated"):
        save_checkpoint(tmp_path, 7, {"stage": "x"})
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError) as err3:  # checkpoints/ under a regular file
        save_checkpoint(tmp_path / "file" / "checkpoints", 1, {"stage": "x"})
    assert err3.value.path == tmp_path / "file" / "checkpoints" / "step-00000001.pt"


def test_checkpoint_state_must_be_plain_data(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"checkpoint\['odd'\] is a \w*Path"):
        save_checkpoint(tmp_path, 1, {"odd": Path("/")})
    path = save_checkpoint(tmp_path, 2, {"n": np.int64(3), "a": np.arange(3)})
    ck = load_checkpoint(path)
    assert ck["n"] == 3 and type(ck["n"]) is int and torch.equal(ck["a"], torch.arange(3))


def test_train_on_a_full_disk_is_one_line_and_leaves_no_temp_file(
        run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    manifest, _ = run
    out = tmp_path / "full"
    monkeypatch.setattr(torch, "save", _writer_failed)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CFG))
    err = _one_line_error(capsys, ["train", str(manifest), "--out", str(out), "--model",
                                   "tiny_unet", "--config", str(cfg), "-q"], 8)
    assert err.startswith(f"error: {out / 'checkpoints' / 'step-00000002.pt'}: the write "
                          "failed part-way"), err
    assert _leftovers(out) == []
    monkeypatch.undo()

    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "train_config.json":
            _enospc()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out2 = tmp_path / "full2"
    with pytest.raises(OutputError) as exc:
        train(manifest, out2, model="tiny_unet", config=CFG)
    assert exc.value.one_line() == f"{out2 / 'train_config.json'}: no space left on device"
    assert _leftovers(out2) == []


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training must not start: data preparation (the first long step) fails the test."""
    import qpseg.training.data

    def started(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started before the output folder was checked")

    monkeypatch.setattr(qpseg.training.data, "prepare_data", started)


@pytest.mark.usefixtures("no_training")
def test_unwritable_out_fails_before_training(run: tuple[Path, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    manifest, _ = run
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError) as err:  # --out under a regular file
        train(manifest, blocker / "out", model="tiny_unet", config=CFG)
    assert err.value.path == blocker / "out"
    with pytest.raises(OutputError, match="is not a folder") as err2:  # --out is a file
        train(manifest, blocker, model="tiny_unet", config=CFG)
    assert err2.value.path == blocker
    line = _one_line_error(capsys, ["train", str(manifest), "--out", str(blocker / "out"),
                                    "--model", "tiny_unet", "-q"], 8)
    assert line.startswith(f"error: {blocker / 'out'}: ")
    import qpseg._io

    monkeypatch.setattr(qpseg._io.os, "write", _enospc)  # the disk is full from the start
    with pytest.raises(OutputError) as err3:
        train(manifest, tmp_path / "ok", model="tiny_unet", config=CFG)
    assert err3.value.one_line() == f"{tmp_path / 'ok'}: no space left on device"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders")
@pytest.mark.usefixtures("no_training")
def test_read_only_out_fails_before_training(run: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, _ = run
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="ermission denied") as err:
            train(manifest, ro, model="tiny_unet", config=CFG)
        assert err.value.path == ro
    finally:
        ro.chmod(0o755)


def test_find_checkpoint_reads_only_the_newest(copy: tuple[Path, Path]) -> None:
    _, out = copy
    ckdir = out / "checkpoints"
    (ckdir / "step-00000002.pt").write_bytes(b"garbage")  # older ones are not read
    path, ck = find_checkpoint(ckdir) or (None, {})
    assert path == ckdir / "step-00000004.pt" and ck["loop"]["step"] == 4
