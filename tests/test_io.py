"""Atomic writes keep the old file on failure and back up what they replace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpseg._io import atomic_write, backup_path, write_json_atomic
from qpseg.errors import EXIT_CODES, GeoJSONError, ProjectError, QpsegError, SlideError


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
