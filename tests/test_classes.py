"""classes.json reading/writing and QuPath's class colours (known answers from real files)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from qpseg.errors import ProjectError, ProjectWarning
from qpseg.qupath.classes import (
    DEFAULT_CLASSES,
    PathClass,
    _java_string_hash,
    argb_to_rgb,
    default_classes,
    default_color,
    read_classes,
    rgb_to_argb,
    write_classes,
)

# fixture folder -> (number of classes, number whose colour is QuPath's default for the name)
CLASS_FILES = {
    "BIOP__ijp-imagetoatlas__mouse-project-v0.5.0-backup-v0.5.1": (97, 94),
    "BIOP__ijp-imagetoatlas__omero-https-u003d-v0.5.1-backup-v0.6.0rc3": (9, 9),
    "BIOP__ijp-imagetoatlas__quicknii-rat-v0.4.4-jpg-bioformats": (14, 10),
    "josenimo__06_QuPath_Annotation_to_AnnData__v0.4.1-imagej-pct-encoded-geojson": (3, 3),
    "sbalci__metadata-qupath__v0.6.0rc3-windows-nonascii-pct-dup-entries": (13, 13),
    "stighellemans__HepatocyteVacuoleDetection__classes-json-only": (6, 2),
    "uw-loci__PaQuO_test__qppaquo-v0.5.0rc2-pyramidize-backup-v0.4.3": (9, 8),
    "uw-loci__PaQuO_test__qppaquo2-v0.5.0rc2-bioformats-ome-tif": (9, 9),
}

SBALCI = "sbalci__metadata-qupath__v0.6.0rc3-windows-nonascii-pct-dup-entries"


def _classes_json(root: Path, folder: str) -> Path:
    return root / folder / "classifiers" / "classes.json"


def test_every_fixture_classes_json_is_pinned(qupath_fixtures: Path) -> None:
    found = {p.parents[1].name for p in qupath_fixtures.glob("*/classifiers/classes.json")}
    assert found == set(CLASS_FILES)


@pytest.mark.parametrize("folder", sorted(CLASS_FILES))
def test_fixture_round_trip_preserves_names_and_argb(qupath_fixtures: Path, tmp_path: Path,
                                                     folder: str) -> None:
    src = _classes_json(qupath_fixtures, folder)
    original = json.loads(src.read_text(encoding="utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real files read without any warning
        classes = read_classes(src)
    n, n_default = CLASS_FILES[folder]
    assert len(classes) == n
    assert [c.name for c in classes] == [c["name"] for c in original["pathClasses"]]
    assert [c.argb for c in classes] == [c["color"] for c in original["pathClasses"]]
    # QuPath colours a class it creates by java.util.Random(name.hashCode()).
    assert sum(default_color(c.name) == c.color for c in classes) == n_default

    out = tmp_path / "classes.json"
    write_classes(out, classes)
    assert json.loads(out.read_text(encoding="utf-8")) == original
    assert read_classes(out) == classes


def test_default_classes_equal_qupath_new_project_file(qupath_fixtures: Path) -> None:
    # A new QuPath project's classes.json (first 9 entries of sbalci's).
    fixture = json.loads(_classes_json(qupath_fixtures, SBALCI).read_text(encoding="utf-8"))
    expected = fixture["pathClasses"][:9]
    assert [{"name": c.name, "color": c.argb} for c in default_classes()] == expected
    assert list(DEFAULT_CLASSES) == default_classes()


@pytest.mark.parametrize(("argb", "rgb"), [
    (-65536, (255, 0, 0)),
    (-16711936, (0, 255, 0)),
    (-16776961, (0, 0, 255)),
    (-1, (255, 255, 255)),
    (-16777216, (0, 0, 0)),
    (-3670016, (200, 0, 0)),       # Tumor
    (-377282, (250, 62, 62)),      # Positive
    (-9408287, (112, 112, 225)),   # Negative
])
def test_argb_rgb_known_values(argb: int, rgb: tuple[int, int, int]) -> None:
    assert argb_to_rgb(argb) == rgb
    assert rgb_to_argb(rgb) == argb


def test_argb_unsigned_and_alpha() -> None:
    assert argb_to_rgb(0xFFFF0000) == (255, 0, 0)
    assert rgb_to_argb((255, 0, 0), alpha=0) == 16711680
    assert rgb_to_argb([0, 0, 0], alpha=0) == 0
    c = PathClass.from_argb("x", 0x00FF0000)
    assert (c.color, c.alpha, c.argb) == ((255, 0, 0), 0, 16711680)
    with pytest.raises(ValueError):
        rgb_to_argb((256, 0, 0))
    with pytest.raises(ValueError):
        rgb_to_argb((1, 2))
    with pytest.raises(ValueError):
        argb_to_rgb(True)
    with pytest.raises(ValueError):
        PathClass("", (0, 0, 0))
    with pytest.raises(ValueError):
        PathClass("a", (0, 0, -1))


def test_default_color_standard_and_hashed() -> None:
    assert default_color("Tumor") == (200, 0, 0)
    assert default_color("Immune cells") == (160, 90, 160)
    assert default_color("Region*") == (0, 0, 180)
    assert default_color("Ignore*") == (180, 180, 180)
    # Custom classes QuPath 0.6 coloured itself (sbalci fixture).
    assert default_color("muscle") == (178, 153, 220)
    assert default_color("fat") == (211, 49, 153)
    assert default_color("Tissue") == (83, 47, 31)
    assert default_color("Steatosis") == (96, 235, 27)
    assert default_color("  muscle ") == (178, 153, 220)  # QuPath strips names
    assert _java_string_hash("hello") == 99162322  # Java's "hello".hashCode()
    assert _java_string_hash("") == 0


def test_default_color_derived_classes() -> None:
    # PathClassFactory.getDerivedPathClass: Tumor children have fixed colours, others scale.
    assert default_color("Tumor: Positive") == (200, 50, 50)
    assert default_color("Tumor: Negative") == (90, 90, 180)
    assert default_color("Stroma: Positive") == (112, 150, 112)   # x0.75, truncated
    assert default_color("Stroma: Negative") == (187, 250, 187)   # x1.25
    assert default_color("Stroma: Other thing") == (225, 255, 225)  # x1.5, clipped
    assert default_color("1+") == (255, 255, 0)


def test_read_classes_accepts_project_folder(qupath_fixtures: Path) -> None:
    classes = read_classes(qupath_fixtures / SBALCI)
    assert [c.name for c in classes][-4:] == ["muscle", "fat", "Tissue", "Steatosis"]
    assert read_classes(qupath_fixtures / SBALCI / "project.qpproj") == classes


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("text", "fragment"), [
    ('{"pathClasses": [', "not valid JSON (truncated?)"),
    ("[]", "top level is a list"),
    ('{"classes": []}', "no 'pathClasses' list"),
    ('{"pathClasses": {}}', "'pathClasses' is a object"),
    ("", "empty"),
])
def test_read_classes_whole_file_errors(tmp_path: Path, text: str, fragment: str) -> None:
    p = _write(tmp_path / "classes.json", text)
    with pytest.raises(ProjectError) as info:
        read_classes(p)
    assert fragment in str(info.value)
    assert str(p) in str(info.value)
    assert "\n" not in str(info.value)


def test_read_classes_missing_and_binary(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="file not found"):
        read_classes(tmp_path / "nope.json")
    bad = tmp_path / "bin.json"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ProjectError, match="not UTF-8"):
        read_classes(bad)


def test_read_classes_item_problems(tmp_path: Path) -> None:
    p = _write(tmp_path / "classes.json", json.dumps({"pathClasses": [
        {"name": "A", "color": -65536},
        "oops",
        {"color": 5},
        {"name": "B"},                     # no colour: QuPath's default
        {"name": "C", "color": "red"},     # bad colour: default + warning
        {"name": "A", "color": 1},         # duplicate
        {"name": "D", "color": -16711936.0},
    ]}))
    with pytest.warns(ProjectWarning) as record:
        classes = read_classes(p)
    messages = [str(w.message) for w in record]
    assert any("class 1 is a string" in m for m in messages)
    assert any("class 2 has no name" in m for m in messages)
    assert any("class 4 'C' has an invalid colour" in m for m in messages)
    assert any("class 5 'A' is listed twice" in m for m in messages)
    assert [c.name for c in classes] == ["A", "B", "C", "D"]
    assert classes[1].color == default_color("B")
    assert classes[2].color == default_color("C")
    assert classes[3].color == (0, 255, 0)


def test_write_classes_rejects_duplicates(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="listed twice"):
        write_classes(tmp_path / "c.json", [PathClass("A", (1, 2, 3)), PathClass("A", (1, 2, 3))])
    write_classes(tmp_path, [PathClass("Ş", (1, 2, 3))])  # a folder: classifiers/classes.json
    text = (tmp_path / "classifiers" / "classes.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"pathClasses": [{"name": "Ş", "color": rgb_to_argb((1, 2, 3))}]}
