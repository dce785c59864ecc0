"""Where a class or instance map lies in QuPath's full-resolution pixel coordinates.

:class:`MapGeometry` maps a map pixel to QuPath coordinates (origin, downsample, the slide's
pixel size) and, given the QuPath image's size, says where the image ends so objects can be
clipped to it; the positive / non-negative number checks the object options share live here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError

if TYPE_CHECKING:
    from qpseg.slide import Slide

__all__ = ["MapGeometry"]


def _positive(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, not {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{what} must be a positive finite number, not {value!r}")
    return v


def _non_negative(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, not {value!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise ConfigError(f"{what} must be a finite number >= 0, not {value!r}")
    return v


@dataclass(frozen=True)
class MapGeometry:
    """Where a map lies in QuPath's full-resolution pixel coordinates.

    Map pixel ``(col, row)`` covers ``x ∈ [x0 + col·downsample, x0 + (col+1)·downsample)`` and
    ``y`` likewise; ``slide_mpp`` is the slide's full-resolution pixel size (µm).
    """

    x0: float
    y0: float
    downsample: float
    slide_mpp: float
    #: QuPath image ``(width, height)`` in full-resolution pixels; objects are clipped to
    #: ``[0, width] × [0, height]``. None: not clipped.
    image_size: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for name in ("x0", "y0"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"map origin {name} must be a finite number, not {v!r}")
            object.__setattr__(self, name, float(v))
        object.__setattr__(self, "downsample", _positive(self.downsample, "map downsample"))
        object.__setattr__(self, "slide_mpp", _positive(self.slide_mpp, "slide pixel size (mpp)"))
        if self.image_size is not None:
            try:
                w, h = self.image_size
            except (TypeError, ValueError):
                raise ConfigError(f"image size must be (width, height), not "
                                  f"{self.image_size!r}") from None
            object.__setattr__(self, "image_size", (_positive(w, "image width"),
                                                    _positive(h, "image height")))

    @property
    def map_mpp(self) -> float:
        """Pixel size of the map (µm)."""
        return self.downsample * self.slide_mpp

    @classmethod
    def from_mpp(cls, map_mpp: float, slide_mpp: float, x0: float = 0.0,
                 y0: float = 0.0) -> MapGeometry:
        """The geometry of a map at ``map_mpp`` whose pixel (0, 0) starts at QuPath ``(x0, y0)``."""
        return cls(float(x0), float(y0),
                   _positive(map_mpp, "map pixel size (mpp)") / _positive(slide_mpp, "slide mpp"),
                   float(slide_mpp))

    @classmethod
    def from_slide(cls, slide: Slide, map_mpp: float, *,
                   origin_level0: tuple[float, float] = (0.0, 0.0)) -> MapGeometry:
        """The geometry of a map of ``slide`` at ``map_mpp`` whose pixel (0, 0) starts at level-0
        file coordinates ``origin_level0``; the bounds offset is removed here, once."""
        x0, y0 = slide.level0_to_qupath(float(origin_level0[0]), float(origin_level0[1]))
        return cls.from_mpp(map_mpp, slide.mpp, x0, y0).within(*slide.qupath_dimensions)

    def within(self, width: float, height: float) -> MapGeometry:
        """This geometry, with objects clipped to a QuPath image of ``width`` × ``height``
        full-resolution pixels (``Slide.qupath_dimensions``: bounds-cropped when OpenSlide
        reports bounds)."""
        return replace(self, image_size=(width, height))

    def tile(self, col: int, row: int) -> MapGeometry:
        """The geometry of a tile of this map whose pixel (0, 0) is this map's ``(col, row)``."""
        return MapGeometry(self.x0 + col * self.downsample, self.y0 + row * self.downsample,
                           self.downsample, self.slide_mpp, self.image_size)

    def image_box(self) -> tuple[float, float, float, float] | None:
        """The image as ``(xmin, ymin, xmax, ymax)`` in map pixels (None without a size)."""
        if self.image_size is None:
            return None
        w, h = self.image_size
        ds = self.downsample
        return -self.x0 / ds, -self.y0 / ds, (w - self.x0) / ds, (h - self.y0) / ds

    def to_qupath(self, col: float, row: float) -> tuple[float, float]:
        """QuPath coordinates of the map point ``(col, row)`` (a pixel corner when integral)."""
        return self.x0 + col * self.downsample, self.y0 + row * self.downsample

    def transform(self, geoms: Any) -> Any:
        """Shapely geometry (or array of them) in map pixels -> QuPath coordinates.

        With ``image_size``, coordinates are also limited to the image (geometry clipped in
        map pixels can land a rounding error past the edge when scaled)."""
        import numpy as np
        import shapely

        ds, origin = self.downsample, np.array([self.x0, self.y0])
        if self.image_size is None:
            return shapely.transform(geoms, lambda xy: xy * ds + origin)
        high = np.array(self.image_size)
        return shapely.transform(geoms, lambda xy: np.clip(xy * ds + origin, 0.0, high))
