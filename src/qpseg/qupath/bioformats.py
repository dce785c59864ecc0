"""What QuPath's Bio-Formats reader reports for a plain image (TIFF, PNG, JPEG, BMP): pixel
type, channels and tile size, so a project entry's stored metadata matches the pixels."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BioFormatsLayout", "bioformats_layout"]

# --------------------------------------------------------------------------------------------
# What Bio-Formats reports for a plain image
# --------------------------------------------------------------------------------------------

# ColorTools.packRGB(255, 255, 255): Bio-Formats' colour for a single channel without one
# (BioFormatsImageServer.java v0.5.1 lines 636-638).
_WHITE = -1
# BioFormatsImageServer.java v0.5.1: DEFAULT_TILE_SIZE (line 127) and MIN_TILE_SIZE (line 122).
_BF_DEFAULT_TILE = 512
_BF_MIN_TILE = 32

# numpy dtype -> QuPath PixelType, as BioFormatsImageServer maps Bio-Formats' pixel types
# (v0.5.1 lines 503-537); 1-bit images (BIT) are left to QuPath.
_PIXEL_TYPES = {"uint8": "UINT8", "int8": "INT8", "uint16": "UINT16", "int16": "INT16",
                "uint32": "UINT32", "int32": "INT32", "float32": "FLOAT32",
                "float64": "FLOAT64"}


@dataclass(frozen=True)
class BioFormatsLayout:
    """The pixel layout QuPath's Bio-Formats reader reports for an image.

    ``channels`` None means RGB (isRGB, UINT8, QuPath's Red/Green/Blue channels); otherwise
    ``(name, packed ARGB)`` per channel. ``tile`` is the preferred tile size, a reading hint
    that QuPath does not compare with the image's own.
    """

    pixel_type: str
    channels: list[tuple[str, int]] | None
    tile: tuple[int, int]


def _tile_length(tile: int, image: int) -> int:
    """BioFormatsImageServer.getDefaultTileLength (v0.5.1 lines 827-834)."""
    if tile <= 0:
        tile = _BF_DEFAULT_TILE
    elif tile < _BF_MIN_TILE:
        tile = math.ceil(_BF_MIN_TILE / tile) * tile
    return min(tile, image)


def bioformats_layout(path: str | os.PathLike[str], width: int, height: int
                      ) -> BioFormatsLayout | None:
    """What Bio-Formats reports for the single-image file ``path`` of size ``width`` x
    ``height``; None when qpseg cannot be sure (palette or grey+alpha images, stacks,
    multi-page or pyramidal TIFFs, other formats), so the entry gets no metadata.

    Known: single-page TIFFs, PNG, JPEG and BMP that are grey (one channel, any integer or
    float type) or 8-bit RGB, with or without alpha (QuPath drops alpha from RGB:
    BioFormatsImageServer.java v0.5.1 lines 552-558). Only file headers are read.
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
        if head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff_layout(p, width, height)
        return _pillow_layout(p, width, height)
    except Exception:  # any file a reader chokes on: unknown layout, QuPath reads it itself
        return None


def _grey(pixel_type: str, width: int, height: int,
          tile: tuple[int, int] | None = None) -> BioFormatsLayout:
    # A channel without a name is "Channel 1" (BioFormatsImageServer.java v0.5.1 lines 642-643).
    tw, th = tile or (_BF_DEFAULT_TILE, _BF_DEFAULT_TILE)
    return BioFormatsLayout(pixel_type, [("Channel 1", _WHITE)],
                            (_tile_length(tw, width), _tile_length(th, height)))


def _rgb(width: int, height: int, tile: tuple[int, int] | None = None) -> BioFormatsLayout:
    tw, th = tile or (_BF_DEFAULT_TILE, _BF_DEFAULT_TILE)
    return BioFormatsLayout("UINT8", None, (_tile_length(tw, width), _tile_length(th, height)))


def _tiff_layout(path: Path, width: int, height: int) -> BioFormatsLayout | None:
    import numpy as np
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if len(tif.pages) != 1:
            return None  # Bio-Formats may read pages as z-slices, channels or time points
        page = tif.pages.first
        if page.subifds or int(page.imagedepth) != 1 or page.dtype is None:
            return None  # a pyramid or volume: its levels/planes are Bio-Formats' to report
        if (int(page.imagewidth), int(page.imagelength)) != (width, height):
            return None
        pixel_type = _PIXEL_TYPES.get(np.dtype(page.dtype).name)
        if pixel_type is None:
            return None
        tile = (int(page.tilewidth), int(page.tilelength)) if page.is_tiled else None
        samples, photometric = int(page.samplesperpixel), int(page.photometric)
        extras = len(page.extrasamples or ())
        if photometric in (0, 1) and samples == 1:
            return _grey(pixel_type, width, height, tile)
        if photometric == 2 and pixel_type == "UINT8" and samples - extras == 3 and extras <= 1:
            return _rgb(width, height, tile)
    return None


def _pillow_layout(path: Path, width: int, height: int) -> BioFormatsLayout | None:
    from PIL import Image

    with Image.open(path) as im:
        if im.format not in ("PNG", "JPEG", "BMP") or getattr(im, "n_frames", 1) != 1:
            return None
        if im.size != (width, height):
            return None
        if im.mode in ("RGB", "RGBA"):
            return _rgb(width, height)
        if im.mode == "L":
            return _grey("UINT8", width, height)
        if im.mode in ("I;16", "I;16B"):
            return _grey("UINT16", width, height)
    return None


