"""``import-project``: a QuPath project + annotations -> ``manifest.json`` for training.

The manifest lists, per project entry, the resolved slide, its pixel size and size, where its
annotations came from and what they label (counts and areas per class after the overlap rules
of :mod:`qpseg.labels`), plus the class map (index, name, colour). Training and evaluation read
the manifest and rasterise labels on the fly with :func:`qpseg.labels.rasterize_labels`.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import (
    ConfigError,
    GeoJSONError,
    LabelError,
    ProjectError,
    QpsegError,
    QpsegWarning,
)
from qpseg.labels import ClassMap, class_areas, label_role
from qpseg.qupath import compat

if TYPE_CHECKING:
    from qpseg.qupath.geojson import QuPathObject
    from qpseg.qupath.project import ProjectEntry, QuPathProject
    from qpseg.review import ReviewCounts, TruthSelection

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
#: The QuPath script that writes ``<project>/qpseg/annotations/<entryID>.geojson``, and the
#: command that writes it to a folder (for a pip-installed qpseg).
EXPORT_SCRIPT = "export_annotations.groovy"
_GROOVY_HINT = (f"export them with {EXPORT_SCRIPT} in QuPath (Automate > Script editor, then "
                "Run > Run for project; `qpseg groovy --out DIR` writes the script to DIR), or "
                "pass --geojson-dir with your own files")


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
    # Where ``mpp`` came from (see qpseg.slide.choose_pixel_size): "slide", "project",
    # "option" or "override"; and for "override" the known value it replaced.
    mpp_source: str | None = None
    mpp_replaced: float | None = None
    # The truth rule (qpseg.review) as applied at import: its policy, the saved predictions the
    # AI objects were compared with (and their SHA-256), and the counts. Old manifests: all-in.
    ai_objects: str = "all-in"
    predictions_file: str | None = None
    predictions_sha256: str | None = None
    ai_review: dict[str, Any] = field(default_factory=dict)
    # SHA-256 of ``annotation_file`` when it was imported: a resumed training run compares it
    # with the file now (qpseg.training.run). Old manifests: None.
    annotation_sha256: str | None = None

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

    @property
    def mpp_changes(self) -> list[tuple[ManifestEntry, float, float]]:
        """``(entry, old, new)`` for every slide whose known pixel size ``--mpp-override``
        replaced (the CLI prints them)."""
        return [(e, e.mpp_replaced, e.mpp) for e in self.entries
                if e.mpp_replaced is not None and e.mpp is not None]

    def annotations_for(self, entry: ManifestEntry) -> list[QuPathObject]:
        """Read an entry's annotations again (labels are rasterised from these)."""
        return [o for o in self.truth_objects(entry) if o.object_type == "annotation"]

    def truth_objects(self, entry: ManifestEntry) -> list[QuPathObject]:
        """Read an entry's objects again, with the truth rule applied as at import
        (:mod:`qpseg.review`: unreviewed AI objects left out); :class:`LabelError` when the
        saved predictions it compared with changed since."""
        from qpseg.qupath.geojson import read_geojson
        from qpseg.review import truth_from_files

        if entry.annotation_file is None:
            return []
        objs = read_geojson(entry.annotation_file)
        return truth_from_files(objs, entry.predictions_file, policy=entry.ai_objects,
                                expected_sha256=entry.predictions_sha256, warn=False).objects

    @property
    def review(self) -> ReviewCounts:
        """The truth rule's counts (AI objects left out / kept) over all entries."""
        from qpseg.review import ReviewCounts

        total = ReviewCounts(self.entries[0].ai_objects if self.entries else "all-in")
        for e in self.entries:
            total.merge(ReviewCounts.from_json(e.ai_review))
        return total

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


def _present(path: Path) -> bool:
    """True when something (a file, a folder, a link, even a broken one) is at ``path``."""
    try:
        return path.is_symlink() or path.exists()
    except (OSError, ValueError):
        return False


def find_annotation_file(entry: ProjectEntry, folders: Sequence[Path]) -> Path | None:
    """The GeoJSON file for an entry: ``<entryID>.geojson``, else ``<imageName>.geojson``.

    The image name is tried with and without its extension (``a.svs.geojson``, ``a.geojson``),
    as both conventions appear in QuPath export scripts. A name that would lead outside its
    folder (an absolute or ``../`` image name, a link to a file elsewhere) is never used: a
    :class:`QpsegWarning` names the entry and the path. Anything else that exists under a
    candidate name is returned, even a folder or an unreadable file, so that reading it reports
    the real problem rather than "no annotations".
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
                candidate = compat.path_inside(folder, f"{stem}{suffix}")
                if candidate is not None:
                    if _present(candidate):
                        return candidate
                    continue
                outside = folder / f"{stem}{suffix}"
                if _present(outside):
                    warnings.warn(
                        f"entry {entry.entry_id} ({name}): annotation file {outside} leads "
                        f"outside {folder}; not read", QpsegWarning, stacklevel=2)
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
    for value, area in class_areas(objects, class_map).items():
        if value == class_map.ignore_index:
            continue
        name = class_map.classes[value].name
        st = stats.setdefault(name, ClassStats())
        st.area_px = float(area)
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


def _raise_no_labels(
    project: QuPathProject,
    folders: Sequence[Path],
    files: dict[int, Path | None],
    objects: dict[int, list[QuPathObject]],
    read_errors: list[GeoJSONError],
) -> None:
    """Raise the error that says why no annotation gives a label class (never returns)."""
    present = [f for f in files.values() if f is not None]
    n_objects = sum(len(objs) for objs in objects.values())
    where = folders[0] if len(folders) == 1 else project.path
    if not present and n_objects == 0:
        stray: list[str] = []
        for folder in folders:
            # A folder that does not exist (nothing was exported) lists nothing.
            with contextlib.suppress(OSError):
                stray += sorted(str(c) for c in folder.iterdir()
                                if c.name.lower().endswith(ANNOTATION_SUFFIXES))
        listing = (f"; files matching no entry: {', '.join(stray[:10])}"
                   f"{f' and {len(stray) - 10} more' if len(stray) > 10 else ''}"
                   if stray else "")
        raise LabelError(
            f"no labelled annotations: no annotation export found for any of the "
            f"{len(files)} project entries (looked "
            f"for <entryID>.geojson or <imageName>.geojson here): {_GROOVY_HINT}{listing}",
            where)
    if read_errors and len(read_errors) == len(present) and n_objects == 0:
        first = read_errors[0]
        more = (f" (and {len(read_errors) - 1} more annotation file(s) that cannot be read)"
                if len(read_errors) > 1 else "")
        raise GeoJSONError(f"annotation file cannot be read: {first.message}{more}", first.path)
    unreadable = (f"; {len(read_errors)} annotation file(s) cannot be read (first: "
                  f"{read_errors[0].one_line()})" if read_errors else "")
    if n_objects == 0:
        raise LabelError(f"no labelled annotations: the {len(present)} annotation file(s) found "
                         f"hold no annotations{unreadable}", where)
    raise LabelError(
        f"no labelled annotations: every one of the {n_objects} annotations is unclassified, "
        f"Ignore* or Region*{unreadable}", where)


def _file_sha256(path: Path | None) -> str | None:
    """SHA-256 of an annotation file, or None when there is none or it cannot be read (that
    entry is then reported as failed with the reason the reader gave)."""
    from qpseg._io import sha256_file

    if path is None:
        return None
    try:
        return sha256_file(path)
    except OSError:
        return None


def import_project(
    project_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    geojson_dir: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    mpp: float | None = None,
    mpp_override: bool = False,
    use_paquo: bool | None = None,
    ai_objects: str = "unreviewed-out",
    predictions_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Manifest:
    """Read a project's entries and annotations and write ``<out_dir>/manifest.json``.

    ``progress(done, total, entry)`` is called as entries are read (their annotations, then
    their slides: ``total`` counts both passes).

    Annotations come from ``<project>/qpseg/annotations/`` (what ``groovy/export_annotations
    .groovy`` writes), or ``geojson_dir``; files are matched by entry id or image name. When
    neither has a file and paquo finds a QuPath installation (``use_paquo`` not False), the
    annotations are read from the project's ``data.qpdata`` through paquo.

    ``classes`` fixes the label classes and their order (``Background`` is always index 0);
    by default every class found in the annotations is used, in the project's classes.json
    order; a named class no annotation has is a :class:`LabelError` listing those present.

    Pixel size, per slide (:func:`qpseg.slide.choose_pixel_size`, the rule of every command):
    the slide's own, else the calibration set in QuPath (the entry's ``pixelCalibration``),
    else ``mpp``. ``mpp_override`` makes ``mpp`` replace known values; each entry records
    where its value came from (``mpp_source``) and what was replaced (``mpp_replaced``, see
    :attr:`Manifest.mpp_changes`).

    Entries that cannot be used are kept in the manifest with ``status`` and ``problem`` set
    (and a warning); the import fails only when no entry has labels, with the reason: no
    annotation export at all, annotation files that cannot be read, or no labelled
    annotation in them. ``out_dir`` is checked to be writable before any slide is read.

    Objects qpseg wrote follow the truth rule of :mod:`qpseg.review` (``ai_objects``): by
    default those the pathologist left unchanged and unlocked are unreviewed predictions and
    are left out; they are compared by id with the saved predictions in ``predictions_dir``
    (default ``<project>/qpseg/predictions``). Each entry records the rule, the predictions
    file and the counts (``ai_review``; :attr:`Manifest.review` sums them).
    """
    from qpseg import __version__
    from qpseg._io import ensure_writable_dir
    from qpseg.qupath.geojson import read_geojson
    from qpseg.qupath.project import QuPathProject
    from qpseg.slide import check_mpp, open_slide

    if mpp is not None:
        check_mpp(mpp, "--mpp", error=ConfigError)
    if mpp_override and mpp is None:
        raise ConfigError("--mpp-override needs --mpp (the pixel size that replaces the "
                          "slides' own)")
    from qpseg.review import check_policy, truth_from_files

    ai_policy = check_policy(ai_objects)
    project = QuPathProject.load(project_path)
    pred_dir = (Path(predictions_dir) if predictions_dir is not None
                else project.path.parent / "qpseg" / "predictions")
    truth: dict[int, tuple[TruthSelection, Path | None]] = {}
    folders = _annotation_dirs(project, Path(geojson_dir) if geojson_dir else None)
    if geojson_dir is not None and not Path(geojson_dir).is_dir():
        raise ProjectError("annotation folder does not exist", geojson_dir)
    if out_dir is not None:
        ensure_writable_dir(out_dir)

    paquo_ok = False
    if use_paquo is not False:
        from qpseg.qupath import paquo_backend

        paquo_ok = paquo_backend.qupath_available()

    annotation_files: dict[int, Path | None] = {}
    objects: dict[int, list[QuPathObject]] = {}
    problems: dict[int, str] = {}
    read_errors: list[GeoJSONError] = []
    cell_classes: set[str] = set()
    unclassified_cells = False
    n_steps = 2 * len(project.entries)
    for step, entry in enumerate(project.entries, 1):
        if progress is not None:
            progress(step, n_steps, entry.image_name)
        f = find_annotation_file(entry, folders)
        annotation_files[entry.entry_id] = f
        try:
            if f is not None:
                objs = read_geojson(f, lean=True)  # measurements are not used here
            elif paquo_ok:
                from qpseg.qupath import paquo_backend

                objs = paquo_backend.read_annotations(project.path, entry.entry_id)
            else:
                objs = []
        except GeoJSONError as exc:
            problems[entry.entry_id] = exc.one_line()
            read_errors.append(exc)
            objs = []
        pf = find_annotation_file(entry, [pred_dir]) if pred_dir.is_dir() else None
        sel = truth_from_files(objs, pf, policy=ai_policy,
                               where=f"entry {entry.entry_id} ({entry.image_name})")
        truth[entry.entry_id] = (sel, pf)
        objects[entry.entry_id] = [o for o in sel.objects if o.object_type == "annotation"]
        for o in sel.objects:  # cells and detections: what an instance target may name
            if o.object_type != "annotation":
                if label_role(o.classification) == "class" and o.classification:
                    cell_classes.add(o.classification.strip().lower())
                else:
                    unclassified_cells = True

    found = {
        o.classification.strip()
        for objs in objects.values()
        for o in objs
        if label_role(o.classification) == "class" and o.classification
    }
    colors = _class_colors(project, objects)
    left_out = sum(sel.counts.total("left_out") for sel, _ in truth.values())
    if not found and left_out:
        raise LabelError(
            f"no labelled annotations once {left_out} AI object(s) are left out "
            f"(--ai-objects {ai_policy}: objects qpseg wrote that the review left unchanged "
            "are not truth): edit or lock the ones that are right in QuPath and export again, "
            "or pass --ai-objects all-in", project.path)
    n_annotations = sum(len(objs) for objs in objects.values())
    if not found and (not classes or n_annotations == 0):
        _raise_no_labels(project, folders, annotation_files, objects, read_errors)
    if classes:
        names = [c.strip() for c in classes if c.strip()]
        lower_found = {n.lower() for n in found}
        missing = [n for n in names if n.lower() not in lower_found and n.lower() != "background"]
        # A class no annotation has is a mistake (a typo, another project's class), unless it
        # names cells or detections: an instance target's classes (e.g. "Nucleus" for
        # unclassified cells inside a Region annotation).
        mistaken = [n for n in missing if n.lower() not in cell_classes and not unclassified_cells]
        if mistaken:
            present = ", ".join(map(repr, sorted(found))) or "no class"
            raise ConfigError(
                f"label class(es) {', '.join(map(repr, mistaken))} are not annotated anywhere "
                f"in the project; the annotations hold: {present}",
                project.path)
        if missing:
            warnings.warn(f"{project.path}: class(es) {', '.join(missing)} are in no "
                          "annotation (kept: the export holds cells or detections, which an "
                          "instance target labels)", QpsegWarning, stacklevel=2)
        if not [n for n in names if n.lower() != "background"]:
            raise LabelError("--classes names no label class (Background is always index 0)",
                             project.path)
    else:
        order = {pc.name.lower(): i for i, pc in enumerate(project.classes)}
        names = sorted(found, key=lambda n: (order.get(n.lower(), len(order)), n.lower()))
    class_map = ClassMap.from_names(names, colors)

    entries: list[ManifestEntry] = []
    unused_mpp: list[str] = []  # slides that have their own pixel size, so --mpp is not used
    for step, entry in enumerate(project.entries, len(project.entries) + 1):
        if progress is not None:
            progress(step, n_steps, entry.image_name)
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
            annotation_sha256=_file_sha256(ann),
            status="ok",
            metadata=dict(entry.metadata),
            tags=list(entry.tags),
            ai_objects=ai_policy,
            predictions_file=str(Path(truth[eid][1] or "").resolve())
            if truth[eid][0].originals_sha256 else None,
            predictions_sha256=truth[eid][0].originals_sha256,
            ai_review=truth[eid][0].counts.to_json(),
        )
        try:
            if eid in problems:
                raise QpsegError(problems[eid])
            if entry.image_path is None or not entry.image_found:
                raise QpsegError(f"image not found (uri {entry.uri})")
            with open_slide(entry.image_path) as slide:
                chosen = slide.choose_mpp(entry.mpp_xy, mpp, override=mpp_override)
                rec.mpp, rec.mpp_source = float(chosen.mpp), chosen.source
                rec.mpp_replaced = chosen.replaced
                for note in chosen.notes:
                    warnings.warn(f"entry {eid} ({entry.image_name}): {note}", QpsegWarning,
                                  stacklevel=2)
                if chosen.given_unused:
                    unused_mpp.append(f"entry {eid} ({entry.image_name}) "
                                      f"{chosen.mpp:g} µm/px from the {chosen.source}")
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

    if unused_mpp:
        warnings.warn(
            f"--mpp {mpp:g} is not used for {len(unused_mpp)} slide(s) with a pixel size of "
            f"their own ({'; '.join(unused_mpp[:3])}{'; ...' if len(unused_mpp) > 3 else ''}); "
            "pass --mpp-override to replace it", QpsegWarning, stacklevel=2)
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

