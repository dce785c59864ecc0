"""QuPath classifications: ``classifiers/classes.json`` and PathClass colours.

QuPath stores a class colour as a *signed* 32-bit ARGB int (alpha 255 makes it negative:
red is ``-65536``). Classes QuPath creates without a colour get a reproducible one: the
standard classes have fixed colours, any other name is coloured by ``java.util.Random`` seeded
with ``String.hashCode()`` (QuPath's ``PathClassFactory``), which :func:`default_color`
reproduces bit for bit (the gene-name classes of the BIOP mouse fixture are coloured so).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpseg._io import atomic_write
from qpseg.errors import ProjectError, ProjectWarning

__all__ = [
    "CLASSES_FILE",
    "DEFAULT_CLASSES",
    "PathClass",
    "argb_to_rgb",
    "default_classes",
    "default_color",
    "read_classes",
    "rgb_to_argb",
    "valid_rgb",
    "write_classes",
]

CLASSES_FILE = Path("classifiers") / "classes.json"

RGB = tuple[int, int, int]

# QuPath's standard classes, in the order QuPath writes them into a new project's classes.json
# (identical in the sbalci, uw-loci qppaquo2, BIOP omero and quicknii fixtures). Positive and
# Negative are ColorTools.makeScaledRGB((200,50,50) / (90,90,180), 1.25).
_STANDARD: dict[str, RGB] = {
    "Tumor": (200, 0, 0),
    "Stroma": (150, 200, 150),
    "Immune cells": (160, 90, 160),
    "Necrosis": (50, 50, 50),
    "Other": (255, 200, 0),
    "Region*": (0, 0, 180),
    "Ignore*": (180, 180, 180),
    "Positive": (250, 62, 62),
    "Negative": (112, 112, 225),
}
# Intensity classes (PathClassFactory: packRGB(...) scaled by 1.25, clipped to 255).
_INTENSITY: dict[str, RGB] = {
    "1+": (255, 255, 0),
    "2+": (255, 187, 62),
    "3+": (250, 62, 62),
}
# Colours used for classes derived from Tumor ("Tumor: Positive" etc.), unscaled.
_TUMOR_DERIVED: dict[str, RGB] = {
    "Positive": (200, 50, 50),
    "Negative": (90, 90, 180),
    "1+": (255, 215, 0),
    "2+": (225, 150, 50),
    "3+": (200, 50, 50),
}
# Brightness factor for other derived classes, by the derived part's name; 1.5 otherwise.
_DERIVED_SCALE: dict[str, float] = {
    "1+": 0.9, "2+": 0.6, "3+": 0.4, "Positive": 0.75, "Negative": 1.25,
}


@dataclass(frozen=True)
class PathClass:
    """A QuPath classification: its name (``"Tumor"``, ``"Tumor: Positive"``) and RGB colour.

    ``alpha`` is kept only so that a colour read from a file is written back unchanged
    (QuPath writes 255).
    """

    name: str
    color: RGB
    alpha: int = 255

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"PathClass name must be a non-empty string, not {self.name!r}")
        _check_rgb(self.color)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int) \
                or not 0 <= self.alpha <= 255:
            raise ValueError(f"alpha must be an int in 0..255, not {self.alpha!r}")
        object.__setattr__(self, "color", tuple(int(c) for c in self.color))

    @property
    def argb(self) -> int:
        """The colour as QuPath stores it: a signed 32-bit ARGB int."""
        return rgb_to_argb(self.color, alpha=self.alpha)

    @classmethod
    def from_argb(cls, name: str, argb: int) -> PathClass:
        """A class from a name and a (signed or unsigned) 32-bit ARGB int."""
        return cls(name, argb_to_rgb(argb), (argb >> 24) & 0xFF)

    @classmethod
    def with_default_color(cls, name: str) -> PathClass:
        """A class coloured as QuPath would colour a new class of that name."""
        return cls(name, default_color(name))


def valid_rgb(value: Any) -> RGB | None:
    """``value`` as an ``(r, g, b)`` tuple when it is three ints in 0..255 (a tuple or list),
    else None: the one rule for an RGB colour, for class colours and object colours alike."""
    if type(value) is tuple and len(value) == 3:  # the common case, without generators
        r, g, b = value
        if (type(r) is int and type(g) is int and type(b) is int
                and 0 <= r <= 255 and 0 <= g <= 255 and 0 <= b <= 255):
            return (r, g, b)
    if (isinstance(value, tuple | list) and len(value) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255
                    for c in value)):
        return (int(value[0]), int(value[1]), int(value[2]))
    return None


def _check_rgb(rgb: object) -> None:
    if valid_rgb(rgb) is None:
        raise ValueError(f"colour must be three ints in 0..255, not {rgb!r}")


def argb_to_rgb(value: int) -> RGB:
    """``-65536`` -> ``(255, 0, 0)``: the RGB part of a (signed or unsigned) ARGB int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ARGB colour must be an int, not {value!r}")
    return ((value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF)


def rgb_to_argb(rgb: Sequence[int], alpha: int = 255) -> int:
    """``(255, 0, 0)`` -> ``-65536``: a signed 32-bit ARGB int as QuPath writes it."""
    _check_rgb(tuple(rgb) if isinstance(rgb, list | tuple) else rgb)
    if isinstance(alpha, bool) or not isinstance(alpha, int) or not 0 <= alpha <= 255:
        raise ValueError(f"alpha must be an int in 0..255, not {alpha!r}")
    r, g, b = rgb
    unsigned = (alpha << 24) | (r << 16) | (g << 8) | b
    return unsigned - (1 << 32) if unsigned >= (1 << 31) else unsigned


# --------------------------------------------------------------------------------------------
# QuPath's default colours
# --------------------------------------------------------------------------------------------


def _java_string_hash(text: str) -> int:
    """Java's ``String.hashCode()`` (over UTF-16 code units, 32-bit signed overflow)."""
    data = text.encode("utf-16-le", errors="surrogatepass")
    h = 0
    for i in range(0, len(data), 2):
        h = (31 * h + (data[i] | (data[i + 1] << 8))) & 0xFFFFFFFF
    return h - (1 << 32) if h >= (1 << 31) else h


def _java_random_rgb(seed: int) -> RGB:
    """Three ``new java.util.Random(seed).nextInt(256)`` values."""
    mask = (1 << 48) - 1
    state = (seed ^ 0x5DEECE66D) & mask
    out = []
    for _ in range(3):
        state = (state * 0x5DEECE66D + 0xB) & mask
        # nextInt(256): bound is a power of two, so (256 * next(31)) >> 31 == next(31) >> 23.
        out.append((state >> 17) >> 23)
    return (out[0], out[1], out[2])


def _scaled(rgb: RGB, scale: float) -> RGB:
    """``ColorTools.makeScaledRGB``: scale each channel, clip to 0..255, truncate."""
    return tuple(min(255, max(0, int(c * scale))) for c in rgb)  # type: ignore[return-value]


def default_color(name: str) -> RGB:
    """The colour QuPath gives a class of this name when none is stored.

    Standard classes (Tumor, Stroma, Immune cells, Necrosis, Other, Region*, Ignore*, Positive,
    Negative, 1+, 2+, 3+) have fixed colours. Any other name gets the colour of
    ``new java.util.Random(name.hashCode())`` as QuPath's ``PathClassFactory`` does: stable
    across runs and machines. Derived names (``"Stroma: Positive"``) scale the parent's colour
    as ``PathClassFactory.getDerivedPathClass`` does.
    """
    if not isinstance(name, str):
        raise ValueError(f"class name must be a string, not {name!r}")
    parts = [p.strip() for p in name.strip().split(":")]
    parts = [p for p in parts if p] or [name.strip()]
    rgb = _base_color(parts[0])
    parent = parts[0]
    for child in parts[1:]:
        if parent == "Tumor" and child in _TUMOR_DERIVED:
            rgb = _TUMOR_DERIVED[child]
        else:
            rgb = _scaled(rgb, _DERIVED_SCALE.get(child, 1.5))
        parent = f"{parent}: {child}"
    return rgb


def _base_color(name: str) -> RGB:
    if name in _STANDARD:
        return _STANDARD[name]
    if name in _INTENSITY:
        return _INTENSITY[name]
    return _java_random_rgb(_java_string_hash(name))


def default_classes() -> list[PathClass]:
    """The classes (and colours) QuPath puts into a new project's ``classes.json``."""
    return [PathClass(n, c) for n, c in _STANDARD.items()]


DEFAULT_CLASSES: tuple[PathClass, ...] = tuple(default_classes())


# --------------------------------------------------------------------------------------------
# classes.json
# --------------------------------------------------------------------------------------------


def _load_json_file(path: Path) -> Any:
    """Parse a JSON file, turning every whole-file problem into a one-line ProjectError."""
    if not path.exists():
        raise ProjectError("file not found", path)
    if path.is_dir():
        raise ProjectError("is a folder, not a JSON file", path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProjectError(f"cannot read the file ({exc.strerror or exc})", path) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ProjectError(f"not UTF-8 text (byte {exc.start})", path) from None
    if not text.strip():
        raise ProjectError("the file is empty", path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (truncated?)" if exc.pos >= len(text.rstrip()) else ""
        raise ProjectError(
            f"not valid JSON{hint}: {exc.msg} at line {exc.lineno} column {exc.colno}", path
        ) from None
    except RecursionError:
        raise ProjectError("JSON is nested too deeply", path) from None
    except ValueError as exc:  # e.g. integers with more digits than Python converts
        raise ProjectError(f"not valid JSON: {exc}", path) from None
    if _too_deep(value, _MAX_JSON_DEPTH):
        # QuPath files are ~10 levels deep; far deeper would overflow copying/writing later.
        raise ProjectError("JSON is nested too deeply", path)
    return value


_MAX_JSON_DEPTH = 100


def _too_deep(value: Any, limit: int) -> bool:
    """True if lists/objects nest deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False


def _color_from_json(value: Any) -> int | None:
    """A 32-bit ARGB int from a JSON colour value, or None if unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not -(1 << 31) <= value < (1 << 32):
        return None
    return value


def read_classes(path: str | os.PathLike[str]) -> list[PathClass]:
    """Read a QuPath ``classes.json`` (``{"pathClasses": [{"name", "color"}, ...]}``).

    ``path`` may be the file, a project folder or a ``.qpproj`` file (then
    ``classifiers/classes.json`` next to it is read). A class without a colour gets
    :func:`default_color` (as in QuPath); malformed or duplicate items are skipped with a
    :class:`ProjectWarning`. Whole-file problems raise :class:`ProjectError`.
    """
    p = Path(path)
    if p.is_dir() and not p.name.endswith(".json"):
        p = p / CLASSES_FILE
    elif p.suffix == ".qpproj" or p.name.endswith(".qpproj.backup"):
        p = p.parent / CLASSES_FILE
    data = _load_json_file(p)
    if not isinstance(data, dict):
        raise ProjectError(f"top level is a {_kind(data)}, expected a JSON object", p)
    items = data.get("pathClasses")
    if not isinstance(items, list):
        raise ProjectError(
            "no 'pathClasses' list" if items is None else
            f"'pathClasses' is a {_kind(items)}, expected a list", p)
    out: list[PathClass] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        problem = None
        if not isinstance(item, dict):
            problem = f"is a {_kind(item)}, not an object"
        elif not isinstance(item.get("name"), str) or not item["name"].strip():
            problem = "has no name"
        if problem is not None:
            warnings.warn(f"{p}: class {i} {problem}; skipped", ProjectWarning, stacklevel=2)
            continue
        name: str = item["name"]
        if name in seen:
            warnings.warn(f"{p}: class {i} {name!r} is listed twice; the first is kept",
                          ProjectWarning, stacklevel=2)
            continue
        raw_color = item.get("color")
        argb = _color_from_json(raw_color)
        if argb is None:
            if raw_color is not None:
                warnings.warn(f"{p}: class {i} {name!r} has an invalid colour {raw_color!r}; "
                              "QuPath's default colour is used", ProjectWarning, stacklevel=2)
            cls = PathClass.with_default_color(name)
        else:
            cls = PathClass.from_argb(name, argb)
        seen.add(name)
        out.append(cls)
    return out


def write_classes(path: str | os.PathLike[str], classes: Iterable[PathClass]) -> None:
    """Write ``classes.json`` in QuPath's format (pretty-printed, signed ARGB ints), atomically.

    ``path`` may be the file or a project folder (then ``classifiers/classes.json``).
    Duplicate names raise :class:`ProjectError`.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CLASSES_FILE
    items = []
    seen: set[str] = set()
    for c in classes:
        if not isinstance(c, PathClass):
            raise ProjectError(f"not a PathClass: {c!r}", p)
        if c.name in seen:
            raise ProjectError(f"class {c.name!r} is listed twice", p)
        seen.add(c.name)
        items.append({"name": c.name, "color": c.argb})
    text = json.dumps({"pathClasses": items}, indent=2, ensure_ascii=False)
    try:
        with atomic_write(p, "w", backup=False) as fh:
            fh.write(text + "\n")
    except OSError as exc:
        raise ProjectError(f"cannot write the file ({exc.strerror or exc})", p) from None


def _kind(value: object) -> str:
    """A JSON-ish name for a Python value's type, for messages."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)
