"""Atomic writes keep the old file on failure and back up what they replace."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpseg._io import atomic_write, backup_path, write_json_atomic
from qpseg.errors import (
    EXIT_CODES,
    GeoJSONError,
    OutputError,
    ProjectError,
    QpsegError,
    SlideError,
)


def test_write_replace_keeps_backup(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "a.json"
    write_json_atomic(p, {"v": 1})
    assert not backup_path(p).exists()
    write_json_atomic(p, {"v": "é"})
    assert json.loads(p.read_text(encoding="utf-8")) == {"v": "é"}
    assert json.loads(backup_path(p).read_text(encoding="utf-8")) == {"v": 1}


def test_failure_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(p) as fh:
        fh.write("partial")
        raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_non_finite_json_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    with pytest.raises(ValueError):
        write_json_atomic(p, {"x": float("nan")})
    assert not p.exists()


def test_error_messages_are_one_line_and_mapped() -> None:
    e = GeoJSONError("bad\n  feature", "/x/y.geojson")
    assert str(e) == "/x/y.geojson: bad feature"
    assert QpsegError("plain").one_line() == "plain"
    codes = {EXIT_CODES[c] for c in (ProjectError, GeoJSONError, SlideError)}
    assert len(codes) == 3 and 0 not in codes


def test_written_files_get_umask_permissions(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------ links and backups

def _marker(tmp_path: Path) -> Path:
    """A file outside the output folder that a hostile link points at."""
    m = tmp_path / "elsewhere" / "precious.txt"
    m.parent.mkdir()
    m.write_bytes(b"the user's own file\n")
    return m


def test_a_bak_link_is_never_written_through(tmp_path: Path) -> None:
    from qpseg._io import backups

    marker = _marker(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    p = out / "a.json"
    write_json_atomic(p, {"v": 1})
    (out / "a.json.bak").symlink_to(marker)
    write_json_atomic(p, {"v": 2})
    write_json_atomic(p, {"v": 3})
    assert marker.read_bytes() == b"the user's own file\n"
    assert (out / "a.json.bak").is_symlink()  # left alone, not followed, not replaced
    assert json.loads(p.read_text()) == {"v": 3}
    assert [b.name for b in backups(p)] == ["a.json.bak", "a.json.bak.1"]
    assert json.loads((out / "a.json.bak.1").read_text()) == {"v": 2}  # the newest version


def test_a_dangling_bak_link_is_not_created_through(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "created-by-attacker.txt"
    target.parent.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    p = out / "a.txt"
    p.write_text("user")
    (out / "a.txt.bak").symlink_to(target)
    with atomic_write(p) as fh:
        fh.write("new")
    assert not target.exists()
    assert (out / "a.txt.bak.1").read_text() == "user"


def test_a_target_that_is_a_link_is_refused(tmp_path: Path) -> None:
    marker = _marker(tmp_path)
    p = tmp_path / "a.json"
    p.symlink_to(marker)
    with pytest.raises(OutputError, match="symbolic link") as info:
        write_json_atomic(p, {"v": 1})
    assert info.value.path == p and EXIT_CODES[OutputError] == 8
    assert marker.read_bytes() == b"the user's own file\n"
    assert p.is_symlink()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json", "elsewhere"]
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="folder"):
        write_json_atomic(tmp_path / "d", {})


def test_a_backup_of_a_file_qpseg_did_not_write_is_never_replaced(tmp_path: Path) -> None:
    """A user's file replaced twice: its backup survives; qpseg's own versions share one
    slot after it."""
    p = tmp_path / "1.geojson"
    p.write_text("pathologist")
    for version in ("pred-1", "pred-2", "pred-3"):
        with atomic_write(p) as fh:
            fh.write(version)
    assert p.read_text() == "pred-3"
    assert (tmp_path / "1.geojson.bak").read_text() == "pathologist"
    assert (tmp_path / "1.geojson.bak.1").read_text() == "pred-2"
    assert not (tmp_path / "1.geojson.bak.2").exists()
    # a qpseg backup edited by hand is no longer qpseg's: kept too
    (tmp_path / "1.geojson.bak.1").write_text("edited")
    with atomic_write(p) as fh:
        fh.write("pred-4")
    assert (tmp_path / "1.geojson.bak.1").read_text() == "edited"
    assert (tmp_path / "1.geojson.bak.2").read_text() == "pred-3"


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400))
def test_ledger_fuzz_never_costs_a_foreign_backup(tmp_path_factory: pytest.TempPathFactory,
                                                  ledger: bytes) -> None:
    """Whatever the ledger holds, a backup of a file qpseg did not write survives."""
    from qpseg._io import LEDGER_NAME

    d = tmp_path_factory.mktemp("ledger")
    (d / LEDGER_NAME).write_bytes(ledger)
    p = d / "x.txt"
    p.write_text("mine")
    for text in ("a", "b"):
        with atomic_write(p) as fh:
            fh.write(text)
    assert (d / "x.txt.bak").read_text() == "mine"
    assert p.read_text() == "b"


def test_a_full_disk_names_the_target_and_keeps_the_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "a.json"
    write_json_atomic(p, {"v": 1})

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as info:
        write_json_atomic(p, {"v": 2})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(p)
    assert OutputError.from_os_error(info.value).one_line() == \
        f"{p}: no space left on device"
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"v": 1}
    assert not [x for x in tmp_path.iterdir() if x.name.endswith(".tmp")]


# ------------------------------------------------------------------------------ locks

def test_file_lock_excludes_other_holders_and_threads(tmp_path: Path) -> None:
    from qpseg._io import FileLock

    a, b = FileLock(tmp_path / "k.lock"), FileLock(tmp_path / "k.lock")
    assert a.acquire()
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(b.acquire()))
    t.start()
    t.join()
    assert got == [False]
    assert a.holder().startswith(f"{os.getpid()}@")
    a.release()
    assert b.acquire(timeout_s=1.0)
    b.release()


_HOLD = """
import sys, time
from qpseg._io import FileLock
lock = FileLock(sys.argv[1])
assert lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_lock_of_a_killed_process_is_free(tmp_path: Path) -> None:
    from qpseg._io import FileLock

    path = tmp_path / "k.lock"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        lock = FileLock(path)
        assert not lock.acquire()
        assert lock.holder().startswith(f"{proc.pid}@")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert lock.acquire(timeout_s=5.0)  # no stale lock left by the dead process
        lock.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
