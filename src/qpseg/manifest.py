"""``import-project``: a QuPath project + annotations -> ``manifest.json`` for training.

The manifest lists, per project entry, the resolved slide, its pixel size and size, where its
annotations came from and what they label (counts and areas per class after the overlap rules
of :mod:`qpseg.labels`), plus the class map (index, name, colour). Training and evaluation read
the manifest and rasterise labels on the fly with :func:`qpseg.labels.rasterize_labels`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import GeoJSONError, LabelError, ProjectError, QpsegError, QpsegWarning
from qpseg.labels import ClassMap, class_geometries, label_role

if TYPE_CHECKING:
    from qpseg.qupath.geojson import QuPathObject
    from qpseg.qupath.project import ProjectEntry, QuPathProject

__all__ = [
    "MANIFEST_VERSION",
    "Manifest",
    "ManifestEntry",
    "find_annotation_file",
    "import_project",
    "read_manifest",
]

MANIFEST_VERSION = 1
ANNOTATION_SUFFIXES = (".geojson", ".geojson.gz", ".json")


@dataclass
class ClassStats:
    """What one class labels in one slide."""

    count: int = 0
    area_px: float = 0.0
    area_um2: float | None = None


@dataclass
class ManifestEntry:
    """One project entry as training sees it."""

    entry_id: int
    image_name: str
    slide_path: str | None
    image_found: bool
    mpp: float | None
    width: int | None
    height: int | None
    annotation_file: str | None
    status: str  # "ok" | "no-annotations" | "no-labels" | "failed"
    problem: str | None = None
    n_annotations: int = 0
    n_unclassified: int = 0
    n_ignore: int = 0
    n_region: int = 0
    labelled_area_px: float = 0.0
    classes: dict[str, ClassStats] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """True when this entry has a readable slide, a pixel size and labels."""
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        """JSON form (as written in manifest.json)."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ManifestEntry:
        """Inverse of :meth:`to_json`."""
        d = dict(d)
        d["classes"] = {k: ClassStats(**v) for k, v in (d.get("classes") or {}).items()}
        return cls(**d)


@dataclass
class Manifest:
    """The result of ``import-project``: class map + one record per project entry."""

    project: str
    class_map: ClassMap
    entries: list[ManifestEntry]
    created: str = ""
    qpseg_version: str = ""
    path: Path | None = None

    @property
    def usable_entries(self) -> list[ManifestEntry]:
        """Entries that can be used for training (slide found, mpp known, labels present)."""
        return [e for e in self.entries if e.usable]

    @property
    def failed_entries(self) -> list[ManifestEntry]:
        """Entries that could not be imported (missing/unreadable slide, unknown mpp, ...)."""
        return [e for e in self.entries if e.status == "failed"]

    def annotations_for(self, entry: ManifestEntry) -> list[QuPathObject]:
        """Read an entry's annotations again (labels are rasterised from these)."""
        from qpseg.qupath.geojson import read_geojson

        if entry.annotation_file is None:
            return []
        return [o for o in read_geojson(entry.annotation_file) if o.object_type == "annotation"]

    def to_json(self) -> dict[str, Any]:
        """JSON form (as written in manifest.json)."""
        return {
            "manifest_version": MANIFEST_VERSION,
            "qpseg_version": self.qpseg_version,
            "created": self.created,
            "project": self.project,
            "ignore_index": self.class_map.ignore_index,
            "classes": self.class_map.to_json(),
            "entries": [e.to_json() for e in self.entries],
        }

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (with a backup of a previous manifest)."""
        from qpseg._io import write_json_atomic

        path = Path(path)
        write_json_atomic(path, self.to_json())
        self.path = path
        return path


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read ``manifest.json`` (or the folder holding it); :class:`LabelError` if malformed."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabelError("manifest not found (run `qpseg import-project` first)", p) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelError(f"cannot read manifest: {exc}", p) from None
    try:
        if data.get("manifest_version") != MANIFEST_VERSION:
            raise LabelError(f"unsupported manifest_version {data.get('manifest_version')!r}", p)
        return Manifest(
            project=str(data["project"]),
            class_map=ClassMap.from_json(data["classes"], int(data.get("ignore_index", 255))),
            entries=[ManifestEntry.from_json(e) for e in data["entries"]],
            created=str(data.get("created", "")),
            qpseg_version=str(data.get("qpseg_version", "")),
            path=p,
        )
    except LabelError as exc:
        raise LabelError(exc.message, p) from None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise LabelError(f"malformed manifest: {type(exc).__name__}: {exc}", p) from None


def _annotation_dirs(project: QuPathProject, geojson_dir: Path | None) -> list[Path]:
    if geojson_dir is not None:
        return [geojson_dir]
    return [project.path.parent / "qpseg" / "annotations"]


def find_annotation_file(entry: ProjectEntry, folders: Sequence[Path]) -> Path | None:
    """The GeoJSON file for an entry: ``<entryID>.geojson``, else ``<imageName>.geojson``.

    The image name is tried with and without its extension (``a.svs.geojson``, ``a.geojson``),
    as both conventions appear in QuPath export scripts.
    """
    name = entry.image_name
    stems = [str(entry.entry_id), name]
    stem_no_ext = Path(name).stem if name else ""
    if stem_no_ext and stem_no_ext not in stems:
        stems.append(stem_no_ext)
    for folder in folders:
        for stem in stems:
            if not stem:
                continue
            for suffix in ANNOTATION_SUFFIXES:
                candidate = folder / f"{stem}{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def _entry_geometry_stats(
    objects: list[QuPathObject], class_map: ClassMap, mpp: float | None
) -> tuple[dict[str, ClassStats], float, dict[str, int]]:
    roles = {"unclassified": 0, "ignore": 0, "region": 0, "class": 0}
    stats: dict[str, ClassStats] = {}
    for obj in objects:
        role = label_role(obj.classification)
        roles[role] += 1
        if role == "class":
            idx = class_map.index_of(obj.classification)
            if idx is not None:
                stats.setdefault(class_map.classes[idx].name, ClassStats()).count += 1
    labelled = 0.0
    for value, geom in class_geometries(objects, class_map).items():
        if value == class_map.ignore_index:
            continue
        name = class_map.classes[value].name
        st = stats.setdefault(name, ClassStats())
        st.area_px = float(geom.area)
        labelled += st.area_px
    for st in stats.values():
        st.area_um2 = st.area_px * mpp * mpp if mpp else None
    return stats, labelled, roles


def _class_colors(
    project: QuPathProject, objects: dict[int, list[QuPathObject]]
) -> dict[str, tuple[int, int, int]]:
    colors: dict[str, tuple[int, int, int]] = {}
    for objs in objects.values():
        for o in objs:
            if o.classification and o.class_color and o.classification not in colors:
                colors[o.classification] = tuple(o.class_color)  # type: ignore[assignment]
    # The project's classes.json is what the user sees in QuPath: it wins.
    for pc in project.classes:
        colors[pc.name] = tuple(pc.color)  # type: ignore[assignment]
    return colors


def import_project(
    project_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    geojson_dir: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    mpp: float | None = None,
    use_paquo: bool | None = None,
) -> Manifest:
    """Read a project's entries and annotations and write ``<out_dir>/manifest.json``.

    Annotations come from ``<project>/qpseg/annotations/`` (what ``groovy/export_annotations
    .groovy`` writes), or ``geojson_dir``; files are matched by entry id or image name. When
    neither has a file and paquo finds a QuPath installation (``use_paquo`` not False), the
    annotations are read from the project's ``data.qpdata`` through paquo.

    ``classes`` fixes the label classes and their order (``Background`` is always index 0);
    by default every class found in the annotations is used, in the project's classes.json
    order. ``mpp`` overrides every slide's pixel size. Entries that cannot be used are kept in
    the manifest with ``status`` and ``problem`` set (and a warning); the import fails only
    when no entry has labels.
    """
    from qpseg import __version__
    from qpseg.qupath.geojson import read_geojson
    from qpseg.qupath.project import QuPathProject
    from qpseg.slide import open_slide

    project = QuPathProject.load(project_path)
    folders = _annotation_dirs(project, Path(geojson_dir) if geojson_dir else None)
    if geojson_dir is not None and not Path(geojson_dir).is_dir():
        raise ProjectError("annotation folder does not exist", geojson_dir)

    paquo_ok = False
    if use_paquo is not False:
        from qpseg.qupath import paquo_backend

        paquo_ok = paquo_backend.qupath_available()

    annotation_files: dict[int, Path | None] = {}
    objects: dict[int, list[QuPathObject]] = {}
    problems: dict[int, str] = {}
    for entry in project.entries:
        f = find_annotation_file(entry, folders)
        annotation_files[entry.entry_id] = f
        try:
            if f is not None:
                objs = read_geojson(f)
            elif paquo_ok:
                from qpseg.qupath import paquo_backend

                objs = paquo_backend.read_annotations(project.path, entry.entry_id)
            else:
                objs = []
        except GeoJSONError as exc:
            problems[entry.entry_id] = exc.one_line()
            objs = []
        objects[entry.entry_id] = [o for o in objs if o.object_type == "annotation"]

    found = {
        o.classification.strip()
        for objs in objects.values()
        for o in objs
        if label_role(o.classification) == "class" and o.classification
    }
    colors = _class_colors(project, objects)
    if classes:
        names = [c.strip() for c in classes if c.strip()]
        lower_found = {n.lower() for n in found}
        missing = [n for n in names if n.lower() not in lower_found and n.lower() != "background"]
        if missing:
            warnings.warn(
                f"{project.path}: class(es) {', '.join(missing)} not found in any annotation",
                QpsegWarning,
                stacklevel=2,
            )
    else:
        order = {pc.name.lower(): i for i, pc in enumerate(project.classes)}
        names = sorted(found, key=lambda n: (order.get(n.lower(), len(order)), n.lower()))
    if not [n for n in names if n.lower() != "background"]:
        raise LabelError(
            "no labelled annotations: every annotation is unclassified, Ignore* or Region* "
            f"(looked in {', '.join(str(f) for f in folders)})",
            project.path,
        )
    class_map = ClassMap.from_names(names, colors)

    entries: list[ManifestEntry] = []
    for entry in project.entries:
        eid = entry.entry_id
        objs = objects[eid]
        ann = annotation_files[eid]
        rec = ManifestEntry(
            entry_id=eid,
            image_name=entry.image_name,
            slide_path=str(entry.image_path) if entry.image_path else None,
            image_found=entry.image_found,
            mpp=None,
            width=None,
            height=None,
            annotation_file=str(ann.resolve()) if ann else None,
            status="ok",
            metadata=dict(entry.metadata),
            tags=list(entry.tags),
        )
        try:
            if eid in problems:
                raise QpsegError(problems[eid])
            if entry.image_path is None or not entry.image_found:
                raise QpsegError(f"image not found (uri {entry.uri})")
            with open_slide(entry.image_path, mpp=mpp) as slide:
                rec.mpp = float(slide.mpp)
                rec.width, rec.height = (int(v) for v in slide.qupath_dimensions)
                # Decode one small tile of the smallest level: a corrupt slide fails here, at
                # import, rather than deep inside a training worker.
                top = slide.level_count - 1
                lw, lh = slide.level_dimensions[top]
                slide.read_region((0, 0), top, (min(lw, 64), min(lh, 64)))
        except QpsegError as exc:
            rec.status, rec.problem = "failed", exc.one_line()
        stats, labelled, roles = _entry_geometry_stats(objs, class_map, rec.mpp)
        rec.classes, rec.labelled_area_px = stats, labelled
        rec.n_annotations = len(objs)
        rec.n_unclassified, rec.n_ignore, rec.n_region = (
            roles["unclassified"], roles["ignore"], roles["region"])
        if rec.status == "ok" and not objs:
            rec.status, rec.problem = "no-annotations", "no annotation file found"
            if ann is not None:
                rec.problem = "annotation file holds no annotations"
        elif rec.status == "ok" and labelled <= 0:
            rec.status, rec.problem = "no-labels", "no labelled annotations"
        if rec.problem:
            warnings.warn(
                f"entry {eid} ({entry.image_name}): {rec.problem}", QpsegWarning, stacklevel=2
            )
        entries.append(rec)

    manifest = Manifest(
        project=str(project.path.resolve()),
        class_map=class_map,
        entries=entries,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        qpseg_version=__version__,
    )
    if not manifest.usable_entries and entries:
        reasons = "; ".join(sorted({e.problem or e.status for e in entries}))[:300]
        raise LabelError(f"no usable entry ({reasons})", project.path)
    if out_dir is not None:
        manifest.write(Path(out_dir) / "manifest.json")
    return manifest

