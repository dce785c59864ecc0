"""The demo's example project and its recipe (the full demo runs in CI's install line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpseg.cli import main
from qpseg.demo import DEMO_TRAIN_CONFIG, build_example
from qpseg.qupath.geojson import read_geojson

ROOT = Path(__file__).resolve().parents[1]


def test_demo_recipe_matches_the_example_config_file() -> None:
    import yaml

    on_disk = yaml.safe_load((ROOT / "examples" / "configs" / "tiny_unet_demo.yaml").read_text())
    assert on_disk == DEMO_TRAIN_CONFIG


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory):
    return build_example(tmp_path_factory.mktemp("ex"), n_train=2, n_test=1, size_px=768)


def test_example_has_sparse_annotations_and_full_truth(example) -> None:
    assert example.train_ids == (1, 2) and example.test_ids == (3,)
    ann = example.folder / "qpseg" / "annotations"
    assert sorted(p.name for p in ann.glob("*.geojson")) == ["1.geojson", "2.geojson"]
    for eid in example.train_ids:
        objs = read_geojson(ann / f"{eid}.geojson")
        classes = {o.classification for o in objs}
        assert {"Region*", "Ignore*"} <= classes and classes & {"Tumor", "Stroma", "Necrosis"}
        truth = read_geojson(example.ground_truth / f"{eid}.geojson")
        labelled = sum(o.geometry.area for o in objs if o.classification in ("Tumor", "Stroma",
                                                                               "Necrosis"))
        full = sum(o.geometry.area for o in truth if o.classification != "Region*")
        assert 0 < labelled < full  # partial labels, as pathologists draw them
    assert (example.ground_truth / "3.geojson").is_file()


def test_example_is_reused_and_reloads_with_info(example, capsys) -> None:
    stamp = example.folder / "qpseg" / "example.json"
    before = stamp.stat().st_mtime_ns
    again = build_example(example.folder, n_train=2, n_test=1, size_px=768)
    assert again == example and stamp.stat().st_mtime_ns == before
    assert main(["info", str(example.project), "--json", "--open-slides"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["found"] for e in info["entries"]] == [True, True, True]
    assert {e["mpp"] for e in info["entries"]} == {0.5}


def test_import_of_example_uses_only_training_entries(example, tmp_path) -> None:
    from qpseg.manifest import import_project

    with pytest.warns(UserWarning, match="no annotation"):
        m = import_project(example.project, tmp_path)
    assert [e.status for e in m.entries] == ["ok", "ok", "no-annotations"]
    assert m.class_map.names[0] == "Background"
    assert set(m.class_map.names) == {"Background", "Tumor", "Stroma", "Necrosis"}
