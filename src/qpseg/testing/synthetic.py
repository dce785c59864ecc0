"""Synthetic pyramidal slides with known regions: exact ground truth for tests and ``qpseg demo``.

:func:`make_slide` writes an H&E-like tiled, deflate-compressed, pyramidal RGB TIFF that OpenSlide
opens as ``generic-tiff`` (pyramid levels are successive TIFF pages marked reduced-resolution;
resolution tags in px/cm give ``openslide.mpp-x/y``). Tiles are rendered one at a time from the
region polygons, so memory stays bounded whatever the slide size.

Ground truth is exact by construction: the level-0 pixel ``(col, row)`` belongs to region ``r``
if and only if its centre ``(col + 0.5, row + 0.5)`` lies in the interior of ``r``'s geometry
(shapely ``contains_xy``; a centre exactly on an edge counts as outside). Regions are made disjoint
before rendering (see :func:`resolve_overlaps`), so :meth:`SyntheticSlide.class_areas_px` (shapely
areas) equals the per-class pixel counts of :meth:`SyntheticSlide.label_map` up to rasterisation
error along the edges.

Appearance, deterministic from ``seed`` (every pixel is a function of its level-0 coordinates, so
tiles join seamlessly): background near-white; unclassified tissue eosin pink with sparse nuclei;
``Tumor`` dark purple with dense nuclei; ``Stroma`` light pink with oriented fibres; ``Necrosis``
pale grey-pink with dark debris speckles. Other class names get distinct fallback colours.
Pyramid level pixels are the mean of (up to 4x4) level-0 samples in their footprint, so a level with
downsample 2 or 4 is exactly the block mean of level 0.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from qpseg.slide import Slide

__all__ = [
    "CLASS_STYLES",
    "ClassStyle",
    "SyntheticRegion",
    "SyntheticSlide",
    "make_plain_image",
    "make_slide",
    "random_layout",
    "random_regions",
    "resolve_overlaps",
    "style_for",
]

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ClassStyle:
    """How one kind of tissue looks: a base colour with noise, plus optional dots and fibres."""

    base: RGB
    dots: RGB = (80, 45, 120)
    dot_cell: int = 0  # grid cell of the dot lattice in px (0: no dots)
    dot_prob: float = 0.0  # probability that a cell holds a dot
    dot_radius: tuple[float, float] = (2.0, 3.0)  # at most dot_cell / 2
    fibre: RGB | None = None
    fibre_period: float = 9.0  # px between fibres
    speckle: float = 0.0  # probability that a pixel is a debris speck (drawn in ``dots``)
    noise: float = 10.0  # +- luminance noise amplitude


#: Styles of known class names (matched case-insensitively; "Tumour" = "Tumor").
CLASS_STYLES: dict[str, ClassStyle] = {
    "tumor": ClassStyle(base=(175, 105, 180), dots=(65, 30, 110), dot_cell=9, dot_prob=0.85,
                        dot_radius=(2.6, 4.4), noise=12.0),
    "stroma": ClassStyle(base=(246, 205, 222), fibre=(212, 128, 170), fibre_period=9.0,
                         dots=(120, 70, 150), dot_cell=40, dot_prob=0.25, dot_radius=(1.5, 2.5),
                         noise=6.0),
    "necrosis": ClassStyle(base=(212, 196, 202), dots=(115, 95, 115), dot_cell=12, dot_prob=0.45,
                           dot_radius=(1.0, 2.2), speckle=0.12, noise=9.0),
}
CLASS_STYLES["tumour"] = CLASS_STYLES["tumor"]
_TISSUE_STYLE = ClassStyle(base=(228, 150, 190), dots=(95, 55, 140), dot_cell=22, dot_prob=0.35,
                           dot_radius=(2.0, 3.2), noise=8.0)
_FALLBACK_STYLES = (
    ClassStyle(base=(120, 125, 205), dots=(40, 40, 120), dot_cell=7, dot_prob=0.9,
               dot_radius=(1.5, 3.0), noise=8.0),
    ClassStyle(base=(205, 185, 110), fibre=(160, 130, 60), fibre_period=14.0, noise=8.0),
    ClassStyle(base=(120, 190, 150), speckle=0.2, dots=(40, 100, 70), noise=8.0),
    ClassStyle(base=(235, 120, 100), dots=(140, 40, 40), dot_cell=16, dot_prob=0.6,
               dot_radius=(3.0, 6.0), noise=8.0),
)
_BACKGROUND_NOISE = 2.0
# At most this many samples per axis average into one pyramid-level pixel.
_MAX_SUPERSAMPLE = 4
# Level-0 samples rendered at once (bounds the temporaries of the renderer).
_CHUNK_SAMPLES = 1 << 15


def style_for(class_name: str, index: int = 0) -> ClassStyle:
    """The style of a class name; unknown names get fallback style ``index`` (mod 4)."""
    known = CLASS_STYLES.get(class_name.strip().lower())
    return known if known is not None else _FALLBACK_STYLES[index % len(_FALLBACK_STYLES)]


@dataclass(frozen=True)
class SyntheticRegion:
    """One class region: a shapely Polygon or MultiPolygon in level-0 pixel coordinates."""

    class_name: str
    geometry: BaseGeometry


# ==================================================================================== geometry
def _polygonal(geom: BaseGeometry, min_area: float = 0.0) -> BaseGeometry:
    """Only the polygon parts of ``geom`` (no slivers below ``min_area``), as (Multi)Polygon."""
    from shapely import make_valid
    from shapely.geometry import MultiPolygon, Polygon

    if geom.is_empty:
        return Polygon()
    if not geom.is_valid:
        geom = make_valid(geom)
    parts: list[Polygon] = []
    stack = [geom]
    while stack:
        g = stack.pop()
        if isinstance(g, Polygon):
            if not g.is_empty and g.area > min_area:
                parts.append(g)
        elif hasattr(g, "geoms"):
            stack.extend(g.geoms)
    if not parts:
        return Polygon()
    if len(parts) == 1:
        return parts[0]
    return MultiPolygon(sorted(parts, key=lambda p: p.bounds))


def resolve_overlaps(
    regions: Sequence[SyntheticRegion], width: int, height: int
) -> list[SyntheticRegion]:
    """Clip regions to the image and make them disjoint: a later region is drawn over earlier
    ones (painter's order), so each keeps only what no later region covers. Empty results are
    dropped."""
    from shapely import unary_union
    from shapely.geometry import box

    frame = box(0, 0, width, height)
    out: list[SyntheticRegion] = []
    covered = None
    for reg in reversed(regions):
        g = _polygonal(reg.geometry).intersection(frame)
        if covered is not None:
            g = g.difference(covered)
        g = _polygonal(g, min_area=1e-9)
        if g.is_empty:
            continue
        out.append(SyntheticRegion(reg.class_name, g))
        covered = g if covered is None else unary_union([covered, g])
    out.reverse()
    return out


def _blob(
    rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float,
    roughness: float = 0.18, vertices: int = 96,
) -> BaseGeometry:
    """A smooth star-shaped polygon (always valid) around (cx, cy) with radii about rx, ry."""
    from shapely.geometry import Polygon

    theta = np.linspace(0.0, 2 * math.pi, vertices, endpoint=False)
    radius = np.ones(vertices)
    for k in range(2, 7):
        radius += rng.uniform(-1, 1) * roughness / (k - 1) * np.sin(k * theta + rng.uniform(0, 7))
    radius = np.clip(radius, 0.45, None)
    rot = rng.uniform(0, math.pi)
    xs, ys = rx * radius * np.cos(theta), ry * radius * np.sin(theta)
    px = cx + xs * math.cos(rot) - ys * math.sin(rot)
    py = cy + xs * math.sin(rot) + ys * math.cos(rot)
    return Polygon(np.column_stack([px, py]))


def random_layout(
    width: int,
    height: int,
    seed: int = 0,
    classes: Sequence[str] = ("Tumor", "Stroma", "Necrosis"),
    n: int | None = None,
) -> tuple[BaseGeometry, list[SyntheticRegion]]:
    """A tissue blob and ``n`` (default ``2 * len(classes)``) disjoint class regions inside it.

    Classes are used in turn, so every class appears when ``n >= len(classes)``; every other
    region (the first included) has a hole. Deterministic from ``seed``.
    """
    from shapely import unary_union
    from shapely.geometry import Point, box

    if width < 1 or height < 1:
        raise ValueError(f"width and height must be >= 1, got {width}x{height}")
    if not classes:
        raise ValueError("classes must not be empty")
    n = 2 * len(classes) if n is None else n
    rng = np.random.default_rng(seed)
    margin = 0.03 * min(width, height)
    frame = box(margin, margin, width - margin, height - margin)
    tissue = _blob(rng, width / 2 + rng.uniform(-0.04, 0.04) * width,
                   height / 2 + rng.uniform(-0.04, 0.04) * height,
                   0.36 * width, 0.36 * height, roughness=0.12)
    tissue = _polygonal(tissue.intersection(frame))
    min_area = max(4.0, 2e-4 * width * height)
    regions: list[SyntheticRegion] = []
    taken = None
    minx, miny, maxx, maxy = tissue.bounds
    base_r = math.sqrt(tissue.area / max(n, 1) / math.pi)
    for i in range(n):
        cls = classes[i % len(classes)]
        for _ in range(200):
            cx, cy = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
            if tissue.contains(Point(cx, cy)) and (taken is None or
                                                   not taken.contains(Point(cx, cy))):
                break
        r = base_r * rng.uniform(0.8, 1.15)
        aspect = rng.uniform(0.75, 1.3)
        geom = _blob(rng, cx, cy, r * aspect, r / aspect).intersection(tissue)
        if i % 2 == 0:
            geom = geom.difference(_blob(rng, cx, cy, 0.3 * r, 0.3 * r, roughness=0.1))
        if taken is not None:
            geom = geom.difference(taken)
        geom = _polygonal(geom, min_area=min_area)
        if geom.is_empty:
            continue
        regions.append(SyntheticRegion(cls, geom))
        taken = geom if taken is None else unary_union([taken, geom])
    return tissue, regions


def random_regions(
    width: int,
    height: int,
    seed: int = 0,
    classes: Sequence[str] = ("Tumor", "Stroma", "Necrosis"),
    n: int | None = None,
) -> list[SyntheticRegion]:
    """The class regions of :func:`random_layout` (without the tissue blob)."""
    return random_layout(width, height, seed, classes, n)[1]


# =================================================================================== rendering
_M32 = 0xFFFFFFFF


def _hash(x: np.ndarray, y: np.ndarray, salt: int) -> np.ndarray:
    """A 32-bit integer hash of integer coordinates (murmur3 finaliser), as uint32 values."""
    with np.errstate(over="ignore"):  # uint32 arithmetic wraps modulo 2**32 on purpose
        h = x.astype(np.uint32) * np.uint32(0x8DA6B343)
        h += y.astype(np.uint32) * np.uint32(0xD8163841)
        h += np.uint32(salt & _M32)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h


def _uniform(x: np.ndarray, y: np.ndarray, salt: int) -> np.ndarray:
    return _hash(x, y, salt) * (1.0 / 4294967296.0)


def _salt(seed: int, *parts: int) -> int:
    h = zlib.crc32(repr((seed, *parts)).encode())
    return h & _M32


@dataclass
class _Painter:
    """Renders pixels of a layout; every pixel depends only on its level-0 coordinates."""

    regions: Sequence[SyntheticRegion]
    tissue: BaseGeometry
    seed: int
    background: RGB
    _prepared: list[Any] = field(default_factory=list)
    _styles: list[ClassStyle] = field(default_factory=list)

    def __post_init__(self) -> None:
        import shapely

        self._prepared = [r.geometry for r in self.regions] + [self.tissue]
        for g in self._prepared:
            shapely.prepare(g)
        unknown: dict[str, int] = {}
        for r in self.regions:
            if r.class_name.strip().lower() not in CLASS_STYLES:
                unknown.setdefault(r.class_name, len(unknown))
        self._styles = [style_for(r.class_name, unknown.get(r.class_name, 0))
                        for r in self.regions]

    def region_index(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """For pixel columns ``xs`` and rows ``ys``: -1 background, len(regions) unclassified
        tissue, else the index of the region containing the pixel centre."""
        import shapely
        from shapely.geometry import box

        out = np.full((len(ys), len(xs)), -1, dtype=np.int32)
        if len(xs) == 0 or len(ys) == 0:
            return out
        cx, cy = xs.astype(np.float64) + 0.5, ys.astype(np.float64) + 0.5
        frame = box(float(cx.min()), float(cy.min()), float(cx.max()), float(cy.max()))
        n = len(self.regions)
        # Tissue first, regions on top (they are disjoint, and may lie outside the tissue).
        for k in [n, *range(n)]:
            g = self._prepared[k]
            if g.is_empty or not g.intersects(frame):
                continue
            if g.contains_properly(frame):
                out[:] = k
                continue
            # Only test the points inside the geometry's bounding box.
            gx0, gy0, gx1, gy1 = g.bounds
            ci = np.nonzero((cx > gx0) & (cx < gx1))[0]
            ri = np.nonzero((cy > gy0) & (cy < gy1))[0]
            if len(ci) == 0 or len(ri) == 0:
                continue
            gx, gy = np.meshgrid(cx[ci], cy[ri])
            inside = shapely.contains_xy(g, gx, gy)
            sub = out[np.ix_(ri, ci)]
            sub[inside] = k
            out[np.ix_(ri, ci)] = sub
        return out

    def _dots(self, st: ClassStyle, px: np.ndarray, py: np.ndarray, salt: int) -> np.ndarray:
        """Pixels inside a nucleus-like disc of a jittered lattice (tile-independent)."""
        c = float(st.dot_cell)
        fx, fy = (px + 0.5) / c, (py + 0.5) / c
        cellx, celly = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
        # With radii <= c/2 only the cell and its 3 nearest neighbours can reach a pixel.
        nx = np.where(fx - cellx < 0.5, cellx - 1, cellx + 1)
        ny = np.where(fy - celly < 0.5, celly - 1, celly + 1)
        r0, r1 = st.dot_radius
        hit = np.zeros(px.shape, dtype=bool)
        byte = np.uint32(0xFF)
        for qx, qy in ((cellx, celly), (nx, celly), (cellx, ny), (nx, ny)):
            # One hash per cell: 8 bits each for presence, radius and the x / y offsets.
            h = _hash(qx, qy, salt)
            present = (h & byte) < np.uint32(round(st.dot_prob * 256))
            r = np.minimum(r0 + ((h >> np.uint32(8)) & byte) * ((r1 - r0) / 256.0), c / 2)
            ox = (qx + (((h >> np.uint32(16)) & byte) + 0.5) / 256.0) * c
            oy = (qy + ((h >> np.uint32(24)) + 0.5) / 256.0) * c
            d2 = (px + 0.5 - ox) ** 2 + (py + 0.5 - oy) ** 2
            hit |= present & (d2 < r * r)
        return hit

    def _paint(self, st: ClassStyle, px: np.ndarray, py: np.ndarray, key: int) -> np.ndarray:
        """Float RGB (n, 3) for the pixels (px, py) of one style; ``key`` varies fibre angle."""
        seed = self.seed
        col = np.empty((len(px), 3), dtype=np.float64)
        col[:] = st.base
        if st.fibre is not None:
            ang = _uniform(np.array([key]), np.array([7]), _salt(seed, 11))[0] * math.pi
            t = (px * math.cos(ang) + py * math.sin(ang)) / st.fibre_period
            t += 0.6 * np.sin(py * 0.045 + px * 0.031 + key)
            strength = np.clip((np.sin(2 * math.pi * t) - 0.1) / 0.6, 0.0, 1.0)[:, None]
            col = col * (1 - strength) + np.asarray(st.fibre, dtype=np.float64) * strength
        lum = (_uniform(px, py, _salt(seed, 1)) - 0.5) * 2 * st.noise
        col += lum[:, None]
        if st.dot_cell and st.dot_prob > 0:
            hit = self._dots(st, px, py, _salt(seed, 2, st.dot_cell))
            if hit.any():
                jitter = (_uniform(px[hit], py[hit], _salt(seed, 3)) - 0.5) * 16
                col[hit] = np.asarray(st.dots, dtype=np.float64) + jitter[:, None]
        if st.speckle > 0:
            sp = _uniform(px, py, _salt(seed, 4)) < st.speckle
            if sp.any():
                col[sp] = np.asarray(st.dots, dtype=np.float64) + 10 * (
                    _uniform(px[sp], py[sp], _salt(seed, 5))[:, None] - 0.5)
        return col

    def render_grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Float RGB ``(len(ys), len(xs), 3)`` of level-0 pixels at columns xs and rows ys."""
        idx = self.region_index(xs, ys)
        gx, gy = np.meshgrid(xs.astype(np.int64), ys.astype(np.int64))
        out = np.empty((len(ys), len(xs), 3), dtype=np.float64)
        n = len(self.regions)
        bg = idx == -1
        if bg.any():
            bx, by = gx[bg], gy[bg]
            noise = (_uniform(bx, by, _salt(self.seed, 0)) - 0.5) * 2 * _BACKGROUND_NOISE
            out[bg] = np.asarray(self.background, dtype=np.float64) + noise[:, None]
        for k in np.unique(idx):
            if k < 0:
                continue
            sel = idx == k
            st = _TISSUE_STYLE if k == n else self._styles[k]
            out[sel] = self._paint(st, gx[sel], gy[sel], int(k))
        return out

    def render_level_tile(
        self, x0: int, y0: int, w: int, h: int, ds_x: float, ds_y: float
    ) -> np.ndarray:
        """uint8 RGB (h, w, 3) of level pixels [x0, x0+w) x [y0, y0+h) of a level whose pixels
        are ds_x x ds_y level-0 pixels: the mean of f x f level-0 samples per pixel."""
        fx = max(1, min(_MAX_SUPERSAMPLE, math.ceil(ds_x - 1e-9)))
        fy = max(1, min(_MAX_SUPERSAMPLE, math.ceil(ds_y - 1e-9)))
        sub_x = (np.arange(w * fx) + 0.5) / fx + x0
        sub_y = (np.arange(h * fy) + 0.5) / fy + y0
        xs = np.floor(sub_x * ds_x + 1e-9).astype(np.int64)
        ys = np.floor(sub_y * ds_y + 1e-9).astype(np.int64)
        out = np.empty((h, w, 3), dtype=np.uint8)
        # Render a few output rows at a time so temporaries stay small (a few MB).
        rows = max(1, _CHUNK_SAMPLES // max(1, w * fx * fy))
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            grid = self.render_grid(xs, ys[r0 * fy:r1 * fy])
            mean = grid.reshape(r1 - r0, fy, w, fx, 3).mean(axis=(1, 3))
            out[r0:r1] = np.clip(np.floor(mean + 0.5), 0, 255).astype(np.uint8)
        return out


# =============================================================================== slide object
@dataclass(frozen=True)
class SyntheticSlide:
    """A generated slide and its exact ground truth (geometry in level-0 pixels)."""

    path: Path
    width: int
    height: int
    mpp: float | None
    levels: tuple[float, ...]  # requested downsamples
    level_dimensions: tuple[tuple[int, int], ...]
    regions: tuple[SyntheticRegion, ...]  # disjoint, clipped to the image, painter order
    tissue: BaseGeometry
    seed: int = 0
    background: RGB = (240, 240, 240)
    tile: int = 256

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsamples as OpenSlide reports them (mean of the width and height ratios)."""
        return tuple((self.width / w + self.height / h) / 2 for w, h in self.level_dimensions)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names of the regions, in order of first appearance; label i + 1 in
        :meth:`label_map` is ``class_names[i]``."""
        return tuple(dict.fromkeys(r.class_name for r in self.regions))

    def class_areas_px(self) -> dict[str, float]:
        """Exact area in level-0 px² per class of what was rendered (shapely areas)."""
        areas = dict.fromkeys(self.class_names, 0.0)
        for r in self.regions:
            areas[r.class_name] += float(r.geometry.area)
        return areas

    def class_geometry(self, class_name: str) -> BaseGeometry:
        """Union of the regions of one class (empty when the class is absent)."""
        from shapely import unary_union

        return unary_union([r.geometry for r in self.regions if r.class_name == class_name])

    def _painter(self) -> _Painter:
        return _Painter(self.regions, self.tissue, self.seed, self.background)

    def _window(self, x: int, y: int, width: int | None, height: int | None) -> tuple[
            np.ndarray, np.ndarray]:
        w = self.width - x if width is None else width
        h = self.height - y if height is None else height
        if w < 0 or h < 0:
            raise ValueError(f"negative window size {w}x{h}")
        return np.arange(x, x + w, dtype=np.int64), np.arange(y, y + h, dtype=np.int64)

    def label_map(
        self, x: int = 0, y: int = 0, width: int | None = None, height: int | None = None
    ) -> np.ndarray:
        """Level-0 class labels (uint8) of a window (default: the whole slide): 0 = no class
        region (background or unclassified tissue), i + 1 = ``class_names[i]``."""
        xs, ys = self._window(x, y, width, height)
        idx = self._painter().region_index(xs, ys)
        names = self.class_names
        lut = np.zeros(len(self.regions) + 2, dtype=np.uint8)  # [-1] -> 0, tissue -> 0
        for k, r in enumerate(self.regions):
            lut[k] = names.index(r.class_name) + 1
        return lut[idx]

    def tissue_mask(
        self, x: int = 0, y: int = 0, width: int | None = None, height: int | None = None
    ) -> np.ndarray:
        """Level-0 boolean mask of non-background pixels (tissue or any class region)."""
        xs, ys = self._window(x, y, width, height)
        return self._painter().region_index(xs, ys) >= 0

    def render(
        self, x: int = 0, y: int = 0, width: int | None = None, height: int | None = None
    ) -> np.ndarray:
        """Level-0 RGB uint8 pixels of a window, exactly as written to level 0 of the file."""
        xs, ys = self._window(x, y, width, height)
        if len(xs) == 0 or len(ys) == 0:
            return np.zeros((len(ys), len(xs), 3), dtype=np.uint8)
        return self._painter().render_level_tile(int(xs[0]), int(ys[0]), len(xs), len(ys),
                                                 1.0, 1.0)

    def open(self, mpp: float | None = None) -> Slide:
        """Open the written file with :func:`qpseg.slide.open_slide`."""
        from qpseg.slide import open_slide

        return open_slide(self.path, mpp=mpp)


# ===================================================================================== writers
def _level_dims(width: int, height: int, levels: Sequence[float]) -> list[tuple[int, int]]:
    dims = []
    for ds in levels:
        if not (math.isfinite(ds) and ds >= 1):
            raise ValueError(f"level downsamples must be finite and >= 1, got {ds!r}")
        dims.append((max(1, round(width / ds)), max(1, round(height / ds))))
    if list(levels)[:1] != [1] and list(levels)[:1] != [1.0]:
        raise ValueError(f"the first level downsample must be 1, got {list(levels)}")
    widths = [w for w, _ in dims]
    if any(b >= a for a, b in itertools.pairwise(widths)):
        raise ValueError(f"levels {list(levels)} give level widths {widths}, which must shrink")
    return dims


def _default_levels(width: int, height: int, tile: int) -> list[float]:
    levels = [1.0]
    while max(width, height) / (levels[-1] * 4) >= tile:
        levels.append(levels[-1] * 4)
    return levels


def _layout_for(
    width: int, height: int, regions: Sequence[SyntheticRegion] | None,
    tissue: BaseGeometry | None, seed: int,
) -> tuple[list[SyntheticRegion], BaseGeometry]:
    from shapely import unary_union
    from shapely.geometry import box

    if regions is None:
        gen_tissue, gen_regions = random_layout(width, height, seed)
        tissue = gen_tissue if tissue is None else tissue
        regions = gen_regions
    resolved = resolve_overlaps(regions, width, height)
    if tissue is None:
        tissue = unary_union([r.geometry for r in resolved]) if resolved else box(0, 0, 0, 0)
    tissue = _polygonal(tissue).intersection(box(0, 0, width, height))
    return resolved, _polygonal(tissue)


def make_slide(
    path: str | Path,
    *,
    width: int,
    height: int,
    mpp: float = 0.5,
    tile: int = 256,
    levels: Sequence[float] | None = None,
    regions: Sequence[SyntheticRegion] | None = None,
    tissue: BaseGeometry | None = None,
    seed: int = 0,
    background: RGB = (240, 240, 240),
    compression_level: int = 1,
) -> SyntheticSlide:
    """Write a pyramidal tiled TIFF (OpenSlide ``generic-tiff``) and return its ground truth.

    ``levels``: downsamples, the first one 1 (default: powers of 4 while the level's longer side
    is >= ``tile``); non-integer values are allowed, a level is ``round(width / ds)`` x
    ``round(height / ds)`` pixels. ``regions``: class regions in level-0 pixels (default:
    :func:`random_layout` from ``seed``), made disjoint in painter's order; ``tissue``: the
    unclassified tissue under them (default: the generated blob, or the union of the given
    regions). Tiles are rendered and written one at a time (bounded memory). Raises ValueError
    for invalid arguments.
    """
    import tifffile

    path = Path(path)
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be >= 1, got {width}x{height}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be > 0, got {mpp!r}")
    levels = _default_levels(width, height, tile) if levels is None else [float(v) for v in levels]
    dims = _level_dims(width, height, levels)
    resolved, tissue_geom = _layout_for(width, height, regions, tissue, seed)
    painter = _Painter(resolved, tissue_geom, seed, background)
    raw_bytes = sum(3 * math.ceil(w / tile) * math.ceil(h / tile) * tile * tile for w, h in dims)

    def tiles(lw: int, lh: int) -> Iterator[np.ndarray]:
        ds_x, ds_y = width / lw, height / lh
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                w, h = min(tile, lw - tx), min(tile, lh - ty)
                block = painter.render_level_tile(tx, ty, w, h, ds_x, ds_y)
                if (w, h) != (tile, tile):  # edge tiles are padded to the full tile size
                    full = np.empty((tile, tile, 3), dtype=np.uint8)
                    full[:] = background
                    full[:h, :w] = block
                    block = full
                yield block

    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=raw_bytes > 2**31) as tw:
        for i, (lw, lh) in enumerate(dims):
            ds_x, ds_y = width / lw, height / lh
            tw.write(
                tiles(lw, lh),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                photometric="rgb",
                planarconfig="contig",
                tile=(tile, tile),
                compression="zlib",
                compressionargs={"level": compression_level},
                resolution=(1e4 / (mpp * ds_x), 1e4 / (mpp * ds_y)),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,  # OpenSlide needs REDUCEDIMAGE on pyramid levels
                description=f"qpseg synthetic slide seed={seed}" if i == 0 else None,
                software="qpseg",
                metadata=None,
                maxworkers=1,
                buffersize=8 * tile * tile * 3,
            )
    return SyntheticSlide(
        path=path, width=width, height=height, mpp=mpp, levels=tuple(levels),
        level_dimensions=tuple(dims), regions=tuple(resolved), tissue=tissue_geom, seed=seed,
        background=background, tile=tile,
    )


def make_plain_image(
    path: str | Path,
    *,
    width: int,
    height: int,
    regions: Sequence[SyntheticRegion] | None = None,
    tissue: BaseGeometry | None = None,
    seed: int = 0,
    background: RGB = (240, 240, 240),
    mode: str = "RGB",
    quality: int = 95,
) -> SyntheticSlide:
    """Write the same kind of picture as a plain image without any pixel size (format from the
    suffix: .png, .jpg/.jpeg, .tif/.tiff (uncompressed, stripped), .bmp), for missing-mpp tests.

    ``mode``: ``"RGB"``, ``"L"`` (grayscale) or ``"I;16"`` (16-bit grayscale: the luminance
    times 257, PNG or TIFF only). The returned ``mpp`` is None and there is one level. The
    whole image is rendered in memory, so keep it small.
    """
    from PIL import Image

    path = Path(path)
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be >= 1, got {width}x{height}")
    resolved, tissue_geom = _layout_for(width, height, regions, tissue, seed)
    rgb = _Painter(resolved, tissue_geom, seed, background).render_level_tile(
        0, 0, width, height, 1.0, 1.0)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = np.rint(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    if mode == "RGB":
        data: np.ndarray = rgb
    elif mode == "L":
        data = gray.clip(0, 255).astype(np.uint8)
    elif mode == "I;16":
        data = (gray.clip(0, 255) * 257).astype(np.uint16)
    else:
        raise ValueError(f"mode must be 'RGB', 'L' or 'I;16', got {mode!r}")
    if suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, data, photometric="rgb" if data.ndim == 3 else "minisblack",
                         metadata=None)
    elif suffix in (".png", ".bmp", ".jpg", ".jpeg"):
        if mode == "I;16" and suffix != ".png":
            raise ValueError("16-bit images can only be written as PNG or TIFF")
        img = Image.fromarray(data)
        kwargs: dict[str, Any] = {"quality": quality} if suffix in (".jpg", ".jpeg") else {}
        img.save(path, **kwargs)
    else:
        raise ValueError(f"unsupported suffix {path.suffix!r} (use .png, .jpg, .tif or .bmp)")
    return SyntheticSlide(
        path=path, width=width, height=height, mpp=None, levels=(1.0,),
        level_dimensions=((width, height),), regions=tuple(resolved), tissue=tissue_geom,
        seed=seed, background=background, tile=0,
    )
