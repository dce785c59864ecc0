"""Pixel sizes: the one plausibility check (:func:`mpp_problem`) and the one rule that decides
which pixel size a command uses for a slide (:func:`choose_pixel_size`).

The rule: the slide's own value, else the QuPath project's calibration, else the value the user
gave (``--mpp``); the user's value replaces a known one only when asked to (``--mpp-override``),
and the result (:class:`PixelSize`) records what it replaced. Pure Python, no image libraries.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from qpseg.errors import QpsegError, SlideError

__all__ = ["MAX_MPP", "MIN_MPP", "PixelSize", "check_mpp", "choose_pixel_size", "mpp_problem"]

#: Largest plausible pixel size in µm/px; anything bigger is a screen/default resolution tag.
MAX_MPP = 100.0
#: Smallest plausible pixel size in µm/px. Light microscopes resolve ~0.2 µm and the finest
#: slide scans (100x oil) are ~0.05-0.1 µm/px; anything smaller is a unit mistake (nm, m).
MIN_MPP = 0.01
#: Two pixel sizes closer than this (relative) are the same value written with other rounding.
_MPP_SAME = 0.01


def mpp_problem(value: object) -> str | None:
    """Why ``value`` is not a plausible pixel size in µm/px, or None when it is one.

    The one plausibility rule for pixel sizes (a slide's own, a QuPath project's calibration,
    ``--mpp`` and the like): a finite number from :data:`MIN_MPP` to :data:`MAX_MPP`.
    """
    if isinstance(value, bool):
        return f"{value!r} is not a number"
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return f"{value!r} is not a number"
    if not (math.isfinite(f) and MIN_MPP <= f <= MAX_MPP):
        return (f"{value!r} µm/px is not a plausible pixel size (it must be from {MIN_MPP:g} "
                f"to {MAX_MPP:g} µm/px)")
    return None


def check_mpp(value: object, what: str, path: str | os.PathLike[str] | None = None, *,
              error: type[QpsegError] = SlideError) -> float:
    """``value`` as a float when :func:`mpp_problem` accepts it; else ``error`` naming ``what``.

    Commands check their pixel-size options with ``error=ConfigError`` before any work starts.
    """
    problem = mpp_problem(value)
    if problem is not None:
        raise error(f"{what}: {problem}", path)
    return float(value)  # type: ignore[arg-type]


def _fmt_mpp(xy: tuple[float, float]) -> str:
    x, y = xy
    return f"{x:g}" if x == y else f"{x:g} x {y:g}"


def _same_mpp(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(abs(p - q) <= _MPP_SAME * max(p, q) for p, q in zip(a, b, strict=True))


@dataclass(frozen=True)
class PixelSize:
    """The pixel size a command uses for one slide, where it came from and what it replaced.

    ``source`` is ``"slide"`` (the slide's own metadata), ``"project"`` (the calibration QuPath
    stores for the entry), ``"option"`` (the user's value, for a slide that has none) or
    ``"override"`` (the user's value replacing a known one, which ``replaced`` keeps).
    ``given_unused`` is True when the user gave a different value that was not used because
    the slide or project has one (callers say so once for all slides). ``notes`` are what
    else the user should hear (an implausible stored value skipped, slide and project that
    disagree); the caller warns with them.
    """

    mpp_x: float
    mpp_y: float
    source: str
    replaced: float | None = None
    notes: tuple[str, ...] = ()
    given_unused: bool = False

    @property
    def mpp(self) -> float:
        """Mean of the horizontal and vertical pixel size in µm/px."""
        return (self.mpp_x + self.mpp_y) / 2


def _pair(value: float | tuple[float, float] | None) -> tuple[object, object] | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        return value[0], value[1]
    return value, value


def choose_pixel_size(
    native: float | tuple[float, float] | None,
    project: float | tuple[float, float] | None = None,
    given: float | None = None,
    *,
    override: bool = False,
    path: str | os.PathLike[str] | None = None,
) -> PixelSize:
    """The pixel size to use for a slide: the one rule every command follows.

    ``native`` is the slide's own value (:attr:`Slide.native_mpp`), ``project`` the QuPath
    entry's ``pixelCalibration`` (:attr:`~qpseg.qupath.project.ProjectEntry.mpp_xy`), ``given``
    the user's ``--mpp``. The first plausible one of slide, project, given is used; an
    implausible stored value is skipped with a note. ``override`` makes ``given`` replace a
    known value (``replaced`` records the old one). Nothing is guessed: with no value at all,
    or an implausible ``given``, :class:`SlideError` names ``path``.
    """
    if given is not None:
        check_mpp(given, "--mpp", path)
    if override and given is None:
        raise SlideError("replacing the pixel size (--mpp-override) needs --mpp", path)
    notes: list[str] = []
    known: tuple[float, float] | None = None
    known_source = ""
    for source, value in (("slide", _pair(native)), ("project", _pair(project))):
        if value is None:
            continue
        where = ("the slide's own pixel size" if source == "slide"
                 else "the pixel size set in the QuPath project")
        bad = [p for p in (mpp_problem(v) for v in value) if p is not None]
        if bad:
            notes.append(f"{where} is ignored: {bad[0]}")
            continue
        xy = (float(value[0]), float(value[1]))  # type: ignore[arg-type]
        if known is None:
            known, known_source = xy, source
        elif not _same_mpp(known, xy) and not override:
            notes.append(f"{where} ({_fmt_mpp(xy)} µm/px) differs from the slide's "
                         f"({_fmt_mpp(known)} µm/px); the slide's is used (pass --mpp "
                         f"{(xy[0] + xy[1]) / 2:g} --mpp-override to use the project's)")
    if given is not None:
        g = float(given)
        if override and known is not None:
            return PixelSize(g, g, "override", (known[0] + known[1]) / 2, tuple(notes))
        if known is None:
            return PixelSize(g, g, "option", None, tuple(notes))
    if known is not None:
        unused = given is not None and known != (float(given), float(given))
        return PixelSize(known[0], known[1], known_source, None, tuple(notes), unused)
    reason = "; ".join(notes) if notes else "neither the slide nor the QuPath project gives one"
    raise SlideError(f"pixel size unknown ({reason}): pass --mpp (µm per pixel at full "
                     "resolution)", path)
