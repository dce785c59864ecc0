"""Pure-Python QuPath project I/O against real QuPath 0.3-0.6 files (known answers)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections import Counter
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import pytest

from qpseg.errors import MissingImageWarning, ProjectError, ProjectWarning
from qpseg.qupath import compat
from qpseg.qupath.classes import default_classes, read_classes
from qpseg.qupath.project import (
    ImageMetadata,
    QuPathProject,
    read_project,
    resolve_image_uri,
)

needs_posix = pytest.mark.skipif(os.name == "nt", reason="POSIX paths")

BIOP_MOUSE = "BIOP__ijp-imagetoatlas__mouse-project-v0.5.0-backup-v0.5.1"
BIOP_OMERO = "BIOP__ijp-imagetoatlas__omero-https-u003d-v0.5.1-backup-v0.6.0rc3"
BIOP_RAT = "BIOP__ijp-imagetoatlas__quicknii-rat-v0.4.4-jpg-bioformats"
JOSENIMO = "josenimo__06_QuPath_Annotation_to_AnnData__v0.4.1-imagej-pct-encoded-geojson"
NEDA = "nedaghohabi__Histopathology-Image-Tiling__v0.3.2-windows-drives-434-entries"
SBALCI = "sbalci__metadata-qupath__v0.6.0rc3-windows-nonascii-pct-dup-entries"
PAQUO = "uw-loci__PaQuO_test__qppaquo-v0.5.0rc2-pyramidize-backup-v0.4.3"
PAQUO2 = "uw-loci__PaQuO_test__qppaquo2-v0.5.0rc2-bioformats-ome-tif"

OPENSLIDE = "openslide"
BIOFORMATS = "bioformats"

# Facts read once from the JSON with python's json module, then pinned here:
# (folder, file) -> version, entries, lastID, first imageName, builder types, providers,
#                   entries with non-empty entry metadata, classes
FACTS: dict[tuple[str, str], dict[str, Any]] = {
    (BIOP_MOUSE, "project.qpproj"): dict(
        version="0.5.0", n=20, last_id=20, first="Section-01.tif",
        builders={"uri": 20}, providers={BIOFORMATS: 20}, with_meta=0, classes=97),
    (BIOP_MOUSE, "project.qpproj.backup"): dict(
        version="0.5.1", n=20, last_id=20, first="Section-01.tif",
        builders={"uri": 20}, providers={BIOFORMATS: 20}, with_meta=0, classes=97),
    (BIOP_OMERO, "project.qpproj"): dict(
        version="0.5.1", n=25, last_id=25, first="Slide_00.vsi [10x_01]",
        builders={"uri": 25}, providers={"omero": 25}, with_meta=0, classes=9),
    (BIOP_OMERO, "project.qpproj.backup"): dict(
        version="0.6.0-rc3", n=25, last_id=25, first="Slide_00.vsi [10x_01]",
        builders={"uri": 25}, providers={"omero": 25}, with_meta=0, classes=9),
    (BIOP_RAT, "project.qpproj"): dict(
        version="0.4.4", n=21, last_id=21, first="ratslices0000.jpg",
        builders={"uri": 21}, providers={BIOFORMATS: 21}, with_meta=0, classes=14),
    (JOSENIMO, "project.qpproj"): dict(
        version="0.4.1", n=1, last_id=1, first="Exemplar001_subset.tif",
        builders={"uri": 1}, providers={"imagej": 1}, with_meta=0, classes=3),
    (NEDA, "project.qpproj"): dict(
        version="0.3.2", n=434, last_id=459,
        first="TCGA-D5-5539-01Z-00-DX1.9c46fe78-2adb-4f49-9141-cda135c2c90b.svs",
        builders={"uri": 434}, providers={OPENSLIDE: 434}, with_meta=0, classes=0),
    (SBALCI, "project.qpproj"): dict(
        version="0.6.0-rc3", n=107, last_id=107, first="kontrol15.01.25_14_6_134952.svs",
        builders={"uri": 107}, providers={BIOFORMATS: 76, OPENSLIDE: 31}, with_meta=0,
        classes=13),
    (PAQUO, "project.qpproj"): dict(
        version="0.5.0-rc2", n=3, last_id=4, first="OS-2.ndpi",
        builders={"uri": 2, "pyramidize": 1}, providers={OPENSLIDE: 2, "imagej": 1},
        with_meta=0, classes=9),
    (PAQUO, "project.qpproj.backup"): dict(
        version="0.4.3", n=4, last_id=5, first="OS-2.ndpi",
        builders={"uri": 3, "pyramidize": 1}, providers={OPENSLIDE: 2, "imagej": 2},
        with_meta=0, classes=9),
    (PAQUO2, "project.qpproj"): dict(
        version="0.5.0-rc2", n=5, last_id=5, first="PDAC_MetroHealth_362-4x-bf.ome.tif",
        builders={"uri": 5}, providers={BIOFORMATS: 5}, with_meta=4, classes=9),
}


def _quiet_load(path: Path, **kw: Any) -> QuPathProject:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProjectWarning)
        return QuPathProject.load(path, **kw)


def _copy_project(src: Path, dst: Path) -> Path:
    """Copy a fixture project (qpproj + classes) into ``dst``; returns the new .qpproj."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "project.qpproj", dst / "project.qpproj")
    if (src / "classifiers").is_dir():
        shutil.copytree(src / "classifiers", dst / "classifiers")
    return dst / "project.qpproj"


# --------------------------------------------------------------------------------------------
# every fixture loads, with pinned facts
# --------------------------------------------------------------------------------------------


def test_every_fixture_project_file_is_pinned(qupath_fixtures: Path) -> None:
    found = {(p.parent.name, p.name) for p in qupath_fixtures.glob("*/project.qpproj*")}
    assert found == set(FACTS)


@pytest.mark.parametrize(("folder", "name"), sorted(FACTS))
def test_fixture_facts(qupath_fixtures: Path, folder: str, name: str) -> None:
    facts = FACTS[(folder, name)]
    path = qupath_fixtures / folder / name
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        project = QuPathProject.load(path)
    # The only warning real files give: their images are not on this machine.
    assert [str(w.message) for w in record
            if not issubclass(w.category, MissingImageWarning)] == []
    assert all("images not found" in str(w.message) for w in record)
    assert all(issubclass(w.category, ProjectWarning) for w in record)
    assert project.version == facts["version"]
    assert len(project.entries) == facts["n"]
    assert project.last_id == facts["last_id"]
    assert project.entries[0].image_name == facts["first"]
    assert Counter(e.server_builder.builder_type for e in project) == facts["builders"]
    assert Counter(e.provider for e in project) == facts["providers"]
    assert sum(bool(e.metadata) for e in project) == facts["with_meta"]
    assert len(project.classes) == facts["classes"]
    assert project.is_backup == name.endswith(".backup")
    assert project.uri is not None and project.uri.startswith("file:/")
    # Nothing from these Windows/OMERO projects exists here.
    assert project.missing_images() == project.entries
    assert all(e.image_path is None and not e.image_found for e in project)
    assert all(e.data_dir == qupath_fixtures / folder / "data" / str(e.entry_id)
               for e in project)
    ids = [e.entry_id for e in project]
    assert len(set(ids)) == len(ids)


def test_backup_flag_and_folder_path(qupath_fixtures: Path) -> None:
    via_folder = _quiet_load(qupath_fixtures / PAQUO, backup=True)
    assert via_folder.path.name == "project.qpproj.backup"
    assert [e.entry_id for e in via_folder] == [1, 2, 3, 5]
    main = _quiet_load(qupath_fixtures / PAQUO)
    assert [e.entry_id for e in main] == [1, 2, 3]
    with pytest.raises(ProjectError, match="backup"):
        via_folder.save()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProjectWarning)
        assert read_project(qupath_fixtures / PAQUO / "project.qpproj").version == "0.5.0-rc2"


def test_version_info(qupath_fixtures: Path) -> None:
    p = _quiet_load(qupath_fixtures / SBALCI)
    assert p.version_info == compat.QuPathVersion(0, 6, 0, "rc3")
    assert p.version_info is not None and p.version_info.is_prerelease


# --------------------------------------------------------------------------------------------
# quirks of individual fixtures
# --------------------------------------------------------------------------------------------


def test_nedaghohabi_large_03_project(qupath_fixtures: Path) -> None:
    p = _quiet_load(qupath_fixtures / NEDA)
    assert p.uri == "file:/D:/QuPath%20COAD%20Project%20(Annotated)/project.qpproj"
    assert compat.file_uri_to_pure_path(p.uri) == PureWindowsPath(
        "D:/QuPath COAD Project (Annotated)/project.qpproj")
    e = p.entries[0]
    assert e.entry_id == 1
    assert e.uri_path == PureWindowsPath(
        "I:/COAD-TCGA-Diagnostic-Slide/00d69f69-3120-4b0c-8985-aab4edf9bc4b/"
        "TCGA-D5-5539-01Z-00-DX1.9c46fe78-2adb-4f49-9141-cda135c2c90b.svs")
    assert e.dimensions == (176501, 85037)
    assert e.mpp == pytest.approx(0.252)
    assert e.mpp_xy == (0.252, 0.252)
    assert e.magnification == 40.0
    assert e.server_builder.args == []
    assert max(e.entry_id for e in p) <= 459
    assert len(p) < p.last_id  # gaps in entryIDs


def test_omero_https_uris(qupath_fixtures: Path) -> None:
    raw = (qupath_fixtures / BIOP_OMERO / "project.qpproj").read_text(encoding="utf-8")
    assert "show\\u003dimage-90627" in raw  # GSON's escape, as written
    p = _quiet_load(qupath_fixtures / BIOP_OMERO)
    e = p.entries[0]
    assert e.uri == "https://omero-tim.gerbi-gmb.de/webclient/?show=image-90627"
    assert e.is_remote and e.uri_path is None and e.image_path is None
    assert e.server_builder.args == ["--pixelAPI", "Ice", "--serverAddress", "", "--serverPort",
                                     "0"]
    assert all(e.is_remote and "\\u003d" not in (e.uri or "") for e in p)
    assert resolve_image_uri(e.uri or "", qupath_fixtures / BIOP_OMERO / "project.qpproj",
                             p.uri) is None


def test_sbalci_duplicates_and_non_ascii(qupath_fixtures: Path) -> None:
    p = _quiet_load(qupath_fixtures / SBALCI)
    dup_uri = "file:/E:/KONTROLHE_2025/OCAK15.01.25_HE_0/kontrol15.01.25_14_6_134952.svs"
    dups = [e for e in p if e.uri == dup_uri]
    assert [e.entry_id for e in dups] == [1, 99]
    assert dups[0].server_builder.args == dups[1].server_builder.args == ["--series", "0"]
    with pytest.raises(ProjectError, match=r"entryIDs 1, 99"):
        p.entry("kontrol15.01.25_14_6_134952.svs")
    e2 = p.entry(2)
    assert e2.uri is not None and "%C5%9EUBAT19.02.25_HE_0" in e2.uri
    assert e2.uri_path == PureWindowsPath(
        "E:/KONTROLHE_2025/ŞUBAT19.02.25_HE_0/kontrol19.02.2025_11_1_SS45328_041327.svs")
    assert sum(1 for e in p if e.uri_path is not None and "ŞUBAT" in str(e.uri_path)) == 44
    # a non-integer pyramid downsample survives as a float
    levels = p.entry(4).server_builder.metadata["levels"]  # type: ignore[index]
    assert levels[-1]["downsample"] == 55.52466302431329


def test_qppaquo2_entry_metadata(qupath_fixtures: Path) -> None:
    p = _quiet_load(qupath_fixtures / PAQUO2)
    e = p.entry(1)
    assert e.metadata == {"acquisition": "4x", "diagnosis": "PDAC"}
    assert e.mpp == pytest.approx(1.105)
    assert e.dimensions == (6759, 7970)
    assert e.provider_class == "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder"
    assert p.entry("PDAC_MetroHealth_362-4x-bf.ome.tif") is e


def test_pyramidize_and_missing_metadata(qupath_fixtures: Path) -> None:
    p = _quiet_load(qupath_fixtures / PAQUO)
    e1, e3 = p.entry(1), p.entry(3)
    # OpenSlide entries saved without serverBuilder metadata
    assert e1.server_builder.metadata is None
    assert e1.dimensions is None and e1.mpp is None and e1.provider == OPENSLIDE
    sb = e3.server_builder
    assert sb.builder_type == "pyramidize" and sb.provider_class is None and sb.uri is None
    assert sb.nested is not None and sb.nested.builder_type == "uri"
    assert sb.innermost is sb.nested
    assert e3.uri == sb.nested.uri
    assert e3.uri_path == PureWindowsPath(
        "D:/QuPath_projects/PDAC_CP annotation validation/image_export/"
        "Copy of 88_region_2_original.tif")
    assert e3.provider == "imagej"
    assert e3.dimensions == (4036, 5055)
    assert e3.mpp == pytest.approx(0.5039001874508697)
    backup = _quiet_load(qupath_fixtures / PAQUO, backup=True)
    e5 = backup.entry(5)
    assert e5.uri is not None and e5.uri.startswith("file:///D:/")
    assert e5.uri_path == PureWindowsPath(
        "D:/QuPath_projects/PDAC_CP annotation validation/image_export/"
        "Copy of 40_region_4_original.tif")


def test_entry_lookup_errors(qupath_fixtures: Path) -> None:
    p = _quiet_load(qupath_fixtures / PAQUO2)
    with pytest.raises(ProjectError, match="no entry with entryID 99"):
        p.entry(99)
    with pytest.raises(ProjectError, match="no entry named"):
        p.entry("nope.tif")
    with pytest.raises(ProjectError):
        p.entry(True)


# --------------------------------------------------------------------------------------------
# URI forms and QuPath's moved-project rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "expected"), [
    ("file:/C:/a%20b/x.svs", PureWindowsPath("C:/a b/x.svs")),
    ("file:///D:/data/x.svs", PureWindowsPath("D:/data/x.svs")),
    ("file:/home/x.svs", PurePosixPath("/home/x.svs")),
    ("file:///home/x.svs", PurePosixPath("/home/x.svs")),
    ("file://localhost/home/x.svs", PurePosixPath("/home/x.svs")),
    ("file:/E:/K/%C5%9EUBAT/a.svs", PureWindowsPath("E:/K/ŞUBAT/a.svs")),
    ("file:/data/%C5%9EUBAT%20(1)/a+b.svs", PurePosixPath("/data/ŞUBAT (1)/a+b.svs")),
    ("file:////server/share/x.svs", PureWindowsPath("//server/share/x.svs")),
    ("file://server/share/x.svs", PureWindowsPath("//server/share/x.svs")),
    ("C:\\slides\\x.svs", PureWindowsPath("C:/slides/x.svs")),
    ("/plain/posix.svs", PurePosixPath("/plain/posix.svs")),
    ("https://omero.example/webclient/?show=image-1", None),
    ("", None),
])
def test_file_uri_forms(uri: str, expected: Any) -> None:
    assert compat.file_uri_to_pure_path(uri) == expected
    if expected is not None:
        assert type(compat.file_uri_to_pure_path(uri)) is type(expected)


def test_path_to_file_uri_matches_java() -> None:
    win = PureWindowsPath("D:/QuPath COAD Project (Annotated)/project.qpproj")
    assert compat.path_to_file_uri(win) == \
        "file:/D:/QuPath%20COAD%20Project%20(Annotated)/project.qpproj"
    posix = PurePosixPath("/data/ŞUBAT x/a[1].svs")
    assert compat.path_to_file_uri(posix) == "file:/data/%C5%9EUBAT%20x/a%5B1%5D.svs"
    assert compat.path_to_file_uri(posix, ascii_only=False) == "file:/data/ŞUBAT%20x/a%5B1%5D.svs"
    assert compat.path_to_file_uri(PureWindowsPath("//server/share/x.svs")) == \
        "file:////server/share/x.svs"
    for p in (win, posix, PureWindowsPath("//server/share/x.svs")):
        assert compat.file_uri_to_pure_path(compat.path_to_file_uri(p)) == p


def test_parse_version() -> None:
    v = compat.parse_version
    assert v("0.6.0-rc3") == (0, 6, 0, "rc3")
    assert v("0.3.2") == (0, 3, 2, "")
    assert v("v0.2.0-m2") == (0, 2, 0, "m2")
    assert v("0.7") == (0, 7, 0, "")
    assert v("banana") is None and v(None) is None and v(6) is None
    ordered = ["0.4.3", "0.5.0-rc2", "0.5.0", "0.5.1", "0.6.0-rc3", "0.6.0", "0.7.0"]
    keys = [v(s).sort_key() for s in ordered]  # type: ignore[union-attr]
    assert keys == sorted(keys)


@needs_posix
def test_resolve_existing_local_files(tmp_path: Path) -> None:
    folder = tmp_path / "ŞUBAT dir (1)"
    folder.mkdir()
    img = folder / "a b.svs"
    img.write_bytes(b"x")
    uri = "file:" + "/".join(
        ["", *tmp_path.parts[1:], "%C5%9EUBAT%20dir%20(1)", "a%20b.svs"])
    assert resolve_image_uri(uri, tmp_path / "p" / "project.qpproj", None) == img
    assert resolve_image_uri(compat.path_to_file_uri(img), tmp_path / "project.qpproj",
                             None) == img
    triple = "file://" + compat.path_to_file_uri(img)[len("file:"):]  # file:///tmp/...
    assert triple.startswith("file:///")
    assert resolve_image_uri(triple, tmp_path / "x.qpproj", None) == img
    assert resolve_image_uri("file:/C:/a%20b/x.svs", tmp_path / "project.qpproj", None) is None
    assert resolve_image_uri("file:" + str(tmp_path / "missing.svs"),
                             tmp_path / "project.qpproj", None) is None


@needs_posix
@pytest.mark.parametrize(("old_project", "image_uri", "found_rel"), [
    # Windows project moved to Linux, images in a sibling folder
    ("file:/D:/old/proj/project.qpproj", "file:/D:/old/images/a.svs", "new/images/a.svs"),
    ("file:///D:/old/proj/project.qpproj", "file:/D:/old/images/a.svs", "new/images/a.svs"),
    # Windows components compare case-insensitively
    ("file:/D:/Old/Proj/project.qpproj", "file:/d:/old/images/a.svs", "new/images/a.svs"),
    # images inside the project folder
    ("file:/D:/old/proj/project.qpproj", "file:/D:/old/proj/slides/a.svs",
     "new/proj/slides/a.svs"),
    # Linux-style old location, percent-encoded names
    ("file:/home/alice/old/proj/project.qpproj", "file:/home/alice/old/images/a%20b.svs",
     "new/images/a b.svs"),
    # project uri with an encoded space in a folder
    ("file:/D:/My%20Old/proj/project.qpproj", "file:/D:/My%20Old/images/a.svs",
     "new/images/a.svs"),
])
def test_moved_project_rule(tmp_path: Path, old_project: str, image_uri: str,
                            found_rel: str) -> None:
    project_file = tmp_path / "new" / "proj" / "project.qpproj"
    project_file.parent.mkdir(parents=True)
    target = tmp_path / found_rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"x")
    assert resolve_image_uri(image_uri, project_file, old_project) == target


@needs_posix
@pytest.mark.parametrize(("old_project", "image_uri"), [
    ("file:/D:/old/proj/project.qpproj", "file:/E:/old/images/a.svs"),  # other drive
    ("file:/home/old/proj/project.qpproj", "file:/D:/old/images/a.svs"),  # other OS
    ("file:/home/old/proj/project.qpproj", "file:/home/old/images/b.svs"),  # not there
    ("https://x/proj/project.qpproj", "file:/home/old/images/a.svs"),
])
def test_moved_project_rule_does_not_guess(tmp_path: Path, old_project: str,
                                           image_uri: str) -> None:
    project_file = tmp_path / "new" / "proj" / "project.qpproj"
    project_file.parent.mkdir(parents=True)
    for rel in ("new/images/a.svs", "new/proj/a.svs", "new/a.svs"):  # same name nearby
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert resolve_image_uri(image_uri, project_file, old_project) is None


def _project_json(uri: str, images: list[Any]) -> dict[str, Any]:
    return {"version": "0.5.1", "createTimestamp": 1, "modifyTimestamp": 2, "uri": uri,
            "lastID": len(images), "images": images}


def _entry_json(entry_id: int, uri: str) -> dict[str, Any]:
    return {"serverBuilder": {"builderType": "uri", "providerClassName":
                              compat.PROVIDER_CLASSES["openslide"], "uri": uri, "args": []},
            "entryID": entry_id, "randomizedName": "r", "imageName": uri.rsplit("/", 1)[-1],
            "metadata": {}}


@needs_posix
def test_moved_project_loads_with_some_images_missing(tmp_path: Path) -> None:
    proj = tmp_path / "new" / "proj"
    proj.mkdir(parents=True)
    (tmp_path / "new" / "images").mkdir()
    (tmp_path / "new" / "images" / "a.svs").write_bytes(b"x")
    data = _project_json("file:/D:/old/proj/project.qpproj", [
        _entry_json(1, "file:/D:/old/images/a.svs"),
        _entry_json(2, "file:/D:/old/images/gone.svs"),
    ])
    (proj / "project.qpproj").write_text(json.dumps(data), encoding="utf-8")
    with pytest.warns(MissingImageWarning, match="1 of 2 images not found"):
        p = QuPathProject.load(proj)
    assert p.entry(1).image_path == tmp_path / "new" / "images" / "a.svs"
    assert p.entry(1).image_found and p.entry(1).relocated
    assert [e.entry_id for e in p.missing_images()] == [2]

    # Saving writes the found location (as QuPath does after its URI check), so the project
    # still finds the image after its own "uri" changed.
    p.save()
    saved = json.loads((proj / "project.qpproj").read_text(encoding="utf-8"))
    assert saved["uri"] == compat.path_to_file_uri(proj / "project.qpproj", ascii_only=False)
    assert saved["images"][0]["serverBuilder"]["uri"] == compat.path_to_file_uri(
        tmp_path / "new" / "images" / "a.svs")
    assert saved["images"][1]["serverBuilder"]["uri"] == "file:/D:/old/images/gone.svs"
    again = _quiet_load(proj)
    assert again.entry(1).image_path == tmp_path / "new" / "images" / "a.svs"
    assert not again.entry(1).relocated


@needs_posix
def test_real_fixture_moved_with_parent_relative_images(qupath_fixtures: Path,
                                                        tmp_path: Path) -> None:
    # josenimo: project in ".../Test Data (MCMICRO Exemplar 001)/Test_QuPath_Project", image in
    # ".../Test Data (MCMICRO Exemplar 001)/registration/": relative path "../registration/…".
    pf = _copy_project(qupath_fixtures / JOSENIMO, tmp_path / "TestData" / "Test_QuPath_Project")
    img = tmp_path / "TestData" / "registration" / "Exemplar001_subset.tif"
    img.parent.mkdir()
    img.write_bytes(b"x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = QuPathProject.load(pf)
    assert p.entries[0].image_path == img
    assert p.missing_images() == []


@needs_posix
def test_real_fixture_moved_with_images_in_project(qupath_fixtures: Path,
                                                   tmp_path: Path) -> None:
    pf = _copy_project(qupath_fixtures / BIOP_MOUSE, tmp_path / "elsewhere" / "mouse")
    for i in (1, 2, 20):
        (pf.parent / f"Section-{i:02d}.tif").write_bytes(b"x")
    p = _quiet_load(pf)
    found = {e.entry_id: e.image_path for e in p if e.image_found}
    assert found == {1: pf.parent / "Section-01.tif", 2: pf.parent / "Section-02.tif",
                     20: pf.parent / "Section-20.tif"}
    assert len(p.missing_images()) == 17


# --------------------------------------------------------------------------------------------
# creating and writing projects
# --------------------------------------------------------------------------------------------


def _meta(**kw: Any) -> ImageMetadata:
    base: dict[str, Any] = dict(width=4000, height=3000,
                                levels=[(1.0, 4000, 3000), (4.0, 1000, 750)],
                                mpp_x=0.25, mpp_y=0.25, tile_width=256, tile_height=256,
                                provider="openslide", magnification=40.0)
    base.update(kw)
    return ImageMetadata(**base)


def _keys(d: dict[str, Any]) -> set[str]:
    return set(d)


def test_create_add_save_load(qupath_fixtures: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    a, b = slides / "a b.svs", slides / "ŞUBAT.tif"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    folder = tmp_path / "proj"
    p = QuPathProject.create(folder)
    assert (folder / "project.qpproj").is_file()
    assert not (folder / "project.qpproj.backup").exists()
    assert read_classes(folder / "classifiers" / "classes.json") == default_classes()
    with pytest.raises(ProjectError, match="already exists"):
        QuPathProject.create(folder)

    e1 = p.add_image(a, _meta(), entry_metadata={"case": "7"})
    e2 = p.add_image(b, _meta(mpp_x=None, mpp_y=None, provider="bioformats", levels=[],
                              magnification=None), image_name="second")
    assert (e1.entry_id, e2.entry_id) == (1, 2)
    first_text = (folder / "project.qpproj").read_text(encoding="utf-8")
    p.save()
    assert (folder / "project.qpproj.backup").read_text(encoding="utf-8") == first_text
    assert not (folder / "data").exists()  # QuPath creates data/<id>/ itself

    raw = json.loads((folder / "project.qpproj").read_text(encoding="utf-8"))
    assert list(raw) == ["version", "createTimestamp", "modifyTimestamp", "uri", "lastID",
                         "images"]
    assert raw["version"] == "0.5.1" and raw["lastID"] == 2
    assert raw["uri"] == compat.path_to_file_uri(folder.absolute() / "project.qpproj",
                                                 ascii_only=False)
    assert raw["uri"].startswith("file:/") and not raw["uri"].startswith("file://")
    assert isinstance(raw["createTimestamp"], int) and raw["modifyTimestamp"] >= \
        raw["createTimestamp"]

    # Same keys as a real QuPath 0.5 entry (uw-loci qppaquo2).
    real = json.loads((qupath_fixtures / PAQUO2 / "project.qpproj").read_text(
        encoding="utf-8"))
    real_entry = real["images"][0]
    mine = raw["images"][0]
    assert list(mine) == list(real_entry)
    assert list(mine["serverBuilder"]) == list(real_entry["serverBuilder"])
    real_meta, my_meta = real_entry["serverBuilder"]["metadata"], mine["serverBuilder"]["metadata"]
    assert _keys(my_meta) - {"magnification"} == _keys(real_meta)
    assert list(raw["images"][1]["serverBuilder"]["metadata"]) == list(real_meta)
    assert my_meta["pixelCalibration"] == {
        "pixelWidth": {"value": 0.25, "unit": "µm"},
        "pixelHeight": {"value": 0.25, "unit": "µm"},
        "zSpacing": {"value": 1.0, "unit": "z-slice"},
        "timeUnit": "SECONDS", "timepoints": []}
    assert my_meta["channels"] == real_meta["channels"]
    assert my_meta["levels"] == [{"downsample": 1.0, "width": 4000, "height": 3000},
                                 {"downsample": 4.0, "width": 1000, "height": 750}]
    assert mine["serverBuilder"]["providerClassName"] == \
        "qupath.lib.images.servers.openslide.OpenslideServerBuilder"
    assert mine["serverBuilder"]["args"] == []
    assert mine["serverBuilder"]["uri"] == compat.path_to_file_uri(a)
    assert "a%20b.svs" in mine["serverBuilder"]["uri"]
    assert mine["metadata"] == {"case": "7"}
    second = raw["images"][1]
    assert second["imageName"] == "second"
    assert "%C5%9EUBAT.tif" in second["serverBuilder"]["uri"]
    assert second["serverBuilder"]["args"] == ["--series", "0"]
    assert second["serverBuilder"]["providerClassName"] == \
        "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder"
    cal = second["serverBuilder"]["metadata"]["pixelCalibration"]
    assert cal["pixelWidth"] == {"value": 1.0, "unit": "px"}
    assert second["serverBuilder"]["metadata"]["levels"] == [
        {"downsample": 1.0, "width": 4000, "height": 3000}]
    assert len({mine["randomizedName"], second["randomizedName"]}) == 2

    loaded = QuPathProject.load(folder)
    assert [(e.entry_id, e.image_name, e.image_path) for e in loaded] == [
        (1, "a b.svs", a), (2, "second", b)]
    assert loaded.entry(1).mpp == 0.25 and loaded.entry(2).mpp is None
    assert loaded.entry(1).dimensions == (4000, 3000)
    assert loaded.entry(1).provider == OPENSLIDE and loaded.entry(2).provider == BIOFORMATS
    assert loaded.entry(1).metadata == {"case": "7"}
    assert loaded.classes == default_classes()
    assert loaded.missing_images() == []


def test_create_overwrite_and_stale_data_ids(tmp_path: Path) -> None:
    folder = tmp_path / "proj"
    QuPathProject.create(folder, classes=[])
    assert not (folder / "classifiers" / "classes.json").exists()
    (folder / "data" / "7").mkdir(parents=True)
    p = QuPathProject.create(folder, overwrite=True)
    assert (folder / "project.qpproj.backup").exists()
    img = tmp_path / "x.svs"
    img.write_bytes(b"x")
    assert p.add_image(img, _meta()).entry_id == 8  # never reuse data/7


def test_add_image_errors(tmp_path: Path) -> None:
    p = QuPathProject.create(tmp_path / "proj")
    img = tmp_path / "x.svs"
    with pytest.raises(ProjectError, match="image not found"):
        p.add_image(img, _meta())
    img.write_bytes(b"x")
    for bad in (dict(provider="pillow"), dict(width=0), dict(mpp_x=-1.0),
                dict(levels=[(0.0, 1, 1)]), dict(levels=[(1.0, 1)]), dict(tile_width=True),
                dict(levels=[(2.0, 4000, 3000)]),
                dict(levels=[(1.0, 4000, 3000), (16.0, 250, 187), (4.0, 1000, 750)])):
        with pytest.raises(ProjectError, match="invalid image metadata"):
            p.add_image(img, _meta(**bad))
    with pytest.raises(ProjectError, match="text to text"):
        p.add_image(img, _meta(), entry_metadata={"a": 1})  # type: ignore[dict-item]
    assert p.entries == []


def test_fixture_load_save_round_trip_keeps_everything(qupath_fixtures: Path,
                                                       tmp_path: Path) -> None:
    src = qupath_fixtures / PAQUO / "project.qpproj"
    original = json.loads(src.read_text(encoding="utf-8"))
    pf = _copy_project(qupath_fixtures / PAQUO, tmp_path / "p")
    p = _quiet_load(pf)
    p.save()
    saved = json.loads(pf.read_text(encoding="utf-8"))
    assert saved["images"] == original["images"]  # pyramidize, missing metadata, all kept
    assert list(saved) == list(original)
    assert saved["version"] == original["version"] and saved["lastID"] == 4
    assert saved["createTimestamp"] == original["createTimestamp"]
    assert json.loads((pf.parent / "project.qpproj.backup").read_text(encoding="utf-8")) == \
        original
    # classes unchanged -> classes.json untouched (QuPath's file, byte for byte)
    assert (pf.parent / "classifiers" / "classes.json").read_bytes() == \
        (qupath_fixtures / PAQUO / "classifiers" / "classes.json").read_bytes()
    img = tmp_path / "new.svs"
    img.write_bytes(b"x")
    assert p.add_image(img, _meta()).entry_id == 5  # above lastID 4


def test_next_id_after_large_lastid(qupath_fixtures: Path, tmp_path: Path) -> None:
    pf = _copy_project(qupath_fixtures / NEDA, tmp_path / "p")
    p = _quiet_load(pf)
    img = tmp_path / "new.svs"
    img.write_bytes(b"x")
    assert p.add_image(img, _meta()).entry_id == 460
    p.save()
    assert json.loads(pf.read_text(encoding="utf-8"))["lastID"] == 460
    assert len(_quiet_load(pf)) == 435


# --------------------------------------------------------------------------------------------
# corrupt input
# --------------------------------------------------------------------------------------------


def _write_project(folder: Path, content: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pf = folder / "project.qpproj"
    if isinstance(content, bytes):
        pf.write_bytes(content)
    else:
        pf.write_text(content, encoding="utf-8")
    return pf


def test_truncated_json(qupath_fixtures: Path, tmp_path: Path) -> None:
    text = (qupath_fixtures / PAQUO2 / "project.qpproj").read_text(encoding="utf-8")
    pf = _write_project(tmp_path / "p", text[: len(text) // 2])
    with pytest.raises(ProjectError) as info:
        QuPathProject.load(pf)
    msg = str(info.value)
    assert msg.startswith(str(pf)) and "not valid JSON (truncated?)" in msg and "\n" not in msg


@pytest.mark.parametrize(("content", "fragment"), [
    ("[1, 2]", "top level is a list"),
    ('"text"', "top level is a string"),
    ("", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8"),
    ("{'single': 'quotes'}", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"images": ' + "[" * 150 + "]" * 150 + "}", "nested too deeply"),
])
def test_whole_file_problems(tmp_path: Path, content: str | bytes, fragment: str) -> None:
    pf = _write_project(tmp_path / "p", content)
    with pytest.raises(ProjectError) as info:
        QuPathProject.load(pf)
    assert fragment in str(info.value) and str(pf) in str(info.value)


def test_missing_and_directory_paths(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="file not found") as info:
        QuPathProject.load(tmp_path / "nope" / "project.qpproj")
    assert str(tmp_path / "nope" / "project.qpproj") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProjectError, match=r"no project\.qpproj in this folder"):
        QuPathProject.load(tmp_path / "empty")
    (tmp_path / "odd" / "project.qpproj").mkdir(parents=True)
    with pytest.raises(ProjectError, match="is a folder"):
        QuPathProject.load(tmp_path / "odd")
    with pytest.raises(ProjectError, match=r"no project\.qpproj in this folder"):
        QuPathProject.load(tmp_path / "empty", backup=True)
    _write_project(tmp_path / "nobackup", json.dumps(_project_json("file:/x/project.qpproj", [])))
    with pytest.raises(ProjectError, match="file not found") as info:
        QuPathProject.load(tmp_path / "nobackup", backup=True)
    assert str(info.value).startswith(str(tmp_path / "nobackup" / "project.qpproj.backup"))


def test_images_not_a_list(tmp_path: Path) -> None:
    data = _project_json("file:/x/project.qpproj", [])
    data["images"] = {"1": _entry_json(1, "file:/x/a.svs")}
    pf = _write_project(tmp_path / "p", json.dumps(data))
    before = pf.read_bytes()
    # QuPath cannot open it either; nothing can be read or saved from it.
    with pytest.raises(ProjectError, match="'images' is a object, not a list of entries") as info:
        QuPathProject.load(pf)
    assert info.value.path == pf and pf.read_bytes() == before


def test_malformed_entries_are_skipped_and_kept_on_save(tmp_path: Path) -> None:
    good = _entry_json(1, "file:/x/a.svs")
    no_id = _entry_json(5, "file:/x/b.svs")
    del no_id["entryID"]
    dup = _entry_json(1, "file:/x/c.svs")
    no_builder = {"entryID": 7, "imageName": "x"}
    weird = _entry_json(3, "file:/x/d.svs")
    weird["metadata"] = {"k": 1, "n": None}
    weird["tags"] = "nope"
    weird["imageName"] = 42
    images: list[Any] = [good, "a string", no_id, dup, no_builder, weird, None]
    data = _project_json("file:/x/project.qpproj", images)
    data["lastID"] = "junk"
    data["futureKey"] = {"kept": True}
    pf = _write_project(tmp_path / "p", json.dumps(data))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        p = QuPathProject.load(pf)
    msgs = [str(w.message) for w in record]
    assert all(issubclass(w.category, ProjectWarning) for w in record)
    for fragment in ("entry 1 is a string, not an object; skipped",
                     "entry 2 has no entryID; skipped",
                     "entry 3 repeats entryID 1 of entry 0; skipped",
                     "entry 4 has no serverBuilder object; skipped",
                     "entry 6 is a null, not an object; skipped",
                     "entry 5 (id 3) has no imageName; using 'd.svs'",
                     "entry 5 (id 3) tags is not a list",
                     "lastID 'junk' is not an integer"):
        assert any(fragment in m for m in msgs), fragment
    assert [e.entry_id for e in p] == [1, 3]
    assert p.entry(3).metadata == {"k": "1"}
    assert p.last_id == 3
    p.save()
    saved = json.loads(pf.read_text(encoding="utf-8"))
    assert saved["images"][1:5] == ["a string", no_id, dup, no_builder]
    assert saved["images"][6] is None
    assert saved["futureKey"] == {"kept": True}
    assert saved["lastID"] == 3


def test_corrupt_classes_json_does_not_stop_loading(qupath_fixtures: Path,
                                                    tmp_path: Path) -> None:
    pf = _copy_project(qupath_fixtures / PAQUO2, tmp_path / "p")
    (pf.parent / "classifiers" / "classes.json").write_text('{"pathClasses": [', "utf-8")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        p = QuPathProject.load(pf)
    assert any("classes not read" in str(w.message) and "truncated" in str(w.message)
               for w in record)
    assert p.classes == [] and len(p) == 5
    p.save()  # classes unchanged: the broken file is left for the user to look at
    assert (pf.parent / "classifiers" / "classes.json").read_text("utf-8") == '{"pathClasses": ['


def test_rotated_builder(tmp_path: Path) -> None:
    inner = _entry_json(1, "file:/x/a.svs")["serverBuilder"]
    inner["metadata"] = {"width": 100, "height": 50, "pixelCalibration": {
        "pixelWidth": {"value": 0.5, "unit": "µm"}, "pixelHeight": {"value": 0.25, "unit": "um"}}}
    entry = _entry_json(1, "file:/x/a.svs")
    entry["serverBuilder"] = {"builderType": "rotated", "rotation": "ROTATE_90", "builder": inner}
    unknown = _entry_json(2, "file:/x/b.svs")
    unknown["serverBuilder"] = {"builderType": "sparse", "regions": [1, 2]}
    pf = _write_project(tmp_path / "p", json.dumps(_project_json("file:/x/project.qpproj",
                                                                 [entry, unknown])))
    p = _quiet_load(pf)
    e = p.entry(1)
    assert e.server_builder.rotation == "ROTATE_90"
    assert e.uri == "file:/x/a.svs" and e.provider == OPENSLIDE
    assert e.dimensions == (50, 100) and e.mpp_xy == (0.25, 0.5)
    u = p.entry(2)
    assert u.server_builder.builder_type == "sparse" and u.uri is None and u.image_path is None
    assert u.server_builder.raw == {"builderType": "sparse", "regions": [1, 2]}
