"""Annotations -> label rasters, following the papers' partial-annotation training.

Rules (khalil2022 "focusing sampling" and ho2021 train on partially annotated slides):

* Classes named ``Ignore*`` (QuPath's convention) and unclassified annotations carry no label.
  ``Ignore*`` areas are *forced* to the ignore index, whatever lies beneath them.
* ``Region*`` annotations mark an exhaustively labelled area: inside it, pixels not covered by a
  class annotation are ``Background`` (index 0).
* Every pixel outside all labelled annotations is *ignore* (:data:`IGNORE_INDEX`), not background.
* Overlapping class annotations: the smaller annotation wins (it is painted last), so a tumour
  island drawn inside a large stroma annotation keeps its class. Ties keep file order.

A pixel belongs to an annotation when its centre lies inside the (``make_valid``-repaired)
polygon; holes are respected. :func:`class_geometries` applies the same rules to the geometry
itself, so areas reported in manifests agree with what :func:`rasterize_labels` draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from qpseg.errors import LabelError

if TYPE_CHECKING:
    import numpy as np
    from shapely.geometry.base import BaseGeometry

    from qpseg.qupath.geojson import QuPathObject

__all__ = [
    "BACKGROUND",
    "IGNORE_INDEX",
    "ClassInfo",
    "ClassMap",
    "class_geometries",
    "fill_mask",
    "label_role",
    "rasterize_labels",
]

IGNORE_INDEX = 255
BACKGROUND = "Background"
BACKGROUND_COLOR = (0, 0, 0)

Role = Literal["class", "region", "ignore", "unclassified"]


def label_role(class_name: str | None) -> Role:
    """How an annotation with this classification is used for labels."""
    if not class_name or not class_name.strip():
        return "unclassified"
    name = class_name.strip()
    if name.lower().startswith("ignore"):
        return "ignore"
    if name.lower().startswith("region"):
        return "region"
    return "class"


@dataclass(frozen=True)
class ClassInfo:
    """One label class: its index in label rasters, QuPath name and RGB colour."""

    index: int
    name: str
    color: tuple[int, int, int]

    def to_json(self) -> dict[str, Any]:
        """JSON form used in manifests and model packages."""
        return {"index": self.index, "name": self.name, "color": list(self.color)}


@dataclass(frozen=True)
class ClassMap:
    """Ordered label classes; index 0 is always ``Background``."""

    classes: tuple[ClassInfo, ...]
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if not self.classes or self.classes[0].name != BACKGROUND or self.classes[0].index != 0:
            raise LabelError(f"class map must start with {BACKGROUND!r} at index 0")
        if [c.index for c in self.classes] != list(range(len(self.classes))):
            raise LabelError("class indices must be 0..N-1 in order")
        if len({c.name.lower() for c in self.classes}) != len(self.classes):
            raise LabelError("class names must be unique (case-insensitive)")
        if len(self.classes) >= self.ignore_index:
            raise LabelError(f"at most {self.ignore_index - 1} classes are supported")

    @classmethod
    def from_names(
        cls,
        names: Sequence[str],
        colors: dict[str, tuple[int, int, int]] | None = None,
    ) -> ClassMap:
        """Build a class map from class names (``Background`` is put first if absent).

        Colours come from ``colors`` (case-insensitive name lookup), else QuPath's defaults.
        """
        from qpseg.qupath.classes import default_color

        lookup = {k.lower(): v for k, v in (colors or {}).items()}
        ordered = [BACKGROUND] + [n for n in names if n.lower() != BACKGROUND.lower()]
        infos = []
        for i, name in enumerate(ordered):
            for bad in ("ignore", "region"):
                if name.lower().startswith(bad):
                    raise LabelError(
                        f"{name!r} cannot be a label class ({bad.title()}* is special)")
            color = lookup.get(name.lower())
            if color is None:
                color = BACKGROUND_COLOR if i == 0 else default_color(name)
            infos.append(ClassInfo(i, name, tuple(int(c) for c in color)))  # type: ignore[arg-type]
        return cls(tuple(infos))

    @property
    def names(self) -> list[str]:
        """Class names in index order."""
        return [c.name for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def index_of(self, name: str | None) -> int | None:
        """Index of a class name (case-insensitive), or None when it is not a label class."""
        if name is None:
            return None
        key = name.strip().lower()
        for c in self.classes:
            if c.name.lower() == key:
                return c.index
        return None

    def to_json(self) -> list[dict[str, Any]]:
        """JSON form: a list of ``{index, name, color}``."""
        return [c.to_json() for c in self.classes]

    @classmethod
    def from_json(cls, data: Any, ignore_index: int = IGNORE_INDEX) -> ClassMap:
        """Inverse of :meth:`to_json`; raises :class:`LabelError` on malformed input."""
        try:
            infos = tuple(
                ClassInfo(int(d["index"]), str(d["name"]),
                          tuple(int(c) for c in d["color"]))  # type: ignore[arg-type]
                for d in data
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise LabelError(f"malformed class list: {exc}") from None
        return cls(infos, ignore_index)


def _paint_order(
    objects: Iterable[QuPathObject], class_map: ClassMap
) -> list[tuple[BaseGeometry, int]]:
    """(geometry, value) pairs in painting order, bottom first, per the module rules."""
    # One repair rule for everything qpseg draws or writes: labels cover what the files hold.
    from qpseg.qupath.geojson import repair_polygonal

    def polygonal(geom: BaseGeometry) -> BaseGeometry | None:
        g = repair_polygonal(geom)
        return None if g.is_empty else g

    regions: list[tuple[BaseGeometry, int]] = []
    classes: list[tuple[float, int, BaseGeometry, int]] = []
    ignores: list[tuple[BaseGeometry, int]] = []
    for order, obj in enumerate(objects):
        geom = polygonal(obj.geometry)
        if geom is None:
            continue
        role = label_role(obj.classification)
        if role == "region":
            regions.append((geom, 0))
        elif role == "ignore":
            ignores.append((geom, class_map.ignore_index))
        elif role == "class":
            idx = class_map.index_of(obj.classification)
            if idx is not None:
                classes.append((-geom.area, order, geom, idx))
    classes.sort(key=lambda t: (t[0], t[1]))
    return regions + [(g, v) for _, _, g, v in classes] + ignores


def class_geometries(
    objects: Iterable[QuPathObject], class_map: ClassMap
) -> dict[int, BaseGeometry]:
    """The area each label index effectively covers (ignore index included), in QuPath pixels.

    Same rules as :func:`rasterize_labels`, evaluated on geometry: later-painted annotations
    cut away what they cover from earlier ones.
    """
    from shapely import union_all
    from shapely.geometry import Polygon

    covered: BaseGeometry = Polygon()
    out: dict[int, list[BaseGeometry]] = {}
    for geom, value in reversed(_paint_order(objects, class_map)):
        visible = geom.difference(covered) if not covered.is_empty else geom
        if not visible.is_empty:
            out.setdefault(value, []).append(visible)
        covered = union_all([covered, geom])
    return {k: union_all(v) for k, v in out.items()}


def _polygons(geom: BaseGeometry) -> list[BaseGeometry]:
    """The non-empty Polygon parts of any geometry, collections flattened."""
    if geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom]
    return [p for part in getattr(geom, "geoms", []) for p in _polygons(part)]


def fill_mask(mask_shape: tuple[int, int], geom: BaseGeometry, x0: float, y0: float,
              ds: float) -> np.ndarray:
    """Boolean mask of pixels whose centre lies inside ``geom`` (holes respected).

    Pixel ``(r, c)`` has its centre at QuPath ``(x0 + (c + .5) ds, y0 + (r + .5) ds)``. A
    vectorised even-odd scanline fill over all rings at once: every edge crossing of a row's
    centre line is computed in one pass, crossings are paired per row, and the spans are painted
    through a cumulative sum. Holes fall out of the even-odd rule, since ``repair_polygonal``
    guarantees valid, non-overlapping parts.
    """
    import numpy as np

    h, w = mask_shape
    rings = [np.asarray(r.coords, dtype=np.float64)
             for poly in _polygons(geom) for r in (poly.exterior, *poly.interiors)]
    if not rings or h <= 0 or w <= 0:
        return np.zeros(mask_shape, dtype=bool)
    # Edges in pixel-centre space: pixel centres sit on integer coordinates.
    a = np.concatenate([r[:-1] for r in rings])
    b = np.concatenate([r[1:] for r in rings])
    ax, ay = (a[:, 0] - x0) / ds - 0.5, (a[:, 1] - y0) / ds - 0.5
    bx, by = (b[:, 0] - x0) / ds - 0.5, (b[:, 1] - y0) / ds - 0.5
    lo_y, hi_y = np.minimum(ay, by), np.maximum(ay, by)
    # Half-open rule: an edge crosses the centre line of row r when lo_y <= r < hi_y.
    r0 = np.clip(np.ceil(lo_y), 0, h).astype(np.int64)
    r1 = np.clip(np.ceil(hi_y), 0, h).astype(np.int64)
    keep = r1 > r0
    if not keep.any():
        return np.zeros(mask_shape, dtype=bool)
    ax, ay, bx, by, r0, r1 = ax[keep], ay[keep], bx[keep], by[keep], r0[keep], r1[keep]
    counts = r1 - r0
    edge = np.repeat(np.arange(len(counts)), counts)
    rows = r0[edge] + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    xs = ax[edge] + (rows - ay[edge]) * (bx[edge] - ax[edge]) / (by[edge] - ay[edge])
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    # Rows clipped at the top/bottom keep their full crossing lists, so every row has an even
    # count and consecutive entries pair up.
    start = np.clip(np.ceil(xs[0::2]), 0, w).astype(np.int64)
    stop = np.clip(np.ceil(xs[1::2]), 0, w).astype(np.int64)
    span_rows = rows[0::2]
    diff = np.zeros((h, w + 1), dtype=np.int32)
    np.add.at(diff, (span_rows, start), 1)
    np.add.at(diff, (span_rows, stop), -1)
    return np.cumsum(diff[:, :w], axis=1) > 0


def rasterize_labels(
    annotations: Iterable[QuPathObject],
    region: tuple[float, float, int, int],
    mpp: float,
    class_map: ClassMap,
    *,
    base_mpp: float,
) -> np.ndarray:
    """Draw annotations into a ``uint8`` label raster.

    ``region`` is ``(x, y, width, height)``: ``x, y`` the top-left corner in QuPath level-0
    pixel coordinates, ``width, height`` the output size in pixels at ``mpp`` µm/px — the same
    convention as :meth:`qpseg.slide.Slide.read_region_mpp`, so a tile and its labels align.
    ``base_mpp`` is the slide's level-0 pixel size. Values are class indices of ``class_map``,
    or ``class_map.ignore_index`` for unlabelled/ignored pixels (see the module rules).
    """
    import numpy as np
    from shapely.geometry import box

    x0, y0, width, height = region
    if width <= 0 or height <= 0:
        raise LabelError(f"label region must have a positive size, got {width}x{height}")
    if not (mpp > 0 and base_mpp > 0):
        raise LabelError(f"pixel sizes must be positive (mpp={mpp}, base_mpp={base_mpp})")
    ds = float(mpp) / float(base_mpp)
    shape = (int(height), int(width))
    out = np.full(shape, class_map.ignore_index, dtype=np.uint8)
    window = box(x0 - ds, y0 - ds, x0 + (width + 1) * ds, y0 + (height + 1) * ds)
    for geom, value in _paint_order(annotations, class_map):
        if not geom.intersects(window):
            continue
        clipped = geom.intersection(window)
        out[fill_mask(shape, clipped, x0, y0, ds)] = value
    return out
