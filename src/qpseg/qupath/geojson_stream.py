"""Large GeoJSON files read a few MB of features at a time, with the whole-file answer.

Used by :mod:`qpseg.qupath.geojson_read` for uncompressed files of 16 MB or more, so the parsed
JSON of all features never exists at once; how it works is described below.
"""

from __future__ import annotations

import json
import re
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import GeoJSONError
from qpseg.qupath.geojson_model import FeatureProblem, QuPathObject, _gc_paused, _orjson
from qpseg.qupath.geojson_parse import _feature_list, _parse_items

if TYPE_CHECKING:  # numpy is imported lazily: the CLI must start fast
    import numpy as np

__all__: list[str] = []


# Streaming: a large file's features are parsed a few MB at a time, so the parsed JSON of all
# of them never exists at once (at 10^6 features it took several GB). The file is mapped, not
# read; structural characters (brackets, commas outside strings) are found with numpy block by
# block, and each run of whole features goes to orjson on its own. Anything unexpected (a
# top-level shape other than an array or an object with a "features" array, text orjson
# refuses and the stdlib does not read either) falls back to parsing the whole file, so the
# result (objects, problems, errors) is always the whole-file parse's.
_STREAM_MIN_BYTES = 16 * 2**20   # smaller files are parsed whole
_STREAM_BLOCK = 4 * 2**20        # bytes scanned at a time (its numpy work takes ~10x that)
_STREAM_CHUNK = 2 * 2**20        # about this many bytes of features parsed at a time
_STREAM_SENTINEL = "\x00qpseg-features"   # stands in for the features in the skeleton
_STREAM_SENTINEL_JSON = b'"\\u0000qpseg-features"'
_KEY_BEFORE_VALUE = re.compile(rb'\s*"((?:[^"\\]|\\.)*)"\s*:\s*\Z', re.DOTALL)
_JSON_SPACE = b" \t\r\n"


_MALLOC_TRIM: list[Any] = []


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    The parsed JSON and numpy temporaries of each chunk are freed among the geometries that
    stay, and glibc keeps such holes: without this a 10^5-feature read kept ~40 % more.
    """
    if not _MALLOC_TRIM:
        trim = None
        try:
            import ctypes

            trim = ctypes.CDLL(None).malloc_trim
            trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError, ImportError):
            trim = None
        _MALLOC_TRIM.append(trim)
    if _MALLOC_TRIM[0] is not None:
        _MALLOC_TRIM[0](0)


class _NotStreamable(Exception):
    """The file is not read in chunks (internal): the whole-file parse reads it."""


def _json_loads_chunk(text: bytes) -> Any:
    """``text`` parsed as orjson does, else as the stdlib does (NaN literals, big ints, as the
    whole-file parse falls back); _NotStreamable when neither reads it."""
    if _orjson is not None:
        try:
            return _orjson.loads(text)
        except _orjson.JSONDecodeError:
            pass
    try:
        return json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise _NotStreamable(str(exc)) from exc


def _scan_codes() -> np.ndarray:
    import numpy as np

    codes = np.zeros(256, dtype=np.uint8)
    codes[[ord("{"), ord("[")]] = 1
    codes[[ord("}"), ord("]")]] = 2
    codes[ord(",")] = 3
    codes[ord('"')] = 4
    codes[ord("\\")] = 5
    return codes


class _Scanner:
    """Structural characters of JSON text, block by block: ``(positions, codes, depth
    before)`` of the brackets (code 1 open, 2 close) and commas (3) outside strings."""

    def __init__(self, buf: Any) -> None:
        self.buf = buf
        self.codes = _scan_codes()
        self.in_string = 0
        self.backslashes = 0   # length of the backslash run that ended the last block
        self.depth = 0

    def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import numpy as np

        data = np.frombuffer(self.buf, dtype=np.uint8, count=stop - start, offset=start)
        codes = self.codes[data]
        del data
        pos = np.flatnonzero(codes)
        code = codes[pos]
        del codes
        quotes = pos[code == 4]
        slashes = pos[code == 5]
        carried = self.backslashes
        self.backslashes = 0
        if len(slashes):
            new_run = np.ones(len(slashes), dtype=bool)
            new_run[1:] = np.diff(slashes) != 1
            run_id = np.cumsum(new_run) - 1
            run_start = slashes[new_run]
            k = np.searchsorted(slashes, quotes)
            after = (k > 0) & (slashes[np.maximum(k - 1, 0)] == quotes - 1)
            first = run_start[run_id[np.maximum(k - 1, 0)]]
            run = quotes - first + np.where(first == 0, carried, 0)
            escaped = after & (run % 2 == 1)
            escaped |= (quotes == 0) & (carried % 2 == 1)
            quotes = quotes[~escaped]
            if slashes[-1] == stop - start - 1:
                last = int(run_start[-1])
                self.backslashes = stop - start - last + (carried if last == 0 else 0)
        elif len(quotes) and carried % 2 == 1 and quotes[0] == 0:
            quotes = quotes[1:]   # escaped by the backslash that ended the last block
        struct = code <= 3
        spos = pos[struct]
        scode = code[struct]
        outside = (np.searchsorted(quotes, spos) + self.in_string) % 2 == 0
        spos, scode = spos[outside], scode[outside]
        self.in_string = (self.in_string + len(quotes)) % 2
        delta = np.where(scode == 1, 1, np.where(scode == 2, -1, 0))
        after_depth = self.depth + np.cumsum(delta)
        before = after_depth - delta
        if len(after_depth):
            self.depth = int(after_depth[-1])
        return spos + start, scode, before


def _stream_file(path: Path, lean: bool
                 ) -> tuple[int, list[tuple[int, QuPathObject]], list[FeatureProblem]] | None:
    """:func:`_parse` of the file's JSON, parsed a chunk of features at a time; None when the
    file is small, compressed or _NotStreamable (the caller parses it whole)."""
    import mmap

    try:
        if not path.is_file() or path.stat().st_size < _STREAM_MIN_BYTES:
            return None
        with open(path, "rb") as fh:
            if fh.read(2) == b"\x1f\x8b":
                return None
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    try:
        with _gc_paused():
            return _stream_features(mm, path, lean)
    except _NotStreamable:
        return None
    finally:
        mm.close()


def _stream_features(mm: Any, path: Path, lean: bool
                     ) -> tuple[int, list[tuple[int, QuPathObject]], list[FeatureProblem]]:
    import mmap

    import numpy as np

    size = len(mm)
    top = 3 if mm[:3] == b"\xef\xbb\xbf" else 0
    while top < size and mm[top] in _JSON_SPACE:
        top += 1
    if top >= size or mm[top] not in b"[{":
        raise _NotStreamable("not an array or object")
    scanner = _Scanner(mm)
    array_depth = 0        # depth inside the features array (0: not found yet)
    opened = closed = -1   # positions of the features array's brackets
    last_struct = top      # the latest comma at depth 1 (a key follows it)
    chunk_start = -1       # where the features not parsed yet begin
    pending = np.empty(0, dtype=np.int64)   # commas between those features
    n_features = 0
    objects: list[tuple[int, QuPathObject]] = []
    problems: list[FeatureProblem] = []
    released = 0           # the file's pages before this are dropped from memory
    page = mmap.PAGESIZE

    def parse(stop: int, n_separators: int, final: bool) -> None:
        nonlocal n_features
        items = _json_loads_chunk(b"[" + mm[chunk_start:stop] + b"]")
        empty_array = final and n_features == 0 and n_separators == 0 and items == []
        if type(items) is not list or (len(items) != n_separators + 1 and not empty_array):
            raise _NotStreamable("features do not parse one by one")
        found, notes = _parse_items(items, n_features, lean)
        n_features += len(items)
        del items
        objects.extend(found)
        problems.extend(notes)
        _trim_heap()

    for start in range(top, size, _STREAM_BLOCK):
        stop = min(start + _STREAM_BLOCK, size)
        spos, scode, before = scanner.block(start, stop)
        if array_depth == 0:
            for j in np.flatnonzero(before <= 1).tolist():
                p, c, d = int(spos[j]), int(scode[j]), int(before[j])
                if p == top:
                    if mm[top] == ord("["):
                        array_depth, opened = 1, p
                        break
                    continue
                if d == 0 or (d == 1 and c == 2):  # the top-level value ended: no features
                    raise _NotStreamable("no features array")
                if c == 1 and mm[p] == ord("["):
                    key = _KEY_BEFORE_VALUE.match(mm[last_struct + 1:p])
                    if key is not None and _json_loads_chunk(
                            b'"' + key.group(1) + b'"') == "features":
                        array_depth, opened = 2, p
                        break
                if c == 3:
                    last_struct = p
            if array_depth == 0:
                continue
            chunk_start = opened + 1
        inside = (spos > opened) & (before == array_depth)
        ends = spos[inside & (scode == 2)]
        pending = np.concatenate([pending, spos[inside & (scode == 3)]])
        if len(ends):
            closed = int(ends[0])
            pending = pending[pending < closed]
        while True:
            cut = int(np.searchsorted(pending, chunk_start + _STREAM_CHUNK))
            if cut >= len(pending):
                break
            parse(int(pending[cut]), cut, False)
            chunk_start = int(pending[cut]) + 1
            pending = pending[cut + 1:]
        if closed >= 0:
            parse(closed, len(pending), True)
            break
        drop = (chunk_start // page) * page
        if drop > released:
            with suppress(OSError, ValueError, AttributeError):  # madvise: Unix, Python 3.8+
                mm.madvise(mmap.MADV_DONTNEED, released, drop - released)
            released = drop
    if closed < 0:
        raise _NotStreamable("features array not closed")
    if array_depth == 1:
        if mm[closed + 1:].strip(_JSON_SPACE):
            raise _NotStreamable("text after the top-level array")
    else:
        skeleton = _json_loads_chunk(mm[top:opened + 1] + _STREAM_SENTINEL_JSON + mm[closed:])
        try:
            listed = _feature_list(skeleton, path)
        except GeoJSONError as exc:
            raise _NotStreamable("not a FeatureCollection") from exc
        if not (type(skeleton) is dict and listed is skeleton.get("features")
                and listed == [_STREAM_SENTINEL]):
            raise _NotStreamable("not a FeatureCollection")
    return n_features, objects, problems
