"""A stand-in for the QuPath Java classes paquo uses, so that paquo's own Python code (its
project, entry, hierarchy and path-object wrappers, its save paths and context manager) runs
in the tests without QuPath or a JVM.

:func:`install` puts a fake ``paquo.java`` into ``sys.modules`` and imports paquo's Python
modules afresh on top of it; everything is undone when the test ends. The fake mirrors what
QuPath does in the calls paquo 0.9 makes (QuPath source, tag v0.5.1 unless said otherwise):

- ``DefaultProject.DefaultProjectImageEntry.readImageData`` builds the image server first,
  i.e. opens the slide, and fails with an IOException when the image file is not there
  (``DefaultProject.java`` 689-698); ``State.slides_opened`` counts these opens.
- ``saveImageData`` moves ``data.qpdata`` to ``data.qpdata.backup``, writes the new file and
  deletes the backup, restoring it only on an IOException (``DefaultProject.java`` 737-767);
  then the data counts as saved (``setLastSavedPath(path, true)``).
- ``syncChanges`` writes ``project.qpproj`` through a ``.tmp`` file (``writeProject``).
- Gson reads any PathObject through one adapter that makes the object of the GeoJSON's
  ``objectType`` (``QuPathTypeAdapters.java`` 566-590), keeps ``metadata`` on every object
  from 0.5 but only on TMA cores in 0.4 (v0.4.4 ``QuPathTypeAdapters.java`` 619-622), and
  ``fromJson(json, cls)`` casts the result to ``cls`` (ClassCastException otherwise).
- ``PathObject.getMetadata`` exists from 0.5, ``hasMetadata`` from 0.6.
- Hierarchy changes mark the ``ImageData`` as changed.

``data.qpdata`` is stored as JSON here (QuPath writes Java serialization), so tests can read
what an entry holds.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest

PAQUO_MODULES = ("paquo._logging", "paquo.colors", "paquo.classes", "paquo.pathobjects",
                 "paquo.hierarchy", "paquo.images", "paquo.projects")


@dataclass
class State:
    """Knobs and counters of one fake QuPath."""

    version: str = "0.5.1"
    slides_opened: int = 0             # image servers built (each opens the slide)
    project_syncs: int = 0             # syncChanges calls
    insert_fails_after: int | None = None  # insertPathObjects throws after this many objects
    save_fails: bool = False           # saveImageData throws half-way through writing
    opened_projects: list[str] = field(default_factory=list)

    def at_least(self, version: str) -> bool:
        def key(v: str) -> tuple[int, ...]:
            return tuple(int(x) for x in v.split("-")[0].split("."))
        return key(self.version) >= key(version)


STATE = State()


# ---- Java exceptions (their hierarchy matters: paquo catches some and not others)

class JavaException(Exception):
    pass


class RuntimeException(JavaException):
    pass


class IllegalArgumentException(RuntimeException):
    pass


class ClassCastException(RuntimeException):
    pass


class NegativeArraySizeException(RuntimeException):
    pass


class IOException(JavaException):
    pass


class FileNotFoundException(IOException):
    pass


class NoSuchFileException(IOException):
    pass


class URISyntaxException(JavaException):
    pass


class ExceptionInInitializerError(JavaException):
    pass


# ---- small Java types

def String(value: Any) -> str:
    return str(value)


class JList(list[Any]):
    def size(self) -> int:
        return len(self)

    def add(self, value: Any) -> bool:
        self.append(value)
        return True


class JPath:
    def __init__(self, path: str | Path) -> None:
        self._p = str(path)

    def toString(self) -> str:
        return self._p

    def toAbsolutePath(self) -> JPath:
        return JPath(Path(self._p).absolute())

    def __str__(self) -> str:
        return self._p


class File:
    def __init__(self, path: str) -> None:
        self.path = Path(str(path))


class URI:
    """java.net.URI, as far as paquo's URI handling needs it (paquo images.py 73-108)."""

    def __init__(self, *args: Any) -> None:
        if len(args) == 1:
            text = str(args[0])
            if " " in text:
                raise URISyntaxException(f"Illegal character in path: {text}")
            s = urlsplit(text)
            self._scheme, self._host = s.scheme or None, s.hostname
            self._path = unquote(s.path)
            self._query, self._fragment = s.query or None, s.fragment or None
        else:
            scheme, _user, host, _port, path, query, fragment = args
            self._scheme, self._host, self._path = scheme, host, path
            self._query, self._fragment = query, fragment

    def getScheme(self) -> str | None:
        return self._scheme

    def getHost(self) -> str | None:
        return self._host

    def getPath(self) -> str:
        return self._path

    def getUserInfo(self) -> None:
        return None

    def getPort(self) -> int:
        return -1

    def getQuery(self) -> str | None:
        return self._query

    def getFragment(self) -> str | None:
        return self._fragment

    def toString(self) -> str:
        authority = f"//{self._host}" if self._host else ""
        return f"{self._scheme}:{authority}{quote(self._path)}"

    def equals(self, other: URI) -> bool:
        return self.toString() == other.toString()

    def __str__(self) -> str:
        return self.toString()


# ---- path objects

class PathObject:
    def __init__(self, *, roi: dict[str, Any] | None = None, id: str | None = None,
                 locked: bool = False, metadata: dict[str, str] | None = None,
                 path_class: str | None = None, nucleus: dict[str, Any] | None = None) -> None:
        self._roi, self._nucleus = roi, nucleus
        self._id = uuid.UUID(id) if id else uuid.uuid4()
        self._locked, self._class = locked, path_class
        self._parent: PathObject | None = None
        self._metadata = dict(metadata or {})
        if STATE.at_least("0.5.0"):
            self.getMetadata = lambda: self._metadata
        if STATE.at_least("0.6.0"):
            self.hasMetadata = lambda: bool(self._metadata)

    KIND = "annotation"

    def getID(self) -> uuid.UUID:
        return self._id

    def isLocked(self) -> bool:
        return self._locked

    def setLocked(self, value: bool) -> None:
        self._locked = bool(value)

    def isAnnotation(self) -> bool:
        return isinstance(self, PathAnnotationObject)

    def isDetection(self) -> bool:
        return isinstance(self, PathDetectionObject)

    def isCell(self) -> bool:
        return isinstance(self, PathCellObject)

    def isTile(self) -> bool:
        return isinstance(self, PathTileObject)

    def isTMACore(self) -> bool:
        return isinstance(self, TMACoreObject)

    def isRootObject(self) -> bool:
        return isinstance(self, PathRootObject)

    def getParent(self) -> PathObject | None:
        return self._parent

    def getName(self) -> None:
        return None

    def getPathClass(self) -> None:
        return None

    def getNucleusROI(self) -> dict[str, Any] | None:
        return self._nucleus if isinstance(self, PathCellObject) else None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.KIND, "id": str(self._id), "locked": self._locked,
                "metadata": self._metadata, "class": self._class, "roi": self._roi,
                **({"nucleus": self._nucleus} if self._nucleus is not None else {})}


class PathRootObject(PathObject):
    KIND = "root"


class PathROIObject(PathObject):
    pass


class PathAnnotationObject(PathROIObject):
    KIND = "annotation"


class PathDetectionObject(PathROIObject):
    KIND = "detection"


class PathCellObject(PathDetectionObject):
    KIND = "cell"


class PathTileObject(PathDetectionObject):
    KIND = "tile"


class TMACoreObject(PathROIObject):
    KIND = "tmaCore"


_KINDS: dict[str, type[PathObject]] = {
    c.KIND: c for c in (PathAnnotationObject, PathDetectionObject, PathCellObject,
                        PathTileObject, TMACoreObject)}


def make_object(kind: str, **kwargs: Any) -> PathObject:
    """A QuPath object as QuPath's GeoJSON adapter (or a data file) would make it."""
    cls = _KINDS.get(kind, PathAnnotationObject)
    if "metadata" in kwargs and not (STATE.at_least("0.5.0") or cls is TMACoreObject):
        kwargs.pop("metadata")  # 0.4 keeps GeoJSON metadata on TMA cores only
    return cls(**kwargs)


def object_from_feature(feature: dict[str, Any]) -> PathObject:
    props = feature.get("properties", {})
    kind = props.get("objectType", props.get("object_type", "annotation"))
    fid = feature.get("id")
    try:
        oid = str(uuid.UUID(str(fid))) if fid is not None else None
    except ValueError:
        oid = None
    cls_name = (props.get("classification") or {}).get("name")
    return make_object(kind, roi=feature.get("geometry"), id=oid,
                       locked=bool(props.get("isLocked", False)),
                       metadata={k: str(v) for k, v in (props.get("metadata") or {}).items()},
                       path_class=cls_name, nucleus=feature.get("nucleusGeometry"))


class _Gson:
    def fromJson(self, text: str, cls: type) -> Any:
        obj = object_from_feature(json.loads(str(text)))
        if not isinstance(obj, cls):  # Gson: Primitives.wrap(classOfT).cast(object)
            raise ClassCastException(f"class qupath.lib.objects.{type(obj).__name__} cannot "
                                     f"be cast to class qupath.lib.objects.{cls.__name__}")
        return obj

    def toJson(self, value: Any) -> str:
        """One object as a Feature, a collection as a list of them (Gson writes a collection
        element by element with the PathObject adapter)."""
        if isinstance(value, PathObject):
            return json.dumps(feature_of(value))
        return json.dumps([feature_of(o) for o in value])


def feature_of(o: PathObject) -> dict[str, Any]:
    """An object as QuPath's PathObject adapter writes it (``QuPathTypeAdapters.java``,
    ``PathObjectTypeAdapter.write``): ``id``, ``geometry``, a cell's nucleus as
    ``nucleusGeometry`` beside it, then ``properties`` with ``objectType``, ``classification``
    when classified, ``isLocked`` only when locked and ``metadata`` when there is some."""
    props: dict[str, Any] = {"objectType": o.KIND}
    if o._class is not None:
        props["classification"] = {"name": o._class, "color": [200, 0, 0]}
    if o._locked:
        props["isLocked"] = True
    if o._metadata:
        props["metadata"] = dict(o._metadata)
    out: dict[str, Any] = {"type": "Feature", "id": str(o._id), "geometry": o._roi}
    if isinstance(o, PathCellObject) and o._nucleus is not None:
        out["nucleusGeometry"] = o._nucleus
    out["properties"] = props
    return out


class GsonTools:
    @staticmethod
    def getInstance(*_: Any) -> _Gson:
        return _Gson()


# ---- hierarchy and image data

class PathObjectHierarchy:
    def __init__(self, objects: list[PathObject] | None = None) -> None:
        self._root = PathRootObject()
        self._objects: list[PathObject] = []
        self.listeners: list[Any] = []
        for o in objects or []:
            o._parent = self._root
            self._objects.append(o)

    def getRootObject(self) -> PathRootObject:
        return self._root

    def getObjects(self, _: Any, cls: type) -> JList:
        return JList(o for o in self._objects if isinstance(o, cls))

    def getAnnotationObjects(self) -> JList:
        return self.getObjects(None, PathAnnotationObject)

    def nObjects(self) -> int:
        return len(self._objects)

    def isEmpty(self) -> bool:
        return not self._objects

    def fireHierarchyChangedEvent(self, _: Any) -> None:
        for listener in self.listeners:
            listener()

    def _add(self, objects: Any) -> bool:
        for i, o in enumerate(list(objects)):
            if STATE.insert_fails_after is not None and i >= STATE.insert_fails_after:
                self.fireHierarchyChangedEvent(self._root)
                raise RuntimeException("java.lang.OutOfMemoryError: Java heap space")
            o._parent = self._root
            self._objects.append(o)
        self.fireHierarchyChangedEvent(self._root)
        return True

    insertPathObjects = addObjects = addPathObjects = _add

    def removeObjects(self, objects: Any, keep_children: bool) -> None:
        for o in list(objects):
            if o in self._objects:
                self._objects.remove(o)
                o._parent = None
        self.fireHierarchyChangedEvent(self._root)

    def to_json(self) -> list[dict[str, Any]]:
        return [o.to_json() for o in self._objects]


class ImageData:
    def __init__(self, hierarchy: PathObjectHierarchy, server: Any) -> None:
        self._hierarchy, self._server, self._changed = hierarchy, server, False
        self._properties: dict[str, Any] = {}
        hierarchy.listeners.append(lambda: self.setChanged(True))

    def getHierarchy(self) -> PathObjectHierarchy:
        return self._hierarchy

    def getServer(self) -> Any:
        return self._server

    def isChanged(self) -> bool:
        return self._changed

    def setChanged(self, value: bool) -> None:
        self._changed = bool(value)

    def setProperty(self, k: str, v: Any) -> None:
        self._properties[k] = v

    def getProperty(self, k: str) -> Any:
        return self._properties.get(k)


def read_qpdata(path: Path) -> PathObjectHierarchy:
    """The hierarchy a (fake) ``data.qpdata`` holds."""
    objects = [make_object(d["kind"], roi=d["roi"], id=d["id"], locked=d["locked"],
                           metadata=d["metadata"], path_class=d["class"],
                           nucleus=d.get("nucleus"))
               for d in json.loads(path.read_text(encoding="utf-8"))["objects"]]
    return PathObjectHierarchy(objects)


def write_qpdata(path: Path, objects: list[PathObject]) -> None:
    """Write a (fake) ``data.qpdata`` holding ``objects``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"objects": [o.to_json() for o in objects]}, sort_keys=True,
                               indent=1), encoding="utf-8")


class PathIO:
    @staticmethod
    def readImageData(file: File, *_: Any) -> ImageData:
        if not file.path.is_file():
            raise FileNotFoundException(str(file.path))
        return ImageData(read_qpdata(file.path), None)


# ---- project

class DefaultProjectImageEntry:
    def __init__(self, project: DefaultProject, raw: dict[str, Any]) -> None:
        from qpseg.qupath.project import ServerBuilder

        self._project, self._raw = project, raw
        self._id = int(raw["entryID"])
        self._uri = ServerBuilder.from_json(raw["serverBuilder"]).image_uri
        self._metadata: dict[str, str] = dict(raw.get("metadata") or {})

    def getID(self) -> int:
        return self._id

    def getImageName(self) -> str:
        return str(self._raw.get("imageName"))

    def getEntryPath(self) -> JPath:
        return JPath(self._project.dir / "data" / str(self._id))

    def getURIs(self) -> JList:
        return JList([URI(self._uri)])

    getServerURIs = getURIs

    def getMetadataValue(self, k: str) -> str | None:
        return self._metadata.get(k)

    def putMetadataValue(self, k: str, v: str) -> None:
        self._metadata[k] = v

    def removeMetadataValue(self, k: str) -> None:
        self._metadata.pop(k, None)

    def getMetadataKeys(self) -> JList:
        return JList(self._metadata)

    def containsMetadata(self, k: str) -> bool:
        return k in self._metadata

    def clearMetadata(self) -> None:
        self._metadata.clear()

    def _data(self) -> Path:
        return self._project.dir / "data" / str(self._id) / "data.qpdata"

    def readImageData(self) -> ImageData:
        # The server is built first: the slide is opened (DefaultProject.java 689-698).
        image = Path(unquote(urlsplit(self._uri).path))
        if not image.is_file():
            raise IOException(f"Unable to build server for {self._uri}")
        STATE.slides_opened += 1
        data = self._data()
        hierarchy = read_qpdata(data) if data.is_file() else PathObjectHierarchy()
        image_data = ImageData(hierarchy, object())
        image_data.setChanged(False)
        return image_data

    def readHierarchy(self) -> PathObjectHierarchy:
        data = self._data()
        return read_qpdata(data) if data.is_file() else PathObjectHierarchy()

    def saveImageData(self, image_data: ImageData) -> None:
        data = self._data()
        data.parent.mkdir(parents=True, exist_ok=True)
        backup = data.with_name("data.qpdata.backup")
        if data.exists():
            data.replace(backup)
        text = json.dumps({"objects": image_data.getHierarchy().to_json()}, sort_keys=True,
                          indent=1)
        if STATE.save_fails:  # a Java error half-way: only an IOException restores the backup
            data.write_text(text[: len(text) // 2], encoding="utf-8")
            raise RuntimeException("java.lang.OutOfMemoryError: Java heap space")
        data.write_text(text, encoding="utf-8")
        backup.unlink(missing_ok=True)
        image_data.setChanged(False)


class DefaultProject:
    def __init__(self, file: Path) -> None:
        self.file = file
        self.dir = file.parent
        self._raw = json.loads(file.read_text(encoding="utf-8"))
        self._images = [DefaultProjectImageEntry(self, raw) for raw in self._raw["images"]]

    def getImageList(self) -> JList:
        return JList(self._images)

    def getPath(self) -> JPath:
        return JPath(self.file)

    def getURI(self) -> URI:
        return URI(self.file.as_uri())

    def getPathClasses(self) -> JList:
        return JList()

    def getVersion(self) -> str:
        return STATE.version

    def getName(self) -> str:
        return self.dir.name

    def syncChanges(self) -> None:
        STATE.project_syncs += 1
        for raw, entry in zip(self._raw["images"], self._images, strict=True):
            raw["metadata"] = dict(entry._metadata)
        self._raw["uri"] = self.file.as_uri()
        tmp = self.file.with_name(self.file.name + ".tmp")
        tmp.write_text(json.dumps(self._raw, indent=2), encoding="utf-8")
        if self.file.exists():
            self.file.replace(self.file.with_name(self.file.name + ".backup"))
        tmp.replace(self.file)


class ProjectIO:
    @staticmethod
    def loadProject(file: File, _: Any) -> DefaultProject:
        STATE.opened_projects.append(str(file.path))
        if not file.path.is_file():
            raise IOException(f"{file.path} not found")
        return DefaultProject(file.path)


# ---- the module

class _Unused(type):
    def __getattr__(cls, name: str) -> Any:
        def unused(*_: Any, **__: Any) -> Any:
            raise NotImplementedError(f"the fake QuPath has no {cls.__name__}.{name}")
        return unused


class _Anything(metaclass=_Unused):
    """A Java class paquo imports but these tests never call."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass


class _JavaStatic:
    """A Java static method: stays unbound when stored on a class (as JPype's do)."""

    def __call__(self, *_: Any) -> None:
        pass


class _System:
    out = err = None
    setOut = setErr = _JavaStatic()


class _Buffer:
    def toString(self) -> str:
        return ""

    def reset(self) -> None:
        pass


def _module(state: State) -> types.ModuleType:
    mod = types.ModuleType("paquo.java")
    at_least = state.at_least
    compat = types.SimpleNamespace(
        version=state.version, requires_missing_classes_json_fix=False,
        requires_annotation_json_fix=False, requires_objecttype_json_fix=False,
        supports_image_server_recovery=True, supports_logmanager=False,
        supports_newer_addobject_and_pathclass=True, supports_addobjects=at_least("0.6.0"),
        supports_get_uris=at_least("0.6.0"),
        supports_newer_measurements_interface=at_least("0.6.0"))
    image_type = types.SimpleNamespace(
        BRIGHTFIELD_H_DAB="BRIGHTFIELD_H_DAB", BRIGHTFIELD_H_E="BRIGHTFIELD_H_E",
        BRIGHTFIELD_OTHER="BRIGHTFIELD_OTHER", FLUORESCENCE="FLUORESCENCE", OTHER="OTHER",
        UNSET="UNSET")
    values: dict[str, Any] = {
        "qupath_version": state.version, "compatibility": compat, "ImageType": image_type,
        "String": String, "URI": URI, "File": File, "PathIO": PathIO, "ProjectIO": ProjectIO,
        "GsonTools": GsonTools, "DefaultProject": DefaultProject,
        "DefaultProjectImageEntry": DefaultProjectImageEntry,
        "PathObjectHierarchy": PathObjectHierarchy, "PathROIObject": PathROIObject,
        "PathAnnotationObject": PathAnnotationObject,
        "PathDetectionObject": PathDetectionObject, "PathCellObject": PathCellObject,
        "PathTileObject": PathTileObject, "LogManager": None, "PathClassFactory": None,
        "ArrayList": JList,
        "System": _System, "ByteArrayOutputStream": _Buffer,
        "PrintStream": _Anything,
        "StandardCharsets": types.SimpleNamespace(UTF_8=types.SimpleNamespace(
            name=lambda: "UTF-8")),
        "ProjectImportImagesCommand_getThumbnailRGB": lambda *_: None,
        "IOException": IOException, "RuntimeException": RuntimeException,
        "IllegalArgumentException": IllegalArgumentException,
        "FileNotFoundException": FileNotFoundException,
        "NoSuchFileException": NoSuchFileException, "URISyntaxException": URISyntaxException,
        "ExceptionInInitializerError": ExceptionInInitializerError,
        "NegativeArraySizeException": NegativeArraySizeException,
    }
    for name in ("BufferedImage", "Files", "GeneralTools", "ImageServerProvider", "Projects",
                 "ServerTools", "PathClass", "ColorTools", "Integer", "ROI", "GeometryTools",
                 "PathObjects", "WKBReader", "WKBWriter", "ImageData", "ImageServer",
                 "ImageServers", "ArrayList", "Files", "Point2", "ROIs"):
        values.setdefault(name, _Unused(name, (_Anything,), {}))
    for key, value in values.items():
        setattr(mod, key, value)
    return mod


def install(monkeypatch: pytest.MonkeyPatch, version: str = "0.5.1") -> State:
    """Run paquo's real Python modules on this fake QuPath for the rest of the test."""
    import paquo

    state = State(version=version)
    monkeypatch.setattr(sys.modules[__name__], "STATE", state)
    fake = _module(state)
    monkeypatch.setitem(sys.modules, "paquo.java", fake)
    monkeypatch.setattr(paquo, "java", fake, raising=False)
    for name in PAQUO_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in PAQUO_MODULES:
        module = importlib.import_module(name)
        monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(paquo, name.split(".")[1], module, raising=False)
    from qpseg.qupath import paquo_backend

    monkeypatch.setattr(paquo_backend, "qupath_available", lambda: True)
    return state
