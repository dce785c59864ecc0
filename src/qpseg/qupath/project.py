"""Read and write QuPath projects (``project.qpproj``) in pure Python: no QuPath, no paquo.

Reading is lenient: a whole-file problem (missing, unreadable, not JSON, not an object) raises
:class:`ProjectError`; a malformed entry is skipped with a :class:`ProjectWarning` naming its
index; a missing image leaves ``entry.image_path`` None. Writing produces the schema QuPath
0.5/0.6 writes (``version`` "0.5.1" for new projects) and never touches ``data.qpdata``.
Version-specific quirks live in :mod:`qpseg.qupath.compat`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, TypeGuard

from qpseg._io import atomic_write
from qpseg.errors import MissingImageWarning, ProjectError, ProjectWarning
from qpseg.qupath import compat
from qpseg.qupath.classes import (
    CLASSES_FILE,
    PathClass,
    _kind,
    _load_json_file,
    default_classes,
    read_classes,
    write_classes,
)

__all__ = [
    "BACKUP_SUFFIX",
    "PROJECT_FILE",
    "WRITE_VERSION",
    "ImageMetadata",
    "ProjectEntry",
    "QuPathProject",
    "ServerBuilder",
    "read_project",
    "resolve_image_uri",
]

PROJECT_FILE = "project.qpproj"
BACKUP_SUFFIX = ".backup"  # QuPath keeps the previous project file as project.qpproj.backup
WRITE_VERSION = "0.5.1"  # the version field written into projects qpseg creates

# Java long range for entryID / lastID.
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
# Wrapping builders deeper than this are treated as corrupt (QuPath nests one or two).
_MAX_BUILDER_DEPTH = 32

# QuPath's RGB channels (ImageChannel.getDefaultRGBChannels) with their packed colours.
_RGB_CHANNELS = [
    {"name": "Red", "color": -65536},
    {"name": "Green", "color": -16711936},
    {"name": "Blue", "color": -16776961},
]

_PROVIDERS = tuple(compat.PROVIDER_CLASSES)


class _Malformed(Exception):
    """An entry cannot be used at all (internal; becomes a ProjectWarning + skip)."""


def _positive_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _int_value(value: Any) -> int | None:
    """A JSON integer (also ``3.0`` or ``"3"``, which GSON accepts for a long), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 25:
        value = int(value.strip())
    if not isinstance(value, int) or not _LONG_MIN <= value <= _LONG_MAX:
        return None
    return value


# --------------------------------------------------------------------------------------------
# Server builder
# --------------------------------------------------------------------------------------------


@dataclass
class ServerBuilder:
    """An entry's ``serverBuilder``: how QuPath opens the image.

    ``builder_type`` "uri" names a reader (``provider_class``) and an image ``uri``; wrapping
    types ("rotated", "pyramidize", ...) hold the wrapped builder in ``nested``. Unknown types
    are kept: ``raw`` is written back unchanged on save.
    """

    builder_type: str
    provider_class: str | None
    uri: str | None
    args: list[str]
    metadata: dict[str, Any] | None
    rotation: str | None
    nested: ServerBuilder | None
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], *, _depth: int = 0) -> ServerBuilder:
        """Parse a ``serverBuilder`` object leniently (wrongly typed fields become None)."""
        if _depth > _MAX_BUILDER_DEPTH:
            raise _Malformed("server builders are nested too deeply")
        btype = raw.get("builderType")
        provider = raw.get("providerClassName")
        uri = raw.get("uri")
        args = raw.get("args")
        meta = raw.get("metadata")
        rotation = raw.get("rotation")
        nested_raw = raw.get(compat.BUILDER_NESTED_KEY)
        nested = (cls.from_json(nested_raw, _depth=_depth + 1)
                  if isinstance(nested_raw, dict) else None)
        return cls(
            builder_type=btype if isinstance(btype, str) else "",
            provider_class=provider if isinstance(provider, str) else None,
            uri=uri if isinstance(uri, str) else None,
            args=[a for a in args if isinstance(a, str)] if isinstance(args, list) else [],
            metadata=meta if isinstance(meta, dict) else None,
            rotation=rotation if isinstance(rotation, str) else None,
            nested=nested,
            raw=dict(raw),
        )

    def chain(self) -> Iterator[ServerBuilder]:
        """This builder, then the builder it wraps, and so on to the innermost."""
        b: ServerBuilder | None = self
        while b is not None:
            yield b
            b = b.nested

    @property
    def innermost(self) -> ServerBuilder:
        """The innermost (usually "uri") builder."""
        *_, last = self.chain()
        return last

    @property
    def image_uri(self) -> str | None:
        """The image URI, looked up through wrapping builders (rotated, pyramidize, ...)."""
        for b in self.chain():
            if b.uri is not None:
                return b.uri
        return None

    def effective_metadata(self) -> tuple[dict[str, Any] | None, bool]:
        """The image metadata QuPath would report and whether width/height must be swapped.

        The outermost builder that has ``metadata`` wins (a "pyramidize" builder repeats it,
        uw-loci qppaquo fixture). When it comes from inside a "rotated" 90/270 builder the
        reported image is transposed.
        """
        swap = False
        for b in self.chain():
            if b.metadata is not None:
                return b.metadata, swap
            if b.builder_type == "rotated" and compat.ROTATION_DEGREES.get(
                    b.rotation or "", 0) in (90, 270):
                swap = not swap
        return None, False

    def to_json(self) -> dict[str, Any]:
        """The JSON object to write (a deep copy of what was read or created)."""
        return copy.deepcopy(self.raw)


# --------------------------------------------------------------------------------------------
# New-entry metadata
# --------------------------------------------------------------------------------------------


@dataclass
class ImageMetadata:
    """What QuPath records about an image when it is added to a project.

    Filled in by whoever opened the slide (qpseg never opens it here). ``levels`` are
    ``(downsample, width, height)``, full resolution first; empty means a single level.
    ``mpp_x``/``mpp_y`` are µm per pixel (None: uncalibrated, written in pixels as QuPath does;
    one given means both). ``provider`` is "openslide", "bioformats" or "imagej".
    ``pixel_type`` is QuPath's PixelType name and ``channels`` the ``(name, packed ARGB)`` of
    each channel; ``channels`` None means an RGB image (isRGB, UINT8, QuPath's Red/Green/Blue).
    ``store`` False writes a server builder without ``metadata``: QuPath then reads it from the
    image when it opens it (for images whose layout qpseg cannot predict).
    """

    width: int
    height: int
    levels: list[tuple[float, int, int]] = field(default_factory=list)
    mpp_x: float | None = None
    mpp_y: float | None = None
    tile_width: int = 256
    tile_height: int = 256
    provider: str = "openslide"
    magnification: float | None = None
    name: str | None = None  # metadata "name"; default: the image's file name
    pixel_type: str = "UINT8"
    channels: list[tuple[str, int]] | None = None
    store: bool = True

    def validate(self, where: Path) -> None:
        """Raise :class:`ProjectError` (about file ``where``) if a field is unusable."""

        def bad(msg: str) -> ProjectError:
            return ProjectError(f"invalid image metadata: {msg}", where)

        for key in ("width", "height", "tile_width", "tile_height"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise bad(f"{key} must be a positive int, not {v!r}")
        for key in ("mpp_x", "mpp_y", "magnification"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                  or not math.isfinite(v) or v <= 0):
                raise bad(f"{key} must be a positive number or None, not {v!r}")
        if self.provider not in _PROVIDERS:
            raise bad(f"provider must be one of {', '.join(_PROVIDERS)}, not {self.provider!r}")
        for i, level in enumerate(self.levels):
            try:
                d, w, h = level
            except (TypeError, ValueError):
                raise bad(f"level {i} is not (downsample, width, height)") from None
            if (isinstance(d, bool) or not isinstance(d, int | float) or not math.isfinite(d)
                    or d <= 0):
                raise bad(f"level {i} downsample must be a positive number, not {d!r}")
            if any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in (w, h)):
                raise bad(f"level {i} width/height must be positive ints")
        if self.levels:
            d0, w0, h0 = self.levels[0]
            if d0 != 1 or (w0, h0) != (self.width, self.height):
                raise bad(f"level 0 must be (1.0, {self.width}, {self.height}), not "
                          f"{tuple(self.levels[0])!r}")
            downsamples = [lv[0] for lv in self.levels]
            if downsamples != sorted(downsamples):
                raise bad("level downsamples must increase")
        if self.name is not None and not isinstance(self.name, str):
            raise bad(f"name must be a string, not {self.name!r}")
        if self.pixel_type not in compat.PIXEL_TYPES:
            raise bad(f"pixel_type must be one of {', '.join(compat.PIXEL_TYPES)}, "
                      f"not {self.pixel_type!r}")
        if self.channels is None and self.pixel_type != "UINT8":
            raise bad("an RGB image (channels None) must be UINT8")
        if self.channels is not None and (not self.channels or any(
                not isinstance(n, str) or isinstance(c, bool) or not isinstance(c, int)
                or not -(1 << 31) <= c < (1 << 31) for n, c in self.channels)):
            raise bad("channels must be (name, 32-bit packed ARGB int) pairs")

    def to_qupath(self, default_name: str) -> dict[str, Any]:
        """The serverBuilder ``metadata`` object, keys in QuPath 0.5's order."""
        levels = list(self.levels) or [(1.0, self.width, self.height)]
        mx = self.mpp_x if self.mpp_x is not None else self.mpp_y
        my = self.mpp_y if self.mpp_y is not None else self.mpp_x

        def quantity(v: float | None) -> dict[str, Any]:
            # Uncalibrated: QuPath's PixelCalibration default (1 pixel, unit "px").
            return {"value": float(v), "unit": "µm"} if v is not None else \
                {"value": 1.0, "unit": "px"}

        meta: dict[str, Any] = {
            "name": self.name or default_name,
            "width": self.width,
            "height": self.height,
            "sizeZ": 1,
            "sizeT": 1,
            "channelType": "DEFAULT",
            "isRGB": self.channels is None,
            "pixelType": self.pixel_type,
            "levels": [{"downsample": float(d), "width": w, "height": h} for d, w, h in levels],
            "channels": copy.deepcopy(_RGB_CHANNELS) if self.channels is None else
            [{"name": n, "color": c} for n, c in self.channels],
            "pixelCalibration": {
                "pixelWidth": quantity(mx),
                "pixelHeight": quantity(my),
                "zSpacing": {"value": 1.0, "unit": "z-slice"},
                "timeUnit": "SECONDS",
                "timepoints": [],
            },
        }
        if self.magnification is not None:
            meta["magnification"] = float(self.magnification)
        meta["preferredTileWidth"] = self.tile_width
        meta["preferredTileHeight"] = self.tile_height
        return meta


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


@dataclass
class ProjectEntry:
    """One image of a project (a ``images[]`` item of ``project.qpproj``).

    ``image_path`` is the local image file when it was found (at its URI, or relative to the
    moved project folder as QuPath resolves it), else None. ``raw`` is the JSON as read; fields
    edited here are written back on save, unknown keys are kept.
    """

    entry_id: int
    image_name: str
    description: str | None
    metadata: dict[str, str]
    tags: list[str]
    randomized_name: str | None
    server_builder: ServerBuilder
    image_path: Path | None
    raw: dict[str, Any]
    project_dir: Path
    # True when image_path was found through QuPath's moved-project rule rather than at the
    # stored URI; saving then writes the found location into the URI, as QuPath does once
    # its "update URIs" prompt is accepted (otherwise the next load, with the project's new
    # ``uri``, could no longer relate the old image path to the project folder).
    relocated: bool = False

    @property
    def uri(self) -> str | None:
        """The image URI as stored (innermost builder), e.g. ``file:/E:/slides/a.svs``."""
        return self.server_builder.image_uri

    @property
    def uri_path(self) -> PurePath | None:
        """The decoded path the URI names (Windows or POSIX flavour), None for non-file URIs."""
        uri = self.uri
        return compat.file_uri_to_pure_path(uri) if uri is not None else None

    @property
    def is_remote(self) -> bool:
        """True when the image is not a file (e.g. an OMERO ``https://`` URI)."""
        uri = self.uri
        return uri is not None and not compat.is_file_uri(uri)

    @property
    def image_found(self) -> bool:
        """True when the image file was found on this machine."""
        return self.image_path is not None

    @property
    def data_dir(self) -> Path:
        """``<project>/data/<entryID>``: where QuPath keeps this entry's data (may not exist)."""
        return self.project_dir / "data" / str(self.entry_id)

    @property
    def data_file(self) -> Path:
        """``<project>/data/<entryID>/data.qpdata`` (exists once QuPath saved objects)."""
        return self.data_dir / "data.qpdata"

    @property
    def mpp_xy(self) -> tuple[float, float] | None:
        """(pixel width, pixel height) in µm from the stored metadata, None if not in µm."""
        meta, swap = self.server_builder.effective_metadata()
        cal = meta.get("pixelCalibration") if meta else None
        if not isinstance(cal, dict):
            return None
        px, py = compat.micron_value(cal.get("pixelWidth")), compat.micron_value(
            cal.get("pixelHeight"))
        # One calibrated axis stands for both (QuPath writes both or neither).
        x = px if px is not None else py
        y = py if py is not None else px
        if x is None or y is None:
            return None
        return (y, x) if swap else (x, y)

    @property
    def mpp(self) -> float | None:
        """Pixel size in µm (mean of width and height) from the stored metadata, else None."""
        xy = self.mpp_xy
        return None if xy is None else (xy[0] + xy[1]) / 2.0

    @property
    def dimensions(self) -> tuple[int, int] | None:
        """(width, height) of the full-resolution image from the stored metadata, if known."""
        meta, swap = self.server_builder.effective_metadata()
        if not meta:
            return None
        w, h = meta.get("width"), meta.get("height")
        if isinstance(w, float) and w.is_integer():
            w = int(w)
        if isinstance(h, float) and h.is_integer():
            h = int(h)
        if not (_positive_int(w) and _positive_int(h)):
            return None
        return (h, w) if swap else (w, h)

    @property
    def magnification(self) -> float | None:
        """Objective magnification from the stored metadata (e.g. 40.0), if recorded."""
        meta, _ = self.server_builder.effective_metadata()
        m = meta.get("magnification") if meta else None
        if isinstance(m, bool) or not isinstance(m, int | float) or not math.isfinite(m) \
                or m <= 0:
            return None
        return float(m)

    @property
    def provider_class(self) -> str | None:
        """The reader's Java class (innermost builder's ``providerClassName``)."""
        for b in self.server_builder.chain():
            if b.provider_class is not None:
                return b.provider_class
        return None

    @property
    def provider(self) -> str | None:
        """``openslide``, ``bioformats``, ``imagej`` or ``omero``; None for other readers."""
        return compat.provider_short_name(self.provider_class)

    def to_json(self) -> dict[str, Any]:
        """The entry as QuPath writes it (known fields from this object, unknown ones kept)."""
        out = copy.deepcopy(self.raw)
        builder = self.server_builder.to_json()
        if self.relocated and self.image_path is not None:
            _set_image_uri(builder, compat.path_to_file_uri(self.image_path))
        out["serverBuilder"] = builder
        out["entryID"] = self.entry_id
        if self.randomized_name is not None:
            out["randomizedName"] = self.randomized_name
        out["imageName"] = self.image_name
        if self.description is not None:
            out["description"] = self.description
        else:
            out.pop("description", None)
        out["metadata"] = dict(self.metadata)
        if self.tags or "tags" in out:
            out["tags"] = list(self.tags)
        return out


def _set_image_uri(builder: dict[str, Any], uri: str) -> None:
    """Replace the URI that :attr:`ServerBuilder.image_uri` reads (through wrapping builders)."""
    b: Any = builder
    for _ in range(_MAX_BUILDER_DEPTH + 1):
        if not isinstance(b, dict):
            return
        if isinstance(b.get("uri"), str):
            b["uri"] = uri
            return
        b = b.get(compat.BUILDER_NESTED_KEY)


def _parse_entry(item: Any, project_file: Path, project_uri: str | None,
                 warn: Any) -> ProjectEntry:
    """Build a ProjectEntry from one ``images[]`` item; raise _Malformed if unusable."""
    if not isinstance(item, dict):
        raise _Malformed(f"is a {_kind(item)}, not an object")
    if "entryID" not in item:
        raise _Malformed("has no entryID")
    entry_id = _int_value(item.get("entryID"))
    if entry_id is None:
        raise _Malformed(f"entryID {item.get('entryID')!r} is not an integer")
    sb_raw = item.get("serverBuilder")
    if not isinstance(sb_raw, dict):
        raise _Malformed("has no serverBuilder object")
    builder = ServerBuilder.from_json(sb_raw)

    name = item.get("imageName")
    if not isinstance(name, str):
        uri_path = compat.file_uri_to_pure_path(builder.image_uri or "")
        name = uri_path.name if uri_path is not None and uri_path.name else f"Image {entry_id}"
        warn(f"has no imageName; using {name!r}")
    description = item.get("description")
    if description is not None and not isinstance(description, str):
        warn("description is not a string; ignored")
        description = None
    metadata = _string_map(item.get("metadata"), warn)
    tags_raw = item.get("tags")
    tags: list[str] = []
    if isinstance(tags_raw, list):
        tags = [t for t in tags_raw if isinstance(t, str)]
        if len(tags) != len(tags_raw):
            warn("tags that are not strings were ignored")
    elif tags_raw is not None:
        warn("tags is not a list; ignored")
    randomized = item.get("randomizedName")
    if randomized is not None and not isinstance(randomized, str):
        randomized = None

    uri = builder.image_uri
    image_path = (resolve_image_uri(uri, project_file, project_uri)
                  if uri is not None else None)
    relocated = False
    if image_path is not None and uri is not None:
        stored = compat.file_uri_to_pure_path(uri)
        direct = compat.to_local_path(stored) if stored is not None else None
        relocated = direct is None or os.path.normpath(direct) != os.path.normpath(image_path)
    return ProjectEntry(
        entry_id=entry_id,
        image_name=name,
        description=description,
        metadata=metadata,
        tags=tags,
        randomized_name=randomized,
        server_builder=builder,
        image_path=image_path,
        raw=item,
        project_dir=project_file.parent,
        relocated=relocated,
    )


def _string_map(value: Any, warn: Any) -> dict[str, str]:
    """Entry metadata as QuPath's ``Map<String, String>`` (scalars become strings)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        warn(f"metadata is a {_kind(value)}, not an object; ignored")
        return {}
    out: dict[str, str] = {}
    dropped = []
    for k, v in value.items():
        if isinstance(v, str):
            out[k] = v
        elif isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif isinstance(v, int | float):
            out[k] = json.dumps(v)
        else:
            dropped.append(k)
    if dropped:
        warn(f"metadata values that are not text were ignored: {', '.join(map(repr, dropped))}")
    return out


# --------------------------------------------------------------------------------------------
# URI resolution
# --------------------------------------------------------------------------------------------


def resolve_image_uri(uri: str, project_file: str | os.PathLike[str],
                      project_uri: str | None) -> Path | None:
    """The local file an image URI points at, or None if it cannot be found here.

    QuPath's rule, nothing more: the decoded absolute path if it exists on this machine;
    otherwise, if the project was moved, the image's path relative to the folder the project
    was saved in (``project_uri``, the top-level ``uri``) applied to the folder that holds
    ``project_file`` now. Windows paths are handled on Linux (drive letters, case-insensitive
    components). Non-file URIs (OMERO ``https://``) give None.
    """
    if not isinstance(uri, str):
        return None
    image = compat.file_uri_to_pure_path(uri)
    if image is None:
        return None
    local = compat.to_local_path(image)
    if local is not None and local.is_absolute() and compat.path_exists(local):
        return local
    if not isinstance(project_uri, str):
        return None
    old = compat.file_uri_to_pure_path(project_uri)
    if old is None:
        return None
    # QuPath stores the .qpproj file's URI; a trailing "/" would name the folder itself.
    old_dir = old if project_uri.rstrip().endswith("/") else old.parent
    pf = Path(os.path.abspath(project_file))
    try:
        new_dir = pf if pf.is_dir() else pf.parent
    except (OSError, ValueError):
        return None
    return compat.relocate(image, old_dir, new_dir)


# --------------------------------------------------------------------------------------------
# Project
# --------------------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _find_project_file(path: Path, backup: bool) -> Path:
    """The .qpproj (or .backup) file meant by ``path`` (a file or a project folder)."""
    if not compat.path_exists(path):
        raise ProjectError("file not found", path)
    if path.is_dir() and path.suffix == ".qpproj":
        raise ProjectError("is a folder, not a project file", path)
    if path.is_dir():
        candidate = path / PROJECT_FILE
        if not candidate.exists():
            others = sorted(path.glob("*.qpproj"))
            if len(others) == 1:
                candidate = others[0]
            else:
                what = "several .qpproj files" if others else "no project.qpproj"
                raise ProjectError(f"{what} in this folder", path)
        path = candidate
    if backup and not path.name.endswith(BACKUP_SUFFIX):
        path = path.with_name(path.name + BACKUP_SUFFIX)
        if not path.exists():
            raise ProjectError("file not found", path)
    if path.is_dir():
        raise ProjectError("is a folder, not a project file", path)
    return path


class QuPathProject:
    """A QuPath project: its entries, classes and the file they live in.

    Use :meth:`load` for an existing project (a ``.qpproj``, its ``.backup`` or the folder)
    and :meth:`create` for a new one; :meth:`add_image` then :meth:`save`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path: Path = Path(os.path.abspath(path))
        self.version: str | None = None
        self.uri: str | None = None
        self.create_timestamp: int | None = None
        self.modify_timestamp: int | None = None
        self.last_id: int = 0
        self.entries: list[ProjectEntry] = []
        self.classes: list[PathClass] = []
        self.is_backup: bool = self.path.name.endswith(BACKUP_SUFFIX)
        self._raw: dict[str, Any] = {}
        # images[] as read, so entries skipped as malformed are written back untouched.
        self._raw_images: list[Any] = []
        self._entry_at: dict[int, ProjectEntry] = {}  # raw index -> parsed entry
        self._loaded_classes: list[PathClass] | None = None

    # ----------------------------------------------------------------------------- reading

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, backup: bool = False) -> QuPathProject:
        """Read a project from its ``.qpproj`` file or its folder.

        ``backup=True`` reads ``project.qpproj.backup`` instead (also chosen by passing the
        ``.backup`` file itself). Such a project cannot be saved.
        """
        file = _find_project_file(Path(path), backup)
        data = _load_json_file(file)
        if not isinstance(data, dict):
            raise ProjectError(f"top level is a {_kind(data)}, expected a JSON object", file)
        project = cls(file)
        project._read(data)
        return project

    def _warn(self, message: str, category: type[ProjectWarning] = ProjectWarning) -> None:
        warnings.warn(f"{self.path}: {message}", category, stacklevel=4)

    def _read(self, data: dict[str, Any]) -> None:
        self._raw = data
        version = data.get("version")
        if version is not None and not isinstance(version, str):
            self._warn(f"version {version!r} is not a string; ignored")
            version = None
        self.version = version
        uri = data.get("uri")
        if uri is not None and not isinstance(uri, str):
            self._warn("uri is not a string; ignored (moved images cannot be located)")
            uri = None
        self.uri = uri
        self.create_timestamp = _int_value(data.get("createTimestamp"))
        self.modify_timestamp = _int_value(data.get("modifyTimestamp"))
        last_id = _int_value(data.get("lastID"))
        if data.get("lastID") is not None and last_id is None:
            self._warn(f"lastID {data.get('lastID')!r} is not an integer; ignored")

        images = data.get("images")
        if images is None:
            images = []
        if not isinstance(images, list):
            # QuPath cannot open such a file either: DefaultProject.loadProject (qupath-core,
            # qupath/lib/projects/DefaultProject.java) reads "images" with
            # gson.fromJson(..., ArrayList<DefaultProjectImageEntry>), which throws on a non-array.
            raise ProjectError(f"'images' is a {_kind(images)}, not a list of entries",
                               self.path)
        self._raw_images = images
        seen: dict[int, int] = {}
        for i, item in enumerate(images):
            problems: list[str] = []
            try:
                entry = _parse_entry(item, self.path, self.uri, problems.append)
            except _Malformed as exc:
                self._warn(f"entry {i} {exc}; skipped")
                continue
            except RecursionError:
                self._warn(f"entry {i} is nested too deeply; skipped")
                continue
            for p in problems:
                self._warn(f"entry {i} (id {entry.entry_id}) {p}")
            if entry.entry_id in seen:
                self._warn(f"entry {i} repeats entryID {entry.entry_id} of entry "
                           f"{seen[entry.entry_id]}; skipped")
                continue
            seen[entry.entry_id] = i
            self.entries.append(entry)
            self._entry_at[i] = entry
        # QuPath: the next ID is above both lastID and every entry's ID.
        self.last_id = max([last_id or 0, *(e.entry_id for e in self.entries)])

        missing = [e for e in self.entries if not e.image_found]
        if missing:
            first = missing[0]
            self._warn(f"{len(missing)} of {len(self.entries)} images not found on this "
                       f"machine (first: entry {first.entry_id} {first.uri!r})",
                       MissingImageWarning)

        classes_file = self.path.parent / CLASSES_FILE
        if classes_file.exists():
            try:
                self.classes = read_classes(classes_file)
            except ProjectError as exc:
                self._warn(f"classes not read: {exc}")
                self.classes = []
        self._loaded_classes = list(self.classes)

    # ----------------------------------------------------------------------------- creating

    @classmethod
    def create(cls, folder: str | os.PathLike[str], classes: Sequence[PathClass] | None = None,
               *, overwrite: bool = False) -> QuPathProject:
        """Create a project in ``folder`` (``project.qpproj`` + ``classifiers/classes.json``).

        ``classes`` default to QuPath's standard classes; ``[]`` writes no classes.json.
        Raises :class:`ProjectError` if a project already exists there, unless ``overwrite``
        (the old file is kept as ``project.qpproj.backup``). New entry IDs start above any
        ``data/<id>`` folder already present, so stale QuPath data is never attached to them.
        """
        target = Path(folder)
        file = target if target.suffix == ".qpproj" else target / PROJECT_FILE
        if file.exists() and not overwrite:
            raise ProjectError("a QuPath project already exists here (pass overwrite=True)", file)
        if file.is_dir():
            raise ProjectError("is a folder, not a project file", file)
        if target.exists() and not target.is_dir() and target.suffix != ".qpproj":
            raise ProjectError("is a file, not a folder", target)
        project = cls(file)
        now = _now_ms()
        project.version = WRITE_VERSION
        project.create_timestamp = project.modify_timestamp = now
        project.last_id = _max_data_dir_id(file.parent / "data")
        project.classes = list(default_classes() if classes is None else classes)
        project._loaded_classes = None  # always write classes.json for a new project
        project.save()
        return project

    def add_image(self, image_path: str | os.PathLike[str], metadata: ImageMetadata, *,
                  image_name: str | None = None, entry_metadata: Mapping[str, str] | None = None,
                  description: str | None = None) -> ProjectEntry:
        """Add an image entry (not yet saved: call :meth:`save`).

        ``metadata`` describes the image (the caller opened it); the entry gets the next free
        entryID, a random ``randomizedName`` and ``image_name`` (default: the file name).
        QuPath creates ``data/<entryID>/`` itself when the image is first opened.
        """
        path = Path(os.path.abspath(image_path))
        if not compat.path_exists(path):
            raise ProjectError("image not found", path)
        metadata.validate(path)
        meta_map = dict(entry_metadata or {})
        for k, v in meta_map.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ProjectError(f"entry metadata must map text to text, not {k!r}: {v!r}",
                                   self.path)
        if image_name is not None and not isinstance(image_name, str):
            raise ProjectError(f"image name must be a string, not {image_name!r}", self.path)
        self.last_id = max([self.last_id, *(e.entry_id for e in self.entries)]) + 1
        builder_raw: dict[str, Any] = {
            "builderType": "uri",
            "providerClassName": compat.PROVIDER_CLASSES[metadata.provider],
            "uri": compat.path_to_file_uri(path),
            "args": list(compat.PROVIDER_ARGS[metadata.provider]),
        }
        if metadata.store:
            builder_raw["metadata"] = metadata.to_qupath(path.name)
        raw: dict[str, Any] = {
            "serverBuilder": builder_raw,
            "entryID": self.last_id,
            "randomizedName": str(uuid.uuid4()),
            "imageName": image_name if image_name is not None else path.name,
        }
        if description is not None:
            raw["description"] = description
        raw["metadata"] = meta_map
        entry = ProjectEntry(
            entry_id=self.last_id,
            image_name=raw["imageName"],
            description=description,
            metadata=dict(meta_map),
            tags=[],
            randomized_name=raw["randomizedName"],
            server_builder=ServerBuilder.from_json(builder_raw),
            image_path=path,
            raw=raw,
            project_dir=self.project_dir,
        )
        self.entries.append(entry)
        return entry

    # ----------------------------------------------------------------------------- writing

    def to_json(self) -> dict[str, Any]:
        """The project file's JSON: QuPath's top-level keys first, unknown keys kept."""
        return self._build()[0]

    def _build(self) -> tuple[dict[str, Any], dict[int, ProjectEntry]]:
        """The JSON to write and, for each written ``images`` index, the entry written there."""
        live = {id(e) for e in self.entries}
        images: list[Any] = []
        slots: dict[int, ProjectEntry] = {}
        written: set[int] = set()
        for i, item in enumerate(self._raw_images):
            entry = self._entry_at.get(i)
            if entry is None:
                images.append(copy.deepcopy(item))  # malformed when read: keep it as it was
            elif id(entry) in live:  # entries removed from self.entries are dropped
                slots[len(images)] = entry
                images.append(entry.to_json())
                written.add(id(entry))
        for e in self.entries:
            if id(e) not in written:
                slots[len(images)] = e
                images.append(e.to_json())
        now = _now_ms()
        out: dict[str, Any] = {
            "version": self.version or WRITE_VERSION,
            "createTimestamp": self.create_timestamp if self.create_timestamp is not None
            else now,
            "modifyTimestamp": self.modify_timestamp if self.modify_timestamp is not None
            else now,
            "uri": compat.path_to_file_uri(self.path, ascii_only=False),
            "lastID": max([self.last_id, *(e.entry_id for e in self.entries)]),
        }
        for k, v in self._raw.items():
            if k not in out and k != "images":
                out[k] = copy.deepcopy(v)
        out["images"] = images
        return out, slots

    def save(self) -> None:
        """Write ``project.qpproj`` atomically, keeping the old one as ``.qpproj.backup``.

        ``classifiers/classes.json`` is (re)written when :attr:`classes` changed. Never writes
        ``data.qpdata``.
        """
        if self.is_backup:
            raise ProjectError("this project was read from a backup file and cannot be saved",
                               self.path)
        self.modify_timestamp = _now_ms()
        data, slots = self._build()
        # allow_nan: QuPath (GSON with serializeSpecialFloatingPointValues) writes NaN itself,
        # so qpseg._io.write_json_atomic (allow_nan=False) cannot be used here.
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=True)
        backup = self.path.with_name(self.path.name + BACKUP_SUFFIX)
        try:
            if self.path.is_file():
                # QuPath's own backup name; written atomically before the project is replaced.
                previous = self.path.read_bytes()
                with atomic_write(backup, "wb", backup=False) as fh:
                    fh.write(previous)
            with atomic_write(self.path, "w", backup=False) as fh:
                fh.write(text + "\n")
        except OSError as exc:
            raise ProjectError(f"cannot write the project ({exc.strerror or exc})",
                               self.path) from None
        except UnicodeEncodeError:
            raise ProjectError("a name or URI holds characters that cannot be written as "
                               "UTF-8", self.path) from None
        self.uri = data["uri"]
        self.last_id = data["lastID"]
        self._raw = data
        self._raw_images = data["images"]
        self._entry_at = slots
        for idx, entry in slots.items():
            entry.raw = data["images"][idx]
            if entry.relocated:
                entry.server_builder = ServerBuilder.from_json(entry.raw["serverBuilder"])
                entry.relocated = False
        if self._loaded_classes is None or self.classes != self._loaded_classes:
            if self.classes:
                write_classes(self.project_dir / CLASSES_FILE, self.classes)
            self._loaded_classes = list(self.classes)

    # ----------------------------------------------------------------------------- queries

    @property
    def project_dir(self) -> Path:
        """The folder holding the project file."""
        return self.path.parent

    @property
    def version_info(self) -> compat.QuPathVersion | None:
        """The parsed :attr:`version` (``0.6.0-rc3`` -> (0, 6, 0, "rc3")), if parseable."""
        return compat.parse_version(self.version)

    def entry(self, key: int | str) -> ProjectEntry:
        """The entry with this entryID (int) or imageName (str); ProjectError if unknown."""
        if isinstance(key, bool) or not isinstance(key, int | str):
            raise ProjectError(f"entry key must be an entryID or an image name, not {key!r}",
                               self.path)
        if isinstance(key, int):
            for e in self.entries:
                if e.entry_id == key:
                    return e
            raise ProjectError(f"no entry with entryID {key}", self.path)
        found = [e for e in self.entries if e.image_name == key]
        if not found:
            raise ProjectError(f"no entry named {key!r}", self.path)
        if len(found) > 1:
            ids = ", ".join(str(e.entry_id) for e in found)
            raise ProjectError(f"{len(found)} entries are named {key!r} (entryIDs {ids}); "
                               "use the entryID", self.path)
        return found[0]

    def missing_images(self) -> list[ProjectEntry]:
        """Entries whose image is not available on this machine (remote URIs included)."""
        return [e for e in self.entries if not e.image_found]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[ProjectEntry]:
        return iter(self.entries)

    def __repr__(self) -> str:
        return (f"QuPathProject({str(self.path)!r}, version={self.version!r}, "
                f"entries={len(self.entries)})")


def _max_data_dir_id(data_dir: Path) -> int:
    """The largest numeric ``data/<id>`` folder name (0 if none)."""
    best = 0
    try:
        for child in data_dir.iterdir():
            if child.name.isdigit() and child.is_dir():
                best = max(best, int(child.name))
    except OSError:
        pass
    return best


def read_project(path: str | os.PathLike[str], *, backup: bool = False) -> QuPathProject:
    """Read a QuPath project (see :meth:`QuPathProject.load`)."""
    return QuPathProject.load(path, backup=backup)
