"""What a predicted object carries besides its outline.

QuPath measurement names, the khalil2022 size categories (codes and object names), the
convex-hull diameter behind ``Max diameter µm``, and provenance: the metadata that records
which model and run made an object (``qpseg_model`` is the key the QuPath import script finds
qpseg's objects by).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError
from qpseg.labels import ClassMap

if TYPE_CHECKING:  # numpy/shapely are imported lazily: the CLI must start fast
    import numpy as np

    from qpseg.objects_geometry import MapGeometry

__all__ = [
    "AREA",
    "CELL",
    "MARKER_KEY",
    "MAX_DIAMETER",
    "NUCLEUS",
    "PERIMETER",
    "PROBABILITY",
    "SIZE_CATEGORY",
    "SIZE_CATEGORY_CODES",
    "SIZE_CATEGORY_LABELS",
    "provenance",
]

AREA = "Area \u00b5m^2"
PERIMETER = "Perimeter \u00b5m"
MAX_DIAMETER = "Max diameter \u00b5m"
PROBABILITY = "Detection probability"
SIZE_CATEGORY = "Size category"
NUCLEUS = "Nucleus: "
CELL = "Cell: "

#: ``Size category`` values (QuPath measurements are numbers) and object-name labels
SIZE_CATEGORY_CODES: dict[str, int] = {"itc": 0, "micro": 1, "macro": 2}
SIZE_CATEGORY_LABELS: dict[str, str] = {
    "itc": "ITC", "micro": "Micrometastasis", "macro": "Macrometastasis",
}
#: the provenance key that marks qpseg's objects (the QuPath import script looks for it)
MARKER_KEY = "qpseg_model"


# -------------------------------------------------------------------------------- provenance


def _fmt(value: Any) -> str:
    """A metadata value as text (QuPath metadata are strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def provenance(model: str, model_sha256: str, *, mpp: float, run: str | None = None,
               thresholds: Mapping[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Object metadata that records what made a prediction.

    Keys: ``qpseg_model``, ``qpseg_model_sha256``, ``qpseg_version``, ``qpseg_run`` (default: the
    UTC time, ``20250101T120000Z``), ``qpseg_date`` (ISO 8601 UTC), ``qpseg_mpp``, one
    ``qpseg_<name>`` per threshold, and ``extra`` as given. All values are strings.
    """
    from qpseg import __version__

    now = datetime.now(UTC)
    meta = {
        "qpseg_model": str(model),
        "qpseg_model_sha256": str(model_sha256),
        "qpseg_version": __version__,
        "qpseg_run": run if run is not None else now.strftime("%Y%m%dT%H%M%SZ"),
        "qpseg_date": now.isoformat(timespec="seconds"),
        "qpseg_mpp": _fmt(float(mpp)),
    }
    for key, value in (thresholds or {}).items():
        meta[key if key.startswith("qpseg_") else f"qpseg_{key}"] = _fmt(value)
    for key, value in (extra or {}).items():
        meta[str(key)] = _fmt(value)
    return meta


def _object_metadata(prov: Mapping[str, Any], geometry: MapGeometry,
                     settings: Mapping[str, Any]) -> dict[str, str]:
    if not isinstance(prov, Mapping):
        raise ConfigError(f"provenance must be a mapping of strings, not {type(prov).__name__}")
    meta: dict[str, str] = {}
    for key, value in prov.items():
        if not isinstance(key, str):
            raise ConfigError(f"provenance key {key!r} is not a string")
        if value is None or isinstance(value, dict | list | tuple):
            raise ConfigError(f"provenance value of {key!r} must be text or a number")
        meta[key] = _fmt(value)
    if not meta.get(MARKER_KEY):
        raise ConfigError(f"provenance must name the model under {MARKER_KEY!r} (the QuPath "
                          "import script finds qpseg's objects by that key)")
    meta.setdefault("qpseg_mpp", _fmt(geometry.map_mpp))
    meta["qpseg_map_mpp"] = _fmt(geometry.map_mpp)
    for key, value in settings.items():
        meta[f"qpseg_{key}"] = _fmt(value)
    return meta


# ------------------------------------------------------------------------- measurements


def _hull_diameters(geoms: np.ndarray) -> np.ndarray:
    """Largest distance between two vertices of each geometry (its convex hull's diameter)."""
    import numpy as np
    import shapely

    from qpseg.metrics.lesion import hull_diameter

    n = len(geoms)
    out = np.zeros(n)
    if n == 0:
        return out
    xy, idx = shapely.get_coordinates(shapely.convex_hull(geoms), return_index=True)
    counts = np.bincount(idx, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
    xx, yy = np.ascontiguousarray(xy[:, 0]), np.ascontiguousarray(xy[:, 1])
    lower = 0
    for size in (8, 16, 32, 64, 128):
        sel = np.flatnonzero((counts > lower) & (counts <= size))
        lower = size
        iu, ju = np.triu_indices(size, 1)
        step = max(1, (1 << 21) // len(iu))
        for s in range(0, len(sel), step):
            part = sel[s:s + step]
            pos = starts[part, None] + np.minimum(np.arange(size)[None, :],
                                                  counts[part, None] - 1)
            px, py = xx[pos], yy[pos]  # (k, size), padded by repeating the last vertex
            d2 = (px[:, iu] - px[:, ju]) ** 2 + (py[:, iu] - py[:, ju]) ** 2
            out[part] = np.sqrt(d2.max(axis=1))
    for i in np.flatnonzero(counts > lower):
        out[i] = hull_diameter(xy[starts[i]:starts[i] + counts[i]])
    return out


def _lesion_set(lesion_classes: Iterable[str], classes: ClassMap) -> set[int]:
    out: set[int] = set()
    for name in lesion_classes:
        idx = classes.index_of(name)
        if idx is not None and idx > 0:
            out.add(idx)
    return out


def _category_name(category: str, diameter_um: float) -> str:
    return f"{SIZE_CATEGORY_LABELS[category]} {diameter_um / 1000.0:.2f} mm"
