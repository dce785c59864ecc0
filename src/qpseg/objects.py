"""Class / instance maps -> QuPath objects with measurements and provenance.

Geometry
    A map pixel ``(col, row)`` covers QuPath ``x ∈ [x0 + col·ds, x0 + (col+1)·ds)`` and likewise
    ``y`` (:class:`MapGeometry`; ``ds = map_mpp / slide_mpp``). The caller applies the OpenSlide
    bounds offset once, through :meth:`MapGeometry.from_slide` (``Slide.level0_to_qupath``).
    A map at a coarser pixel size than the image usually has a last row/column that reaches
    past the image; with ``image_size`` (the QuPath image's width and height, which
    ``from_slide`` and :meth:`MapGeometry.within` set) every object is clipped to the image,
    ``0 ≤ x ≤ width``, ``0 ≤ y ≤ height``, before it is measured, so no written vertex lies
    outside the image and areas count only the image's part.

Polygons: pixel-edge (staircase) tracing, then simplification
    Each connected component (``connectivity`` 2 = 8-connected, as the lesion metrics count
    lesions; 1 = 4-connected) of each class (never Background 0 nor the ignore index) is traced
    along pixel edges, so the exact polygon covers exactly the component's pixel squares (one
    pixel -> its square; holes are interior rings). The tracer is vectorised: maximal straight
    edge runs are linked into rings (at a vertex where two pixels of one component touch only
    diagonally it turns around the pixel, and the rare self-touching ring this can give is
    repaired by :func:`qpseg.qupath.geojson.repair_polygonal`); rings are ordered by pointer
    jumping, with no Python loop per object. Then, per object: holes smaller than
    ``fill_holes_um2`` are filled (objects of the same class inside a filled hole become part of
    it; other classes stay, overlapping), objects smaller than ``min_area_um2`` are dropped
    (both default to :data:`REVIEW_DEFAULTS` for the object's output type: lesion, tissue class
    or nucleus, sizes a pathologist can review; 0 keeps every hole / object), and
    the outline is simplified with GEOS Douglas-Peucker at ``simplify_um`` (default one map
    pixel, so the outline stays within one output pixel of the exact one; the topology-preserving
    variant where plain DP gives an invalid polygon). When simplifying would change
    the area by more than :data:`MAX_SIMPLIFY_AREA_CHANGE` (tiny objects: a one-pixel square
    would become a triangle) the exact outline is kept. Simplification is done in map pixels and
    the result is then mapped exactly to QuPath coordinates (a corner ``(col, row)`` becomes
    ``(x0 + col·ds, y0 + row·ds)``) and repaired if rounding made it invalid.

Large maps
    Maps are read in blocks of ``block_size`` pixels through 2-D slicing, so any array-like
    works (numpy memmap, zarr, h5py). Blocks need no overlap: pieces of adjacent blocks share
    their pixel edges exactly, so the pieces of one object (same class, connected across a
    block border by the edge rows/columns of the two blocks, diagonally too when 8-connected)
    are unioned into one polygon. Every exact polygon is brought to a canonical form (no
    collinear vertices, ``shapely.normalize``) before hole filling and simplification, and
    probability sums are kept in exact fixed point (2^-24), so the result is identical to
    polygonising the whole map at once, whatever the block size (1 - 16384 px). Memory: one
    block of the map (and of each probability channel) at a time, plus the objects found.
    Reading and tracing the blocks is most of the time polygonising takes, so ``progress`` (a
    :data:`PolygoniseProgress`) is told after each block.
    A map tile given with :meth:`MapGeometry.tile` is polygonised on its own: objects crossing
    the tile border are not joined, so give the whole on-disk map where that matters.

Measurements (QuPath names; all finite)
    ``Area µm^2`` is the exact pixel area (after hole filling), the area the pixel metrics of
    ``qpseg evaluate`` see; ``Perimeter µm`` is measured on the written (simplified) outline,
    because a staircase is ~27 % longer than the edge it approximates; ``Max diameter µm`` is
    the largest distance between two corners of the object's pixels (the convex hull diameter,
    equal to :func:`qpseg.metrics.lesion.max_feret_diameters`), so the size category agrees with
    the lesion metrics; ``Detection probability`` is the mean probability of the object's class
    over the object's pixels (those of absorbed same-class islands included, filled background
    not; non-finite values ignored), written only when probabilities are given. Objects of a
    ``lesion_classes`` class also get ``Size category`` (0 ITC ≤ 0.2 mm, 1 micrometastasis
    ≤ 2 mm, 2 macrometastasis; khalil2022) and a name such as ``"Macrometastasis 3.20 mm"``.

Cells (:func:`polygonise_instances`)
    One cell per instance id of an instance label map (pieces with the same id are one cell,
    even when they are not connected). ``nucleus_geometry`` is the nucleus outline; the cell
    geometry is the nucleus itself (``cell_expansion_um=0``, the default) or the nucleus grown by
    ``cell_expansion_um`` µm, limited to its Voronoi region (nucleus centroids) and never covering
    another nucleus (as QuPath's cell expansion). Measurements use QuPath's cell names
    (``Nucleus: Area µm^2``, ``Cell: Area µm^2``, ...). The class of a cell is the most frequent
    class of its pixels in an optional class map, else ``default_class``. Holes of a nucleus
    below ``fill_holes_um2`` are filled; a cell never swallows another one.

Provenance
    Every object's ``metadata`` holds the caller's provenance (see :func:`provenance`; it must
    contain ``qpseg_model``, the key ``groovy/import_predictions.groovy`` uses to find qpseg's
    objects) plus the thresholds used here (``qpseg_min_area_um2``, ``qpseg_fill_holes_um2``,
    ``qpseg_simplify_um``, ``qpseg_connectivity``, ``qpseg_map_mpp``).

Files
    :func:`write_predictions` writes ``<entryID>.geojson`` atomically and refuses to replace an
    existing file unless ``overwrite`` (the previous one is then kept as ``.bak``); the per-slide
    summary (:func:`slide_summary`) goes to ``<entryID>.metadata.json`` (flat str -> str), which
    is written *first*, so an existing GeoJSON always means a finished slide.

Where the code lives
    This module is the entry point: import from here. The code lives beside it, one job per
    module: :mod:`qpseg.objects_geometry` (:class:`MapGeometry`), :mod:`qpseg.objects_trace`
    (the pixel-edge tracer), :mod:`qpseg.objects_scan` (block-wise reading, probabilities,
    joining pieces across blocks), :mod:`qpseg.objects_polygonise` (review defaults, hole
    filling, simplification, clipping, cells; :func:`polygonise`,
    :func:`polygonise_instances`), :mod:`qpseg.objects_measure` (measurement names, size
    categories, hull diameters, provenance) and :mod:`qpseg.objects_write` (summaries and the
    predictions files).
"""

from __future__ import annotations

from qpseg.objects_geometry import MapGeometry
from qpseg.objects_measure import (
    AREA,
    MAX_DIAMETER,
    PERIMETER,
    PROBABILITY,
    SIZE_CATEGORY,
    SIZE_CATEGORY_CODES,
    SIZE_CATEGORY_LABELS,
    provenance,
)
from qpseg.objects_measure import CELL as CELL
from qpseg.objects_measure import MARKER_KEY as MARKER_KEY
from qpseg.objects_measure import NUCLEUS as NUCLEUS
from qpseg.objects_polygonise import (
    MAX_SIMPLIFY_AREA_CHANGE,
    REVIEW_DEFAULTS,
    polygonise,
    polygonise_instances,
)
from qpseg.objects_scan import DEFAULT_BLOCK_SIZE as DEFAULT_BLOCK_SIZE
from qpseg.objects_scan import MAX_BLOCK_SIZE as MAX_BLOCK_SIZE
from qpseg.objects_scan import PolygoniseProgress
from qpseg.objects_write import (
    PredictionsExistError,
    metadata_path,
    predictions_path,
    slide_summary,
    summary_metadata,
    write_predictions,
)

__all__ = [
    "AREA",
    "MAX_DIAMETER",
    "MAX_SIMPLIFY_AREA_CHANGE",
    "PERIMETER",
    "PROBABILITY",
    "REVIEW_DEFAULTS",
    "SIZE_CATEGORY",
    "SIZE_CATEGORY_CODES",
    "SIZE_CATEGORY_LABELS",
    "MapGeometry",
    "PolygoniseProgress",
    "PredictionsExistError",
    "metadata_path",
    "polygonise",
    "polygonise_instances",
    "predictions_path",
    "provenance",
    "slide_summary",
    "summary_metadata",
    "write_predictions",
]
