"""Long steps report progress: the library calls ``progress(done, total, item)``; the CLI shows
a Rich bar on stderr only when stderr is a terminal, and --json stays one document.
Polygonising reports each map block; commands that load torch say so before they do."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shapely.affinity import translate

from qpseg.cli import _progress
from qpseg.edits import evaluate_edits
from qpseg.evaluate import evaluate
from qpseg.labels import ClassMap
from qpseg.manifest import import_project
from qpseg.objects import MapGeometry, polygonise, polygonise_instances
from qpseg.qupath.geojson import QuPathObject, read_geojson, write_geojson
from qpseg.testing.projects import SyntheticProject, make_project
from qpseg.testing.synthetic import make_slide


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> SyntheticProject:
    p = make_project(tmp_path_factory.mktemp("proj"), n_slides=2, width=600, height=500,
                     mpp=0.5, seed=5)
    pred_dir = p.folder / "qpseg" / "predictions"
    pred_dir.mkdir()
    for f in (p.folder / "qpseg" / "annotations").glob("*.geojson"):
        write_geojson(pred_dir / f.name, [
            QuPathObject(translate(o.geometry, 10, 0), classification=o.classification,
                         metadata={"qpseg_model": "m", "qpseg_model_sha256": "0" * 64})
            for o in read_geojson(f)])
    return p


class Calls:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, str]] = []

    def __call__(self, done: int, total: int, item: str) -> None:
        self.calls.append((done, total, item))


def test_evaluate_reports_each_slide(project: SyntheticProject, tmp_path: Path) -> None:
    calls = Calls()
    evaluate(project.path, project.path, tmp_path / "o", report=False, n_bootstrap=0,
             progress=calls)
    names = [s.path.name for s in project.slides]
    assert calls.calls == [(0, 2, ""), (1, 2, names[0]), (2, 2, names[1])]


def test_import_project_reports_each_entry(project: SyntheticProject, tmp_path: Path) -> None:
    calls = Calls()
    import_project(project.path, tmp_path / "o", use_paquo=False, ai_objects="all-out",
                   progress=calls)
    names = [s.path.name for s in project.slides]
    assert calls.calls == [(1, 4, names[0]), (2, 4, names[1]), (3, 4, names[0]),
                           (4, 4, names[1])]


def test_evaluate_edits_reports_each_entry(project: SyntheticProject, tmp_path: Path) -> None:
    calls = Calls()
    evaluate_edits(project.path, tmp_path / "o", progress=calls)
    names = [s.path.name for s in project.slides]
    assert calls.calls == [(1, 4, names[0]), (2, 4, names[1]), (3, 4, names[0]),
                           (4, 4, names[1])]


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    with _progress.StepProgress("work") as bar:
        assert not bar.enabled
        bar(1, 2, "a")
    assert err.getvalue() == ""


def test_cli_bar_on_a_terminal_leaves_json_alone(project: SyntheticProject, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """On a terminal the bar is drawn on stderr; stdout holds only the JSON summary."""
    from qpseg.cli.evaluate import evaluate as evaluate_cmd

    monkeypatch.setattr(_progress, "stderr_is_terminal", lambda: True)
    seen: list[Any] = []
    real_call = _progress.StepProgress.__call__

    def spy(self: _progress.StepProgress, done: int, total: int, item: str = "") -> None:
        seen.append((self.enabled, done, total))
        real_call(self, done, total, item)

    monkeypatch.setattr(_progress.StepProgress, "__call__", spy)
    truth = tmp_path / "proj"
    shutil.copytree(project.folder, truth)
    code = evaluate_cmd(truth=truth / "project.qpproj", pred=truth / "project.qpproj",
                        out=tmp_path / "o", classes=None, mpp=None, mpp_override=False,
                        eval_mpp=None, truth_mode="exhaustive", mask_mpp=None,
                        lesion_class=None, instances=None, no_report=True, seed=0, workers=1,
                        ai_objects="unreviewed-out", model=None, as_json=True)
    out, err = capfd.readouterr()
    assert code == 0
    assert json.loads(out)["n_scored"] == 2
    assert seen[-1] == (True, 2, 2)
    assert "scoring slides" in err


def test_demo_bars_follow_the_steps_the_training_and_the_slides() -> None:
    """One bar per step, labelled by the demo; training steps and slides fill theirs; a
    round's fine-tuning fills its own bar, never a finished one."""
    from types import SimpleNamespace

    from rich.console import Console

    out = io.StringIO()
    bars = _progress.DemoProgress(Console(file=out, width=100),
                                  {"train": "train tiny_unet", "infer": "infer slides"})

    def task(step: str) -> Any:
        return bars.bars.tasks[bars.tasks[step]]

    with bars:
        bars.on_step("train", {"event": "start"})
        bars.on_train(SimpleNamespace(kind="step", step=3, total_steps=10, loss=0.25))
        t = task("train")
        assert (t.description, t.completed, t.total, t.fields["info"]) == (
            "train tiny_unet", 3, 10, "loss 0.250")
        bars.on_step("train", {"event": "end", "seconds": 2.54})
        assert (t.completed, t.total, t.fields["info"]) == (1, 1, "done in 2.5 s")
        bars.on_step("infer", {"event": "start"})
        bars.on_infer(SimpleNamespace(kind="slide_start", index=1, total=3))
        assert (task("infer").completed, task("infer").fields["info"]) == (1, "slide 1/3")
        bars.on_infer(SimpleNamespace(kind="slide_end", index=1, total=3))
        assert (task("infer").completed, task("infer").total) == (2, 3)
        bars.on_step("rounds: train model 1", {"event": "start"})
        bars.on_step("rounds: train model 1", {"event": "end", "seconds": 1.0})
        bars.on_step("round 1: fine-tune", {"event": "start"})
        bars.on_round_train(SimpleNamespace(kind="step", step=4, total_steps=8, loss=None))
        ft, first = task("round 1: fine-tune"), task("rounds: train model 1")
        assert (ft.description, ft.completed, ft.total, ft.fields["info"]) == (
            "round 1: fine-tune", 4, 8, "")
        assert (first.completed, first.total, first.fields["info"]) == (1, 1, "done in 1.0 s")
    assert "train tiny_unet" in out.getvalue()


# ------------------------------------------------------------------------------ polygonising

CLASSES = ClassMap.from_names(["Tumor", "Stroma"])
PROV = {"qpseg_model": "m", "qpseg_model_sha256": "0" * 64}
UNIT = MapGeometry(0.0, 0.0, 1.0, 1.0)


class Blocks:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, done: int, total: int, objects: int) -> None:
        self.calls.append((done, total, objects))


def test_polygonise_reports_each_block_then_the_objects() -> None:
    """A 6x6 map in 3x3 blocks (2 x 2, row by row): a Stroma pixel in the first block, a
    Tumor square across all four (one piece in each, one object), a Stroma pixel in the last."""
    m = np.zeros((6, 6), dtype=np.uint8)
    m[0, 0] = 2
    m[2:4, 2:4] = 1
    m[5, 5] = 2
    blocks = Blocks()
    objs = polygonise(m, UNIT, CLASSES, provenance=PROV, min_area_um2=0, fill_holes_um2=0,
                      block_size=3, progress=blocks)
    assert [o.classification for o in objs] == ["Stroma", "Tumor", "Stroma"]
    assert objs[1].geometry.area == 4.0
    assert blocks.calls == [(0, 4, 0), (1, 4, 2), (2, 4, 3), (3, 4, 4), (4, 4, 6), (4, 4, 3)]


def test_polygonise_counts_the_objects_kept() -> None:
    """The last call counts the objects returned: specks under the minimum area are not."""
    m = np.zeros((4, 5), dtype=np.uint8)
    m[0, 0] = 1        # 1 µm²: dropped
    m[1:4, 1:4] = 2    # 9 µm²: kept
    blocks = Blocks()
    objs = polygonise(m, UNIT, CLASSES, provenance=PROV, min_area_um2=5, fill_holes_um2=0,
                      block_size=16, progress=blocks)
    assert len(objs) == 1
    assert blocks.calls == [(0, 1, 0), (1, 1, 2), (1, 1, 1)]


def test_polygonise_instances_reports_each_block() -> None:
    """Nucleus 5 spans the two upper 2x2 blocks (two pieces, one cell); nucleus 9 is in the
    last block; the lower-left block is empty."""
    inst = np.zeros((4, 4), dtype=np.int32)
    inst[0:2, 1:3] = 5
    inst[3, 3] = 9
    blocks = Blocks()
    cells = polygonise_instances(inst, UNIT, CLASSES, provenance=PROV, min_area_um2=0,
                                 fill_holes_um2=0, block_size=2, progress=blocks)
    assert sorted(c.geometry.area for c in cells) == [1.0, 4.0]
    assert blocks.calls == [(0, 4, 0), (1, 4, 1), (2, 4, 2), (3, 4, 2), (4, 4, 3), (4, 4, 2)]


def test_an_error_in_the_callback_stops_polygonising() -> None:
    m = np.ones((6, 6), dtype=np.uint8)
    seen: list[int] = []

    def stop(done: int, total: int, objects: int) -> None:
        seen.append(done)
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        polygonise(m, UNIT, CLASSES, provenance=PROV, block_size=3, progress=stop)
    assert seen == [0, 1, 2]


# ------------------------------------------------------------- a first line before torch loads

_SPY = """
import importlib.abc, sys

class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.stderr.write("<torch imported>\\n")
            sys.stderr.flush()
            sys.meta_path.remove(self)
        return None

sys.meta_path.insert(0, Spy())
from qpseg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``qpseg ARGS`` in a fresh interpreter that notes on stderr when torch is imported."""
    return subprocess.run([sys.executable, "-c", _SPY, *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_train_says_something_before_torch_loads(tmp_path: Path) -> None:
    # a manifest that does not exist fails after torch is loaded (the device is set up first)
    res = _run_cli("train", str(tmp_path / "none" / "manifest.json"), "--out",
                   str(tmp_path / "o"), "--model", "tiny_unet", "--dry-run", "--json")
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res.stderr
    assert lines[0] == "qpseg train: loading torch and the data..."
    assert lines[1] == "<torch imported>"
    assert lines[2].startswith("error: ") and "no such manifest" in lines[2]
    assert res.stdout == ""


def test_infer_says_something_before_torch_loads(tmp_path: Path) -> None:
    slide = make_slide(tmp_path / "x.tif", width=64, height=64, mpp=0.5).path
    res = _run_cli("infer", str(slide), "--model", str(tmp_path / "no-model"), "--out",
                   str(tmp_path / "o"), "--json")
    lines = res.stderr.splitlines()
    assert res.returncode == 6, res.stderr
    assert lines[0] == "qpseg infer: loading torch and the model..."
    assert lines[1] == "<torch imported>"
    assert lines[2].startswith("error: ") and "model package" in lines[2]
    assert res.stdout == ""


def test_quiet_commands_stay_quiet(tmp_path: Path) -> None:
    res = _run_cli("train", str(tmp_path / "none" / "manifest.json"), "--out",
                   str(tmp_path / "o"), "--model", "tiny_unet", "--quiet")
    assert res.stderr.splitlines()[0] == "<torch imported>"
    assert res.returncode == 2
