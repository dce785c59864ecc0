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


# --- the demo's output folder: it never replaces what it did not make ---------------------------


class _WentAhead(Exception):
    """Raised by a stand-in for the demo's work: the demo got past its folder check."""


def _real_project(folder: Path) -> dict[Path, bytes]:
    """A user's project and model where the demo would put its own; returns path -> bytes."""
    files = {
        folder / "project" / "project.qpproj": b'{"version": "0.5.1", "images": [{"x": 1}]}',
        folder / "project" / "project.qpproj.backup": b'{"version": "0.5.1"}',
        folder / "project" / "classes.json": b'{"pathClasses": [{"name": "Mine"}]}',
        folder / "model" / "weights.safetensors": b"hours of training",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _stop_demo(monkeypatch: pytest.MonkeyPatch, calls: list[dict]) -> None:
    """Replace the demo's slow work with a recorder that stops it."""
    import qpseg.demo

    def fake_run_demo(out, **kwargs):
        calls.append({"out": Path(out), **kwargs})
        raise _WentAhead

    monkeypatch.setattr(qpseg.demo, "run_demo", fake_run_demo)


def test_demo_refuses_a_folder_with_a_real_project(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "work"
    files = _real_project(out)
    calls: list[dict] = []
    _stop_demo(monkeypatch, calls)
    assert main(["demo", "--out", str(out)]) == 8
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: ") and "--force" in err[0]
    assert calls == []
    assert {p: p.read_bytes() for p in files} == files
    assert sorted(p.name for p in out.iterdir()) == ["model", "project"]  # no marker either


def test_demo_library_refuses_too(tmp_path, monkeypatch) -> None:
    import qpseg.demo
    from qpseg.errors import OutputError

    out = tmp_path / "work"
    files = _real_project(out)

    def went_ahead(*args, **kwargs):
        raise _WentAhead

    monkeypatch.setattr(qpseg.demo, "build_example", went_ahead)
    with pytest.raises(OutputError, match="not made by `qpseg demo`") as info:
        qpseg.demo.run_demo(out, device="cpu")
    assert Path(info.value.path) == out
    assert {p: p.read_bytes() for p in files} == files


def test_demo_runs_in_new_empty_and_its_own_folders(tmp_path, monkeypatch) -> None:
    calls: list[dict] = []
    _stop_demo(monkeypatch, calls)
    new, empty = tmp_path / "new" / "deeper", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        with pytest.raises(_WentAhead):
            main(["demo", "--out", str(out)])
        assert (out / ".qpseg-demo").is_file()
    # A rerun into the demo's own folder (marker present, full of its outputs) goes ahead.
    (empty / "model").mkdir()
    (empty / "model" / "config.json").write_text("{}")
    with pytest.raises(_WentAhead):
        main(["demo", "--out", str(empty)])
    assert [c["out"] for c in calls] == [new, empty, empty]
    assert all(c["force"] is False for c in calls)


def test_demo_out_from_environment_as_ci_sets_it(tmp_path, monkeypatch) -> None:
    calls: list[dict] = []
    _stop_demo(monkeypatch, calls)
    for _ in range(2):  # CI's fresh temp dir, then a rerun into it
        monkeypatch.setenv("QPSEG_DEMO_OUT", str(tmp_path / "ci-demo"))
        with pytest.raises(_WentAhead):
            main(["demo"])
    assert [c["out"] for c in calls] == [tmp_path / "ci-demo"] * 2


def test_demo_recognises_a_folder_from_before_the_marker(tmp_path, monkeypatch) -> None:
    calls: list[dict] = []
    _stop_demo(monkeypatch, calls)
    stamp = tmp_path / "old" / "project" / "qpseg" / "example.json"
    stamp.parent.mkdir(parents=True)
    stamp.write_text('{"settings": {}}')
    with pytest.raises(_WentAhead):
        main(["demo", "--out", str(tmp_path / "old")])
    assert (tmp_path / "old" / ".qpseg-demo").is_file()


def test_demo_force_takes_over_a_folder(tmp_path, monkeypatch) -> None:
    calls: list[dict] = []
    _stop_demo(monkeypatch, calls)
    out = tmp_path / "work"
    _real_project(out)
    with pytest.raises(_WentAhead):
        main(["demo", "--out", str(out), "--force"])
    assert calls[0]["force"] is True and (out / ".qpseg-demo").is_file()


def test_demo_out_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    calls: list[dict] = []
    _stop_demo(monkeypatch, calls)
    out = tmp_path / "file"
    out.write_text("x")
    assert main(["demo", "--out", str(out)]) == 8
    assert capsys.readouterr().err.startswith(f"error: {out}: is not a folder")
    assert calls == [] and out.read_text() == "x"


def test_demo_last_lines_name_scripts_that_exist(tmp_path, monkeypatch, capsys) -> None:
    import re

    import qpseg.demo
    from qpseg.cli.groovy import packaged_script
    from qpseg.demo import DemoResult, Example

    out = tmp_path / "qpseg-demo"

    def fake_run_demo(out_arg, **kwargs):
        out_arg = Path(out_arg)
        ex = Example(out_arg / "project" / "project.qpproj", (1,), (2,), out_arg / "truth")
        return DemoResult(example=ex, out=out_arg, scores=[
            {"slide": "test_01", "entry_id": "2", "role": "held-out", "dice_Tumor": 0.9}],
            paths={"predictions": out_arg / "p", "evaluation": out_arg / "e",
                   "model": out_arg / "m"})

    monkeypatch.setattr(qpseg.demo, "run_demo", fake_run_demo)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QPSEG_DEMO_OUT", raising=False)
    assert main(["demo"]) == 0  # the default --out, a relative path
    monkeypatch.chdir(out)  # QuPath's file dialog does not start where qpseg ran
    text = capsys.readouterr().out
    named = re.findall(r"(\S+\.groovy)", text)
    assert named, text
    for name in named:
        path = Path(name)
        assert path.is_absolute() and path.is_file(), name
        assert path.read_bytes() == packaged_script(path.name)
