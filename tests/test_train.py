"""Training runs end to end on generated projects: package, logs, metadata, exact resume,
early stopping, boosting, bad input, every model family, the CLI and the example configs."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from shapely.geometry import Point, box
from typer.testing import CliRunner

from qpseg.data import DataWarning
from qpseg.errors import ConfigError, LabelError, ModelError, OutputError, SlideError
from qpseg.manifest import import_project
from qpseg.models import load_package
from qpseg.qupath.geojson import QuPathObject, read_geojson, write_geojson
from qpseg.testing.projects import SyntheticProject, make_project
from qpseg.training import TrainEvent, train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
torch.set_num_threads(1)  # predictable on shared CPUs

#: A tiny tiny_unet on 32 px tiles at 4 µm/px: a step takes milliseconds.
SMALL: dict[str, Any] = {
    "model_kwargs": {"tile_px": 32, "base_filters": 4, "depth": 2},
    "data": {"mpp": 4.0},
    "split": {"val": 0.25, "test": 0.0},
    "train": {"batch_size": 4, "log_every": 1, "checkpoint_every": 3},
}


def _cfg(**sections: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(SMALL))
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticProject, Path]:
    folder = tmp_path_factory.mktemp("trainproj")
    proj = make_project(folder / "p", n_slides=4, width=1024, height=1024, seed=11)
    manifest = import_project(proj.path, folder / "m", use_paquo=False)
    assert manifest.path is not None
    return proj, manifest.path


def _steps(out: Path, stage: str = "train") -> list[dict[str, Any]]:
    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "step" and r["stage"] == stage]


def test_train_writes_package_logs_and_metadata(project: tuple[SyntheticProject, Path],
                                                tmp_path: Path) -> None:
    _, manifest = project
    out = tmp_path / "run"
    events: list[TrainEvent] = []
    result = train(manifest, out, model="tiny_unet", config=_cfg(), overrides={
        "train": {"steps": 6}}, callback=events.append)
    pkg = load_package(out)
    assert pkg.architecture == "tiny_unet"
    assert list(pkg.class_names) == ["Background", "Tumor", "Stroma", "Necrosis"]
    assert pkg.mpp == 4.0 and pkg.tile_px == 32
    split = json.loads((out / "split.json").read_text())
    assert pkg.config.training["split"] == split
    assert set(split["val"]) and not set(split["val"]) & set(split["train"])
    steps = _steps(out)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["tiles_per_s"] > 0 for r in steps)
    epochs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs and "val_dice_tumor" in epochs[-1] and "val_iou_stroma" in epochs[-1]
    csv_lines = (out / "train_log.csv").read_text().splitlines()
    assert len(csv_lines) == len(epochs) + 1 and "val_dice_tumor" in csv_lines[0]
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["status"] == "done" and meta["versions"]["torch"] == torch.__version__
    assert meta["config"]["train"]["steps"] == 6 and meta["split"] == split
    slides = meta["data"]["slides"]
    assert {s["subset"] for s in slides} == {"train", "val"}
    assert all(len(s["sha256_head_tail"]) == 64 and len(s["annotation_sha256"]) == 64
               for s in slides)
    assert meta["data"]["manifest_sha256"] and meta["result"]["train"]["steps"] == 6
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*.pt")) == [
        "step-00000006.pt"]
    kinds = [e.kind for e in events]
    assert kinds[0] == "stage" and "start" in kinds and kinds[-1] == "done"
    assert result.metrics["val_pixels"] > 0
    # The package predicts (probabilities sum to one).
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(pkg.model.predict(pkg.normalize(x)).sum(1), torch.ones(1, 32, 32),
                          atol=1e-5)


class _Interrupt(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(project: tuple[SyntheticProject, Path],
                                                 tmp_path: Path) -> None:
    _, manifest = project
    cfg = _cfg(train={"steps": 14, "checkpoint_every": 4})
    full = train(manifest, tmp_path / "a", model="tiny_unet", config=cfg)

    def stop_at_10(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 10:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(manifest, tmp_path / "b", model="tiny_unet", config=cfg, callback=stop_at_10)
    assert (tmp_path / "b" / "checkpoints" / "step-00000008.pt").is_file()
    events: list[TrainEvent] = []
    resumed = train(manifest, tmp_path / "b", resume=True, callback=events.append)
    resumed_events = [e for e in events if e.kind == "resumed"]
    assert len(resumed_events) == 1 and resumed_events[0].step == 8
    a, b = _steps(tmp_path / "a"), _steps(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 15))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise on CPU
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    # The epoch rows agree too (validation after the resume point included).
    def rows(out: Path) -> list[dict[str, str]]:
        with open(out / "train_log.csv", newline="") as fh:
            return [{k: v for k, v in r.items() if k != "time"} for r in csv.DictReader(fh)]

    assert rows(tmp_path / "a") == rows(tmp_path / "b") and len(rows(tmp_path / "a")) >= 2


def test_out_folder_rules(project: tuple[SyntheticProject, Path], tmp_path: Path) -> None:
    _, manifest = project
    out = tmp_path / "r"
    train(manifest, out, model="tiny_unet", config=_cfg(train={"steps": 1}))
    with pytest.raises(ConfigError, match="--resume"):
        train(manifest, out, model="tiny_unet", config=_cfg())
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(manifest, tmp_path / "empty", model="tiny_unet", resume=True)
    with pytest.raises(ConfigError, match="trains tiny_unet"):
        train(manifest, out, model="dmmn_m3", resume=True)
    # Resuming a finished run changes nothing and repackages.
    again = train(manifest, out, resume=True)
    assert again.stages[0].finished and load_package(out).architecture == "tiny_unet"
    with pytest.raises(ConfigError, match="no model"):
        train(manifest, tmp_path / "x")
    with pytest.raises(ModelError, match="non-learned"):
        train(manifest, tmp_path / "y", model="otsu_threshold")
    with pytest.raises(OutputError, match="is not a folder"):  # before any work starts
        train(manifest, out / "config.json", model="tiny_unet", config=_cfg())


def test_batches_beyond_memory_are_refused_before_training(
        project: tuple[SyntheticProject, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import qpseg.training.config as config

    _, manifest = project
    monkeypatch.setattr(config, "physical_memory", lambda: 1 << 30)  # 256 MiB per batch
    # tiny_unet's own tile (256 px) is not in the config: the model's contract is checked.
    # 1024 x 3 x 256² x 4 bytes = 768 MiB.
    with pytest.raises(ConfigError) as err:
        train(manifest, tmp_path / "a", model="tiny_unet",
              config={"train": {"batch_size": 1024}}, dry_run=True)
    assert err.value.message.startswith("tiny_unet (tile_px 256) with train.batch_size: a batch "
                                        "of 1024 tile(s) of 256 px needs 0.75 GiB")
    train(manifest, tmp_path / "a", model="tiny_unet", config={"train": {"batch_size": 256}},
          dry_run=True)  # 192 MiB fits
    # Each stage of a two-stage model with its own batch size: the refinement network reads
    # an image and a heatmap (3 + 1 channels) of 256 px: 256 x 4 x 256² x 4 bytes = 256 MiB + .
    cfg = {"model_kwargs": {"patch_kwargs": {"width_mult": 0.25, "tile_px": 64, "hidden": 8},
                            "refine_kwargs": {"filters": [4, 8, 8], "tile_px": 256}},
           "stages": {"patch": {"train": {"batch_size": 4}},
                      "refine": {"train": {"batch_size": 257}}}}
    with pytest.raises(ConfigError, match=r"^h2g_refine_unet \(tile_px 256\) with "
                       r"stages\.refine\.train\.batch_size: a batch of 257"):
        train(manifest, tmp_path / "b", model="h2g_net", config=cfg, dry_run=True)


def test_early_stopping_and_selection(project: tuple[SyntheticProject, Path],
                                      tmp_path: Path) -> None:
    _, manifest = project
    cfg = _cfg(train={"epochs": 6, "checkpoint_every": 0, "early_stopping": {
        "metric": "val_loss", "mode": "min", "patience": 1, "min_delta": 1e9},
        "select": {"metric": "val_mdice", "mode": "max"}})
    result = train(manifest, tmp_path / "es", model="tiny_unet", config=cfg)
    stage = result.stages[0]
    assert stage.stopped_early and stage.epochs == 2
    best = stage.best
    values = [r["val_mdice"] for r in stage.history]
    assert best["value"] == max(values) and best["weights"] == "best"


def test_boosting_raises_weights_of_hard_tiles(project: tuple[SyntheticProject, Path],
                                               tmp_path: Path) -> None:
    from qpseg.training.checkpoint import find_checkpoint

    _, manifest = project
    cfg = _cfg(sampler={"name": "boosting", "gamma": 0.05, "chi": 1.0},
               train={"epochs": 2, "checkpoint_every": 0, "log_every": 5})
    train(manifest, tmp_path / "boost", model="tiny_unet", config=cfg)
    found = find_checkpoint(tmp_path / "boost" / "checkpoints")
    assert found is not None
    w = np.asarray(found[1]["boosting"]["weights"])
    # eq. (1): 0 or 1 to start; eq. (2): +χ for tiles wrong on >= 5 % of their pixels.
    assert set(np.unique(w)) <= {0.0, 1.0, 2.0} and (w == 2.0).any()
    # §3.2.3: round 2 trains on the enlarged set T_2 (every tile l_e times): the epoch grows by
    # the hard tiles' extra copies instead of keeping T_1's size.
    recs = [json.loads(line) for line in
            (tmp_path / "boost" / "train_log.jsonl").read_text().splitlines()]
    (boost,) = [r for r in recs if r["kind"] == "boost"]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert boost["round"] == 1 and boost["hard_tiles"] == int((w == 2.0).sum())
    assert boost["set_size"] == int(w.sum())
    t1 = int((w > 0).sum())
    assert epochs[0]["step"] == t1 // 4
    assert epochs[1]["step"] - epochs[0]["step"] == int(w.sum()) // 4 > t1 // 4


def test_gradient_accumulation_counts_steps(project: tuple[SyntheticProject, Path],
                                            tmp_path: Path) -> None:
    _, manifest = project
    cfg = _cfg(train={"epochs": 1, "batch_size": 2, "accumulate": 3, "checkpoint_every": 0})
    result = train(manifest, tmp_path / "acc", model="tiny_unet", config=cfg)
    n_items = result.summary["train"]["items"]
    assert result.stages[0].steps == (n_items // 2) // 3


def test_config_classes_must_exist(project: tuple[SyntheticProject, Path],
                                   tmp_path: Path) -> None:
    _, manifest = project
    with pytest.raises(ConfigError, match="'Lymphocyte'"):
        train(manifest, tmp_path / "c", model="tiny_unet",
              config=_cfg(classes=["Tumor", "Lymphocyte"]), dry_run=True)
    proj, _ = project
    with pytest.raises(ConfigError, match="'Lymphocyte' are not annotated anywhere"):
        train(proj.path, tmp_path / "c2", model="tiny_unet",
              config=_cfg(classes=["Tumor", "Lymphocyte"]), dry_run=True)
    # A subset is fine: the other annotations become unlabelled.
    res = train(manifest, tmp_path / "c", model="tiny_unet", config=_cfg(classes=["Tumor"]),
                dry_run=True)
    assert res.summary["classes"] == ["Background", "Tumor"]


def test_no_labels_at_all(tmp_path: Path) -> None:
    proj = make_project(tmp_path / "p", n_slides=1, width=256, height=256, annotations=False)
    with pytest.raises(LabelError, match="no labelled annotations"):
        train(proj.path, tmp_path / "o", model="tiny_unet", config=_cfg())


def _edited_manifest(manifest: Path, tmp_path: Path, edit: Any) -> Path:
    data = json.loads(manifest.read_text())
    edit(data["entries"])
    target = tmp_path / "edited" / "manifest.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data))
    return target


def test_unusable_slides_are_skipped_with_a_warning(project: tuple[SyntheticProject, Path],
                                                    tmp_path: Path) -> None:
    _, manifest = project

    def edit(entries: list[dict[str, Any]]) -> None:
        entries[0].update(status="no-labels", problem="no labelled annotations")
        entries[1].update(status="failed", problem="pixel size unknown", mpp=None)

    m = _edited_manifest(manifest, tmp_path, edit)
    with pytest.warns(DataWarning) as rec:
        res = train(m, tmp_path / "o", model="tiny_unet", config=_cfg(split={"val": 0.5}),
                    dry_run=True)
    msgs = " ".join(str(r.message) for r in rec)
    assert "no labelled annotations" in msgs and "pixel size unknown" in msgs
    assert res.summary["train"]["slides"] + (res.summary["val"] or {"slides": 0})[
        "slides"] == 2

    def all_bad(entries: list[dict[str, Any]]) -> None:
        for e in entries:
            e.update(status="failed", problem="pixel size unknown", mpp=None)

    with pytest.warns(DataWarning), pytest.raises(LabelError, match="no usable slide"):
        train(_edited_manifest(manifest, tmp_path / "b", all_bad), tmp_path / "o2",
              model="tiny_unet", config=_cfg(), dry_run=True)


@pytest.fixture
def corrupt_copy(project: tuple[SyntheticProject, Path], tmp_path: Path) -> Path:
    """A manifest over copies of the slides, the first training slide truncated after the
    import (as a file that breaks while a run is under way)."""
    _, manifest = project
    res = train(manifest, tmp_path / "dry", model="tiny_unet", config=_cfg(), dry_run=True)
    key = res.summary["split"]["train"][0]
    data = json.loads(manifest.read_text())
    (tmp_path / "slides").mkdir()
    for e in data["entries"]:
        copy = tmp_path / "slides" / Path(e["slide_path"]).name
        shutil.copyfile(e["slide_path"], copy)
        e["slide_path"] = str(copy)
        if e["image_name"] == key:
            copy.write_bytes(copy.read_bytes()[:300])
    target = tmp_path / "m" / "manifest.json"
    target.parent.mkdir()
    target.write_text(json.dumps(data))
    return target


def test_unreadable_slide_mid_training_is_a_clear_error(corrupt_copy: Path,
                                                        tmp_path: Path) -> None:
    with pytest.raises(SlideError) as exc:
        train(corrupt_copy, tmp_path / "o", model="tiny_unet",
              config=_cfg(data={"workers": 1}, train={"steps": 4}))
    text = str(exc.value)
    assert "Traceback" not in text and "\n" not in text and ".tif" in text


def test_unreadable_slide_skipped_when_configured(corrupt_copy: Path, tmp_path: Path) -> None:
    with pytest.warns(DataWarning, match="slide skipped"):
        res = train(corrupt_copy, tmp_path / "o", model="tiny_unet",
                    config=_cfg(data={"on_error": "skip"}, train={"steps": 4}))
    assert res.stages[0].steps == 4


# --------------------------------------------------------------------------- model families
def test_patch_classifier_hierarchical(project: tuple[SyntheticProject, Path],
                                       tmp_path: Path) -> None:
    _, manifest = project
    cfg = {"model_kwargs": {"width_mult": 0.25, "tile_px": 64, "hidden": 8},
           "data": {"mpp": 2.0, "select": "labelled", "min_labelled": 0.25, "group_by": "grade",
                    "stain_normalization": "reinhard"},
           "split": {"val": 0.25, "test": 0.0}, "sampler": {"samples_per_epoch": 16,
                                                           "val_samples": 8},
           # pedersen2022 §2.3-2.4 cluster guiding (Mob-KM-PW), with cheap colour features
           "loss": {"name": "cwce", "clusters": {"features": "rgb", "k": 3, "batches": 2,
                                                 "batch_size": 8}},
           "train": {"batch_size": 4, "steps": 3, "log_every": 1}}
    result = train(manifest, tmp_path / "patch", model="mobilenetv2_patch", config=cfg)
    s = result.summary
    assert sum(s["train_patches"].values()) == s["train"]["tiles"] > 0
    pkg = load_package(tmp_path / "patch")
    assert pkg.contract.output == "patch"
    assert result.metrics["val_pixels"] == min(8, s["val"]["tiles"]) > 0  # one per patch


def test_h2g_net_trains_in_two_stages(project: tuple[SyntheticProject, Path],
                                      tmp_path: Path) -> None:
    _, manifest = project
    out = tmp_path / "h2g"
    cfg = {"model_kwargs": {"patch_kwargs": {"width_mult": 0.25, "tile_px": 64, "hidden": 8},
                            "refine_kwargs": {"filters": [4, 8, 8], "tile_px": 64}},
           "classes": ["Tumor", "Stroma", "Necrosis"],
           "data": {"tissue_method": None},
           "split": {"val": 0.25, "test": 0.0},
           "stages": {"patch": {"data": {"mpp": 2.0, "select": "labelled",
                                         "min_labelled": 0.25, "group_by": None},
                                "sampler": {"samples_per_epoch": 8, "val_samples": 4},
                                "train": {"batch_size": 4, "steps": 2}},
                      # pedersen2022 §3.4's 4 x 6 slides per step; 3 training slides here
                      "refine": {"train": {"batch_size": 4, "accumulate": 6, "steps": 2}}}}
    with pytest.warns(DataWarning, match=r"3 training slide\(s\) per process do not fill a "
                      r"step of 4 x 6 slides; training with batch_size 3 x accumulate 1"):
        result = train(manifest, out, model="h2g_net", config=cfg)
    assert [s.name for s in result.stages] == ["patch", "refine"]
    assert result.stages[1].steps == 2
    assert len(list((out / "refine_data").glob("*.npz"))) == 4
    assert sorted(p.name for p in out.rglob("*") if ".tmp" in p.name) == []  # written atomically
    with np.load(next((out / "refine_data").glob("*.npz"))) as d:
        assert d["image"].shape == (64, 64, 3) and d["heatmap"].shape == (64, 64)
        assert float(d["heatmap"].min()) >= 0.0 and float(d["heatmap"].max()) <= 1.0
    pkg = load_package(out)
    assert pkg.architecture == "h2g_net" and pkg.mpp == 2.0
    assert pkg.normalization(1) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    stages = {r["stage"] for r in map(json.loads, (out / "train_log.jsonl").read_text()
                                      .splitlines())}
    assert stages == {"patch", "refine"}
    assert set(pkg.config.training["stages"]) == {"patch", "refine"}
    assert pkg.config.training["refine_batch"] == {"batch_size": 3, "accumulate": 1}


def test_dmmn_multi_magnification_with_class_balance(project: tuple[SyntheticProject, Path],
                                                     tmp_path: Path) -> None:
    _, manifest = project
    cfg = {"model_kwargs": {"base_filters": 4, "tile_px": 64}, "data": {
        "mpp": 2.0, "tissue_method": None,
        "class_balance": {"rates": {"Tumor": 2, "Necrosis": 1}, "order": ["Tumor", "Necrosis"]}},
        "split": {"val": 0.25, "test": 0.0}, "train": {"batch_size": 2, "steps": 2}}
    result = train(manifest, tmp_path / "dmmn", model="dmmn_m3", config=cfg)
    tr = result.summary["train"]
    assert tr["items"] > tr["tiles"]  # elastic copies of tumour/necrosis tiles
    pkg = load_package(tmp_path / "dmmn")
    assert pkg.input_mpp == (2.0, 4.0, 8.0)
    w = pkg.config.training["class_weights"]  # ho2021 eq. (2)
    assert len(w) == 4 and all(0 <= v <= 1 for v in w) and w[0] == 1.0


def _nuclei_project(folder: Path) -> Path:
    """A generated project whose annotation files hold a Region (exhaustive area) and round
    nuclei as cells; returns the project file."""
    proj = make_project(folder, n_slides=2, width=512, height=512, seed=5)
    rng = np.random.default_rng(0)
    for f in proj.annotation_files:
        objs = [QuPathObject(box(32, 32, 480, 480), "annotation", "Region")]
        for _ in range(40):
            c = Point(rng.uniform(40, 470), rng.uniform(40, 470))
            objs.append(QuPathObject(c.buffer(7), "cell", None, nucleus_geometry=c.buffer(5)))
        write_geojson(f, objs)
        assert len(read_geojson(f)) == 41
    return proj.path


@pytest.mark.parametrize("arch,kwargs", [
    ("tiny_unet", {"tile_px": 64, "base_filters": 4, "depth": 2}),
    ("gb_unet", {"members": ["tiny_unet"] * 3, "member_kwargs": {"base_filters": 4},
                 "encoder_filters": [4, 8, 8, 16, 16], "decoder_filters": [8, 8, 8, 4, 4],
                 "tile_px": 64}),
])
def test_nuclei_instance_targets_with_lagree_loss(arch: str, kwargs: dict[str, Any],
                                                  tmp_path: Path) -> None:
    path = _nuclei_project(tmp_path / "n")
    cfg = {"classes": ["Nucleus"], "model_kwargs": kwargs,
           "data": {"mpp": 1.0, "target": "instance", "min_labelled": 0.5},
           "loss": {"name": "lagree2021"}, "split": {"val": 0.5, "test": 0.0},
           "train": {"batch_size": 2, "steps": 2}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Nucleus not found in any annotation"
        result = train(path, tmp_path / "out", model=arch, config=cfg)
    assert result.summary["target"] == "instance"
    if arch == "gb_unet":  # the three members stay frozen: only the second stage trains
        first = result.model.members[0].head.weight
        assert not first.requires_grad
        # One command: the members were trained first (lagree2021, "Ensemble networks"), each
        # into its own package, and the second stage learns from those, not random members.
        for i, member in enumerate(result.model.members):
            pkg = load_package(tmp_path / "out" / "members" / f"{i + 1}-tiny_unet")
            assert pkg.config.training["stages"]["train"]["steps"] == 2
            trained = pkg.model.state_dict()
            for key, value in member.state_dict().items():
                assert torch.equal(value, trained[key]), key
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert result.metrics["val_dice_nucleus"] >= 0.0


def test_gb_unet_config_trains_one_member(tmp_path: Path) -> None:
    # The documented first step (qpseg train --model <member> --config <gb_unet config>) used
    # to fail with "unexpected keyword argument 'members'".
    path = _nuclei_project(tmp_path / "n")
    cfg = {"model": "gb_unet", "classes": ["Nucleus"],
           "model_kwargs": {"members": ["tiny_unet"] * 3, "member_kwargs": {"base_filters": 4},
                            "encoder_filters": [4, 8, 8, 16, 16], "freeze_members": True,
                            "tile_px": 64},
           "data": {"mpp": 1.0, "target": "instance", "min_labelled": 0.5},
           "split": {"val": 0.5, "test": 0.0}, "train": {"batch_size": 2, "steps": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(path, tmp_path / "m", model="tiny_unet", config=cfg)
        assert result.model.contract.tile_px == 64
        with pytest.raises(ConfigError, match="trains the members tiny_unet"):
            train(path, tmp_path / "x", model="unet_vgg19", config=cfg)


@pytest.mark.slow
def test_mask_rcnn_trains_on_its_summed_losses(tmp_path: Path) -> None:
    path = _nuclei_project(tmp_path / "n")
    cfg = {"classes": ["Nucleus"], "model_kwargs": {"tile_px": 64, "proposals_train": 64,
                                                    "rois_per_image": 32,
                                                    "detections_per_img": 16},
           "data": {"mpp": 1.0, "min_labelled": 0.5}, "augment": {"preset": "none"},
           "split": {"val": 0.5, "test": 0.0}, "train": {"batch_size": 2, "steps": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(path, tmp_path / "out", model="maskrcnn_resnet101", config=cfg)
    assert result.stages[0].steps == 1 and np.isnan(result.metrics["val_loss"])
    assert "val_dice_nucleus" in result.metrics


# ------------------------------------------------------------------------------------ CLI
def _app() -> typer.Typer:
    from qpseg.cli.train import train as train_command

    app = typer.Typer()
    app.command()(train_command)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps "train" a sub-command
        pass

    return app


def test_cli_trains_and_prints(project: tuple[SyntheticProject, Path], tmp_path: Path) -> None:
    _, manifest = project
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(_cfg()))
    out = tmp_path / "cli"
    res = CliRunner().invoke(_app(), ["train", str(manifest), "--model", "tiny_unet", "--out",
                                      str(out), "--config", str(cfg), "--steps", "3",
                                      "--batch-size", "2", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "model package" in res.output and load_package(out).architecture == "tiny_unet"
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["params"]["steps"] == 3 and meta["config"]["train"]["batch_size"] == 2
    assert meta["config"]["train"]["seed"] == 3


def _project_for(config: dict[str, Any], folder: Path) -> Path:
    """A generated project that fits an example config (its classes, nuclei, a grade)."""
    if config["model"] == "gb_unet":
        return _nuclei_project(folder)
    classes = [c for c in config.get("classes") or ["Tumor", "Stroma", "Necrosis"]]
    if config["model"] == "h2g_net":
        classes = ["Tumor", "Stroma"]
    proj = make_project(folder, n_slides=4, width=1024, height=1024, seed=2, classes=classes)
    if config.get("classes") and config["model"] != "h2g_net":
        # make_project annotates Tumor/Stroma/Necrosis: give the regions the config's classes.
        k = 0
        for f in proj.annotation_files:
            objs = read_geojson(f)
            for o in objs:
                o.classification = classes[k % len(classes)]
                k += 1
            write_geojson(f, objs)
    if config["model"] == "h2g_net":  # exhaustive tumour annotation: tissue marked as Region
        for slide, f in zip(proj.slides, proj.annotation_files, strict=True):
            objs = read_geojson(f)
            write_geojson(f, [QuPathObject(slide.tissue, "annotation", "Region"), *objs])
    return proj.path


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_pass_dry_run(path: Path, tmp_path: Path) -> None:
    import yaml

    config = yaml.safe_load(path.read_text())
    project = _project_for(config, tmp_path / "p")
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = CliRunner().invoke(_app(), ["train", str(project), "--out", str(out), "--config",
                                          str(path), "--dry-run"])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    assert "split" in res.output and "train" in res.output
    assert not out.exists()  # a dry run writes nothing
    res_json = CliRunner().invoke(_app(), ["train", str(project), "--out", str(out), "--config",
                                           str(path), "--dry-run", "--json"])
    assert res_json.exit_code == 0, res_json.output


# ------------------------------------------------------------------------------ unit pieces
def test_patch_labels_follow_pedersen_rules() -> None:
    from qpseg.data.grid import Tile
    from qpseg.training.data import patch_labels

    def tile(*hist: int) -> Tile:
        return Tile(0, 0.0, 0.0, sum(hist) / 100, hist)

    tiles = [tile(60, 30, 0), tile(80, 10, 0), tile(100, 0, 0), tile(10, 0, 20), tile(5, 0, 0)]
    # 100-pixel tiles, tumour = class 1: > 25 % tumour -> tumour; (0, 25] % -> discarded;
    # no tumour -> the class covering most of the tile when it covers > 25 %.
    assert patch_labels(tiles, 3, 100.0, threshold=0.25, positive=1) == [1, None, 0, None, None]
    assert patch_labels(tiles, 3, 100.0, threshold=0.25, positive=None) == [0, 0, 0, None, None]


def test_class_weights() -> None:
    from qpseg.labels import ClassMap
    from qpseg.training.data import weights_for_classes

    cm = ClassMap.from_names(["Tumor", "Stroma"])
    counts = np.array([0.0, 30.0, 10.0])
    assert weights_for_classes("ho2021", cm, counts) == pytest.approx([1.0, 0.25, 0.75])
    assert weights_for_classes("balanced", cm, counts) == pytest.approx([1.0, 40 / 60, 2.0])
    assert weights_for_classes({"Stroma": 3}, cm, counts) == [1.0, 1.0, 3.0]
    assert weights_for_classes(None, cm, counts) is None
    with pytest.raises(ConfigError):
        weights_for_classes([1.0, 2.0], cm, counts)
    with pytest.raises(ConfigError):
        weights_for_classes({"Lymph": 1}, cm, counts)


def test_heatmap_follows_the_image_geometry_only() -> None:
    """The refinement stage's heatmap gets the image's rotation/flip/zoom, no colour change."""
    from qpseg.labels import ClassMap
    from qpseg.losses import LossSpec
    from qpseg.models import create_model
    from qpseg.training.loop import Task

    model = create_model("h2g_refine_unet", 2, filters=[4, 8], tile_px=32)
    cm = ClassMap.from_names(["Tumor"])
    task = Task(output="pixel", contract=model.contract, class_map=cm, loss=LossSpec("dice"),
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), device=torch.device("cpu"),
                augment={"preset": "none", "rot90": True, "hflip": True, "vflip": True,
                         "zoom": [1.0, 1.3], "p": 1.0},
                seed=4, patch_labels=None, val_patch_labels=None, extents=(1.0,), heatmap=True)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(6, 3, 32, 32, generator=g)
    batch = {"inputs": [image, image[:, :1].clone()], "label": torch.zeros(6, 32, 32).long(),
             "meta": {"index": torch.arange(6)}}
    prep = task.prepare(batch, train=True)
    out_image, out_heat = prep.inputs
    assert not torch.equal(out_image, image)  # something happened
    assert torch.allclose(out_image[:, :1], out_heat, atol=1e-6)
