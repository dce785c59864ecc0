""":func:`open_slide`: checks the file, then picks the backend (OpenSlide, else tifffile for
TIFFs, else Pillow) as described in :mod:`qpseg.slide`.
"""

from __future__ import annotations

import os
from pathlib import Path

from qpseg.errors import SlideError
from qpseg.slides.base import Slide, _one_line
from qpseg.slides.openslide_backend import OpenSlideSlide
from qpseg.slides.pillow_backend import _open_pillow
from qpseg.slides.plain import ImageSlide
from qpseg.slides.tifffile_backend import _is_tiff, _more_than_8_bits, _open_tifffile

__all__ = ["PathArg", "open_slide"]

PathArg = str | bytes | os.PathLike[str]


def _open_plain(path: Path, mpp: float | None) -> ImageSlide:
    errors: list[str] = []
    if _is_tiff(path):
        try:
            slide = _open_tifffile(path, mpp)
        except SlideError:
            raise
        except Exception as exc:
            errors.append(f"tifffile: {_one_line(exc)}")
        else:
            if slide is not None:
                return slide
    try:
        return _open_pillow(path, mpp)
    except SlideError:
        raise
    except Exception as exc:
        errors.append(f"Pillow: {_one_line(exc)}")
    raise SlideError("not a slide or image format qpseg can read (" + "; ".join(errors) + ")",
                     path)


def open_slide(path: PathArg, mpp: float | None = None) -> Slide:
    """Open a whole-slide image or plain image.

    ``mpp`` (µm/px at level 0), when given, replaces the slide's own pixel size (it is checked,
    like the slide's, when :attr:`Slide.mpp` is read). Raises SlideError when the file is
    missing, not a format OpenSlide, tifffile or Pillow can read, or cannot be opened.
    """
    try:
        p = Path(os.fsdecode(path))
    except (TypeError, ValueError) as exc:
        raise SlideError(f"invalid path: {_one_line(exc)}", None) from exc
    if not p.exists():
        raise SlideError("file not found", p)
    if p.is_dir():
        raise SlideError("is a directory, not a slide file", p)
    try:
        if p.stat().st_size == 0:
            raise SlideError("file is empty", p)
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise SlideError(f"cannot read file: {_one_line(exc)}", p) from exc

    try:
        import openslide
    except (ImportError, OSError):  # OpenSlide's C library missing: plain images still work
        return _open_plain(p, mpp)
    try:
        fmt = openslide.OpenSlide.detect_format(str(p))
    except Exception:
        fmt = None
    if fmt == "generic-tiff" and _more_than_8_bits(p):
        # libtiff's RGBA conversion keeps only the high byte of 16-bit samples (a 12-bit image
        # turns black); tifffile scales by the image maximum instead (see :mod:`qpseg.slide`).
        try:
            return _open_plain(p, mpp)
        except SlideError:
            pass
    if fmt is not None:
        try:
            handle = openslide.OpenSlide(str(p))
        except Exception as exc:
            msg = _one_line(exc)
            if fmt == "generic-tiff":
                # A tiled TIFF OpenSlide cannot handle may still be a plain image tifffile reads.
                try:
                    return _open_plain(p, mpp)
                except SlideError:
                    pass
            hint = ""
            if fmt == "dicom":
                hint = " (a DICOM slide needs all instances of its series in the same folder)"
            raise SlideError(f"cannot open {fmt} slide: {msg}{hint}", p) from exc
        try:
            return OpenSlideSlide(p, handle, mpp=mpp, vendor=fmt)
        except SlideError:
            handle.close()
            raise
    return _open_plain(p, mpp)
