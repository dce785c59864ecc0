"""Messages a user reads in a log: one line each, naming the file, whatever the terminal width."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from shapely.geometry import box

from qpseg.cli import main
from qpseg.qupath.geojson import QuPathObject, write_geojson


def _ann(geom: object, cls: str) -> QuPathObject:
    return QuPathObject(geometry=geom, object_type="annotation", classification=cls)


def _pair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    truth, pred = tmp_path / "t", tmp_path / "p"
    truth.mkdir()
    pred.mkdir()
    for n in ("a", name):
        write_geojson(truth / f"{n}.geojson", [_ann(box(0, 0, 80, 80), "Tumor")])
    write_geojson(pred / "a.geojson", [_ann(box(0, 0, 80, 80), "Tumor")])
    return truth, pred


def test_per_slide_failure_stays_on_one_line_when_piped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A long slide name and a long reason: Rich used to wrap them at 80 columns when the output
    # was not a terminal, splitting the failure over several lines of a log.
    name = "S" * 70 + "-a-very-long-slide-name-from-a-real-scanner"
    truth, pred = _pair(tmp_path, name)
    (pred / f"{name}.geojson").write_text("{not json", encoding="utf-8")
    code = main(["evaluate", "--truth", str(truth), "--pred", str(pred),
                 "--out", str(tmp_path / "o"), "--mpp", "1", "--no-report"])
    assert code == 1
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("failed")]
    assert len(lines) == 1, out
    assert name in lines[0] and "not valid JSON" in lines[0]


def test_disk_full_while_writing_results_is_one_line_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    truth, pred = _pair(tmp_path, "b")
    write_geojson(pred / "b.geojson", [_ann(box(0, 0, 80, 80), "Tumor")])
    real_replace = os.replace

    def full(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith(".csv"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full)
    code = main(["evaluate", "--truth", str(truth), "--pred", str(pred),
                 "--out", str(tmp_path / "o"), "--mpp", "1", "--no-report"])
    err = capsys.readouterr().err
    assert code == 8, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"error: {tmp_path / 'o'}") and lines[0].endswith(
        ".csv: no space left on device")
    assert not list((tmp_path / "o").glob("*.tmp")) and not list((tmp_path / "o").glob(".*.tmp"))


def test_a_stray_os_error_is_one_line_with_its_exit_code(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever command hits an OSError the library did not anticipate, the user sees one line
    # naming the file, never a traceback.
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "x.json"))

    # cli/validate.py imports validate_paths from qpseg.validation when it runs
    monkeypatch.setattr("qpseg.validation.validate_paths", boom)
    target = tmp_path / "a.geojson"
    write_geojson(target, [_ann(box(0, 0, 8, 8), "Tumor")])
    code = main(["validate", str(target)])
    err = capsys.readouterr().err
    assert code == 8 and err.strip() == f"error: {tmp_path / 'x.json'}: disk quota exceeded"
