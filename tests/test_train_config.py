"""Training configuration: the papers' defaults, files, merging, validation; optimisers,
schedules and checkpoint helpers."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpseg.errors import ConfigError, QpsegError
from qpseg.training.checkpoint import (
    find_checkpoint,
    get_rng_state,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from qpseg.training.config import (
    GENERIC_DEFAULTS,
    check_batch_memory,
    deep_merge,
    load_config_file,
    paper_defaults,
    paper_of,
    resolve_config,
    stage_config,
)
from qpseg.training.optim import build_optimizer, build_scheduler, current_lr

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"


def test_papers_numbers_are_the_defaults() -> None:
    k = paper_defaults("fcn32s_vgg16")  # khalil2022 §3.5
    assert k["optimizer"] == {**k["optimizer"], "name": "sgd", "lr": 1e-10, "weight_decay": 5e-4}
    assert k["sampler"]["name"] == "boosting" and k["sampler"]["gamma"] == 0.05
    assert k["augment"]["preset"] == "khalil2022" and k["data"]["tissue_method"] == "otsu"
    h = paper_defaults("dmmn_m3")  # ho2021 §2.5
    assert (h["optimizer"]["lr"], h["optimizer"]["momentum"], h["optimizer"]["weight_decay"]) \
        == (5e-5, 0.99, 1e-4)
    assert h["train"]["epochs"] == 20 and h["loss"]["class_weights"] == "ho2021"
    assert h["train"]["select"]["metric"] == "val_miou"
    lg = paper_defaults("unet_resnet101")  # lagree2021
    assert lg["loss"]["name"] == "lagree2021" and lg["optimizer"] == {
        **lg["optimizer"], "name": "adam", "lr": 1e-4}
    assert lg["loss"]["border_w0"] == 10.0 and lg["loss"]["border_sigma"] == 5.0
    mr = paper_defaults("maskrcnn_resnet101")
    assert (mr["optimizer"]["name"], mr["optimizer"]["lr"], mr["optimizer"]["momentum"],
            mr["optimizer"]["weight_decay"]) == ("sgd", 1e-3, 0.9, 1e-4)
    p = paper_defaults("h2g_net")  # pedersen2022 §3.4
    patch, refine = stage_config(p, "patch"), stage_config(p, "refine")
    assert (patch["optimizer"]["lr"], patch["train"]["batch_size"], patch["train"]["epochs"]) \
        == (1e-4, 64, 100)
    assert patch["sampler"]["samples_per_epoch"] == 500 * 64
    assert (refine["optimizer"]["lr"], refine["train"]["batch_size"],
            refine["train"]["accumulate"], refine["train"]["epochs"]) == (1e-3, 4, 6, 1000)
    assert refine["train"]["early_stopping"]["patience"] == 100
    assert patch["data"]["tissue_method"] == refine["data"]["tissue_method"] == "hsv"
    assert paper_of("tiny_unet") == "qpseg"


def test_unknown_keys_are_named_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'optimiser'"):
        resolve_config("tiny_unet", {"optimiser": {"lr": 1}})
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        resolve_config("tiny_unet", {"train": {"batch_sise": 4}})
    with pytest.raises(ConfigError, match="section 'augment'"):
        resolve_config("tiny_unet", {"augment": {"rotate": True}})
    with pytest.raises(ConfigError, match=r"stages\.patch"):
        resolve_config("h2g_net", {"stages": {"patch": {"trian": {}}}})


@pytest.mark.parametrize("bad", [
    {"train": {"batch_size": 0}}, {"train": {"epochs": 1.5}}, {"optimizer": {"lr": -1}},
    {"optimizer": {"name": "lbfgs"}}, {"data": {"select": "some"}},
    {"split": {"val": 0.6, "test": 0.5}}, {"loss": {"class_weights": "inverse"}},
    {"data": {"normalization": {"mean": [0.5], "std": [0.0]}}}, {"classes": "Tumor"},
    {"train": {"early_stopping": {"metric": "val_loss", "mode": "up"}}},
    {"train": {"precision": "fp8"}}, {"augment": {"preset": "mine"}}, {"data": "x"},
])
def test_invalid_values(bad: dict) -> None:
    with pytest.raises(ConfigError):
        resolve_config("tiny_unet", bad)


@pytest.mark.parametrize("layer, key", [
    ({"data": {"tile_px": 1_000_000_000}}, "data.tile_px 1000000000"),
    ({"model_kwargs": {"tile_px": 1_000_000_000}}, "model_kwargs.tile_px 1000000000"),
    ({"stages": {"patch": {"data": {"tile_px": 10**9}}}}, "stages.patch.data.tile_px"),
])
def test_tile_size_beyond_memory_is_refused_when_the_config_is_read(layer: dict,
                                                                    key: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config("tiny_unet", layer)
    msg = err.value.message
    assert msg.startswith(key), msg
    assert "GiB of memory for its input alone (batch x channels x px² x 4 bytes" in msg
    assert "25% of this machine's" in msg


def test_batch_memory_limit_known_answers() -> None:
    gib = 1 << 30
    # 4 GiB of RAM: a batch may take 1 GiB. 16 x 3 x 4096² x 4 bytes = 3 GiB: refused, and the
    # largest tile for batch 16 is isqrt(2^30 / (4 x 16 x 3)) = 2364 px.
    with pytest.raises(ConfigError) as err:
        check_batch_memory(16, [(3, 4096)], "data.tile_px 4096", memory=4 * gib)
    assert err.value.message.startswith("data.tile_px 4096: a batch of 16 tile(s) of 4096 px "
                                        "needs 3 GiB of memory")
    assert "over the limit of 1 GiB (25% of this machine's 4 GiB" in err.value.message
    assert err.value.message.endswith("tiles can be at most 2364 px")
    check_batch_memory(16, [(3, 2364)], "x", memory=4 * gib)  # just fits
    with pytest.raises(ConfigError):
        check_batch_memory(16, [(3, 2365)], "x", memory=4 * gib)
    # Several inputs add up (DMMN's three magnifications): 3 x 3 x 512² x 4 x 1024 = 9 GiB.
    with pytest.raises(ConfigError, match="needs 9 GiB"):
        check_batch_memory(1024, [(3, 512)] * 3, "x", memory=16 * gib)
    check_batch_memory(64, [(3, 512)] * 3, "x", memory=16 * gib)


def test_paper_batches_fit_a_small_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import qpseg.training.config as config

    monkeypatch.setattr(config, "physical_memory", lambda: 8 << 30)  # an 8 GiB laptop
    from qpseg.models import create_model, get_entry
    from qpseg.training.stage_setup import _check_memory

    for path in sorted(EXAMPLES.glob("*.yaml")) + sorted(EXAMPLES.glob("*.json")):
        layer = load_config_file(path)
        arch = layer.get("model") or "tiny_unet"
        cfg = resolve_config(arch, layer, path=path)
        kwargs = {k: v for k, v in cfg["model_kwargs"].items()
                  if k not in get_entry(arch).init_only and k != "pretrained"}
        model = create_model(arch, 3, meta=True, **kwargs)
        for i, stage in enumerate(getattr(model, "stages", None) or [model]):  # the models' own
            name = list(cfg.get("stages") or {"": None})[i]                    # tile sizes too
            scfg = stage_config(cfg, name) if name else cfg
            _check_memory(stage.contract, int(scfg["train"]["batch_size"]), name)
    monkeypatch.setattr(config, "physical_memory", lambda: None)  # OS does not say: no limit
    resolve_config("tiny_unet", {"model_kwargs": {"tile_px": 10**9}})


def test_merge_order_and_augment_presets() -> None:
    cfg = resolve_config("tiny_unet", {"augment": {"preset": "khalil2022"},
                                       "train": {"epochs": 3}}, {"train": {"epochs": 5}})
    assert cfg["train"]["epochs"] == 5
    # A preset replaces the previous augment section (no rot90 override leaks from qpseg's).
    assert cfg["augment"] == {"preset": "khalil2022"}
    cfg2 = resolve_config("tiny_unet", {"augment": {"brightness": 0.1}})
    assert cfg2["augment"]["preset"] == "none" and cfg2["augment"]["brightness"] == 0.1
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    assert set(GENERIC_DEFAULTS) == {"data", "split", "sampler", "augment", "loss", "optimizer",
                                     "scheduler", "train"}


def test_config_files(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  epochs: 4\n", encoding="utf-8")
    assert load_config_file(y) == {"train": {"epochs": 4}}
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"optimizer": {"lr": 0.5}}), encoding="utf-8")
    assert load_config_file(j)["optimizer"]["lr"] == 0.5
    (tmp_path / "empty.yaml").write_text("", encoding="utf-8")
    assert load_config_file(tmp_path / "empty.yaml") == {}
    for text, suffix in (("[1, 2]", ".yaml"), ("train: [", ".yaml"), ("{", ".json")):
        bad = tmp_path / f"bad{suffix}"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=str(bad.name)):
            load_config_file(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_resolve(path: Path) -> None:
    data = load_config_file(path)
    cfg = resolve_config(data["model"], {k: v for k, v in data.items() if k != "model"},
                         path=path)
    assert cfg["model"] == data["model"]


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                  st.lists(st.integers(-3, 3), max_size=3))
_keys = st.sampled_from(["lr", "epochs", "batch_size", "name", "val", "mpp", "preset",
                         "reduction", "select", "momentum", "rates", "metric", "bogus"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([*GENERIC_DEFAULTS, "classes", "model_kwargs", "x"]),
                       st.one_of(_leaf, st.dictionaries(_keys, _leaf, max_size=4)),
                       max_size=4))
def test_fuzz_config_ends_in_config_or_qpseg_error(layer: dict) -> None:
    try:
        cfg = resolve_config("tiny_unet", layer)
    except QpsegError:
        return
    assert cfg["model"] == "tiny_unet"


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_config_file_text(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.yaml"
        p.write_text(text, encoding="utf-8")
        try:
            data = load_config_file(p)
            resolve_config("tiny_unet", data)
        except QpsegError:
            pass


# ------------------------------------------------------------------------- optim, schedules
def _opt(name: str = "sgd", lr: float = 0.1) -> torch.optim.Optimizer:
    cfg = dict(GENERIC_DEFAULTS["optimizer"], name=name, lr=lr)
    return build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "adadelta", "rmsprop"])
def test_optimizers(name: str) -> None:
    opt = _opt(name, 0.01)
    assert current_lr(opt) == pytest.approx(0.01)


def test_no_trainable_parameters() -> None:
    p = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    with pytest.raises(ConfigError):
        build_optimizer([p], dict(GENERIC_DEFAULTS["optimizer"]))


def _lrs(sched_cfg: dict, total: int, n: int) -> list[float]:
    opt = _opt(lr=1.0)
    sch = build_scheduler(opt, {**GENERIC_DEFAULTS["scheduler"], **sched_cfg}, total)
    out = []
    for _ in range(n):
        out.append(current_lr(opt))
        opt.step()
        sch.step()
    return out


def test_schedules() -> None:
    assert _lrs({"name": "constant"}, 10, 3) == [1.0, 1.0, 1.0]
    assert _lrs({"name": "step", "step_size": 2, "gamma": 0.5}, 10, 5) == [1, 1, .5, .5, .25]
    assert _lrs({"name": "multistep", "milestones": [1, 3], "gamma": 0.1}, 10, 4) == \
        pytest.approx([1, 0.1, 0.1, 0.01])
    cos = _lrs({"name": "cosine"}, 4, 5)
    assert cos == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])
    assert _lrs({"name": "poly", "power": 1.0}, 4, 3) == pytest.approx([1.0, 0.75, 0.5])
    assert _lrs({"name": "constant", "warmup_steps": 4}, 10, 5) == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0])


def test_scheduler_state_roundtrip() -> None:
    cfg = {**GENERIC_DEFAULTS["scheduler"], "name": "cosine"}
    opt = _opt(lr=1.0)
    sch = build_scheduler(opt, cfg, 10)
    for _ in range(3):
        opt.step()
        sch.step()
    state = sch.state_dict()
    opt2 = _opt(lr=1.0)
    opt2.load_state_dict(opt.state_dict())
    sch2 = build_scheduler(opt2, cfg, 10)
    sch2.load_state_dict(state)
    for _ in range(2):
        opt.step()
        sch.step()
        opt2.step()
        sch2.step()
    assert current_lr(opt) == current_lr(opt2)
    plateau = build_scheduler(_opt(lr=1.0), {**cfg, "name": "plateau", "patience": 0}, 10)
    plateau.step_metric(1.0)
    plateau.step_metric(2.0)
    assert current_lr(plateau.inner.optimizer) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- checkpoints
def test_rng_state_roundtrip() -> None:
    gen = torch.Generator().manual_seed(3)
    state = get_rng_state(gen)
    a = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen))
    set_rng_state(state, gen)
    b = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen))
    assert a == b


def test_checkpoint_files(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, {"stage": "x", "value": step})
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-00000004.pt",
                                                                  "step-00000006.pt"]
    path, ck = find_checkpoint(tmp_path)
    assert ck["value"] == 6
    # Checkpoints are renamed into place complete, so an unreadable newest one was damaged
    # afterwards: an error naming it, never a silent fall-back to an older step.
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ConfigError, match="cannot be loaded safely") as err:
        find_checkpoint(tmp_path)
    assert err.value.path == path
    assert find_checkpoint(tmp_path / "none") is None


def test_boosting_round_structure_is_explicit() -> None:
    # khalil2022 §3.2.2: χ and the rounds h = 1..H are config keys; an epoch of T_h has no
    # fixed size, so samples_per_epoch is refused for boosting.
    k = paper_defaults("fcn32s_vgg16")
    assert (k["sampler"]["chi"], k["sampler"]["round_epochs"], k["sampler"]["rounds"]) \
        == (1.0, 1, None)
    cfg = resolve_config("fcn32s_vgg16", {"sampler": {"rounds": 3, "round_epochs": 2}})
    assert (cfg["sampler"]["rounds"], cfg["sampler"]["round_epochs"]) == (3, 2)
    with pytest.raises(ConfigError, match="samples_per_epoch does not apply to boosting"):
        resolve_config("fcn32s_vgg16", {"sampler": {"samples_per_epoch": 100}})
    with pytest.raises(ConfigError, match=r"sampler\.round_epochs"):
        resolve_config("fcn32s_vgg16", {"sampler": {"round_epochs": 0}})
