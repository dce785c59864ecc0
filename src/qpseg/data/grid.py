"""Slides as training sees them (:class:`SlideRecord`) and tile grids over them (:func:`tile_grid`).

A tile is ``tile_px`` x ``tile_px`` pixels at ``mpp`` µm/px; its record holds the slide index,
the QuPath level-0 top-left corner, the labelled fraction and a class histogram. The grid starts
at QuPath (0, 0) with a stride of ``stride_px`` (default: ``tile_px``, no overlap; ho2021 §2.2
uses a stride equal to the 256 px target), and the last row/column may reach past the image
(those pixels are white and ignored).

Labelled fractions come from :func:`qpseg.labels.rasterize_labels` at a coarse pixel size
(``resolution`` cells per tile side), band by band over the labelled bounding box only, so no
slide or full-resolution label raster is ever held in memory. khalil2022 §3.2.2 eq. (1) keeps a
tile when its labelled fraction ``ϑ`` is at least ``γ = 0.05`` (:data:`FOCUS_GAMMA`); ho2021
§2.2 keeps target patches with more than 1 % annotated pixels; pedersen2022 §2.2 keeps patches
with more than 25 % tissue (:data:`MIN_TISSUE`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from qpseg.errors import ConfigError, LabelError, QpsegError

if TYPE_CHECKING:
    import numpy as np

    from qpseg.labels import ClassMap
    from qpseg.manifest import Manifest, ManifestEntry
    from qpseg.qupath.geojson import QuPathObject
    from qpseg.tissue import TissueMask

__all__ = [
    "FOCUS_GAMMA",
    "MIN_TISSUE",
    "SELECT_MODES",
    "SlideRecord",
    "Tile",
    "build_tiles",
    "slides_from_manifest",
    "tile_grid",
    "tiles_from_json",
    "tiles_to_json",
]

#: khalil2022 §3.2.2 eq. (1): γ = 0.05, the least labelled fraction of a training tile.
FOCUS_GAMMA = 0.05
#: pedersen2022 §2.2: "Only patches containing more than 25% tissue were included".
MIN_TISSUE = 0.25
#: Which tiles :func:`tile_grid` keeps.
SELECT_MODES: tuple[str, ...] = ("labelled", "tissue", "either", "both", "all")
# Coarse label cells per tile side when measuring labelled fractions.
_RESOLUTION = 16
# Coarse cells rasterised at once (bounds the memory of a band).
_BAND_CELLS = 1 << 22
_INSTANCE_TYPES = ("cell", "detection")


@dataclass
class SlideRecord:
    """One slide for training: where it is, its pixel size and size, and its objects.

    ``annotations`` are the label annotations (QuPath level-0 coordinates); ``detections`` the
    cells/detections used for nuclei instance targets. ``group`` is the pedersen2022 §2.3 first
    sampling level (histological grade, or any entry metadata/tag). ``width``/``height`` are
    QuPath's image size (the bounds size) in level-0 pixels.
    """

    path: str
    mpp: float
    width: int
    height: int
    annotations: list[QuPathObject] = field(default_factory=list)
    name: str = ""
    entry_id: int | None = None
    group: str | None = None
    detections: list[QuPathObject] = field(default_factory=list)
    annotation_file: str | None = None

    def __post_init__(self) -> None:
        from qpseg.slide import check_mpp

        self.mpp = check_mpp(self.mpp, "slide pixel size", self.path, error=ConfigError)
        if self.width <= 0 or self.height <= 0:
            raise ConfigError(f"slide size must be positive, got {self.width}x{self.height}",
                              self.path)

    @property
    def key(self) -> str:
        """Identifier used by splits: the image name, else the file name."""
        from pathlib import Path

        return self.name or Path(self.path).name


def _entry_group(entry: ManifestEntry, group_by: str) -> str | None:
    """The entry's value for ``group_by``: metadata key, else a tag ``key:value``/``key=value``."""
    key = group_by.strip().lower()
    for k, v in entry.metadata.items():
        if k.strip().lower() == key:
            return str(v)
    for tag in entry.tags:
        for sep in (":", "="):
            name, found, value = tag.partition(sep)
            if found and name.strip().lower() == key:
                return value.strip()
    return None


def slides_from_manifest(
    manifest: Manifest,
    *,
    group_by: str | None = None,
    detections: bool = False,
) -> list[SlideRecord]:
    """The usable entries of a manifest as :class:`SlideRecord` objects.

    Entries that are not usable (no slide, no pixel size, no labels) are skipped with a
    :class:`~qpseg.data.DataWarning`. ``group_by`` names the entry metadata key (or tag prefix,
    ``grade:2`` / ``grade=2``) used as the pedersen2022 group; entries without it get group
    ``None``. ``detections=True`` also loads cells/detections for nuclei targets. Raises
    :class:`~qpseg.errors.LabelError` when no entry is usable.
    """
    from qpseg.data import DataWarning

    out: list[SlideRecord] = []
    for entry in manifest.entries:
        if not entry.usable or entry.slide_path is None or entry.mpp is None \
                or entry.width is None or entry.height is None:
            warnings.warn(f"entry {entry.entry_id} ({entry.image_name}) skipped: "
                          f"{entry.problem or entry.status}", DataWarning, stacklevel=2)
            continue
        objects = manifest.truth_objects(entry)  # the review rule, as at import
        rec = SlideRecord(
            path=entry.slide_path, mpp=float(entry.mpp), width=int(entry.width),
            height=int(entry.height), name=entry.image_name, entry_id=entry.entry_id,
            annotations=[o for o in objects if o.object_type == "annotation"],
            group=_entry_group(entry, group_by) if group_by else None,
            detections=[o for o in objects if o.object_type in _INSTANCE_TYPES] if detections
            else [],
            annotation_file=entry.annotation_file,
        )
        out.append(rec)
    if not out:
        raise LabelError("no usable slide in the manifest", manifest.path)
    return out


@dataclass(frozen=True)
class Tile:
    """One training tile: ``slide`` indexes the slide list; ``x, y`` are the QuPath level-0
    coordinates of the top-left corner of the target; ``class_hist[c]`` is the number of
    class-``c`` pixels at the tile's mpp (from the coarse raster); ``labelled_fraction`` the
    fraction of the tile with a label (not ignore); ``tissue_fraction`` None without a mask."""

    slide: int
    x: float
    y: float
    labelled_fraction: float
    class_hist: tuple[int, ...]
    tissue_fraction: float | None = None

    @property
    def classes(self) -> tuple[int, ...]:
        """Indices of the classes present in the tile."""
        return tuple(c for c, n in enumerate(self.class_hist) if n > 0)

    def to_json(self) -> list[Any]:
        """Compact JSON form ``[slide, x, y, labelled, [hist...], tissue]``."""
        return [self.slide, self.x, self.y, round(self.labelled_fraction, 6),
                list(self.class_hist), self.tissue_fraction]

    @classmethod
    def from_json(cls, data: Any) -> Tile:
        """Inverse of :meth:`to_json`; raises ConfigError when malformed."""
        try:
            s, x, y, lab, hist, tissue = data
            tile = cls(int(s), float(x), float(y), float(lab), tuple(int(v) for v in hist),
                       None if tissue is None else float(tissue))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"malformed tile record {data!r}: {exc}") from None
        fractions = [tile.labelled_fraction] + ([] if tile.tissue_fraction is None
                                                else [tile.tissue_fraction])
        if (tile.slide < 0 or not (math.isfinite(tile.x) and math.isfinite(tile.y))
                or any(not 0 <= f <= 1 for f in fractions) or any(v < 0 for v in tile.class_hist)):
            raise ConfigError(f"invalid tile record {data!r}")
        return tile


def tiles_to_json(tiles: Sequence[Tile]) -> list[list[Any]]:
    """JSON form of a tile list (see :meth:`Tile.to_json`)."""
    return [t.to_json() for t in tiles]


def tiles_from_json(data: Any) -> list[Tile]:
    """Inverse of :func:`tiles_to_json`."""
    if not isinstance(data, list):
        raise ConfigError("tile list must be a JSON array")
    return [Tile.from_json(d) for d in data]


def _label_bounds(objects: Iterable[QuPathObject]) -> tuple[float, float, float, float] | None:
    """Bounding box of everything that can carry a label (class and Region* annotations)."""
    from qpseg.labels import label_role

    bounds = None
    for obj in objects:
        if label_role(obj.classification) not in ("class", "region") or obj.geometry.is_empty:
            continue
        x0, y0, x1, y1 = obj.geometry.bounds
        if bounds is None:
            bounds = (x0, y0, x1, y1)
        else:
            bounds = (min(bounds[0], x0), min(bounds[1], y0), max(bounds[2], x1),
                      max(bounds[3], y1))
    return bounds


def _window_sums(table: np.ndarray, r0: np.ndarray, c0: np.ndarray, size: int) -> np.ndarray:
    """Sums of ``size`` x ``size`` windows with top-left cells (r0, c0) from a summed-area table
    (rows/cols broadcast: r0 is (R, 1), c0 is (1, C))."""
    r1, c1 = r0 + size, c0 + size
    out: np.ndarray = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return out


def tile_grid(
    annotations: Sequence[QuPathObject],
    class_map: ClassMap,
    *,
    image_size: tuple[int, int],
    base_mpp: float,
    tile_px: int,
    mpp: float,
    slide_index: int = 0,
    stride_px: int | None = None,
    select: str = "labelled",
    min_labelled: float = FOCUS_GAMMA,
    min_tissue: float = MIN_TISSUE,
    tissue: TissueMask | None = None,
    resolution: int = _RESOLUTION,
    unlabelled: str = "ignore",
) -> list[Tile]:
    """Tiles of one slide, in row-major order.

    ``unlabelled`` is :func:`qpseg.labels.rasterize_labels`'s: ``"background"`` (exhaustive
    annotation) makes unannotated pixels Background inside ``tissue`` (everywhere without it).

    ``select``: ``"labelled"`` keeps tiles with labelled fraction >= ``min_labelled``;
    ``"tissue"`` those with tissue fraction > ``min_tissue`` (needs ``tissue``); ``"either"``
    / ``"both"`` combine the two; ``"all"`` keeps every tile of the image. ``image_size`` is
    QuPath's ``(width, height)`` in level-0 pixels and ``base_mpp`` its pixel size.
    """
    import numpy as np

    from qpseg.labels import rasterize_labels
    from qpseg.tissue import enough_tissue

    if select not in SELECT_MODES:
        raise ConfigError(f"unknown tile selection {select!r} (choose from "
                          f"{', '.join(SELECT_MODES)})")
    if select in ("tissue", "either", "both") and tissue is None:
        raise ConfigError(f"tile selection {select!r} needs a tissue mask")
    if tile_px < 1 or (stride_px is not None and stride_px < 1):
        raise ConfigError(f"tile_px and stride_px must be >= 1, got {tile_px}, {stride_px}")
    from qpseg.slide import check_mpp

    mpp = check_mpp(mpp, "tile pixel size (mpp)", error=ConfigError)
    base_mpp = check_mpp(base_mpp, "slide pixel size (base_mpp)", error=ConfigError)
    if resolution < 1:
        raise ConfigError(f"resolution must be >= 1, got {resolution}")
    stride_px = tile_px if stride_px is None else stride_px
    width, height = image_size
    ds = mpp / base_mpp  # level-0 pixels per target pixel
    tile_l0, stride_l0 = tile_px * ds, stride_px * ds
    nx = max(1, math.ceil((width - tile_l0) / stride_l0) + 1) if width > tile_l0 else 1
    ny = max(1, math.ceil((height - tile_l0) / stride_l0) + 1) if height > tile_l0 else 1

    # Coarse cell (in target pixels) that divides both tile and stride: gcd / k, k chosen so
    # that a tile has at least `resolution` cells per side.
    g = math.gcd(tile_px, stride_px)
    k = max(1, math.ceil(resolution * g / tile_px))
    cell_px = g / k
    tile_c, stride_c = round(tile_px / cell_px), round(stride_px / cell_px)
    cell_mpp = cell_px * mpp
    n_classes = len(class_map)
    ignore = class_map.ignore_index

    labelled = np.zeros((ny, nx), dtype=np.float64)
    hist = np.zeros((ny, nx, n_classes), dtype=np.float64)
    bounds = _label_bounds(annotations)
    if bounds is not None:
        # Tiles whose box meets the labelled bounding box.
        bx0, by0, bx1, by1 = bounds
        cx0 = max(0, math.floor((bx0 - tile_l0) / stride_l0))
        cx1 = min(nx, math.floor(bx1 / stride_l0) + 1)
        cy0 = max(0, math.floor((by0 - tile_l0) / stride_l0))
        cy1 = min(ny, math.floor(by1 / stride_l0) + 1)
        if cx1 > cx0 and cy1 > cy0:
            ncols = cx1 - cx0
            w_cells = (ncols - 1) * stride_c + tile_c
            rows_per_band = max(1, int(_BAND_CELLS / max(1, w_cells * stride_c)))
            for b0 in range(cy0, cy1, rows_per_band):
                b1 = min(cy1, b0 + rows_per_band)
                h_cells = (b1 - b0 - 1) * stride_c + tile_c
                region = (cx0 * stride_l0, b0 * stride_l0, w_cells, h_cells)
                lab = rasterize_labels(annotations, region, cell_mpp, class_map,
                                       base_mpp=base_mpp, unlabelled=cast(Any, unlabelled),
                                       within=tissue if unlabelled == "background" else None)
                r0 = (np.arange(b1 - b0) * stride_c)[:, None]
                c0 = (np.arange(ncols) * stride_c)[None, :]
                table = np.zeros((h_cells + 1, w_cells + 1), dtype=np.int64)
                table[1:, 1:] = (lab != ignore).cumsum(0).cumsum(1)
                labelled[b0:b1, cx0:cx1] = _window_sums(table, r0, c0, tile_c)
                for c in np.unique(lab):
                    if int(c) == ignore:
                        continue
                    table[1:, 1:] = (lab == c).cumsum(0).cumsum(1)
                    hist[b0:b1, cx0:cx1, int(c)] = _window_sums(table, r0, c0, tile_c)
    cells_per_tile = float(tile_c * tile_c)
    labelled /= cells_per_tile
    hist *= cell_px * cell_px  # coarse cells -> target pixels

    out: list[Tile] = []
    for j in range(ny):
        for i in range(nx):
            x, y = i * stride_l0, j * stride_l0
            tf = tissue.region_fraction(x, y, tile_l0, tile_l0) if tissue is not None else None
            lab_ok = labelled[j, i] >= min_labelled and labelled[j, i] > 0
            tis_ok = tf is not None and enough_tissue(tf, min_tissue)
            keep = {"labelled": lab_ok, "tissue": tis_ok, "either": lab_ok or tis_ok,
                    "both": lab_ok and tis_ok, "all": True}[select]
            if keep:
                out.append(Tile(slide_index, float(x), float(y), float(labelled[j, i]),
                                tuple(round(v) for v in hist[j, i]), tf))
    return out


def build_tiles(
    slides: Sequence[SlideRecord],
    class_map: ClassMap,
    *,
    tile_px: int,
    mpp: float,
    stride_px: int | None = None,
    select: str = "labelled",
    min_labelled: float = FOCUS_GAMMA,
    min_tissue: float = MIN_TISSUE,
    tissue_method: str | None = None,
    tissue_masks: Sequence[TissueMask | None] | None = None,
    resolution: int = _RESOLUTION,
    unlabelled: str = "ignore",
) -> list[Tile]:
    """Tiles of every slide (``Tile.slide`` indexes ``slides``).

    With ``tissue_method`` (``"otsu"``, ``"otsu_od"`` or ``"hsv"``) each slide's thumbnail is
    read once to detect tissue (:func:`qpseg.tissue.detect_tissue`), unless ``tissue_masks``
    are given. A slide that yields no tile is skipped with a :class:`~qpseg.data.DataWarning`;
    a slide that cannot be read raises :class:`~qpseg.errors.SlideError`.
    """
    from qpseg.data import DataWarning

    if tissue_masks is not None and len(tissue_masks) != len(slides):
        raise ConfigError(f"got {len(tissue_masks)} tissue masks for {len(slides)} slides")
    out: list[Tile] = []
    for i, rec in enumerate(slides):
        mask = tissue_masks[i] if tissue_masks is not None else None
        if mask is None and tissue_method is not None:
            from qpseg.slide import open_slide
            from qpseg.tissue import detect_tissue

            with open_slide(rec.path, mpp=rec.mpp) as slide:
                mask = detect_tissue(slide, tissue_method)
        try:
            tiles = tile_grid(rec.annotations, class_map, image_size=(rec.width, rec.height),
                              base_mpp=rec.mpp, tile_px=tile_px, mpp=mpp, slide_index=i,
                              stride_px=stride_px, select=select, min_labelled=min_labelled,
                              min_tissue=min_tissue, tissue=mask, resolution=resolution,
                              unlabelled=unlabelled)
        except LabelError as exc:
            raise LabelError(exc.message, rec.annotation_file or rec.path) from None
        except QpsegError:
            raise
        if not tiles:
            warnings.warn(f"{rec.path}: no tile passes the selection ({select}); slide skipped",
                          DataWarning, stacklevel=2)
        out.extend(tiles)
    return out
