"""import-project on generated projects: manifest areas match the generator's ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import box

from qpseg.cli import main
from qpseg.errors import LabelError, ProjectError
from qpseg.labels import IGNORE_INDEX, rasterize_labels
from qpseg.manifest import import_project, read_manifest
from qpseg.qupath.geojson import QuPathObject, read_geojson, write_geojson
from qpseg.testing.projects import SyntheticProject, make_project


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SyntheticProject:
    return make_project(tmp_path_factory.mktemp("proj"), n_slides=2, width=900, height=700,
                        mpp=0.5, seed=3)


def test_manifest_areas_match_ground_truth(project: SyntheticProject, tmp_path: Path) -> None:
    manifest = import_project(project.path, tmp_path / "labels")
    assert (tmp_path / "labels" / "manifest.json").is_file()
    assert manifest.class_map.names == ["Background", "Tumor", "Stroma", "Necrosis"]
    assert [e.entry_id for e in manifest.entries] == list(project.entry_ids)
    for entry, slide in zip(manifest.entries, project.slides, strict=True):
        assert entry.status == "ok", entry.problem
        assert entry.mpp == pytest.approx(0.5)
        assert (entry.width, entry.height) == (900, 700)
        assert Path(entry.slide_path).resolve() == slide.path.resolve()
        truth = slide.class_areas_px()
        assert set(entry.classes) == set(truth)
        for name, area in truth.items():
            assert entry.classes[name].area_px == pytest.approx(area, rel=0.01)
            assert entry.classes[name].area_um2 == pytest.approx(area * 0.25, rel=0.01)
    again = read_manifest(tmp_path / "labels")
    assert again.to_json()["entries"] == manifest.to_json()["entries"]


def test_rasterised_labels_match_rendered_ground_truth(project: SyntheticProject,
                                                       tmp_path: Path) -> None:
    manifest = import_project(project.path)
    entry, slide = manifest.entries[0], project.slides[0]
    lab = rasterize_labels(manifest.annotations_for(entry), (0, 0, 900, 700), 0.5,
                           manifest.class_map, base_mpp=entry.mpp or 0.5)
    truth = slide.label_map()  # 0 = outside every region, i + 1 = class_names[i]
    for i, name in enumerate(slide.class_names):
        idx = manifest.class_map.index_of(name)
        agree = np.mean((lab == idx) == (truth == i + 1))
        assert agree > 0.995, name
    assert ((truth == 0) == (lab == IGNORE_INDEX)).mean() > 0.995


def test_cli_import_and_info(project: SyntheticProject, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import-project", str(project.path), "--out", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in data["classes"]] == ["Background", "Tumor", "Stroma", "Necrosis"]
    assert main(["info", str(project.folder), "--json", "--open-slides"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["found"] for e in info["entries"]] == [True, True]
    assert [e["mpp"] for e in info["entries"]] == [pytest.approx(0.5)] * 2


def test_classes_option_and_partial_annotations(tmp_path: Path) -> None:
    p = make_project(tmp_path / "p", n_slides=1, width=600, height=600, seed=5, annotations=False)
    objs = [
        QuPathObject(box(0, 0, 300, 300), classification="Region*"),
        QuPathObject(box(10, 10, 110, 110), classification="Tumor"),
        QuPathObject(box(200, 200, 260, 260), classification="Stroma"),
        QuPathObject(box(400, 400, 500, 500), classification="Tumor"),
        QuPathObject(box(420, 420, 440, 440), classification="Ignore*"),
        QuPathObject(box(0, 500, 50, 550), classification=None),
    ]
    write_geojson(p.folder / "qpseg" / "annotations" / f"{p.entry_ids[0]}.geojson", objs)
    m = import_project(p.path, classes=["Tumor"])
    assert m.class_map.names == ["Background", "Tumor"]
    e = m.entries[0]
    assert e.classes["Tumor"].area_px == pytest.approx(100 * 100 + 100 * 100 - 20 * 20)
    # Stroma is not a label class here: inside the Region it is background.
    assert e.classes["Background"].area_px == pytest.approx(300 * 300 - 100 * 100)
    assert (e.n_region, e.n_ignore, e.n_unclassified) == (1, 1, 1)


def test_annotations_by_image_name_in_geojson_dir(project: SyntheticProject,
                                                  tmp_path: Path) -> None:
    src = project.annotation_files[0]
    (tmp_path / "slide_00.tif.geojson").write_bytes(src.read_bytes())
    m = import_project(project.path, geojson_dir=tmp_path)
    assert [e.status for e in m.entries] == ["ok", "no-annotations"]
    assert len(read_geojson(m.entries[0].annotation_file)) == len(project.slides[0].regions)


def test_missing_slide_and_bad_geojson_fail_per_entry(tmp_path: Path) -> None:
    p = make_project(tmp_path / "p", n_slides=3, width=400, height=400, seed=1)
    p.slides[1].path.unlink()
    p.annotation_files[2].write_text("{truncated", encoding="utf-8")
    with pytest.warns(UserWarning):
        m = import_project(p.path)
    assert [e.status for e in m.entries] == ["ok", "failed", "failed"]
    assert "image not found" in (m.entries[1].problem or "")
    assert str(p.annotation_files[2]) in (m.entries[2].problem or "")


def test_missing_mpp_needs_override(tmp_path: Path) -> None:
    from PIL import Image

    from qpseg.qupath.images import add_slide
    from qpseg.qupath.project import QuPathProject

    folder = tmp_path / "p"
    qp = QuPathProject.create(folder)
    img = folder / "plain.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(img)
    entry = add_slide(qp, img)
    qp.save()
    write_geojson(folder / "qpseg" / "annotations" / f"{entry.entry_id}.geojson",
                  [QuPathObject(box(0, 0, 10, 10), classification="Tumor")])
    with pytest.raises(LabelError, match="pixel size"):
        import_project(qp.path)
    m = import_project(qp.path, mpp=0.25)
    assert m.entries[0].status == "ok" and m.entries[0].mpp == 0.25


def test_no_labels_at_all_is_an_error(tmp_path: Path) -> None:
    p = make_project(tmp_path / "p", n_slides=1, width=300, height=300, annotations=False)
    with pytest.raises(LabelError, match="no annotation export found"):
        import_project(p.path)
    with pytest.raises(ProjectError):
        import_project(p.path, geojson_dir=tmp_path / "nope")


def test_unreadable_slide_fails_its_entry_only(tmp_path: Path, image_fixtures: Path) -> None:
    import shutil

    from qpseg.qupath.images import add_slide

    p = make_project(tmp_path / "p", n_slides=1, width=300, height=300, seed=2)
    bad = p.folder / "slides" / "unreadable.svs"
    shutil.copy(image_fixtures / "openslide" / "unreadable.svs", bad)
    from qpseg.qupath.project import QuPathProject

    qp = QuPathProject.load(p.path)
    entry = add_slide(qp, bad)  # metadata is readable; pixel data is corrupt
    qp.save()
    write_geojson(p.folder / "qpseg" / "annotations" / f"{entry.entry_id}.geojson",
                  [QuPathObject(box(0, 0, 8, 8), classification="Tumor")])
    with pytest.warns(UserWarning, match="unreadable.svs"):
        m = import_project(p.path)
    assert [e.status for e in m.entries] == ["ok", "failed"]
    problem = m.entries[1].problem or ""
    assert "unreadable.svs" in problem and "\n" not in problem
