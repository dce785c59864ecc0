"""GeoJSON files -> :class:`QuPathObject`: :func:`read_geojson` and the file handling under it.

A file is read whole (gzip-compressed or not, orjson with the stdlib as fallback) and parsed by
:mod:`qpseg.qupath.geojson_parse`, or, when large, in chunks by
:mod:`qpseg.qupath.geojson_stream`; both give the same objects, problems and errors.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

from qpseg.errors import GeoJSONError, GeoJSONWarning
from qpseg.qupath.geojson_model import FeatureProblem, QuPathObject, _gc_paused, _orjson
from qpseg.qupath.geojson_parse import _parse
from qpseg.qupath.geojson_stream import _stream_file

__all__ = ["read_geojson"]


# --------------------------------------------------------------------------------------------
# Reading: whole file
# --------------------------------------------------------------------------------------------


def _load_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in ``path`` (gzip-compressed or not); GeoJSONError for whole-file problems."""
    path = Path(path)
    if not path.exists():
        raise GeoJSONError("file not found", path)
    if path.is_dir():
        raise GeoJSONError("is a directory, not a GeoJSON file", path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GeoJSONError(f"cannot read file ({exc.strerror or exc})", path) from exc
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the extension says
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise GeoJSONError(f"corrupt gzip data ({exc})", path) from exc
    if not raw.strip():
        raise GeoJSONError("file is empty", path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GeoJSONError(f"not UTF-8 text (byte {exc.start})", path) from exc
    with _gc_paused():
        if _orjson is not None:
            try:
                return _orjson.loads(text)
            except _orjson.JSONDecodeError:
                pass  # NaN literals, huge integers, deep nesting: the stdlib says what and where
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise GeoJSONError(f"not valid JSON ({exc.msg} at line {exc.lineno} column "
                               f"{exc.colno})", path) from exc
        except RecursionError as exc:
            raise GeoJSONError("JSON nested too deeply", path) from exc
        except ValueError as exc:  # e.g. an integer with more digits than Python converts
            raise GeoJSONError(f"not valid JSON ({exc})", path) from exc


def _parse_file(path: Path, lean: bool = False
                ) -> tuple[int, list[tuple[int, QuPathObject]], list[FeatureProblem]]:
    """:func:`_parse` of the JSON in ``path`` (large files in chunks; same result)."""
    streamed = _stream_file(path, lean)
    if streamed is not None:
        return streamed
    return _parse(_load_json(path), path, lean)


def read_geojson(path: str | os.PathLike[str], *, lean: bool = False) -> list[QuPathObject]:
    """Read the QuPath objects of a ``.geojson`` (or gzip-compressed ``.geojson.gz``) file.

    Raises :class:`GeoJSONError` for whole-file problems (missing, empty, not JSON, wrong
    top-level type); bad features are skipped with a warning (see :func:`parse_features`).
    ``lean``: the objects carry no measurements (checked as usual, same warnings, but not
    kept), for commands that need only outlines, classes and review state (a cell export
    holds dozens of measurements per object). Large files are parsed a few MB at a time.
    """
    path = Path(path)
    _, objects, problems = _parse_file(path, lean)
    for problem in problems:
        warnings.warn(f"{path}: feature {problem.index}: {problem.message}",
                      GeoJSONWarning, stacklevel=2)
    return [obj for _, obj in objects]
