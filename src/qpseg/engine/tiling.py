"""Tile plans: which tiles of a slide a model reads, where, and which part of each output counts.

Units. ``ds`` is level-0 pixels per *base* pixel (``base_mpp / slide_mpp``, any positive float:
non-integer downsamples are normal, e.g. a 0.2527 µm/px scan read at 0.5 µm/px). The model
contract speaks in base pixels (``tile_px``, ``context_px``, ``margin_px``); the output map has
``output_stride`` base pixels per pixel (1 for dense models, ``tile_px`` for patch classifiers).
Everything below is in *output* pixels unless it says otherwise.

Map. The map covers QuPath's image (the OpenSlide bounds, see :mod:`qpseg.slide`) from QuPath
(0, 0): map pixel ``(c, r)`` covers QuPath ``x ∈ [c·ds_out, (c+1)·ds_out)`` (``ds_out = ds ·
output_stride``) and likewise ``y``; ``ceil`` makes the last column/row cover the image edge.

Grid. Tile ``(i, j)`` predicts ``tile_out`` output pixels starting at ``origin = start - margin
+ (i, j)·step``; of those, the ``valid`` pixels after the ``margin`` (the part free of
zero-padding artefacts, ``margin_px`` of the contract) are used:

* ``"center"`` (default): ``step = valid = tile_out - 2·margin`` and ``start = 0``: the valid
  parts tile the map exactly (each map pixel comes from exactly one tile; neighbouring inputs
  overlap by ``2·margin``), so stitching is a copy.
* ``"blend"``: ``step = valid // 2`` (50 % overlap, lagree2021 "tiled ... with a 50 % overlap"),
  ``start = -step``; overlapping valid parts are averaged with a Hann window, which sums to one
  at 50 % overlap (see :mod:`qpseg.engine.stitch`).
* ``"instance"``: as ``"center"``, but a tile's objects may reach into its margins: an object is
  kept by the one tile whose valid part holds its centroid (tile-border deduplication).

Inputs. Every input of the contract is centred on the tile's centre (``InputSpec``: ``size_px``
pixels at ``scale`` × base mpp), so FCN's context (input 0 is ``tile_px + 2·context_px``) and
DMMN's 20x/10x/5x fields (``size_px · scale`` base pixels) follow from one rule.

Tissue. With a :class:`~qpseg.tissue.TissueMask`, only tiles whose written part holds tissue
(fraction above ``min_tissue``) are planned; the rest of the map stays background (class 0).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from qpseg.errors import ModelError, QpsegWarning, SlideError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from qpseg.models.contract import ModelContract
    from qpseg.objects import MapGeometry
    from qpseg.slide import Slide
    from qpseg.tissue import TissueMask

__all__ = [
    "DEFAULT_MAX_UPSAMPLE",
    "MODES",
    "InferenceWarning",
    "InputRead",
    "TilePlan",
    "check_reachable",
    "inference_contract",
    "plan_for_slide",
    "plan_tiles",
]

StitchMode = Literal["center", "blend", "instance"]
MODES: tuple[str, ...] = ("center", "blend", "instance")


class InferenceWarning(QpsegWarning):
    """Something about a run the user should know (e.g. a margin that had to shrink)."""


#: A model may ask for pixels at most this much finer than the slide's level 0 (a 0.25 µm/px
#: model on a 0.2631 µm/px scan is fine; on a 0.5 µm/px scan it would be a 2x upsampling).
DEFAULT_MAX_UPSAMPLE = 1.25


@dataclass(frozen=True)
class InputRead:
    """How one model input is read for a tile: ``size_px`` pixels at ``scale`` × base mpp,
    its top-left ``offset_base`` base pixels from the tile's output origin (negative: before)."""

    size_px: int
    scale: float
    offset_base: float


def check_reachable(slide_mpp: float, model_mpp: float, *,
                    max_upsample: float = DEFAULT_MAX_UPSAMPLE, path: object = None) -> None:
    """SlideError when the model's pixel size cannot be read from a slide of ``slide_mpp``."""
    if not (math.isfinite(model_mpp) and model_mpp > 0):
        raise SlideError(f"model pixel size {model_mpp!r} µm/px is not usable",
                         path)  # type: ignore[arg-type]
    if slide_mpp / model_mpp > max_upsample:
        raise SlideError(
            f"model needs {model_mpp:g} µm/px but the slide's finest level is {slide_mpp:g} "
            f"µm/px (more than {max_upsample:g}x upsampling)", path)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class TilePlan:
    """The tiles of one slide for one model (stage); see the module docstring for the rules.

    ``tiles`` is an ``(N, 2)`` int array of ``(i, j)`` grid indices in raster order (row ``j``
    first), the tiles to run.
    """

    slide_mpp: float
    base_mpp: float
    downsample: float          # level-0 px per base px
    output_stride: int         # base px per output px
    tile_px: int               # base px the model predicts per tile (contract.tile_px)
    map_width: int
    map_height: int
    tile_out: int              # output px per tile side
    margin: int
    valid: int
    step: int
    start: int
    nx: int
    ny: int
    mode: str
    inputs: tuple[InputRead, ...]
    tiles: np.ndarray
    tissue_fraction: float = 1.0
    low_tissue: int = 0        # grid tiles with some tissue, too little to run (min_tissue)

    # ------------------------------------------------------------------ derived geometry
    @property
    def n_tiles(self) -> int:
        """Number of tiles to run."""
        return int(self.tiles.shape[0])

    @property
    def grid_tiles(self) -> int:
        """Number of tiles of the full grid (with and without tissue)."""
        return self.nx * self.ny

    @property
    def map_downsample(self) -> float:
        """Level-0 (QuPath) pixels per output pixel."""
        return self.downsample * self.output_stride

    @property
    def map_mpp(self) -> float:
        """Pixel size of the output map in µm."""
        return self.base_mpp * self.output_stride

    def valid_start(self, index: int) -> int:
        """First output pixel (column or row) of the valid part of tile column/row ``index``."""
        return self.start + index * self.step

    def origin(self, i: int, j: int) -> tuple[int, int]:
        """Output-pixel position of tile ``(i, j)``'s output pixel (0, 0)."""
        return self.valid_start(i) - self.margin, self.valid_start(j) - self.margin

    def write_start(self, j: int) -> int:
        """First map row tile row ``j`` may write (its valid part; the whole output for
        instance tiles, whose objects may reach into the margin)."""
        v = self.valid_start(j)
        return v - self.margin if self.mode == "instance" else v

    def write_end(self, j: int) -> int:
        """One past the last map row tile row ``j`` may write."""
        v = self.valid_start(j)
        return v - self.margin + self.tile_out if self.mode == "instance" else v + self.valid

    def row_bands(self, count: int) -> list[tuple[int, int]]:
        """The map's rows split into ``count`` consecutive ``[r0, r1)`` bands holding about
        the same number of tiles (some may be empty), for ranks sharing one slide.

        Band edges are where a tile row starts writing, so in centre mode each tile belongs
        to one band; in blend mode a tile row straddling an edge is run by both bands, each
        keeping its own rows (see :meth:`for_rows`)."""
        if count < 1:
            raise ValueError("count must be >= 1")
        h, n = self.map_height, self.n_tiles
        if n == 0:
            return [(0, h)] + [(h, h)] * (count - 1)
        edges = [0]
        for b in range(1, count):  # band b starts at the tile row of its first tile
            j = int(self.tiles[min(n - 1, math.ceil(b * n / count)), 1])
            edges.append(max(min(max(self.write_start(j), 0), h), edges[-1]))
        edges.append(h)
        return list(itertools.pairwise(edges))

    def for_rows(self, r0: int, r1: int) -> TilePlan:
        """The same plan with only the tiles that write map rows ``[r0, r1)``."""
        import dataclasses

        import numpy as np

        if self.mode == "instance":
            raise ValueError("instance plans are not split by rows (objects cross bands)")
        j = self.tiles[:, 1]
        lo = np.clip(self.start + j * self.step, 0, self.map_height)  # write_start, clipped
        hi = np.clip(self.start + j * self.step + self.valid, 0, self.map_height)
        keep = (np.maximum(lo, r0) < np.minimum(hi, r1))
        return dataclasses.replace(self, tiles=self.tiles[keep])

    def reads(self, i: int, j: int) -> list[tuple[float, float, int, float]]:
        """``(x, y, size_px, mpp)`` of every input of tile ``(i, j)``: QuPath coordinates of the
        top-left corner and the pixel size to read at (:meth:`Slide.read_region_mpp`)."""
        ox, oy = self.origin(i, j)
        bx, by = ox * self.output_stride, oy * self.output_stride
        out = []
        for inp in self.inputs:
            out.append(((bx + inp.offset_base) * self.downsample,
                        (by + inp.offset_base) * self.downsample,
                        inp.size_px, self.base_mpp * inp.scale))
        return out

    def geometry(self) -> MapGeometry:
        """The map's place in QuPath coordinates (for :mod:`qpseg.objects`)."""
        from qpseg.objects import MapGeometry

        return MapGeometry(0.0, 0.0, self.map_downsample, self.slide_mpp)

    def tissue_pixels(self) -> int:
        """Output pixels written by the planned tiles (inside the map): the work done."""
        import numpy as np

        if self.n_tiles == 0:
            return 0
        lo_x = np.clip(self.start + self.tiles[:, 0] * self.step, 0, self.map_width)
        hi_x = np.clip(self.start + self.tiles[:, 0] * self.step + self.step, 0, self.map_width)
        lo_y = np.clip(self.start + self.tiles[:, 1] * self.step, 0, self.map_height)
        hi_y = np.clip(self.start + self.tiles[:, 1] * self.step + self.step, 0, self.map_height)
        return int(((hi_x - lo_x) * (hi_y - lo_y)).sum())

    def to_json(self) -> dict[str, object]:
        """A JSON summary (no tile list)."""
        return {
            "slide_mpp": self.slide_mpp, "base_mpp": self.base_mpp, "map_mpp": self.map_mpp,
            "downsample": self.downsample, "output_stride": self.output_stride,
            "map_size": [self.map_width, self.map_height], "tile_out": self.tile_out,
            "margin": self.margin, "valid": self.valid, "step": self.step, "mode": self.mode,
            "grid": [self.nx, self.ny], "tiles": self.n_tiles,
            "tissue_fraction": self.tissue_fraction, "low_tissue": self.low_tissue,
        }


def _count(extent: int, start: int, valid: int, step: int) -> int:
    """Tiles needed so the valid parts (start + k·step, length valid) cover [0, extent)."""
    if extent <= 0:
        return 0
    return max(1, math.ceil((extent - start - valid) / step) + 1)


def _inputs(contract: ModelContract) -> tuple[InputRead, ...]:
    reads = []
    for spec in contract.inputs:
        if spec.scale is None or spec.kind != "image":
            raise ModelError(f"{contract.architecture}: input {spec.name!r} is not an image "
                             "tile (whole-slide or heatmap inputs need a multi-stage model)")
        field = spec.size_px * spec.scale
        reads.append(InputRead(spec.size_px, float(spec.scale),
                               (contract.tile_px - field) / 2.0))
    return tuple(reads)


def _resizable(c: ModelContract) -> bool:
    return (not c.fixed_size and not c.stages and c.output == "pixel" and len(c.inputs) == 1
            and c.inputs[0].scale == 1.0 and c.output_px == c.tile_px
            and c.inputs[0].size_px == c.tile_px + 2 * c.context_px)


def inference_contract(contract: ModelContract, tile_px: int | None = None) -> ModelContract:
    """The contract tiles are run with: ``contract`` itself, or the same model at another tile
    size. Models that are not ``fixed_size`` (one image input, dense output at full
    resolution) can run larger tiles than they were trained on, which wastes less of each tile
    on margins; ``tile_px`` asks for a size, and a tile whose margins would leave less than
    half of it is enlarged to ``4 * margin_px`` automatically. A fixed-size model whose margin
    leaves nothing gets a smaller margin (with a warning). ModelError for an impossible size.
    """
    import warnings
    from dataclasses import replace

    c = contract
    if tile_px is not None:
        if not _resizable(c):
            raise ModelError(f"{c.architecture} runs {c.tile_px} px tiles only (fixed size or "
                             "several inputs); leave out --tile-px")
        if tile_px < 1 or tile_px % c.size_multiple:
            raise ModelError(f"{c.architecture}: --tile-px must be a positive multiple of "
                             f"{c.size_multiple}, not {tile_px}")
        target = tile_px
    elif _resizable(c) and 4 * c.margin_px > c.tile_px:
        target = -(-4 * c.margin_px // c.size_multiple) * c.size_multiple
    else:
        target = c.tile_px
    if target != c.tile_px:
        spec = replace(c.inputs[0], size_px=target + 2 * c.context_px)
        return replace(c, tile_px=target, output_px=target, inputs=(spec,))
    if c.output != "patch" and c.output_px - 2 * c.margin_px < 1:
        margin = max(0, (c.output_px - 1) // 4)
        warnings.warn(f"{c.architecture}: margin {c.margin_px} px does not fit a "
                      f"{c.tile_px} px tile; using {margin} px", InferenceWarning, stacklevel=3)
        return replace(c, margin_px=margin)
    return c


def plan_tiles(
    contract: ModelContract,
    *,
    slide_size: tuple[int, int],
    slide_mpp: float,
    base_mpp: float,
    tissue: TissueMask | None = None,
    mode: str = "center",
    min_tissue: float = 0.0,
    instance_margin: int = 0,
    max_upsample: float = DEFAULT_MAX_UPSAMPLE,
    tile_px: int | None = None,
    path: object = None,
) -> TilePlan:
    """The tile plan of one slide for a pixel, patch or instance contract.

    ``tile_px`` runs another tile size (see :func:`inference_contract`).
    ``slide_size`` is QuPath's image size (``Slide.qupath_dimensions``), ``slide_mpp`` its pixel
    size, ``base_mpp`` the model's input-0 pixel size. ``mode`` is ``"center"`` or ``"blend"``
    (instance contracts always use ``"instance"``). ``instance_margin``: least margin (output
    pixels) for instance models, so an object up to that size near a tile border is seen whole.
    Raises SlideError when the model's pixel size is not reachable from the slide and ModelError
    for a contract the engine cannot tile.
    """
    import numpy as np

    contract = inference_contract(contract, tile_px)
    if mode not in ("center", "blend"):
        raise ValueError(f"mode must be 'center' or 'blend', not {mode!r}")
    finest = min(s.scale for s in contract.inputs if s.scale is not None) if any(
        s.scale is not None for s in contract.inputs) else 1.0
    check_reachable(slide_mpp, base_mpp * finest, max_upsample=max_upsample, path=path)
    reads = _inputs(contract)
    if contract.output == "patch":  # one value per tile: nothing to blend
        stride, tile_out, margin_base = contract.tile_px, 1, 0
        mode = "center"
    else:
        if contract.tile_px % contract.output_px:
            raise ModelError(f"{contract.architecture}: tile_px {contract.tile_px} is not a "
                             f"multiple of output_px {contract.output_px}")
        stride = contract.tile_px // contract.output_px
        tile_out, margin_base = contract.output_px, contract.margin_px
    margin = math.ceil(margin_base / stride)
    if contract.output == "instance":
        mode = "instance"
        margin = max(margin, min(instance_margin, (tile_out - 1) // 2 - 1))
        margin = max(margin, 0)
    valid = tile_out - 2 * margin
    if valid < 1:
        raise ModelError(f"{contract.architecture}: margin {margin_base} px leaves nothing of a "
                         f"{contract.tile_px} px tile")
    if mode == "blend":
        step = max(1, valid // 2)
        start = -step
    else:
        step, start = valid, 0
    ds = base_mpp / slide_mpp
    w_q, h_q = slide_size
    ds_out = ds * stride
    map_w = max(1, math.ceil(w_q / ds_out - 1e-9))
    map_h = max(1, math.ceil(h_q / ds_out - 1e-9))
    # Blending: one more tile past the edge, so every pixel gets both of its windows.
    extra = valid if mode == "blend" else 0
    nx = _count(map_w + extra, start, valid, step)
    ny = _count(map_h + extra, start, valid, step)

    jj, ii = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    tiles = np.stack([ii.ravel(), jj.ravel()], axis=1).astype(np.int64)
    fraction = 1.0
    low = 0
    if tissue is not None:
        from qpseg.tissue import enough_tissue

        keep = np.zeros(len(tiles), dtype=bool)
        ext = valid if mode != "instance" else tile_out
        off = 0 if mode != "instance" else -margin
        for k, (i, j) in enumerate(tiles):
            x0 = (start + i * step + off) * ds_out
            y0 = (start + j * step + off) * ds_out
            f = tissue.region_fraction(x0, y0, ext * ds_out, ext * ds_out)
            keep[k] = enough_tissue(f, min_tissue)
            low += int(f > 0 and not keep[k])
        tiles = tiles[keep]
        fraction = tissue.region_fraction(0.0, 0.0, float(w_q), float(h_q))
    return TilePlan(
        slide_mpp=float(slide_mpp), base_mpp=float(base_mpp), downsample=ds,
        output_stride=stride, tile_px=contract.tile_px, map_width=map_w, map_height=map_h,
        tile_out=tile_out, margin=margin, valid=valid, step=step, start=start, nx=nx, ny=ny,
        mode=mode, inputs=reads, tiles=tiles, tissue_fraction=float(fraction), low_tissue=low)


def plan_for_slide(contract: ModelContract, slide: Slide, base_mpp: float, *,
                   tissue: TissueMask | None = None, mode: str = "center",
                   min_tissue: float = 0.0, instance_margin: int = 0,
                   max_upsample: float = DEFAULT_MAX_UPSAMPLE,
                   tile_px: int | None = None) -> TilePlan:
    """:func:`plan_tiles` for an open slide (its QuPath size and pixel size)."""
    return plan_tiles(contract, slide_size=slide.qupath_dimensions, slide_mpp=slide.mpp,
                      base_mpp=base_mpp, tissue=tissue, mode=mode, min_tissue=min_tissue,
                      instance_margin=instance_margin, max_upsample=max_upsample,
                      tile_px=tile_px, path=slide.path)
