"""Model packages: save/load round trips, provenance, and every kind of broken package."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from qpseg import __version__
from qpseg.errors import ModelError
from qpseg.models import (
    create_model,
    describe_package,
    get_entry,
    load_package,
    make_inputs,
    predict,
    read_package_config,
    save_package,
    validate_package,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _trained_like(name: str, num_classes: int = 2, **kwargs: Any) -> torch.nn.Module:
    """A model with non-trivial weights and batch-norm statistics (one train-mode pass)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes, **(kwargs or dict(get_entry(name).tiny)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        if model.contract.output != "instance":  # detection models need targets in training
            model.train()
            model(*make_inputs(model.contract, 2, seed=5))
    return model.eval()


def _save(tmp_path: Path, model: torch.nn.Module, **kwargs: Any) -> Path:
    n = model.contract.num_classes
    args: dict[str, Any] = {
        "class_names": ["Background", "Tumor", "Stroma"][:n] + [f"c{i}" for i in range(3, n)],
        "mpp": 0.5, "training": {"slides": 3, "pixels": {"Tumor": 1234}}}
    args.update(kwargs)
    return save_package(tmp_path / "pkg", model, **args)


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", ["tiny_unet", "dmmn_m3", "mobilenetv2_patch", "h2g_net",
                                  "gb_unet", "fcn8s_vgg16", "otsu_watershed",
                                  pytest.param("maskrcnn_resnet101", marks=pytest.mark.slow)])
def test_round_trip_is_bit_for_bit(tmp_path: Path, name: str) -> None:
    model = _trained_like(name, 3 if name != "otsu_watershed" else 2)
    directory = _save(tmp_path, model)
    pkg = load_package(directory)
    assert not pkg.model.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), pkg.model.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b), k
    inputs = make_inputs(model.contract, 2, seed=9)
    with torch.no_grad():
        expected, got = model(*inputs), pkg.model(*inputs)
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, got)
    else:
        for d1, d2 in zip(expected, got, strict=True):
            assert all(torch.equal(d1[k], d2[k]) for k in d1)
    assert pkg.contract == model.contract


def test_config_content_and_provenance(tmp_path: Path) -> None:
    import numpy as np

    model = _trained_like("dmmn_m3", 3)
    directory = _save(tmp_path, model, class_colors=[[255, 255, 255], [200, 0, 0], [0, 150, 0]],
                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                      training={"slides": np.int64(3), "pixels": {"Tumor": 1234},
                                "project": Path("/data/p.qpproj"), "lr": np.float32(0.5)})
    data = json.loads((directory / "config.json").read_text())
    assert data["format"] == "qpseg-model" and data["format_version"] == 1
    assert data["qpseg_version"] == __version__
    assert data["architecture"] == "dmmn_m3"
    assert data["architecture_kwargs"] == {"base_filters": 4, "tile_px": 64}
    assert data["input_mpp"] == [0.5, 1.0, 2.0]  # 20x / 10x / 5x
    assert data["tile_px"] == 64 and data["ignore_index"] == 255
    assert data["class_colors"][1] == [200, 0, 0]
    assert data["training"] == {"slides": 3, "pixels": {"Tumor": 1234},
                                "project": "/data/p.qpproj", "lr": 0.5}
    weights = directory / "weights.pt"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert data["weights_sha256"] == digest

    pkg = load_package(directory)
    assert pkg.sha256 == digest
    assert pkg.input_mpp == (0.5, 1.0, 2.0)
    assert pkg.class_names == ("Background", "Tumor", "Stroma")
    assert pkg.provenance() == {"model_architecture": "dmmn_m3", "model_package": str(directory),
                                "model_sha256": digest, "model_qpseg_version": __version__}
    img = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(pkg.normalize(img), torch.full((1, 3, 2, 2), 2.0))
    info = describe_package(pkg)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["classes"][2] == {"index": 2, "name": "Stroma", "color": [0, 150, 0]}
    assert json.loads(json.dumps(info)) == info
    assert read_package_config(directory).architecture == "dmmn_m3"


def test_gb_unet_package_does_not_record_member_packages(tmp_path: Path) -> None:
    member = _trained_like("tiny_unet", 2, base_filters=4, tile_px=64)
    member_dir = save_package(tmp_path / "member", member, class_names=["a", "b"], mpp=0.25)
    gb = create_model("gb_unet", 2, members=["tiny_unet"] * 3,
                      member_kwargs={"base_filters": 4}, encoder_filters=[4, 4, 4, 4, 4],
                      decoder_filters=[4, 4, 4, 4, 4], tile_px=64,
                      member_packages=[str(member_dir)] * 3)
    assert torch.equal(gb.members[2].head.weight, member.head.weight)
    directory = save_package(tmp_path / "gb", gb, class_names=["a", "b"], mpp=0.25)
    data = json.loads((directory / "config.json").read_text())
    assert "member_packages" not in data["architecture_kwargs"]
    pkg = load_package(directory)
    assert torch.equal(pkg.model.members[2].head.weight, member.head.weight)
    with pytest.raises(ModelError, match="holds tiny_unet"):
        create_model("unet_ensemble", 2, members=["dmmn_s1"], member_kwargs={"base_filters": 4},
                     tile_px=64, member_packages=[str(member_dir)])


def test_validate_package_runs_the_model(tmp_path: Path) -> None:
    directory = _save(tmp_path, _trained_like("tiny_unet", 3))
    pkg = validate_package(directory)
    assert pkg.architecture == "tiny_unet"
    probs = predict(pkg.model, *make_inputs(pkg.contract, 1))
    assert probs.shape == (1, 3, 64, 64)


def test_save_refuses_to_overwrite_and_checks_classes(tmp_path: Path) -> None:
    model = _trained_like("tiny_unet", 3)
    _save(tmp_path, model)
    with pytest.raises(ModelError, match="overwrite"):
        _save(tmp_path, model)
    _save(tmp_path, model, overwrite=True)
    with pytest.raises(ModelError, match="2 class names but the model has 3"):
        _save(tmp_path, model, class_names=["a", "b"], overwrite=True)
    with pytest.raises(ModelError, match="ignore_index 1"):
        _save(tmp_path, model, ignore_index=1, overwrite=True)
    with pytest.raises(ModelError, match="create_model"):
        save_package(tmp_path / "x", torch.nn.Linear(2, 2), class_names=["a"], mpp=1.0)
    with pytest.raises(ModelError, match="weights_format"):
        _save(tmp_path, model, weights_format="onnx", overwrite=True)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    model = _trained_like("tiny_unet", 3)
    directory = _save(tmp_path, model, weights_format="safetensors")
    assert (directory / "weights.safetensors").is_file()
    assert not (directory / "weights.pt").exists()
    pkg = load_package(directory)
    x = make_inputs(model.contract, 1)
    with torch.no_grad():
        assert torch.equal(model(*x), pkg.model(*x))


def test_safetensors_without_the_package_is_a_clear_error(tmp_path: Path) -> None:
    try:
        import safetensors  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("safetensors is installed")
    model = _trained_like("tiny_unet", 3)
    with pytest.raises(ModelError, match="pip install safetensors"):
        _save(tmp_path, model, weights_format="safetensors")
    directory = _save(tmp_path, model)
    (directory / "weights.pt").rename(directory / "weights.safetensors")
    _edit(directory, weights="weights.safetensors", weights_sha256=None)
    with pytest.raises(ModelError, match="pip install safetensors"):
        load_package(directory)


# ------------------------------------------------------------------------ broken packages


def _edit(directory: Path, **changes: Any) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return _save(tmp_path, _trained_like("tiny_unet", 3))


def _error(directory: Path) -> ModelError:
    with pytest.raises(ModelError) as err:
        load_package(directory)
    text = str(err.value)
    assert "\n" not in text
    return err.value


def test_missing_config_key(package: Path) -> None:
    _edit(package, mpp=None)
    err = _error(package)
    assert err.path == package / "config.json"
    assert "missing key(s) 'mpp'" in err.message


def test_bad_json(package: Path) -> None:
    (package / "config.json").write_text('{"architecture": "tiny_unet",')
    err = _error(package)
    assert err.path == package / "config.json" and "invalid JSON" in err.message
    (package / "config.json").write_bytes(b"\xff\xfe\x00")
    assert "UTF-8" in _error(package).message


def test_unknown_architecture(package: Path) -> None:
    _edit(package, architecture="tiny_unte")
    err = _error(package)
    assert err.path == package / "config.json"
    assert "did you mean tiny_unet" in err.message


def test_wrong_tensor_shapes(package: Path) -> None:
    _edit(package, architecture_kwargs={"base_filters": 16, "tile_px": 64})
    err = _error(package)
    assert err.path == package / "weights.pt"
    assert "shape mismatch" in err.message


def test_wrong_tile_or_class_count(package: Path) -> None:
    _edit(package, tile_px=128)
    assert "tile_px 128" in _error(package).message
    _edit(package, tile_px=64, class_names=["a", "b"], class_colors=[[0, 0, 0], [1, 1, 1]])
    # num_classes follows the class names, so the 3-class head in the weights no longer fits
    assert "shape mismatch for 'head.weight'" in _error(package).message


def test_inconsistent_input_mpp(package: Path) -> None:
    _edit(package, input_mpp=[0.25])
    assert "input_mpp" in _error(package).message


def test_pickled_object_is_refused_and_not_executed(package: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    with open(package / "weights.pt", "wb") as fh:
        pickle.dump({"head.weight": Evil()}, fh)
    _edit(package, weights_sha256=None)
    err = _error(package)
    assert err.path == package / "weights.pt"
    assert "pickled Python objects" in err.message and "never runs pickled code" in err.message
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_error_never_advises_the_unsafe_loader(package: Path, tmp_path: Path,
                                                      protocol: int) -> None:
    # torch's own message says to retry with weights_only=False "if you trust the source":
    # that advice would run the payload, so none of torch's text reaches the user.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    with open(package / "weights.pt", "wb") as fh:
        pickle.dump({"head.weight": Evil()}, fh, protocol=protocol)
    _edit(package, weights_sha256=None)
    msg = _error(package).one_line()
    assert "False" not in msg and "trust" not in msg.lower() and "can still be" not in msg
    assert msg.startswith(f"{package / 'weights.pt'}: not a plain state dict of tensors: it "
                          "holds pickled Python objects")
    if protocol == 2:  # torch names the callable it refused for this protocol
        assert re.search(r"objects \((builtins\.)?exec\)", msg), msg
    assert not marker.exists()


def test_state_dict_of_non_tensors(package: Path) -> None:
    torch.save({"head.weight": [1, 2, 3]}, package / "weights.pt")
    _edit(package, weights_sha256=None)
    assert "not a named tensor" in _error(package).message
    torch.save([torch.zeros(1)], package / "weights.pt")
    assert "expected a state dict" in _error(package).message


def test_truncated_weights(package: Path) -> None:
    data = (package / "weights.pt").read_bytes()
    (package / "weights.pt").write_bytes(data[: len(data) // 2])
    assert "SHA-256" in _error(package).message
    with pytest.raises(ModelError, match="not a readable torch file") as err:
        load_package(package, check_sha256=False)
    assert err.value.path == package / "weights.pt"


def test_missing_and_extra_keys(package: Path) -> None:
    state = torch.load(package / "weights.pt", weights_only=True)
    del state["head.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, package / "weights.pt")
    _edit(package, weights_sha256=None)
    msg = _error(package).message
    assert "'head.bias'" in msg and "'extra.weight'" in msg


def test_nan_weights(package: Path) -> None:
    state = torch.load(package / "weights.pt", weights_only=True)
    state["head.weight"][0] = float("nan")
    torch.save(state, package / "weights.pt")
    _edit(package, weights_sha256=None)
    assert "NaN" in _error(package).message


def test_missing_weights_and_directory(package: Path, tmp_path: Path) -> None:
    (package / "weights.pt").unlink()
    assert "weights file 'weights.pt'" in _error(package).message
    _edit(package, weights=None, weights_sha256=None)
    assert "no weights file" in _error(package).message
    assert "not found" in _error(tmp_path / "nope").message
    assert "missing config.json" in _error(tmp_path).message
    (tmp_path / "file").write_text("x")
    assert "directory" in _error(tmp_path / "file").message


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"class_colors": [[0, 0, 0], [1, 1, 1]]}, "class_colors"),
    ({"class_colors": [[0, 0, 0], [1, 1, 1], [256, 0, 0]]}, "class colour"),
    ({"class_names": ["a", "a", "b"]}, "appears twice"),
    ({"normalization": {"mean": [0.5], "std": [0.5]}}, "normalization has 1"),
    ({"normalization": {"mean": [0, 0, 0], "std": [1, 0, 1]}}, "std must be positive"),
    ({"mpp": -1}, "mpp"),
    ({"format_version": 2}, "newer"),
    ({"format": "onnx"}, "format"),
    ({"weights": "../evil.pt"}, "weights must be a file name"),
    ({"weights_sha256": "abc"}, "64 lowercase hex"),
    ({"architecture_kwargs": {"pretrained": "/nonexistent.pt", "tile_px": 64}}, None),
    ({"architecture_kwargs": {"tile_px": 64, "depth": "x"}}, "depth"),
    ({"training": [1, 2]}, "training must be an object"),
    ({"surprise": 1}, "unknown key"),
])
def test_invalid_config_values(package: Path, changes: dict[str, Any],
                               fragment: str | None) -> None:
    _edit(package, **changes)
    if fragment is None:  # build-only options in a config are ignored, never acted on
        assert load_package(package).architecture == "tiny_unet"
        return
    err = _error(package)
    assert fragment in err.message


# ------------------------------------------------------------------------ links out of a package


def _outside_copy(package: Path, name: str, tmp_path: Path) -> Path:
    """Move ``package/name`` outside the package and leave a link to it in its place."""
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir(exist_ok=True)
    (package / name).rename(outside)
    (package / name).symlink_to(outside)
    return outside


@pytest.mark.parametrize("name", ["weights.pt", "config.json"])
def test_link_leading_out_of_the_package_is_refused(package: Path, tmp_path: Path,
                                                    name: str) -> None:
    outside = _outside_copy(package, name, tmp_path)  # a perfectly valid file, but not ours
    err = _error(package)
    assert err.path == package / name
    assert f"is a link to {outside}, outside the model package" in err.message
    with pytest.raises(ModelError, match="outside the model package"):
        read_package_config(package) if name == "config.json" else validate_package(package)


def test_safetensors_link_out_of_the_package_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    directory = _save(tmp_path, _trained_like("tiny_unet", 2), weights_format="safetensors")
    _outside_copy(directory, "weights.safetensors", tmp_path)
    err = _error(directory)
    assert err.path == directory / "weights.safetensors" and "outside" in err.message


def test_links_inside_the_package_and_a_linked_package_folder_load(package: Path,
                                                                   tmp_path: Path) -> None:
    (package / "weights.pt").rename(package / "real.pt")
    (package / "weights.pt").symlink_to("real.pt")  # relative, stays inside
    linked = tmp_path / "linked_pkg"
    linked.symlink_to(package, target_is_directory=True)
    assert load_package(linked).sha256 == load_package(package).sha256


def test_dangling_or_looping_weights_link(package: Path) -> None:
    (package / "weights.pt").unlink()
    (package / "weights.pt").symlink_to(package / "weights.pt")  # a loop
    _edit(package, weights="weights.pt")
    assert "missing" in _error(package).message
    (package / "config.json").rename(package / "cfg.json")
    (package / "config.json").symlink_to(package / "gone.json")
    assert "missing config.json" in _error(package).message


# ------------------------------------------------------------------------ writing a package


def test_save_package_write_failure_is_an_output_error(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from qpseg.errors import OutputError

    model = _trained_like("tiny_unet", 2)

    def full(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError) as err:
        _save(tmp_path, model)
    assert err.value.path == tmp_path / "pkg" / "weights.pt"
    assert err.value.one_line() == f"{tmp_path / 'pkg' / 'weights.pt'}: no space left on device"
    assert not [p.name for p in (tmp_path / "pkg").iterdir()]  # no temp file left behind
    monkeypatch.undo()
    (tmp_path / "blocker").write_text("a file")
    with pytest.raises(OutputError) as err2:  # a package folder under a regular file
        save_package(tmp_path / "blocker" / "pkg", model, class_names=["a", "b"], mpp=0.5)
    assert err2.value.path is not None and "blocker" in str(err2.value.path)
