"""Quirks of QuPath versions 0.2-0.7 in one place, each with the fixture that shows it.

Fixture folders are under ``../shared/fixtures/qupath`` (see its SOURCES.md). Everything here is
pure string/path logic: no file is opened except through :func:`path_exists`.
"""

from __future__ import annotations

import math
import ntpath
import os
import posixpath
import re
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "BUILDER_NESTED_KEY",
    "MICRON_UNITS",
    "PROVIDER_CLASSES",
    "ROTATION_DEGREES",
    "QuPathVersion",
    "file_uri_to_pure_path",
    "is_file_uri",
    "micron_value",
    "parse_version",
    "path_exists",
    "path_to_file_uri",
    "provider_short_name",
    "relative_parts",
    "relocate",
    "to_local_path",
    "uri_scheme",
]

# --------------------------------------------------------------------------------------------
# Version strings
# --------------------------------------------------------------------------------------------


class QuPathVersion(NamedTuple):
    """A parsed QuPath ``version`` field, e.g. ``0.6.0-rc3`` -> (0, 6, 0, "rc3")."""

    major: int
    minor: int
    patch: int
    suffix: str  # pre-release / build suffix without the separator ("" for releases)

    @property
    def is_prerelease(self) -> bool:
        """True for ``-rc``, ``-m`` (milestone) and ``-SNAPSHOT`` versions."""
        return self.suffix != ""

    def sort_key(self) -> tuple[int, int, int, int, str]:
        """Order versions: a pre-release sorts before its release (0.6.0-rc3 < 0.6.0)."""
        return (self.major, self.minor, self.patch, 0 if self.suffix else 1, self.suffix)


_VERSION_RE = re.compile(r"^\s*v?(\d{1,6})(?:\.(\d{1,6}))?(?:\.(\d{1,6}))?(?:[-.+_ ]?(.*?))\s*$")


def parse_version(text: object) -> QuPathVersion | None:
    """Parse a QuPath version string; None when it is not one.

    Pre-release strings are real: ``0.5.0-rc2`` (uw-loci__PaQuO_test__qppaquo*), ``0.6.0-rc3``
    (sbalci__metadata-qupath__v0.6.0rc3-…, BIOP__…omero… backup); plain ``0.3.2``
    (nedaghohabi__…). QuPath 0.2 milestones were written as ``v0.2.0-m2`` (leading ``v``).
    """
    if not isinstance(text, str):
        return None
    m = _VERSION_RE.match(text)
    if m is None:
        return None
    major, minor, patch, suffix = m.groups()
    return QuPathVersion(int(major), int(minor or 0), int(patch or 0), suffix or "")


# --------------------------------------------------------------------------------------------
# URIs <-> paths
# --------------------------------------------------------------------------------------------

# "/C:/..." or "C:/..." (and the ancient "C|/" form) after the scheme.
_DRIVE_RE = re.compile(r"^/?([A-Za-z])[:|](?=/|\\|$)")
# A bare Windows path (no URI at all): "C:\\x" or "C:/x".
_BARE_WINDOWS_RE = re.compile(r"^[A-Za-z]:[\\/]")


def uri_scheme(uri: str) -> str | None:
    """The URI's scheme in lower case, or None for a bare path (``C:\\x`` is a path, not ``c:``)."""
    if _BARE_WINDOWS_RE.match(uri) or uri.startswith(("/", "\\")):
        return None
    try:
        scheme = urlsplit(uri).scheme
    except ValueError:
        return None
    return scheme.lower() or None


def is_file_uri(uri: str) -> bool:
    """True for ``file:`` URIs and bare absolute paths (which QuPath 0.1 stored).

    False for OMERO's ``https://`` URIs (BIOP__ijp-imagetoatlas__omero-https-u003d-…).
    """
    scheme = uri_scheme(uri)
    return scheme is None or scheme == "file"


def file_uri_to_pure_path(uri: str) -> PurePath | None:
    """Decode a QuPath image/project URI to a path of the OS that wrote it; None if not a file.

    Returns :class:`PureWindowsPath` for drive-letter and UNC paths, :class:`PurePosixPath`
    otherwise, so Windows projects can be reasoned about on Linux. Forms seen in real files:

    - ``file:/I:/COAD-TCGA…/x.svs``: single slash + drive letter, Java's ``File.toURI()``
      (nedaghohabi__…-windows-drives-434-entries and every other project fixture).
    - ``file:///D:/QuPath_projects/…``: triple slash, next to ``file:/D:/`` in the same file
      (uw-loci__PaQuO_test__qppaquo-…/project.qpproj.backup).
    - ``%20``, parentheses, and percent-encoded UTF-8 (``%C5%9EUBAT`` = ``ŞUBAT``)
      (josenimo__…, nedaghohabi__…, sbalci__metadata-qupath__…). ``+`` is *not* a space.
    - ``https://…/webclient/?show\\u003dimage-90627``: OMERO images have no local path; json
      turns the GSON escape ``\\u003d`` into ``=`` (BIOP__ijp-imagetoatlas__omero-https-u003d-…).
    - ``file:////server/share/x`` / ``file://server/share/x``: UNC shares (Java's form for
      ``\\\\server\\share``; no fixture under a redistributable licence).
    - ``file:/home/x.svs`` and ``file://localhost/home/x.svs``: Linux/macOS (no fixture here).
    """
    if not isinstance(uri, str) or not uri.strip():
        return None
    text = uri.strip()
    # Bare paths (no scheme): QuPath <= 0.1 stored these; keep them undecoded.
    if _BARE_WINDOWS_RE.match(text) or text.startswith("\\\\"):
        return PureWindowsPath(text)
    if text.startswith("/"):
        return _posix_or_drive(text)
    try:
        parts = urlsplit(text)
    except ValueError:
        return None
    if parts.scheme.lower() != "file":
        return None
    # urlsplit drops "?..." and "#..." from the path; in a file URI those are literal characters
    # only when percent-encoded, so QuPath never writes them raw. Keep what urlsplit gives.
    path = unquote(parts.path, errors="replace")
    netloc = unquote(parts.netloc, errors="replace")
    if netloc and netloc.lower() != "localhost":
        if _DRIVE_RE.match(netloc):  # "file://C:/x" (malformed but seen in hand-edited files)
            return PureWindowsPath(netloc + path)
        return PureWindowsPath("//" + netloc + path)  # UNC share
    if path.startswith("//") and not path.startswith("///"):
        return PureWindowsPath(path)  # "file:////server/share/x" -> //server/share/x
    return _posix_or_drive(path)


def _posix_or_drive(path: str) -> PurePath:
    m = _DRIVE_RE.match(path)
    if m:
        rest = path[m.end():]
        return PureWindowsPath(f"{m.group(1)}:{rest or '/'}")
    return PurePosixPath(path)


def to_local_path(path: PurePath) -> Path | None:
    """A concrete :class:`Path` when ``path`` belongs to the running OS's flavour, else None.

    Every project fixture stores Windows paths (``C:``/``D:``/``E:``/``I:``); read on Linux
    they are never looked up as-is (``Path("E:\\x")`` would be a relative name here).
    A Windows path (``E:\\…``) is meaningless on Linux and vice versa; those can only be found
    through :func:`relocate`.
    """
    windows_here = os.name == "nt"
    if isinstance(path, PureWindowsPath) != windows_here:
        return None
    return Path(str(path))


def path_exists(path: Path) -> bool:
    """``path.exists()`` that is False (not an error) for names the OS cannot represent.

    A URI may decode to anything (``%00``, invalid UTF-8); no fixture, found by fuzzing.
    """
    try:
        return path.exists()
    except (OSError, ValueError):  # embedded NUL, lone surrogates, name too long, ...
        return False


def path_inside(folder: Path, name: str) -> Path | None:
    """``folder / name`` when that stays inside ``folder``, else None.

    For file names built from project content (an ``imageName``, an entry ID): an absolute
    name, ``..`` components, a NUL byte, or a symbolic link whose target lies outside
    ``folder`` all give None, so a crafted project cannot make qpseg read or write elsewhere.
    Links are followed when deciding (``resolve``), so a link to a file inside is fine.
    """
    if not name or "\0" in name:
        return None
    candidate = folder / name
    try:
        root = folder.resolve()
        target = candidate.resolve()
    except (OSError, RuntimeError, ValueError):  # link loops, names the OS cannot represent
        return None
    if target == root or not target.is_relative_to(root):
        return None
    return candidate


# Characters Java's multi-argument URI constructor leaves unescaped in a path (what
# File.toURI() produces): unreserved, punct and '/', '@'. Parentheses stay raw, as in
# ``file:/D:/QuPath%20COAD%20Project%20(Annotated)/project.qpproj`` (nedaghohabi__…).
_JAVA_PATH_SAFE = "/@,;:$&+=_-!.~'()*"


def path_to_file_uri(path: PurePath | str, *, ascii_only: bool = True) -> str:
    """The ``file:`` URI QuPath writes for an absolute path: ``file:/abs/path`` (one slash).

    ``ascii_only`` percent-encodes non-ASCII as UTF-8, as GSON writes image URIs
    (``URI.toASCIIString``; sbalci__… shows ``%C5%9E``). The project's own ``uri`` is written
    with ``URI.toString()``, which keeps non-ASCII letters raw: pass ``ascii_only=False``.
    """
    p = path if isinstance(path, PurePath) else PurePath(path)
    if isinstance(p, PureWindowsPath):
        text = p.as_posix()
        if text.startswith("//"):  # UNC -> file:////server/share/...
            return "file://" + _quote_java("//" + text.lstrip("/"), ascii_only)
        return "file:/" + _quote_java(text, ascii_only)
    return "file:" + _quote_java(p.as_posix(), ascii_only)


def _quote_java(text: str, ascii_only: bool) -> str:
    if ascii_only:
        return quote(text, safe=_JAVA_PATH_SAFE, errors="surrogatepass")
    out = []
    for ch in text:
        # Java's URI keeps "other" characters: non-ASCII that is neither control nor space.
        if ord(ch) > 127 and ch.isprintable() and not ch.isspace():
            out.append(ch)
        else:
            out.append(quote(ch, safe=_JAVA_PATH_SAFE, errors="surrogatepass"))
    return "".join(out)


def _normalise(path: PurePath) -> PurePath:
    """Collapse ``.`` and ``..`` lexically (like Java's ``Path.normalize``)."""
    if isinstance(path, PureWindowsPath):
        return PureWindowsPath(ntpath.normpath(str(path)))
    return PurePosixPath(posixpath.normpath(str(path)))


def relative_parts(base: PurePath, target: PurePath) -> list[str] | None:
    """Path components that lead from folder ``base`` to ``target`` (``..`` allowed).

    Like Java's ``Path.relativize``: None when the two have different roots (another drive,
    Windows vs POSIX). Windows components compare case-insensitively (``D:\\Data`` and
    ``d:\\data`` are one folder); POSIX components compare exactly. The Windows case is what
    every project fixture needs (e.g. nedaghohabi__…: project on ``D:``, images on ``I:``,
    so no relative path exists and QuPath cannot relocate them either).
    """
    if type(base) is not type(target):
        return None
    base, target = _normalise(base), _normalise(target)
    windows = isinstance(base, PureWindowsPath)

    def key(s: str) -> str:
        return s.casefold() if windows else s

    if key(base.anchor.replace("\\", "/")) != key(target.anchor.replace("\\", "/")):
        return None
    if not base.anchor:
        return None  # relative paths: nothing to anchor them to
    b, t = base.parts[1:], target.parts[1:]
    common = 0
    while common < len(b) and common < len(t) and key(b[common]) == key(t[common]):
        common += 1
    return [".."] * (len(b) - common) + list(t[common:])


def relocate(image: PurePath, old_project_dir: PurePath, project_dir: Path) -> Path | None:
    """QuPath's rule for a moved project: same relative path from the new project folder.

    QuPath (``UriUpdater.updateReplacementsRelative``) relativises the missing image's path
    against the folder the project was last saved in (from the top-level ``uri``) and resolves
    that against the current project folder, if both paths share a root. Needed by every
    Windows fixture when read on Linux, e.g. josenimo__… (saved under ``Test%20Data%20(…)``,
    now under ``TestData(…)``). Returns the candidate only if it exists.
    """
    rel = relative_parts(old_project_dir, image)
    if rel is None:
        return None
    candidate = Path(os.path.normpath(project_dir.joinpath(*rel))) if rel else project_dir
    return candidate if path_exists(candidate) else None


# --------------------------------------------------------------------------------------------
# Server builders
# --------------------------------------------------------------------------------------------

# Wrapping builders ("pyramidize", "rotated", "cropped", "affine", "channels", "color",
# "swapRedBlue", "color_deconvolved") keep the wrapped builder under this key.
# "pyramidize" wrapping an ImageJServerBuilder: uw-loci__PaQuO_test__qppaquo-… (entry 3);
# "rotated" is in QuPath's ImageServers type adapter (no redistributable fixture).
BUILDER_NESTED_KEY = "builder"

# RotatedImageServer.Rotation enum names (the "rotation" field of a "rotated" builder).
ROTATION_DEGREES: dict[str, int] = {
    "ROTATE_NONE": 0,
    "ROTATE_90": 90,
    "ROTATE_180": 180,
    "ROTATE_270": 270,
}

# providerClassName that QuPath writes for the readers qpseg creates entries for.
# OpenSlide: nedaghohabi__…, sbalci__…, uw-loci__…qppaquo-…; Bio-Formats: sbalci__…,
# uw-loci__…qppaquo2-…, BIOP__…; ImageJ: josenimo__…, uw-loci__…qppaquo-… (pyramidize).
PROVIDER_CLASSES: dict[str, str] = {
    "openslide": "qupath.lib.images.servers.openslide.OpenslideServerBuilder",
    "bioformats": "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder",
    "imagej": "qupath.imagej.images.servers.ImageJServerBuilder",
}

# Bio-Formats entries carry "--series 0" (uw-loci__…qppaquo2-…, sbalci__…); OpenSlide and
# ImageJ entries have empty args (nedaghohabi__…, josenimo__…).
PROVIDER_ARGS: dict[str, list[str]] = {
    "openslide": [],
    "bioformats": ["--series", "0"],
    "imagej": [],
}

# QuPath's PixelType names, the "pixelType" of image metadata (qupath-core
# qupath/lib/images/servers/PixelType.java, v0.5.1 lines 35-63).
PIXEL_TYPES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "FLOAT64")


def provider_short_name(class_name: object) -> str | None:
    """``openslide`` / ``bioformats`` / ``imagej`` / ``omero`` for a providerClassName, else None.

    OMERO: ``qupath.ext.omero.core.imageserver.OmeroImageServerBuilder``
    (BIOP__ijp-imagetoatlas__omero-https-u003d-…); older QuPath used
    ``qupath.lib.images.servers.omero.OmeroWebImageServerBuilder``.
    """
    if not isinstance(class_name, str):
        return None
    low = class_name.lower()
    for short in ("openslide", "bioformats", "imagej", "omero"):
        if short in low:
            return short
    return None


# --------------------------------------------------------------------------------------------
# Pixel calibration
# --------------------------------------------------------------------------------------------

# "µ" appears both raw (U+00B5, uw-loci__…qppaquo2-…) and as the JSON escape "\u00b5m"
# (nedaghohabi__…, uw-loci__…qppaquo-…); json decodes both to the same string. U+03BC (Greek
# mu) and ASCII spellings are accepted too.
MICRON_UNITS = frozenset({"µm", "μm", "um", "micron", "microns", "micrometer", "micrometre",
                          "micrometers", "micrometres"})


def micron_value(quantity: Any) -> float | None:
    """The value of a ``{"value": v, "unit": "µm"}`` quantity in µm; None if not in microns.

    Uncalibrated images are written as ``{"value": 1.0, "unit": "px"}`` and give None.
    """
    if not isinstance(quantity, dict):
        return None
    unit, value = quantity.get("unit"), quantity.get("value")
    if not isinstance(unit, str) or unit.strip().casefold() not in MICRON_UNITS:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) and v > 0 else None
