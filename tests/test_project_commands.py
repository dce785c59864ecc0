"""``qpseg project create|add|relink`` and the server builders they write.

The .qpproj structure is checked against what QuPath itself writes and accepts (qupath/qupath
tags v0.5.1 and v0.6.0): ``DefaultProject.writeProject`` (qupath-core
qupath/lib/projects/DefaultProject.java, v0.5.1 lines 992-1007), ``DefaultImageServerBuilder``
(ImageServerBuilder.java v0.5.1 lines 283-314), Bio-Formats builders with ``--series`` args
(BioFormatsImageServer.java v0.5.1 lines 396-398) and the metadata Bio-Formats reports
(same file, lines 503-658), which QuPath requires stored metadata to match in pixel type and
channel count (ImageServerMetadata.isCompatibleMetadata, v0.5.1 lines 796-814).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpseg.cli import main
from qpseg.errors import MissingImageWarning
from qpseg.qupath.bioformats import bioformats_layout
from qpseg.qupath.project import QuPathProject

BF = "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder"
OS = "qupath.lib.images.servers.openslide.OpenslideServerBuilder"
RGB_CHANNELS = [{"name": "Red", "color": -65536}, {"name": "Green", "color": -16711936},
                {"name": "Blue", "color": -16776961}]
QUICKNII = "BIOP__ijp-imagetoatlas__quicknii-rat-v0.4.4-jpg-bioformats"
PAQUO = "uw-loci__PaQuO_test__qppaquo-v0.5.0rc2-pyramidize-backup-v0.4.3"
PAQUO2 = "uw-loci__PaQuO_test__qppaquo2-v0.5.0rc2-bioformats-ome-tif"
NEDA = "nedaghohabi__Histopathology-Image-Tiling__v0.3.2-windows-drives-434-entries"
JOSENIMO = "josenimo__06_QuPath_Annotation_to_AnnData__v0.4.1-imagej-pct-encoded-geojson"
OMERO = "BIOP__ijp-imagetoatlas__omero-https-u003d-v0.5.1-backup-v0.6.0rc3"


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["project", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _copy_project(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copyfile(src / "project.qpproj", dst / "project.qpproj")
    return dst / "project.qpproj"


def _one_line_error(err: str, path: Path) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and str(path) in lines[0], err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# create
# --------------------------------------------------------------------------------------------


def test_create_uses_openslide_or_bioformats_with_the_real_pixel_layout(
        tmp_path: Path, image_fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svs = image_fixtures / "openslide" / "small.svs"
    grey16 = image_fixtures / "stardist" / "img2d.tif"  # 512x512 uint16, one channel
    jpg = image_fixtures / "stardist" / "histo.jpg"  # 500x300 RGB
    palette = image_fixtures / "openslide" / "boxes.png"  # palette PNG
    bogus = image_fixtures / "openslide" / "boxes.tiff"  # OpenSlide, 352.8 µm/px from 72 dpi
    folder = tmp_path / "new"
    rc, out, err = _run(["create", str(folder), str(svs), str(grey16), str(jpg), str(palette),
                         str(bogus)], capsys)
    assert rc == 0, err
    images = _json(folder / "project.qpproj")["images"]
    assert [(e["entryID"], e["imageName"]) for e in images] == [
        (1, "small.svs"), (2, "img2d.tif"), (3, "histo.jpg"), (4, "boxes.png"),
        (5, "boxes.tiff")]
    b = [e["serverBuilder"] for e in images]
    assert all(x["builderType"] == "uri" for x in b)
    assert [x["providerClassName"] for x in b] == [OS, BF, BF, BF, OS]
    assert [x["args"] for x in b] == [[], ["--series", "0"], ["--series", "0"],
                                      ["--series", "0"], []]
    assert b[1]["uri"] == "file:" + str(grey16)
    # OpenSlide: RGB, calibrated from aperio.MPP
    m = b[0]["metadata"]
    assert (m["width"], m["height"], m["isRGB"], m["pixelType"]) == (16, 16, True, "UINT8")
    assert m["pixelCalibration"]["pixelWidth"] == {"value": 0.499, "unit": "µm"}
    # 16-bit grey: what Bio-Formats reports (not ImageJ's hard-coded RGB that QuPath refuses)
    m = b[1]["metadata"]
    assert (m["isRGB"], m["pixelType"], m["channels"]) == (
        False, "UINT16", [{"name": "Channel 1", "color": -1}])
    assert (m["width"], m["height"], m["sizeZ"], m["sizeT"]) == (512, 512, 1, 1)
    assert m["pixelCalibration"]["pixelWidth"] == {"value": 1.0, "unit": "px"}
    m = b[2]["metadata"]
    assert (m["width"], m["height"], m["isRGB"], m["pixelType"], m["channels"]) == (
        500, 300, True, "UINT8", RGB_CHANNELS)
    assert (m["preferredTileWidth"], m["preferredTileHeight"]) == (500, 300)
    assert "metadata" not in b[3]  # a palette PNG: QuPath reads its layout itself
    m = b[4]["metadata"]  # the implausible 352.8 µm/px is not written
    assert m["pixelCalibration"]["pixelWidth"] == {"value": 1.0, "unit": "px"}
    assert "added: entry 1: " + str(svs) + " (OpenSlide, 0.499 µm/px)" in out
    assert "added: entry 2: " + str(grey16) + " (Bio-Formats, no pixel size)" in out
    assert f"created: {folder / 'project.qpproj'} (5 image(s))" in out
    warned = err.splitlines()
    assert any(str(grey16) in w and "added without calibration" in w
               and "records none" in w for w in warned)
    assert any(str(bogus) in w and "352.7" in w and "added without calibration" in w
               for w in warned)
    assert any(str(palette) in w and "without image metadata" in w for w in warned)
    assert not any(str(svs) in w for w in warned)
    # qpseg reads back what it wrote
    qp = QuPathProject.load(folder)
    assert [e.mpp for e in qp.entries] == [0.499, None, None, None, None]
    assert [e.dimensions for e in qp.entries] == [(16, 16), (512, 512), (500, 300), None,
                                                  (300, 250)]
    assert all(e.image_found for e in qp.entries)
    assert len({e.randomized_name for e in qp.entries}) == 5


def test_add_slide_library_path_gives_bioformats_for_16bit_grey(
        tmp_path: Path, image_fixtures: Path) -> None:
    from qpseg.qupath.images import add_slide

    qp = QuPathProject.create(tmp_path / "p")
    entry = add_slide(qp, image_fixtures / "stardist" / "img2d.tif")
    builder = entry.to_json()["serverBuilder"]
    assert builder["providerClassName"] == BF
    assert builder["metadata"]["pixelType"] == "UINT16"
    assert builder["metadata"]["isRGB"] is False


def test_create_refuses_a_non_empty_folder_and_an_existing_project(
        tmp_path: Path, image_fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svs = str(image_fixtures / "openslide" / "small.svs")
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine", encoding="utf-8")
    rc, _, err = _run(["create", str(folder), svs], capsys)
    assert rc == 8
    _one_line_error(err, folder)
    assert "not empty" in err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    # hidden files do not count (QuPath: Commands.java v0.5.1 lines 1351-1355)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".DS_Store").write_bytes(b"x")
    assert _run(["create", str(hidden), svs], capsys)[0] == 0
    rc, _, err = _run(["create", str(hidden), svs], capsys)
    assert rc == 3
    _one_line_error(err, hidden / "project.qpproj")


def test_create_with_an_unreadable_slide_creates_nothing(
        tmp_path: Path, image_fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = image_fixtures / "openslide" / "unopenable.tiff"
    folder = tmp_path / "p"
    rc, _, err = _run(["create", str(folder), str(image_fixtures / "openslide" / "small.svs"),
                       str(bad)], capsys)
    assert rc == 5
    _one_line_error(err, bad)
    assert not folder.exists()


# --------------------------------------------------------------------------------------------
# add
# --------------------------------------------------------------------------------------------


def test_add_to_a_real_project_keeps_every_existing_entry_and_skips_duplicates(
        tmp_path: Path, qupath_fixtures: Path, image_fixtures: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    pf = _copy_project(qupath_fixtures / PAQUO2, tmp_path / "p")
    original = _json(pf)
    svs = image_fixtures / "openslide" / "small.svs"
    emoji = image_fixtures / "openslide" / "😐.svs"  # same bytes, another file
    rc, out, err = _run(["add", str(pf), str(svs), str(svs), str(emoji)], capsys)
    assert rc == 0, err
    saved = _json(pf)
    assert saved["images"][:5] == original["images"]
    assert saved["lastID"] == 7
    new = saved["images"][5:]
    assert [(e["entryID"], e["imageName"]) for e in new] == [(6, "small.svs"), (7, "😐.svs")]
    assert new[1]["serverBuilder"]["uri"].endswith("/%F0%9F%98%90.svs")
    assert f"skipped: {svs}: given more than once" in out
    assert _json(pf.with_name("project.qpproj.backup")) == original
    # adding again: everything is already there, nothing is written
    before = pf.read_bytes()
    rc, out, _ = _run(["add", str(pf), str(svs), str(emoji)], capsys)
    assert rc == 0
    assert f"skipped: {svs}: already in the project as entry 6 (small.svs)" in out
    assert "0 image(s) added, nothing written" in out
    assert pf.read_bytes() == before


def test_add_recognises_the_same_file_under_another_uri_form(
        tmp_path: Path, image_fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svs = image_fixtures / "openslide" / "small.svs"
    assert _run(["create", str(tmp_path / "p"), str(svs)], capsys)[0] == 0
    pf = tmp_path / "p" / "project.qpproj"
    data = _json(pf)
    data["images"][0]["serverBuilder"]["uri"] = "file://" + str(svs)  # file:///abs form
    pf.write_text(json.dumps(data), encoding="utf-8")
    rc, out, _ = _run(["add", str(pf), str(svs)], capsys)
    assert rc == 0 and "already in the project as entry 1" in out
    assert len(_json(pf)["images"]) == 1


def test_add_with_an_unreadable_slide_leaves_the_project_unchanged(
        tmp_path: Path, qupath_fixtures: Path, image_fixtures: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    pf = _copy_project(qupath_fixtures / PAQUO2, tmp_path / "p")
    before = pf.read_bytes()
    bad = image_fixtures / "openslide" / "unopenable.tiff"
    rc, _, err = _run(["add", str(pf), str(image_fixtures / "openslide" / "small.svs"),
                       str(bad)], capsys)
    assert rc == 5
    _one_line_error(err, bad)
    assert pf.read_bytes() == before
    assert not pf.with_name("project.qpproj.backup").exists()
    rc, _, err = _run(["add", str(tmp_path / "nope"), str(bad)], capsys)
    assert rc == 3
    _one_line_error(err, tmp_path / "nope")


# --------------------------------------------------------------------------------------------
# Bio-Formats layout
# --------------------------------------------------------------------------------------------


def test_bioformats_layout_known_and_unknown_files(tmp_path: Path) -> None:
    import tifffile
    from PIL import Image

    def png(name: str, im: Image.Image) -> Path:
        p = tmp_path / name
        im.save(p)
        return p

    rgba = png("rgba.png", Image.new("RGBA", (40, 30)))
    grey = png("grey.png", Image.new("L", (40, 30)))
    la = png("la.png", Image.new("LA", (40, 30)))
    pal = png("pal.png", Image.new("P", (40, 30)))
    assert bioformats_layout(rgba, 40, 30) == bioformats_layout(grey, 40, 30).__class__(
        "UINT8", None, (40, 30))  # QuPath drops alpha from RGB
    layout = bioformats_layout(grey, 40, 30)
    assert layout is not None and (layout.pixel_type, layout.channels) == (
        "UINT8", [("Channel 1", -1)])
    assert bioformats_layout(la, 40, 30) is None
    assert bioformats_layout(pal, 40, 30) is None
    assert bioformats_layout(grey, 41, 30) is None  # not the image that was opened

    f32 = tmp_path / "f32.tif"
    tifffile.imwrite(f32, np.zeros((600, 700), np.float32), tile=(16, 16))
    layout = bioformats_layout(f32, 700, 600)
    # 16-px tiles become 32 (getDefaultTileLength, BioFormatsImageServer.java v0.5.1 l. 827)
    assert layout is not None and (layout.pixel_type, layout.tile) == ("FLOAT32", (32, 32))
    big = tmp_path / "big.tif"
    tifffile.imwrite(big, np.zeros((600, 700, 3), np.uint8), photometric="rgb")
    assert bioformats_layout(big, 700, 600) == layout.__class__("UINT8", None, (512, 512))
    stack = tmp_path / "stack.tif"
    with tifffile.TiffWriter(stack) as tw:
        for _ in range(3):
            tw.write(np.zeros((20, 20), np.uint16), photometric="minisblack")
    assert bioformats_layout(stack, 20, 20) is None  # pages may be z, c or t to Bio-Formats
    rgb16 = tmp_path / "rgb16.tif"
    tifffile.imwrite(rgb16, np.zeros((20, 20, 3), np.uint16), photometric="rgb")
    assert bioformats_layout(rgb16, 20, 20) is None
    assert bioformats_layout(tmp_path / "missing.png", 1, 1) is None


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.sampled_from([b"II*\x00", b"MM\x00*", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff",
                             b""]),
       body=st.binary(max_size=300))
def test_bioformats_layout_never_raises(tmp_path: Path, head: bytes, body: bytes) -> None:
    p = tmp_path / "fuzz.img"
    p.write_bytes(head + body)
    result = bioformats_layout(p, 1, 1)
    assert result is None or result.pixel_type in ("UINT8", "UINT16", "FLOAT32")


# --------------------------------------------------------------------------------------------
# relink
# --------------------------------------------------------------------------------------------


def _jpeg(path: Path, size: tuple[int, int]) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 120, 160)).save(path, quality=50)
    return path


def _by_id(out: str) -> dict[int, str]:
    rows = {}
    for line in out.splitlines():
        if ": entry " in line:
            status, rest = line.split(": entry ", 1)
            rows[int(rest.split()[0])] = status
    return rows


def test_relink_real_windows_project_by_name_and_recorded_size(
        tmp_path: Path, qupath_fixtures: Path, image_fixtures: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    pf = _copy_project(qupath_fixtures / QUICKNII, tmp_path / "qp")
    original = _json(pf)
    s = tmp_path / "search"
    right = _jpeg(s / "a" / "ratslices0000.jpg", (606, 526))  # the size the project records
    _jpeg(s / "b" / "ratslices0000.jpg", (100, 100))  # same name, other image
    _jpeg(s / "c" / "ratslices0001.jpg", (606, 526))
    _jpeg(s / "d" / "ratslices0001.jpg", (606, 526))  # two that fit: ambiguous
    (s / "e").mkdir()
    shutil.copyfile(image_fixtures / "stardist" / "histo.jpg", s / "e" / "ratslices0002.jpg")
    _jpeg(s / ".hidden" / "ratslices0003.jpg", (606, 526))  # QuPath skips hidden folders
    upper = _jpeg(s / "RATSLICES0004.JPG", (606, 526))  # Windows names ignore case
    rc, out, err = _run(["relink", str(pf), "--search", str(s)], capsys)
    assert rc == 1, err
    rows = _by_id(out)
    assert len(rows) == 21
    assert (rows[1], rows[2], rows[3], rows[4], rows[5]) == (
        "relinked", "ambiguous", "wrong size", "not found", "relinked")
    assert all(rows[i] == "not found" for i in range(6, 22))
    assert f"relinked: entry 1 ratslices0000.jpg -> {right}" in out
    assert "the project records 606x526" in out and "500x300" in out
    assert "2 relinked, 17 not found, 1 ambiguous, 1 wrong size (written;" in out
    saved = _json(pf)
    for i, (old, new) in enumerate(zip(original["images"], saved["images"], strict=True)):
        ob, nb = old["serverBuilder"], new["serverBuilder"]
        if i in (0, 4):
            assert nb["uri"] == "file:" + str(right if i == 0 else upper)
            assert {k: v for k, v in nb.items() if k != "uri"} == \
                {k: v for k, v in ob.items() if k != "uri"}  # reader, args, metadata kept
            assert {k: v for k, v in new.items() if k != "serverBuilder"} == \
                {k: v for k, v in old.items() if k != "serverBuilder"}
        else:
            assert new == old
    assert _json(pf.with_name("project.qpproj.backup")) == original
    with pytest.warns(MissingImageWarning, match="19 of 21 images not found"):
        qp = QuPathProject.load(pf)
    assert qp.entry(1).image_path == right and qp.entry(5).image_path == upper


def test_relink_pyramidize_and_builders_without_metadata(
        tmp_path: Path, qupath_fixtures: Path, image_fixtures: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import tifffile

    pf = _copy_project(qupath_fixtures / PAQUO, tmp_path / "qp")
    original = _json(pf)
    s = tmp_path / "search"
    s.mkdir()
    ndpi = s / "OS-2.ndpi"  # no metadata in the project: matched by name, as QuPath does
    shutil.copyfile(image_fixtures / "openslide" / "small.svs", ndpi)
    tif = s / "x" / "Copy of 88_region_2_original.tif"
    tif.parent.mkdir()
    tifffile.imwrite(tif, np.zeros((5055, 4036, 3), np.uint8), photometric="rgb",
                     tile=(512, 512), compression="zlib")
    rc, out, _ = _run(["relink", str(pf), "--search", str(s)], capsys)
    assert rc == 1
    assert _by_id(out) == {1: "relinked", 2: "not found", 3: "relinked"}
    assert "matched by name only" in out
    saved = _json(pf)["images"]
    assert saved[0]["serverBuilder"] == {**original["images"][0]["serverBuilder"],
                                         "uri": "file:" + str(ndpi)}
    outer, old_outer = saved[2]["serverBuilder"], original["images"][2]["serverBuilder"]
    assert outer["builderType"] == "pyramidize"
    assert {k: v for k, v in outer.items() if k != "builder"} == \
        {k: v for k, v in old_outer.items() if k != "builder"}
    assert outer["builder"] == {**old_outer["builder"],
                                "uri": "file:" + str(tif).replace(" ", "%20")}
    assert saved[1] == original["images"][1]


def test_relink_moved_project_rule_remote_and_nothing_found(
        tmp_path: Path, qupath_fixtures: Path, image_fixtures: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # josenimo: the image sits where QuPath's moved-project rule looks for it
    pf = _copy_project(qupath_fixtures / JOSENIMO, tmp_path / "data" / "Test_QuPath_Project")
    img = tmp_path / "data" / "registration" / "Exemplar001_subset.tif"
    img.parent.mkdir()
    shutil.copyfile(image_fixtures / "stardist" / "img2d.tif", img)
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, _ = _run(["relink", str(pf), "--search", str(empty)], capsys)
    assert rc == 0 and _by_id(out) == {1: "moved"}
    assert _json(pf)["images"][0]["serverBuilder"]["uri"] == "file:" + str(img)
    # OMERO images are not files: nothing to do, nothing written
    pf = _copy_project(qupath_fixtures / OMERO, tmp_path / "omero")
    before = pf.read_bytes()
    rc, out, _ = _run(["relink", str(pf), "--search", str(empty)], capsys)
    assert rc == 0 and set(_by_id(out).values()) == {"remote"}
    assert "25 remote (nothing to write)" in out and pf.read_bytes() == before
    # 434 Windows entries, none here: reported, file untouched
    pf = _copy_project(qupath_fixtures / NEDA, tmp_path / "neda")
    before = pf.read_bytes()
    rc, out, err = _run(["relink", str(pf), "--search", str(empty)], capsys)
    assert rc == 1 and "434 not found (nothing to write)" in out
    assert "warning" not in err  # the load-time missing-image warning is not repeated
    assert pf.read_bytes() == before


def test_relink_dry_run_json_and_bad_search(
        tmp_path: Path, qupath_fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pf = _copy_project(qupath_fixtures / QUICKNII, tmp_path / "qp")
    before = pf.read_bytes()
    s = tmp_path / "s"
    found = _jpeg(s / "ratslices0007.jpg", (606, 526))
    rc, out, _ = _run(["relink", str(pf), "--search", str(s), "--dry-run", "--json"], capsys)
    assert rc == 1
    report = json.loads(out)
    assert report["written"] is False and report["missing"] == 20
    row = next(r for r in report["entries"] if r["id"] == 8)
    assert (row["status"], row["path"]) == ("relinked", str(found))
    assert pf.read_bytes() == before
    rc, _, err = _run(["relink", str(pf), "--search", str(tmp_path / "nope")], capsys)
    assert rc == 2
    _one_line_error(err, tmp_path / "nope")
