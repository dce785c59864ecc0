"""One image of a QuPath project: how QuPath opens it and what it records about it.

:class:`ServerBuilder` is an entry's ``serverBuilder`` (the reader and image URI, through
wrapping builders), :class:`ImageMetadata` the metadata written for a new image, and
:class:`ProjectEntry` one ``images[]`` item of ``project.qpproj``, parsed leniently from the
JSON by ``_parse_entry``. :class:`~qpseg.qupath.project.QuPathProject` holds the entries;
import these names from :mod:`qpseg.qupath.project`.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, TypeGuard

from qpseg.errors import ProjectError
from qpseg.qupath import compat
from qpseg.qupath.classes import _kind
from qpseg.qupath.project_uris import resolve_image_uri

__all__ = ["ImageMetadata", "ProjectEntry", "ServerBuilder"]

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
