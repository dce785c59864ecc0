"""Optional paquo backend: read/write objects in ``data.qpdata`` through a QuPath install.

Only used when paquo is installed *and* finds QuPath (paquo starts QuPath's JVM). Everything
else in qpseg uses the pure-Python readers; objects still travel as QuPath GeoJSON, parsed and
written by :mod:`qpseg.qupath.geojson`, so both paths give the same :class:`QuPathObject`.

Writing follows three rules, each against a way paquo 0.9 loses or corrupts an entry:

- Nothing is saved project-wide. ``QuPathProject.save()`` (and leaving paquo's ``with`` block,
  which calls it even after an exception: paquo ``projects.py`` 600-605) saves *every* entry,
  and asking each whether it changed reads its image data, which opens its slide (paquo
  ``projects.py`` 529-531, ``images.py`` 429-433 and 698-716; QuPath
  ``DefaultProject.readImageData`` builds the image server, v0.5.1 ``DefaultProject.java``
  689-693, and still loads it lazily in v0.6.0 688-694). A :class:`ProjectSession` opens the
  project once, saves only the entry it has completely updated (``image.save()``) and then the
  project file alone (``save(images=False)``: ``syncChanges``, paquo ``projects.py`` 521-536).
- An entry is updated completely or not at all: every object is converted to a QuPath object
  and checked before the hierarchy is touched, new objects are added before old ones are
  removed, and on any failure nothing of the entry is saved; if the failure came while saving,
  ``data.qpdata`` is put back byte for byte from the copy made first (``data.qpdata.bak``).
- An entry whose image is not a local file is refused up front: paquo's ``save()`` skips it
  with only a log warning (paquo ``images.py`` 714-721), which would look like success.

Which earlier qpseg objects are replaced follows the review rule of :mod:`qpseg.review`: only
an *unreviewed* one (unlocked, and unchanged from the predictions qpseg saved for the entry,
matched by id). A locked one is accepted, a reshaped or reclassified one is the pathologist's
(edited), and one whose original cannot be found cannot be shown to be unchanged: all of
these stay, and a new object with the id of one that stays is not added beside it. The
objects are compared as QuPath's own GeoJSON writer gives them (``GsonTools``, as the
annotation export does), read back by qpseg's reader.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from qpseg.errors import ProjectError, QpsegError, QpsegWarning
from qpseg.objects import MARKER_KEY

if TYPE_CHECKING:
    from qpseg.qupath.geojson import QuPathObject
    from qpseg.qupath.project import ProjectEntry
    from qpseg.qupath.project import QuPathProject as PyProject

__all__ = [
    "ProjectSession",
    "Replaced",
    "add_objects",
    "qupath_available",
    "read_annotations",
    "replace_qpseg_objects",
    "resolve_project_file",
]

QPSEG_MARKER = MARKER_KEY  # metadata key on every object qpseg writes

# What QuPath must make of each GeoJSON object type: the PathObject predicates that hold.
# ``isDetection()`` is also true for cells and tiles (PathCellObject and PathTileObject extend
# PathDetectionObject), hence the exclusions. qpseg writes no TMA cores, and
# ``insertPathObjects`` drops them (v0.5.1 ``PathObjectHierarchy.java`` 268-273).
_KIND_CHECKS: dict[str, tuple[tuple[str, bool], ...]] = {
    "annotation": (("isAnnotation", True),),
    "detection": (("isDetection", True), ("isCell", False), ("isTile", False)),
    "cell": (("isCell", True),),
    "tile": (("isTile", True),),
}


class Replaced(NamedTuple):
    """What writing one entry did (the earlier qpseg objects by the review rule)."""

    removed: int            # earlier unreviewed qpseg objects taken out
    added: int              # new objects put in
    kept_locked: int = 0    # earlier qpseg objects kept: locked (accepted) in QuPath
    kept_edited: int = 0    # earlier qpseg objects kept: reshaped or reclassified
    kept_unproven: int = 0  # earlier qpseg objects kept: their original was not found
    not_added: int = 0      # new objects not added: an object kept has their id


@functools.cache
def qupath_available() -> bool:
    """True when paquo is installed and can find a QuPath installation (no JVM is started)."""
    try:
        from paquo._config import settings, to_kwargs
        from paquo.jpype_backend import find_qupath
    except Exception:  # paquo missing or broken: the pure-Python path is used
        return False
    try:
        find_qupath(**to_kwargs(settings))
    except Exception:
        return False
    return True


def _load_py_project(project_path: str | os.PathLike[str]) -> PyProject:
    """qpseg's own reading of the project (no QuPath): finds the ``.qpproj`` and each entry's
    image. Its warnings were shown when the run read the project; not repeated here."""
    from qpseg.qupath.project import QuPathProject as PyProject

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QpsegWarning)
        return PyProject.load(project_path)


def resolve_project_file(project_path: str | os.PathLike[str]) -> Path:
    """The absolute, symlink-free ``.qpproj`` meant by ``project_path`` (file or folder).

    paquo takes a path as given: it appends ``project.qpproj`` only when the name has no
    suffix, so a project folder such as ``study.v2`` is refused, and it does not resolve
    links (paquo ``projects.py`` 193-205), while QuPath writes the path it was given into the
    project's ``uri`` on save (v0.5.1 ``DefaultProject.writeProject``).
    """
    return _load_py_project(project_path).path.resolve()


def _need_qupath(project_path: str | os.PathLike[str]) -> None:
    if not qupath_available():
        raise ProjectError("paquo cannot find a QuPath installation", project_path)


def _open(project_path: str | os.PathLike[str], mode: str) -> Any:
    """paquo's project for the resolved ``.qpproj`` (no ``with``: see the module docstring)."""
    _need_qupath(project_path)
    from paquo.projects import QuPathProject

    try:
        return QuPathProject(Path(project_path), mode=mode)  # type: ignore[arg-type]
    except Exception as exc:
        raise ProjectError(f"paquo cannot open the project: {exc}", project_path) from None


def _image(qp: Any, entry_id: int, project_path: str | os.PathLike[str]) -> Any:
    for image in qp.images:
        if str(getattr(image, "entry_id", "")) == str(entry_id):
            return image
    raise ProjectError(f"no entry with id {entry_id}", project_path)


def read_annotations(project_path: str | os.PathLike[str], entry_id: int) -> list[QuPathObject]:
    """An entry's annotations read from its ``data.qpdata`` via paquo (read-only: paquo reads
    the hierarchy without opening the slide, paquo ``images.py`` 594-595)."""
    from qpseg.qupath.geojson import parse_features

    _need_qupath(project_path)
    qpproj = resolve_project_file(project_path)
    qp = _open(qpproj, "r")
    image = _image(qp, entry_id, qpproj)
    try:
        features = image.hierarchy.to_geojson()
    except Exception as exc:
        raise ProjectError(f"QuPath could not read entry {entry_id}'s objects: "
                           f"{type(exc).__name__}: {exc}", qpproj) from None
    return parse_features(features, source=f"{qpproj}#entry{entry_id}")


def add_objects(
    project_path: str | os.PathLike[str], entry_id: int, objects: Iterable[QuPathObject]
) -> int:
    """Add objects to an entry's hierarchy via paquo and save; returns the number added.

    User annotations are left as they are: objects are only added (except one whose id is
    that of a locked object, which stays as it is).
    """
    session = ProjectSession(project_path)
    try:
        return session.write(entry_id, objects, replace=False).added
    finally:
        session.close()


def replace_qpseg_objects(
    project_path: str | os.PathLike[str], entry_id: int, objects: Iterable[QuPathObject], *,
    originals: Iterable[QuPathObject] | None = None,
    entry_metadata: dict[str, str] | None = None, marker: str = QPSEG_MARKER,
) -> Replaced:
    """Put qpseg's objects into an entry's ``data.qpdata`` via paquo, as
    ``groovy/import_predictions.groovy`` does in QuPath; see :meth:`ProjectSession.write`.

    For several entries, use one :class:`ProjectSession` (the project is opened once).
    """
    session = ProjectSession(project_path)
    try:
        return session.write(entry_id, objects, originals=originals,
                             entry_metadata=entry_metadata, marker=marker)
    finally:
        session.close()


class ProjectSession:
    """A QuPath project opened once through paquo, to write the objects of several entries.

    ``path`` is the resolved ``.qpproj``. paquo (and QuPath's JVM) is started at the first
    write. Each :meth:`write` saves its own entry and the project file, nothing else; an entry
    whose write failed is not written again in the same session (its in-memory objects are
    not what is on disk).
    """

    def __init__(self, project_path: str | os.PathLike[str]) -> None:
        _need_qupath(project_path)
        self._py = _load_py_project(project_path)
        self.path: Path = self._py.path.resolve()
        self._qp: Any = None
        self._failed: set[int] = set()

    def close(self) -> None:
        """Forget paquo's project (nothing is saved: each write saved its entry)."""
        self._qp = None

    def __enter__(self) -> ProjectSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _paquo(self) -> Any:
        if self._qp is None:
            self._qp = _open(self.path, "r+")
        return self._qp

    def _entry(self, entry_id: int) -> ProjectEntry:
        try:
            return self._py.entry(entry_id)
        except (KeyError, LookupError, QpsegError):
            raise ProjectError(f"no entry with id {entry_id}", self.path) from None

    def _check_image(self, entry: ProjectEntry) -> None:
        """Refuse an entry paquo would not save because its image is not a local file."""
        why = "paquo saves an entry only while its image file is reachable"
        if entry.uri is None:
            raise ProjectError(f"entry {entry.entry_id} has no image URI; {why}", self.path)
        if entry.is_remote:
            raise ProjectError(f"entry {entry.entry_id}'s image is not a local file "
                               f"({entry.uri}); {why}: import the predictions with "
                               "import_predictions.groovy in QuPath instead (`qpseg groovy "
                               "--out DIR` writes it)", self.path)
        if entry.relocated:
            raise ProjectError(
                f"the project was moved: entry {entry.entry_id}'s image is stored as "
                f"{entry.uri} but is now at {entry.image_path}; {why}: open the project in "
                "QuPath once and accept its offer to update the image paths, then run "
                "again", self.path)
        if entry.image_path is None:
            raise ProjectError(f"entry {entry.entry_id}'s image {entry.uri} is not on this "
                               f"machine; {why}", self.path)

    def write(self, entry_id: int, objects: Iterable[QuPathObject], *,
              originals: Iterable[QuPathObject] | None = None,
              entry_metadata: dict[str, str] | None = None, marker: str = QPSEG_MARKER,
              replace: bool = True) -> Replaced:
        """Put ``objects`` into entry ``entry_id``'s ``data.qpdata``, completely or not at all.

        With ``replace``, an earlier qpseg object (metadata key ``marker``) is removed only
        when the review rule calls it unreviewed: unlocked and unchanged from its original in
        ``originals`` (the predictions qpseg saved for this entry before, matched by id;
        ``None``: none known, so nothing is removed). Edited, locked and unproven ones stay
        (module docstring), and every new object must carry ``marker`` (QuPath must keep
        it, or the objects could never be found again). Objects without the key (the user's
        own annotations) are never touched, and a new object whose id is that of an object
        that stays is not added: that one is the pathologist's version.
        ``entry_metadata`` (the per-slide summary) is stored on the entry. The entry's
        previous ``data.qpdata`` is kept as ``data.qpdata.bak``. Raises :class:`ProjectError`
        with the reason when the entry cannot be written; it is then as it was.
        """
        from qpseg.qupath.geojson import to_feature

        if entry_id in self._failed:
            raise ProjectError(f"writing entry {entry_id} failed earlier in this run; run "
                               "again to write it", self.path)
        entry = self._entry(entry_id)
        self._check_image(entry)
        features = [f for f in (to_feature(o) for o in objects) if f is not None]
        qp = self._paquo()
        image = _image(qp, entry_id, self.path)
        try:
            readable = bool(image.is_readable())
        except Exception as exc:  # paquo cannot even parse the URI (paquo images.py 159-183)
            raise ProjectError(f"paquo cannot locate entry {entry_id}'s image: {exc}",
                               self.path) from None
        if not readable:
            raise ProjectError(f"paquo cannot reach entry {entry_id}'s image ({image.uri}), "
                               "so it would not save the entry", self.path)
        try:
            new = _to_java(features, marker if replace else None, entry_id)
        except QpsegError:
            raise
        except Exception as exc:
            raise ProjectError(f"QuPath could not convert entry {entry_id}'s objects: "
                               f"{type(exc).__name__}: {exc}", self.path) from None
        by_id: dict[str, QuPathObject] = {}
        for o in originals or ():
            if o.id:
                by_id.setdefault(o.id.lower(), o)
        try:
            return self._update(qp, image, new, features, marker, replace, entry_metadata or {},
                                by_id if originals is not None else None)
        except BaseException as exc:
            self._failed.add(entry_id)
            if isinstance(exc, QpsegError) or not isinstance(exc, Exception):
                raise
            raise ProjectError(f"QuPath could not store entry {entry_id}'s objects "
                               f"(the entry is unchanged): {type(exc).__name__}: {exc}",
                               self.path) from None

    def _update(self, qp: Any, image: Any, new: list[Any], features: list[dict[str, Any]],
                marker: str, replace: bool, metadata: dict[str, str],
                originals: dict[str, QuPathObject] | None) -> Replaced:
        """Change the entry in memory, then save it; restore it on any failure."""
        hierarchy = image.hierarchy  # reads data.qpdata (QuPath opens the slide once)
        staying: set[str] = set()  # ids of objects that stay: no new object takes their id
        n_locked = 0
        candidates: list[tuple[Any, Any]] = []  # (proxy, earlier unlocked qpseg object)
        for proxy in (hierarchy.annotations, hierarchy.detections):  # detections: cells too
            for obj in proxy:
                if obj.locked:
                    oid = _object_id(obj.java_object)
                    if oid:
                        staying.add(oid)
                    if replace and _metadata_value(obj.java_object, marker) is not None:
                        n_locked += 1
                elif replace and _metadata_value(obj.java_object, marker) is not None:
                    candidates.append((proxy, obj))
        statuses = _review_statuses([obj.java_object for _, obj in candidates], originals)
        previous: dict[int, tuple[Any, list[Any]]] = {}
        for (proxy, obj), status in zip(candidates, statuses, strict=True):
            if status == "unreviewed":
                previous.setdefault(id(proxy), (proxy, []))[1].append(obj)
            else:
                oid = _object_id(obj.java_object)
                if oid:
                    staying.add(oid)
        keep = [str(f.get("id", "")).lower() not in staying for f in features]
        to_add = [obj for obj, k in zip(new, keep, strict=True) if k]

        data = Path(str(image.entry_path)) / "data.qpdata"
        had_data = _backup_image_data(data, self.path)
        old_metadata = {k: _entry_metadata(image, k) for k in metadata}
        saving = False
        try:
            # Add first, then remove: a failure half-way never leaves fewer objects.
            if to_add:
                hierarchy.java_object.insertPathObjects(to_add)  # as paquo load_geojson does
                hierarchy.flush(invalidate_proxy_cache=True)     # (paquo hierarchy.py 531-533)
            for proxy, stale in previous.values():
                proxy -= stale  # removeObjects(..., keepChildren=True): paquo hierarchy.py 130
            for key, value in metadata.items():
                image.metadata[str(key)] = str(value)
            saving = True
            image.save()
            if image.is_changed():  # QuPath marks saved data unchanged (saveImageData)
                raise ProjectError("paquo did not save the entry (its image is not "
                                   f"reachable: {image.uri})", self.path)
            qp.save(images=False)   # the project file only: entry metadata
        except BaseException:
            with contextlib.suppress(Exception):
                _restore_entry_metadata(image, old_metadata)
            if saving:
                _restore_image_data(data, had_data, self.path)
            raise
        return Replaced(removed=sum(len(s) for _, s in previous.values()), added=len(to_add),
                        kept_locked=n_locked, kept_edited=statuses.count("edited"),
                        kept_unproven=statuses.count("unproven"), not_added=keep.count(False))


def _review_statuses(java_objects: list[Any],
                     originals: dict[str, QuPathObject] | None) -> list[str]:
    """The review status (:func:`qpseg.review.review`) of each earlier unlocked qpseg object:
    ``unreviewed`` (may be replaced), ``edited`` or ``unproven`` (no original: ``originals``
    is None, its id is not there, or QuPath's GeoJSON of it cannot be read).

    The objects are written by QuPath's own GeoJSON writer in one call (``GsonTools``, as
    paquo's ``hierarchy.to_geojson`` does, paquo ``hierarchy.py`` 432-436) and read by qpseg's
    reader, so they are compared exactly as an annotation export would be.
    """
    if not java_objects:
        return []
    if not originals:
        return ["unproven"] * len(java_objects)
    from paquo.java import ArrayList, GsonTools

    from qpseg.errors import GeoJSONWarning
    from qpseg.qupath.geojson import parse_features
    from qpseg.review import review

    listed = ArrayList()
    for java in java_objects:
        listed.add(java)
    features = json.loads(str(GsonTools.getInstance().toJson(listed)))
    with warnings.catch_warnings():  # an unreadable object is simply not proven unchanged
        warnings.simplefilter("ignore", GeoJSONWarning)
        finals = {o.id.lower(): o for o in parse_features(features, source="QuPath")
                  if o.id}
    ids = [_object_id(java) for java in java_objects]
    pairs = [(i, finals[oid], originals.get(oid)) for i, oid in enumerate(ids)
             if oid in finals]
    out = ["unproven"] * len(java_objects)
    reviews = review([f for _, f, _ in pairs], [o for _, _, o in pairs])
    for (i, _, _), r in zip(pairs, reviews, strict=True):
        out[i] = r.status
    return out


def _to_java(features: list[dict[str, Any]], marker: str | None, entry_id: int) -> list[Any]:
    """Every feature as a QuPath object, checked, before anything of the entry changes.

    paquo's ``load_geojson`` asks Gson for a ``PathAnnotationObject`` for every type it does
    not know, "cell" included (paquo ``hierarchy.py`` 498-512); QuPath's adapter makes a
    ``PathCellObject`` (v0.5.1 ``QuPathTypeAdapters.java`` 572-574) and Gson's cast then
    throws ClassCastException, which paquo does not catch (``hierarchy.py`` 514). Asking for
    ``PathROIObject``, the common superclass, gets each object as its own type through the
    same adapter (v0.4.4 ``GsonTools.java`` 116-117).
    """
    from paquo.java import GsonTools, PathROIObject, String

    gson = GsonTools.getInstance()
    out = []
    for i, feature in enumerate(features, start=1):
        kind = feature["properties"]["objectType"]
        what = f"entry {entry_id}, object {i} (a {kind})"
        obj = gson.fromJson(String(json.dumps(feature)), PathROIObject)
        problem = _conversion_problem(feature, obj, kind, marker)
        if problem:
            raise ProjectError(f"{what}: {problem}; nothing was written")
        out.append(obj)
    return out


def _conversion_problem(feature: dict[str, Any], obj: Any, kind: str,
                        marker: str | None) -> str:
    """Why QuPath's object does not hold what the feature says ("" when it does)."""
    if obj is None:
        return "QuPath made nothing of it"
    checks = _KIND_CHECKS.get(kind)
    if checks is None:
        return "qpseg writes no such objects into a project"
    if any(bool(getattr(obj, name)()) != want for name, want in checks):
        return f"QuPath made a {type(obj).__name__} of it"
    if kind == "cell" and "nucleusGeometry" in feature and obj.getNucleusROI() is None:
        return "QuPath dropped the nucleus"
    if marker is not None:
        wanted = (feature["properties"].get("metadata") or {}).get(marker)
        if wanted is None:
            return (f"it has no {marker!r} metadata, so it could never be told from the "
                    "user's own objects")
        if _metadata_value(obj, marker) != str(wanted):
            return (f"this QuPath ({_qupath_version()}) does not keep object metadata "
                    f"({marker!r}; QuPath 0.4 keeps it only on TMA cores), so qpseg could "
                    "not find and replace its objects later: use QuPath 0.5 or newer")
    return ""


def _qupath_version() -> str:
    try:
        from paquo.java import qupath_version
    except Exception:
        return "version unknown"
    return str(qupath_version) if qupath_version is not None else "version unknown"


def _object_id(java: Any) -> str:
    """An object's UUID as lower-case text (``PathObject.getID()``, QuPath 0.4+)."""
    try:
        value = java.getID()
    except Exception:
        return ""
    return "" if value is None else str(value).lower()


def _metadata_value(java: Any, key: str) -> str | None:
    """An object's metadata value: ``hasMetadata()`` first where QuPath has it (0.6+: no map
    is allocated for objects without metadata, v0.7.0 ``PathObject.java`` 1095-1100), then
    ``getMetadata()`` (every object since 0.5, v0.5.1 ``PathObject.java`` 1076), then
    ``retrieveMetadataValue`` (annotations in 0.4)."""
    if java is None:
        return None
    has = getattr(java, "hasMetadata", None)
    if has is not None:
        try:
            if not has():
                return None
        except Exception:  # a Java exception: this QuPath does not have that call
            pass
    for getter in ("getMetadata", "retrieveMetadataValue"):
        fn = getattr(java, getter, None)
        if fn is None:
            continue
        try:
            value = fn().get(key) if getter == "getMetadata" else fn(key)
        except Exception:  # a Java exception: this QuPath does not have that call
            continue
        return None if value is None else str(value)
    return None


def _entry_metadata(image: Any, key: str) -> str | None:
    try:
        return str(image.metadata[key])
    except KeyError:
        return None


def _restore_entry_metadata(image: Any, old: dict[str, str | None]) -> None:
    """Put the entry's metadata back as it was, so a later project save cannot store it."""
    for key, value in old.items():
        if value is None:
            if key in image.metadata:
                del image.metadata[key]
        else:
            image.metadata[key] = value


def _backup_image_data(data: Path, project_path: Path) -> bool:
    """Keep the entry's ``data.qpdata`` as ``data.qpdata.bak`` before paquo rewrites it;
    False when the entry has no data yet."""
    from qpseg._io import backup_path, replace_with_copy

    if not data.is_file():
        return False
    try:
        replace_with_copy(data, backup_path(data))  # never through a link at the .bak
    except OSError as exc:
        raise ProjectError(f"cannot back up {data} before writing it ({exc.strerror or exc})",
                           project_path) from exc
    return True


def _restore_image_data(data: Path, had_data: bool, project_path: Path) -> None:
    """Put ``data.qpdata`` back as it was before the save started (atomically)."""
    from qpseg._io import backup_path, replace_with_copy

    try:
        if not had_data:
            data.unlink(missing_ok=True)
            return
        replace_with_copy(backup_path(data), data)
    except OSError as exc:
        raise ProjectError(f"saving failed and {data} could not be restored from "
                           f"{backup_path(data).name} ({exc.strerror or exc}): copy it back "
                           "by hand", project_path) from exc
