"""Read and write QuPath projects (``project.qpproj``) in pure Python: no QuPath, no paquo.

Reading is lenient: a whole-file problem (missing, unreadable, not JSON, not an object) raises
:class:`ProjectError`; a malformed entry is skipped with a :class:`ProjectWarning` naming its
index; a missing image leaves ``entry.image_path`` None. Writing produces the schema QuPath
0.5/0.6 writes (``version`` "0.5.1" for new projects) and never touches ``data.qpdata``.
Version-specific quirks live in :mod:`qpseg.qupath.compat`.

This module is the entry point (import from here). The project file itself
(:class:`QuPathProject`, :func:`read_project`) lives here; one image's builder, metadata and
entry in :mod:`qpseg.qupath.project_entry`; image URI resolution in
:mod:`qpseg.qupath.project_uris`.
"""

from __future__ import annotations

import copy
import json
import os
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qpseg._io import atomic_write
from qpseg.errors import MissingImageWarning, ProjectError, ProjectWarning
from qpseg.qupath import compat
from qpseg.qupath.classes import (
    CLASSES_FILE,
    PathClass,
    _kind,
    _load_json_file,
    default_classes,
    read_classes,
    write_classes,
)
from qpseg.qupath.project_entry import (
    ImageMetadata,
    ProjectEntry,
    ServerBuilder,
    _int_value,
    _Malformed,
    _parse_entry,
)
from qpseg.qupath.project_uris import resolve_image_uri

__all__ = [
    "BACKUP_SUFFIX",
    "PROJECT_FILE",
    "WRITE_VERSION",
    "ImageMetadata",
    "ProjectEntry",
    "QuPathProject",
    "ServerBuilder",
    "read_project",
    "resolve_image_uri",
]

PROJECT_FILE = "project.qpproj"
BACKUP_SUFFIX = ".backup"  # QuPath keeps the previous project file as project.qpproj.backup
WRITE_VERSION = "0.5.1"  # the version field written into projects qpseg creates


# --------------------------------------------------------------------------------------------
# Project
# --------------------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _find_project_file(path: Path, backup: bool) -> Path:
    """The .qpproj (or .backup) file meant by ``path`` (a file or a project folder)."""
    if not compat.path_exists(path):
        raise ProjectError("file not found", path)
    if path.is_dir() and path.suffix == ".qpproj":
        raise ProjectError("is a folder, not a project file", path)
    if path.is_dir():
        candidate = path / PROJECT_FILE
        if not candidate.exists():
            others = sorted(path.glob("*.qpproj"))
            if len(others) == 1:
                candidate = others[0]
            else:
                what = "several .qpproj files" if others else "no project.qpproj"
                raise ProjectError(f"{what} in this folder", path)
        path = candidate
    if backup and not path.name.endswith(BACKUP_SUFFIX):
        path = path.with_name(path.name + BACKUP_SUFFIX)
        if not path.exists():
            raise ProjectError("file not found", path)
    if path.is_dir():
        raise ProjectError("is a folder, not a project file", path)
    return path


class QuPathProject:
    """A QuPath project: its entries, classes and the file they live in.

    Use :meth:`load` for an existing project (a ``.qpproj``, its ``.backup`` or the folder)
    and :meth:`create` for a new one; :meth:`add_image` then :meth:`save`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path: Path = Path(os.path.abspath(path))
        self.version: str | None = None
        self.uri: str | None = None
        self.create_timestamp: int | None = None
        self.modify_timestamp: int | None = None
        self.last_id: int = 0
        self.entries: list[ProjectEntry] = []
        self.classes: list[PathClass] = []
        self.is_backup: bool = self.path.name.endswith(BACKUP_SUFFIX)
        self._raw: dict[str, Any] = {}
        # images[] as read, so entries skipped as malformed are written back untouched.
        self._raw_images: list[Any] = []
        self._entry_at: dict[int, ProjectEntry] = {}  # raw index -> parsed entry
        self._loaded_classes: list[PathClass] | None = None

    # ----------------------------------------------------------------------------- reading

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, backup: bool = False) -> QuPathProject:
        """Read a project from its ``.qpproj`` file or its folder.

        ``backup=True`` reads ``project.qpproj.backup`` instead (also chosen by passing the
        ``.backup`` file itself). Such a project cannot be saved.
        """
        file = _find_project_file(Path(path), backup)
        data = _load_json_file(file)
        if not isinstance(data, dict):
            raise ProjectError(f"top level is a {_kind(data)}, expected a JSON object", file)
        project = cls(file)
        project._read(data)
        return project

    def _warn(self, message: str, category: type[ProjectWarning] = ProjectWarning) -> None:
        warnings.warn(f"{self.path}: {message}", category, stacklevel=4)

    def _read(self, data: dict[str, Any]) -> None:
        self._raw = data
        version = data.get("version")
        if version is not None and not isinstance(version, str):
            self._warn(f"version {version!r} is not a string; ignored")
            version = None
        self.version = version
        uri = data.get("uri")
        if uri is not None and not isinstance(uri, str):
            self._warn("uri is not a string; ignored (moved images cannot be located)")
            uri = None
        self.uri = uri
        self.create_timestamp = _int_value(data.get("createTimestamp"))
        self.modify_timestamp = _int_value(data.get("modifyTimestamp"))
        last_id = _int_value(data.get("lastID"))
        if data.get("lastID") is not None and last_id is None:
            self._warn(f"lastID {data.get('lastID')!r} is not an integer; ignored")

        images = data.get("images")
        if images is None:
            images = []
        if not isinstance(images, list):
            # QuPath cannot open such a file either: DefaultProject.loadProject (qupath-core,
            # qupath/lib/projects/DefaultProject.java) reads "images" with
            # gson.fromJson(..., ArrayList<DefaultProjectImageEntry>), which throws on a non-array.
            raise ProjectError(f"'images' is a {_kind(images)}, not a list of entries",
                               self.path)
        self._raw_images = images
        seen: dict[int, int] = {}
        for i, item in enumerate(images):
            problems: list[str] = []
            try:
                entry = _parse_entry(item, self.path, self.uri, problems.append)
            except _Malformed as exc:
                self._warn(f"entry {i} {exc}; skipped")
                continue
            except RecursionError:
                self._warn(f"entry {i} is nested too deeply; skipped")
                continue
            for p in problems:
                self._warn(f"entry {i} (id {entry.entry_id}) {p}")
            if entry.entry_id in seen:
                self._warn(f"entry {i} repeats entryID {entry.entry_id} of entry "
                           f"{seen[entry.entry_id]}; skipped")
                continue
            seen[entry.entry_id] = i
            self.entries.append(entry)
            self._entry_at[i] = entry
        # QuPath: the next ID is above both lastID and every entry's ID.
        self.last_id = max([last_id or 0, *(e.entry_id for e in self.entries)])

        missing = [e for e in self.entries if not e.image_found]
        if missing:
            first = missing[0]
            self._warn(f"{len(missing)} of {len(self.entries)} images not found on this "
                       f"machine (first: entry {first.entry_id} {first.uri!r})",
                       MissingImageWarning)

        classes_file = self.path.parent / CLASSES_FILE
        if classes_file.exists():
            try:
                self.classes = read_classes(classes_file)
            except ProjectError as exc:
                self._warn(f"classes not read: {exc}")
                self.classes = []
        self._loaded_classes = list(self.classes)

    # ----------------------------------------------------------------------------- creating

    @classmethod
    def create(cls, folder: str | os.PathLike[str], classes: Sequence[PathClass] | None = None,
               *, overwrite: bool = False) -> QuPathProject:
        """Create a project in ``folder`` (``project.qpproj`` + ``classifiers/classes.json``).

        ``classes`` default to QuPath's standard classes; ``[]`` writes no classes.json.
        Raises :class:`ProjectError` if a project already exists there, unless ``overwrite``
        (the old file is kept as ``project.qpproj.backup``). New entry IDs start above any
        ``data/<id>`` folder already present, so stale QuPath data is never attached to them.
        """
        target = Path(folder)
        file = target if target.suffix == ".qpproj" else target / PROJECT_FILE
        if file.exists() and not overwrite:
            raise ProjectError("a QuPath project already exists here (pass overwrite=True)", file)
        if file.is_dir():
            raise ProjectError("is a folder, not a project file", file)
        if target.exists() and not target.is_dir() and target.suffix != ".qpproj":
            raise ProjectError("is a file, not a folder", target)
        project = cls(file)
        now = _now_ms()
        project.version = WRITE_VERSION
        project.create_timestamp = project.modify_timestamp = now
        project.last_id = _max_data_dir_id(file.parent / "data")
        project.classes = list(default_classes() if classes is None else classes)
        project._loaded_classes = None  # always write classes.json for a new project
        project.save()
        return project

    def add_image(self, image_path: str | os.PathLike[str], metadata: ImageMetadata, *,
                  image_name: str | None = None, entry_metadata: Mapping[str, str] | None = None,
                  description: str | None = None) -> ProjectEntry:
        """Add an image entry (not yet saved: call :meth:`save`).

        ``metadata`` describes the image (the caller opened it); the entry gets the next free
        entryID, a random ``randomizedName`` and ``image_name`` (default: the file name).
        QuPath creates ``data/<entryID>/`` itself when the image is first opened.
        """
        path = Path(os.path.abspath(image_path))
        if not compat.path_exists(path):
            raise ProjectError("image not found", path)
        metadata.validate(path)
        meta_map = dict(entry_metadata or {})
        for k, v in meta_map.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ProjectError(f"entry metadata must map text to text, not {k!r}: {v!r}",
                                   self.path)
        if image_name is not None and not isinstance(image_name, str):
            raise ProjectError(f"image name must be a string, not {image_name!r}", self.path)
        self.last_id = max([self.last_id, *(e.entry_id for e in self.entries)]) + 1
        builder_raw: dict[str, Any] = {
            "builderType": "uri",
            "providerClassName": compat.PROVIDER_CLASSES[metadata.provider],
            "uri": compat.path_to_file_uri(path),
            "args": list(compat.PROVIDER_ARGS[metadata.provider]),
        }
        if metadata.store:
            builder_raw["metadata"] = metadata.to_qupath(path.name)
        raw: dict[str, Any] = {
            "serverBuilder": builder_raw,
            "entryID": self.last_id,
            "randomizedName": str(uuid.uuid4()),
            "imageName": image_name if image_name is not None else path.name,
        }
        if description is not None:
            raw["description"] = description
        raw["metadata"] = meta_map
        entry = ProjectEntry(
            entry_id=self.last_id,
            image_name=raw["imageName"],
            description=description,
            metadata=dict(meta_map),
            tags=[],
            randomized_name=raw["randomizedName"],
            server_builder=ServerBuilder.from_json(builder_raw),
            image_path=path,
            raw=raw,
            project_dir=self.project_dir,
        )
        self.entries.append(entry)
        return entry

    # ----------------------------------------------------------------------------- writing

    def to_json(self) -> dict[str, Any]:
        """The project file's JSON: QuPath's top-level keys first, unknown keys kept."""
        return self._build()[0]

    def _build(self) -> tuple[dict[str, Any], dict[int, ProjectEntry]]:
        """The JSON to write and, for each written ``images`` index, the entry written there."""
        live = {id(e) for e in self.entries}
        images: list[Any] = []
        slots: dict[int, ProjectEntry] = {}
        written: set[int] = set()
        for i, item in enumerate(self._raw_images):
            entry = self._entry_at.get(i)
            if entry is None:
                images.append(copy.deepcopy(item))  # malformed when read: keep it as it was
            elif id(entry) in live:  # entries removed from self.entries are dropped
                slots[len(images)] = entry
                images.append(entry.to_json())
                written.add(id(entry))
        for e in self.entries:
            if id(e) not in written:
                slots[len(images)] = e
                images.append(e.to_json())
        now = _now_ms()
        out: dict[str, Any] = {
            "version": self.version or WRITE_VERSION,
            "createTimestamp": self.create_timestamp if self.create_timestamp is not None
            else now,
            "modifyTimestamp": self.modify_timestamp if self.modify_timestamp is not None
            else now,
            "uri": compat.path_to_file_uri(self.path, ascii_only=False),
            "lastID": max([self.last_id, *(e.entry_id for e in self.entries)]),
        }
        for k, v in self._raw.items():
            if k not in out and k != "images":
                out[k] = copy.deepcopy(v)
        out["images"] = images
        return out, slots

    def save(self) -> None:
        """Write ``project.qpproj`` atomically, keeping the old one as ``.qpproj.backup``.

        ``classifiers/classes.json`` is (re)written when :attr:`classes` changed. Never writes
        ``data.qpdata``.
        """
        if self.is_backup:
            raise ProjectError("this project was read from a backup file and cannot be saved",
                               self.path)
        self.modify_timestamp = _now_ms()
        data, slots = self._build()
        # allow_nan: QuPath (GSON with serializeSpecialFloatingPointValues) writes NaN itself,
        # so qpseg._io.write_json_atomic (allow_nan=False) cannot be used here.
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=True)
        backup = self.path.with_name(self.path.name + BACKUP_SUFFIX)
        try:
            if self.path.is_file():
                # QuPath's own backup name; written atomically before the project is replaced.
                previous = self.path.read_bytes()
                with atomic_write(backup, "wb", backup=False) as fh:
                    fh.write(previous)
            with atomic_write(self.path, "w", backup=False) as fh:
                fh.write(text + "\n")
        except OSError as exc:
            raise ProjectError(f"cannot write the project ({exc.strerror or exc})",
                               self.path) from None
        except UnicodeEncodeError:
            raise ProjectError("a name or URI holds characters that cannot be written as "
                               "UTF-8", self.path) from None
        self.uri = data["uri"]
        self.last_id = data["lastID"]
        self._raw = data
        self._raw_images = data["images"]
        self._entry_at = slots
        for idx, entry in slots.items():
            entry.raw = data["images"][idx]
            if entry.relocated:
                entry.server_builder = ServerBuilder.from_json(entry.raw["serverBuilder"])
                entry.relocated = False
        if self._loaded_classes is None or self.classes != self._loaded_classes:
            if self.classes:
                write_classes(self.project_dir / CLASSES_FILE, self.classes)
            self._loaded_classes = list(self.classes)

    # ----------------------------------------------------------------------------- queries

    @property
    def project_dir(self) -> Path:
        """The folder holding the project file."""
        return self.path.parent

    @property
    def version_info(self) -> compat.QuPathVersion | None:
        """The parsed :attr:`version` (``0.6.0-rc3`` -> (0, 6, 0, "rc3")), if parseable."""
        return compat.parse_version(self.version)

    def entry(self, key: int | str) -> ProjectEntry:
        """The entry with this entryID (int) or imageName (str); ProjectError if unknown."""
        if isinstance(key, bool) or not isinstance(key, int | str):
            raise ProjectError(f"entry key must be an entryID or an image name, not {key!r}",
                               self.path)
        if isinstance(key, int):
            for e in self.entries:
                if e.entry_id == key:
                    return e
            raise ProjectError(f"no entry with entryID {key}", self.path)
        found = [e for e in self.entries if e.image_name == key]
        if not found:
            raise ProjectError(f"no entry named {key!r}", self.path)
        if len(found) > 1:
            ids = ", ".join(str(e.entry_id) for e in found)
            raise ProjectError(f"{len(found)} entries are named {key!r} (entryIDs {ids}); "
                               "use the entryID", self.path)
        return found[0]

    def missing_images(self) -> list[ProjectEntry]:
        """Entries whose image is not available on this machine (remote URIs included)."""
        return [e for e in self.entries if not e.image_found]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[ProjectEntry]:
        return iter(self.entries)

    def __repr__(self) -> str:
        return (f"QuPathProject({str(self.path)!r}, version={self.version!r}, "
                f"entries={len(self.entries)})")


def _max_data_dir_id(data_dir: Path) -> int:
    """The largest numeric ``data/<id>`` folder name (0 if none)."""
    best = 0
    try:
        for child in data_dir.iterdir():
            if child.name.isdigit() and child.is_dir():
                best = max(best, int(child.name))
    except OSError:
        pass
    return best


def read_project(path: str | os.PathLike[str], *, backup: bool = False) -> QuPathProject:
    """Read a QuPath project (see :meth:`QuPathProject.load`)."""
    return QuPathProject.load(path, backup=backup)
