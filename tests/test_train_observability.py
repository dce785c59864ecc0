"""What training shows while it runs and leaves behind: a progress event every step with an
ETA, training_curves.png and the curves in the model card, optional TensorBoard scalars,
warnings about the data before training, the split set from the command line, and resuming
refused on changed annotations."""

from __future__ import annotations

import hashlib
import json
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from qpseg.errors import ConfigError
from qpseg.manifest import import_project, read_manifest
from qpseg.qupath.geojson import read_geojson, write_geojson
from qpseg.testing.projects import SyntheticProject, make_project
from qpseg.training import TrainEvent, train
from qpseg.training.data import TrainingWarning

torch.set_num_threads(1)

# the same tiny tiny_unet recipe as test_train.py
from test_train import _cfg  # noqa: E402


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticProject, Path]:
    folder = tmp_path_factory.mktemp("obsproj")
    proj = make_project(folder / "p", n_slides=4, width=1024, height=1024, seed=11)
    manifest = import_project(proj.path, folder / "m", use_paquo=False)
    assert manifest.path is not None
    return proj, manifest.path


def _app() -> typer.Typer:
    from qpseg.cli.train import train as train_command

    app = typer.Typer()
    app.command()(train_command)

    @app.command("noop")
    def _noop() -> None:
        pass

    return app


# ------------------------------------------------------------------------------- progress
def test_a_step_event_after_every_step_with_an_eta(project: tuple[SyntheticProject, Path],
                                                   tmp_path: Path) -> None:
    _, manifest = project
    events: list[TrainEvent] = []
    train(manifest, tmp_path / "run", model="tiny_unet",
          config=_cfg(train={"log_every": 4, "steps": 6}), callback=events.append)
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5, 6]
    assert all(e.total_steps == 6 and e.eta_s is not None and e.eta_s >= 0 for e in steps)
    assert steps[-1].eta_s == 0.0 and steps[0].eta_s > 0
    assert all(e.loss is not None and e.tiles_per_s and e.tiles_per_s > 0 for e in steps)
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl")
              .read_text().splitlines()]
    assert [r["step"] for r in logged if r["kind"] == "step"] == [4, 6]  # the log keeps its pace


def test_progress_bar_shows_the_eta_of_the_events() -> None:
    from qpseg.cli._progress import TrainProgress as _Progress
    from qpseg.cli._progress import _clock

    assert _clock(None) == "-:--:--" and _clock(83.4) == "0:01:23" and _clock(3725) == "1:02:05"
    with _Progress(quiet=True) as progress:
        progress(TrainEvent("start", "train", 0, 2, 0, 10))
        progress(TrainEvent("step", "train", 0, 2, 1, 10, loss=0.5, tiles_per_s=12.0,
                            eta_s=83.0))
        task = progress.progress.tasks[0]
        assert task.completed == 1 and task.fields["eta"] == "0:01:23"
        progress(TrainEvent("step", "train", 0, 2, 2, 10, loss=0.4, tiles_per_s=12.0,
                            eta_s=70.2))
        assert task.completed == 2 and task.fields["eta"] == "0:01:10"


# --------------------------------------------------------------------------------- curves
def test_curves_plot_puts_each_value_where_it_belongs(tmp_path: Path) -> None:
    from qpseg.training import curves

    records = [{"kind": "epoch", "stage": "train", "epoch": 0, "train_loss": 1.0,
                "val_mdice": 0.25},
               {"kind": "epoch", "stage": "train", "epoch": 1, "train_loss": 0.5,
                "val_mdice": 0.75}]
    path = curves.draw_training_curves(records, tmp_path / "c.png")
    assert path is not None
    img = Image.open(path).convert("RGB")
    assert img.size == (2 * curves._W, curves._H)
    blue = curves._COLORS[0]  # the first series of each panel
    left, right = curves._PAD_L, curves._W - curves._PAD_R
    top, bottom = curves._PAD_T, curves._H - curves._PAD_B
    # loss panel: range [0.5, 1.0] with 5 % margins; epoch 1 at the left edge, 2 at the right
    lo, hi = 0.5 - 0.025, 1.0 + 0.025
    for x, v in ((left + 1, 1.0), (right - 1, 0.5)):
        y = round(bottom - (v - lo) / (hi - lo) * (bottom - top))
        assert img.getpixel((x, y)) == blue, (x, y)
    # scores panel: fixed [0, 1]
    for x, v in ((curves._W + left + 1, 0.25), (curves._W + right - 1, 0.75)):
        y = round(bottom - v * (bottom - top))
        assert img.getpixel((x, y)) == blue, (x, y)
    assert curves.draw_training_curves([], tmp_path / "none.png") is None


def test_training_curves_beside_the_log_and_in_the_model_card(
        project: tuple[SyntheticProject, Path], tmp_path: Path) -> None:
    _, manifest = project
    out = tmp_path / "run"
    train(manifest, out, model="tiny_unet",
          config=_cfg(sampler={"samples_per_epoch": 8}, train={"epochs": 3}))
    png = out / "training_curves.png"
    assert png.is_file() and Image.open(png).format == "PNG"
    rows = (out / "train_log.csv").read_text().splitlines()
    assert len(rows) == 4
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Training curves" in card and "![training curves](training_curves.png)" in card
    header = rows[0].split(",")
    table = [line for line in card.splitlines() if line.startswith("| ")]
    loss_col = header.index("train_loss")
    for i, row in enumerate(rows[1:], start=1):
        loss = float(row.split(",")[loss_col])
        assert any(line.startswith(f"| {i} |") and f"{loss:.4f}" in line for line in table), i


# ---------------------------------------------------------------------------- tensorboard
def test_tensorboard_scalars_through_summary_writer(project: tuple[SyntheticProject, Path],
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, manifest = project
    writers: list[Any] = []

    class FakeWriter:
        def __init__(self, log_dir: str) -> None:
            self.log_dir = log_dir
            self.scalars: list[tuple[str, float, int]] = []
            self.closed = False
            writers.append(self)

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.scalars.append((tag, value, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            self.closed = True

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    out = tmp_path / "tb"
    train(manifest, out, model="tiny_unet",
          config=_cfg(train={"steps": 4, "tensorboard": True}))
    (w,) = writers
    assert Path(w.log_dir) == out / "tensorboard" / "train" and w.closed
    steps = [s for tag, _, s in w.scalars if tag == "train/loss_step"]
    assert steps == [1, 2, 3, 4]
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    epoch = next(r for r in logged if r["kind"] == "epoch")
    assert ("val/mdice", epoch["val_mdice"], epoch["step"]) in w.scalars
    assert ("train/loss_epoch", epoch["train_loss"], epoch["step"]) in w.scalars


def test_tensorboard_missing_is_a_clear_error(project: tuple[SyntheticProject, Path],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _, manifest = project
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'qpseg\[tensorboard\]'"):
        train(manifest, tmp_path / "tb", model="tiny_unet",
              config=_cfg(train={"steps": 2, "tensorboard": True}))
    with pytest.raises(ConfigError, match=r"train\.tensorboard must be true or false"):
        train(manifest, tmp_path / "tb2", model="tiny_unet",
              config=_cfg(train={"tensorboard": "yes"}), dry_run=True)


# ------------------------------------------------------------------------- data warnings
def _messages(record: list[warnings.WarningMessage]) -> str:
    return " ".join(str(r.message) for r in record if issubclass(r.category, TrainingWarning))


def test_fewer_than_three_slides_warns(tmp_path: Path) -> None:
    proj = make_project(tmp_path / "p", n_slides=2, width=512, height=512, seed=3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        train(proj.path, tmp_path / "o", model="tiny_unet", config=_cfg(), dry_run=True)
    assert "only 2 slide(s) with labels" in _messages(rec)


def test_class_only_on_the_validation_slide_warns(tmp_path: Path) -> None:
    proj = make_project(tmp_path / "p", n_slides=3, width=1024, height=1024, seed=5)
    # Necrosis stays on the last slide only.
    for f in proj.annotation_files[:-1]:
        objs = [o for o in read_geojson(f) if o.classification != "Necrosis"]
        write_geojson(f, objs)
    keep = proj.slides[-1]
    manifest = import_project(proj.path, tmp_path / "m", use_paquo=False)
    name = manifest.entries[-1].image_name
    assert keep is not None and manifest.entries[-1].classes["Necrosis"].area_px > 0
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = train(manifest.path, tmp_path / "o", model="tiny_unet",
                    config=_cfg(split={"val_slides": [name]}), dry_run=True)
    assert res.summary["split"]["val"] == [name]
    assert f"class 'Necrosis' is annotated only on slide {name}, in the validation split" \
        in _messages(rec)
    # Another validation slide: Necrosis trains, no warning about it.
    other = manifest.entries[0].image_name
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        train(manifest.path, tmp_path / "o", model="tiny_unet",
              config=_cfg(split={"val_slides": [other]}), dry_run=True)
    assert "Necrosis" not in _messages(rec)


def test_a_class_without_training_pixels_warns(project: tuple[SyntheticProject, Path]) -> None:
    from qpseg.data.grid import slides_from_manifest
    from qpseg.data.splits import Split
    from qpseg.training.data import data_problems

    _, path = project
    manifest = read_manifest(path)
    slides = slides_from_manifest(manifest)
    keys = [s.key for s in slides]
    split = Split(tuple(keys[1:]), (keys[0],), ())

    class Tiles:  # the selected training tiles hold no Stroma pixel
        @staticmethod
        def summary() -> dict[str, Any]:
            return {"classes": {"Background": {"pixels": 5}, "Tumor": {"pixels": 7},
                                "Stroma": {"pixels": 0}, "Necrosis": {"pixels": 3}}}

    problems = data_problems(manifest, slides, split, manifest.class_map, Tiles())  # type: ignore[arg-type]
    assert problems == ["class 'Stroma' has no training pixels: the model cannot learn it; "
                        "annotate it on a training slide or leave it out (classes:)"]


# ------------------------------------------------------------------------- split on the CLI
def test_cli_val_takes_slide_names_or_a_share(project: tuple[SyntheticProject, Path],
                                              tmp_path: Path) -> None:
    _, manifest = project
    names = [e.image_name for e in read_manifest(manifest).entries]
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(_cfg()))
    base = ["train", str(manifest), "--model", "tiny_unet", "--out", str(tmp_path / "o"),
            "--config", str(cfg), "--dry-run", "--json"]
    res = CliRunner().invoke(_app(), [*base, "--val", f"{names[1]},{names[2]}",
                                      "--test", names[3]])
    assert res.exit_code == 0, res.output
    split = json.loads(res.stdout)["split"]
    assert split["val"] == sorted(names[1:3]) and split["test"] == [names[3]]
    assert split["train"] == [names[0]]
    res = CliRunner().invoke(_app(), [*base, "--val", "0.5", "--test", "0"])
    assert res.exit_code == 0, res.output
    split = json.loads(res.stdout)["split"]
    assert len(split["val"]) == 2 and split["test"] == [] and split["val_fraction"] == 0.5
    with pytest.raises(ConfigError, match=rf"did you mean {names[1]!r}"):
        train(manifest, tmp_path / "o", model="tiny_unet",
              config=_cfg(split={"val_slides": [names[1] + "x"]}), dry_run=True)
    res = CliRunner().invoke(_app(), [*base, "--val", "1.5"])
    assert res.exit_code != 0


# ------------------------------------------------------------------ changed annotations
def test_manifest_records_annotation_sha256(project: tuple[SyntheticProject, Path]) -> None:
    _, path = project
    entries = read_manifest(path).entries
    for entry in entries:
        assert entry.annotation_file is not None
        want = hashlib.sha256(Path(entry.annotation_file).read_bytes()).hexdigest()
        assert entry.annotation_sha256 == want


def test_resume_on_changed_annotations_is_refused_unless_allowed(tmp_path: Path) -> None:
    from qpseg.training.run import ChangedAnnotationsWarning, annotation_changes

    proj = make_project(tmp_path / "p", n_slides=4, width=1024, height=1024, seed=11)
    out = tmp_path / "run"
    cfg = _cfg(train={"steps": 4, "checkpoint_every": 2})

    def stop_at_3(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # interrupted after the checkpoint of step 2
        train(proj.path, out, model="tiny_unet", config=cfg, callback=stop_at_3)
    split = json.loads((out / "split.json").read_text())
    manifest = read_manifest(out / "manifest.json")
    entry = next(e for e in manifest.entries if e.image_name == split["train"][0])
    assert entry.annotation_file is not None
    objs = read_geojson(entry.annotation_file)
    write_geojson(entry.annotation_file, objs[:-1])  # the pathologist deleted one
    with pytest.raises(ConfigError) as err:
        train(proj.path, out, model="tiny_unet", resume=True)
    msg = err.value.message
    assert f"{entry.image_name} (train): {Path(entry.annotation_file).name} changed" in msg
    assert "--allow-changed-annotations" in msg
    assert not (out / "config.json").exists()  # nothing trained
    with pytest.warns(ChangedAnnotationsWarning, match=entry.image_name):
        res = train(proj.path, out, model="tiny_unet", resume=True,
                    allow_changed_annotations=True)
    assert res.stages[0].steps == 4
    # The run now records the new file: resuming again needs no permission.
    assert annotation_changes(out, read_manifest(out / "manifest.json")) == []
