"""Tests of qpseg.models: registry, every architecture against its contract, paper facts."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qpseg.errors import ModelError
from qpseg.models import (
    create_model,
    get_entry,
    instance_targets_from_label_map,
    list_models,
    make_inputs,
    model_info,
    predict,
)
from qpseg.models._base import count_parameters

PAPER_MODELS = {
    # khalil2022
    "fcn32s_vgg16",
    # pedersen2022
    "mobilenetv2_patch", "h2g_refine_unet", "h2g_net",
    # lagree2021
    "unet_vgg16", "unet_vgg19", "unet_resnet50", "unet_resnet101", "unet_resnet152",
    "unet_densenet121", "unet_densenet201", "unet_inception_v3", "unet_ensemble", "gb_unet",
    "maskrcnn_resnet101", "otsu_threshold", "otsu_watershed",
    # ho2021
    "dmmn_m3", "dmmn_s1",
    # qpseg
    "tiny_unet",
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Other jobs share the two CPU cores; one thread is also the fastest for these tiny nets.
    torch.set_num_threads(1)


def _all_models() -> list[object]:
    return [pytest.param(n, marks=pytest.mark.slow) if get_entry(n).heavy else n
            for n in list_models()]


# ------------------------------------------------------------------------------ registry


def test_registry_holds_every_paper_architecture() -> None:
    names = list_models()
    assert set(names) >= PAPER_MODELS
    assert names == sorted(names)


def test_unknown_architecture_lists_close_names() -> None:
    with pytest.raises(ModelError) as err:
        create_model("unet_resnet51", 2)
    assert "unet_resnet50" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"tile_px": 60}, "multiple of 16"),
    ({"base_filters": "wide"}, "base_filters"),
    ({"no_such_option": 1}, "no_such_option"),
    ({"depth": 0}, "depth"),
])
def test_bad_options_are_model_errors(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ModelError, match=fragment):
        create_model("tiny_unet", 2, **kwargs)


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True, "2"])
def test_bad_num_classes(num_classes: object) -> None:
    with pytest.raises(ModelError, match="num_classes"):
        create_model("tiny_unet", num_classes)  # type: ignore[arg-type]


def test_importing_qpseg_models_does_not_import_torch() -> None:
    code = "import sys, qpseg.models; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_model_info_is_cheap_and_complete() -> None:
    info = model_info("unet_densenet201", 2)
    assert info["parameters"] > 20_000_000
    assert info["contract"]["output"] == "pixel"
    assert info["contract"]["inputs"][0]["size_px"] == 256
    assert "lagree2021" in info["paper"]


# ------------------------------------------------------------------ every registered model


def _pixel_loss(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(*inputs), target)


@pytest.mark.parametrize("name", _all_models())
def test_model_obeys_contract_and_learns(name: str) -> None:
    """Build small, forward a batch, check the output against the contract, train a few steps."""
    torch.manual_seed(0)
    num_classes = 3
    entry = get_entry(name)
    model = create_model(name, num_classes, **entry.tiny)
    c = model.contract
    assert c.architecture == name
    assert c.num_classes == num_classes
    for spec in c.inputs:
        assert spec.size_px % c.size_multiple == 0
    assert c.tile_px + 2 * c.context_px == c.inputs[0].size_px
    inputs = make_inputs(c, batch=2, seed=1)

    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    probs = predict(model, *inputs)
    assert not model.training or not c.trainable
    if c.output in ("pixel", "patch"):
        assert tuple(out.shape) == c.output_shape(2)
        assert torch.isfinite(out).all()
        assert tuple(probs.shape) == c.output_shape(2)
        assert torch.allclose(probs.sum(1), torch.ones(()), atol=1e-5)
    else:
        assert isinstance(probs, list) and len(probs) == 2
        for det in probs:
            k = det["labels"].shape[0]
            assert det["boxes"].shape == (k, 4)
            assert det["scores"].shape == (k,)
            assert det["masks"].shape == (k, c.output_px, c.output_px)
    for stage in c.stages:
        assert stage.num_classes == num_classes
    if c.stages:
        stage0 = model.stages[0]
        x0 = make_inputs(stage0.contract, batch=2)
        assert tuple(predict(stage0, *x0).shape) == c.stages[0].output_shape(2)

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not c.trainable:
        assert trainable == []
        return
    assert trainable
    model.train()
    if c.output == "pixel":
        # Learnable by bias and position alone: top half class 1, bottom quarters 0 and 2.
        s = c.output_px
        target = torch.ones(2, s, s, dtype=torch.long)
        target[:, s // 2:, : s // 2] = 0
        target[:, s // 2:, s // 2:] = 2

        def loss_fn() -> torch.Tensor:
            return _pixel_loss(model, inputs, target)
        opt: torch.optim.Optimizer = torch.optim.Adam(trainable, lr=2e-3)
    elif c.output == "patch":
        labels = torch.tensor([0, 2])

        def loss_fn() -> torch.Tensor:
            return F.cross_entropy(model(*inputs), labels)
        opt = torch.optim.Adam(trainable, lr=2e-3)
    else:
        lab = torch.zeros(c.tile_px, c.tile_px, dtype=torch.int64)
        lab[8:24, 8:24] = 1
        lab[30:50, 34:60] = 2
        targets = [instance_targets_from_label_map(lab)] * 2

        def loss_fn() -> torch.Tensor:
            return sum(model(inputs[0], targets).values())  # type: ignore[return-value]
        # lagree2021: gradient descent, momentum 0.9, learning rate 1e-3
        opt = torch.optim.SGD(trainable, lr=1e-3, momentum=0.9)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses


# ------------------------------------------------------------------ paper facts


def test_dmmn_parameter_counts_match_ho2021_table2() -> None:
    # ho2021 Table 2 (C = 7 outputs): U-Net 34,550,663; DMMN-S2 34,554,119; DMMN-M3 27,071,303.
    assert model_info("dmmn_s1", 7)["parameters"] == 34_550_663
    assert model_info("dmmn_s2", 7)["parameters"] == 34_554_119
    assert model_info("dmmn_m3", 7)["parameters"] == 27_071_303


def _bn_channels(model: torch.nn.Module) -> int:
    return sum(m.num_features for m in model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_h2g_parameter_counts_match_pedersen2022() -> None:
    # §3.2: MobileNetV2 ~2.39 M, U-Net ~11.58 M; Keras counts batch-norm statistics too.
    mob = create_model("mobilenetv2_patch", 2, meta=True)
    assert count_parameters(mob) + 2 * _bn_channels(mob) == 2_386_686  # Keras: 2,386,686
    unet = create_model("h2g_refine_unet", 2, meta=True)
    keras_count = count_parameters(unet) + 2 * _bn_channels(unet)
    assert abs(keras_count - 11.58e6) / 11.58e6 < 2e-3
    assert unet.contract.inputs[0].size_px == 1024
    assert [s.channels for s in unet.contract.inputs] == [3, 1]


def test_fcn32s_is_vgg16_plus_fully_convolutional_head() -> None:
    c = 2
    model = create_model("fcn32s_vgg16", c, meta=True)
    vgg16_convs = 14_714_688  # torchvision vgg16().features
    fc6 = 512 * 7 * 7 * 4096 + 4096
    fc7 = 4096 * 4096 + 4096
    assert count_parameters(model) == vgg16_convs + fc6 + fc7 + (4096 * c + c) + c * c * 64 * 64
    assert model.upscore.kernel_size == (64, 64) and model.upscore.stride == (32, 32)
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 2
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 5
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13 and all(m.kernel_size == (3, 3) for m in convs)


def test_vgg_and_resnet_key_names_are_torchvision_names() -> None:
    import torchvision

    with torch.device("meta"):
        tv_vgg = torchvision.models.vgg16(weights=None).features.state_dict()
        tv_res = torchvision.models.resnet101(weights=None).state_dict()
    fcn = create_model("fcn32s_vgg16", 2, meta=True)
    assert [k for k in fcn.state_dict() if k.startswith("features.")] == [
        f"features.{k}" for k in tv_vgg]
    unet = create_model("unet_resnet101", 2, meta=True)
    body = unet.encoder.body.state_dict()
    assert set(body) == {k for k in tv_res if not k.startswith("fc.")}
    assert count_parameters(unet.encoder) == 44_549_160 - 2_049_000  # resnet101 minus fc


@pytest.mark.parametrize("name", ["fcn32s_vgg16", "fcn8s_vgg16"])
@pytest.mark.parametrize("tile", [31, 64, 100, 257])
def test_fcn_output_covers_any_tile(name: str, tile: int) -> None:
    model = create_model(name, 2, width_mult=1 / 32, tile_px=tile).eval()
    (x,) = make_inputs(model.contract, 1)
    assert model(x).shape == (1, 2, tile, tile)
    ctx = create_model(name, 2, width_mult=1 / 32, tile_px=tile, pad_mode="context").eval()
    assert ctx.contract.inputs[0].size_px == tile + 200 and ctx.contract.context_px == 100
    (xc,) = make_inputs(ctx.contract, 1)
    assert ctx(xc).shape == (1, 2, tile, tile)


@pytest.mark.parametrize("name", ["fcn32s_vgg16", "fcn8s_vgg16"])
def test_fcn_crop_is_centred(name: str) -> None:
    """With mirror-symmetric kernels the net is mirror-equivariant iff every crop is centred:
    a mirror-symmetric input must give a mirror-symmetric output (an off-by-one crop breaks
    this)."""
    torch.manual_seed(0)
    model = create_model(name, 2, width_mult=1 / 16, tile_px=504).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.copy_((p + p.flip(-1)) / 2)
            if p.dim() == 4 and p.shape[-1] == 1:
                p.add_(0.01)  # zero-initialised 1×1 score layers: make them non-trivial
        x = torch.randn(1, 3, 504, 504)
        x = (x + x.flip(-1)) / 2
        out = model(x)
    assert out.abs().max() > 0
    assert torch.allclose(out, out.flip(-1), atol=1e-5 * float(out.abs().max()))


def test_pretrained_vgg16_state_dict_fills_fcn(tmp_path: Path) -> None:
    """A torchvision-style VGG16 checkpoint: features.* and fc6/fc7 reshaped to convolutions."""
    from qpseg.models._backbones import VGG16_CFG, make_vgg_features

    w = 1 / 16
    feats = make_vgg_features(VGG16_CFG, width_mult=w)
    state = {f"features.{k}": v for k, v in feats.state_dict().items()}
    state["classifier.0.weight"] = torch.randn(256, 32 * 7 * 7)
    state["classifier.0.bias"] = torch.randn(256)
    state["classifier.3.weight"] = torch.randn(256, 256)
    state["classifier.3.bias"] = torch.randn(256)
    state["classifier.6.weight"] = torch.randn(1000, 256)
    state["classifier.6.bias"] = torch.randn(1000)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model = create_model("fcn32s_vgg16", 2, width_mult=w, tile_px=64, pretrained=path)
    assert torch.equal(model.features[0].weight, state["features.0.weight"])
    assert torch.equal(model.fc6.weight, state["classifier.0.weight"].reshape(256, 32, 7, 7))
    assert torch.equal(model.fc7.weight[:, :, 0, 0], state["classifier.3.weight"])
    assert model.qpseg_config["kwargs"] == {"width_mult": w, "tile_px": 64}

    state["features.0.weight"] = torch.randn(5, 3, 3, 3)
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"shape mismatch for 'features.0.weight'") as err:
        create_model("fcn32s_vgg16", 2, width_mult=w, tile_px=64, pretrained=path)
    assert str(path) in str(err.value)
    del state["features.0.weight"]
    state["head.bias"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"head\.bias"):
        create_model("fcn32s_vgg16", 2, width_mult=w, tile_px=64, pretrained=path)


def test_pretrained_torchvision_checkpoints_fill_encoders(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    mob = torchvision.models.mobilenet_v2(weights=None).state_dict()
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(mob, path)
    model = create_model("mobilenetv2_patch", 2, pretrained=path)
    assert torch.equal(model.features[0][0].weight, mob["features.0.0.weight"])
    h2g = create_model("h2g_net", 2, pretrained=path)
    assert torch.equal(h2g.stages[0].features[18][0].weight, mob["features.18.0.weight"])

    res = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(res, path)
    unet = create_model("unet_resnet50", 2, decoder_filters=(8, 8, 8, 8, 8), pretrained=path)
    assert torch.equal(unet.encoder.body.layer4[2].conv3.weight, res["layer4.2.conv3.weight"])
    del res["layer1.0.conv1.weight"]
    torch.save(res, path)
    with pytest.raises(ModelError, match=r"missing.*layer1.0.conv1.weight"):
        create_model("unet_resnet50", 2, decoder_filters=(8, 8, 8, 8, 8), pretrained=path)


def test_pretrained_arbitrary_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"features.0.weight": torch.zeros(1), "x": Path("/")}, path)
    with pytest.raises(ModelError, match="weights_only"):
        create_model("tiny_unet", 2, pretrained=path)


# ------------------------------------------------------------------ behaviour of models


def test_fcn_padding_layer_gives_712_input() -> None:
    model = create_model("fcn32s_vgg16", 2, width_mult=1 / 32).eval()
    seen: list[tuple[int, ...]] = []
    model.features[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    (x,) = make_inputs(model.contract, 1)
    assert model(x).shape == (1, 2, 512, 512)
    assert seen == [(1, 3, 712, 712)]


def test_dmmn_m3_uses_all_three_magnifications() -> None:
    torch.manual_seed(0)
    model = create_model("dmmn_m3", 2, base_filters=4, tile_px=64)
    c = model.contract
    assert [s.scale for s in c.inputs] == [1.0, 2.0, 4.0]
    assert [s.field_px for s in c.inputs] == [64, 128, 256]
    assert c.input_mpp(0.5) == (0.5, 1.0, 2.0)
    inputs = [x.requires_grad_(True) for x in make_inputs(c, 1)]
    model(*inputs)[:, 1].sum().backward()
    for x in inputs:
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_center_crop() -> None:
    from qpseg.models.dmmn import center_crop

    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    assert torch.equal(center_crop(x, 2), x[..., 2:6, 2:6])
    assert torch.equal(center_crop(x, 4), x[..., 3:5, 3:5])


def test_ensemble_is_mean_of_member_probabilities() -> None:
    torch.manual_seed(0)
    model = create_model("unet_ensemble", 2, members=["tiny_unet", "dmmn_s1"],
                         member_kwargs={"base_filters": 4}, tile_px=64).eval()
    (x,) = make_inputs(model.contract, 2)
    expected = torch.stack([predict(m, x) for m in model.members]).mean(0)
    assert torch.allclose(predict(model, x), expected, atol=1e-6)


def test_gb_unet_stacks_member_maps_and_keeps_members_frozen() -> None:
    torch.manual_seed(0)
    model = create_model("gb_unet", 2, **get_entry("gb_unet").tiny)
    first_conv = model.second.encoder.blocks[0][0][0]
    assert first_conv.in_channels == 3 + 3 * 2  # image + three members' two-class maps
    before = [p.clone() for p in model.members.parameters()]
    model.train()
    assert not any(m.training for m in model.members.modules())
    (x,) = make_inputs(model.contract, 2)
    F.cross_entropy(model(x), torch.zeros(2, 64, 64, dtype=torch.long)).backward()
    assert all(p.grad is None for p in model.members.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.members.parameters(),
                                                 strict=True))


def test_h2g_net_describes_both_stages() -> None:
    model = create_model("h2g_net", 2, **get_entry("h2g_net").tiny)
    c = model.contract
    patch, refine = c.stages
    assert patch.output == "patch" and patch.output_stride == patch.tile_px
    assert refine.inputs[1].kind == "heatmap" and refine.inputs[1].heatmap_class == 1
    assert all(s.scale is None for s in c.inputs)  # whole slide resized
    assert c.input_mpp(1.0) == (None, None)


def _disc_image(size: int = 96) -> tuple[torch.Tensor, int]:
    """Light background with three dark nuclei, two of them touching."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = torch.full((3, size, size), 0.9)
    centres = [(24, 24), (60, 50), (60, 68)]  # the last two touch
    for cy, cx in centres:
        img[:, (yy - cy) ** 2 + (xx - cx) ** 2 <= 10 ** 2] = 0.2
    return img[None], len(centres)


def test_otsu_baselines_find_nuclei() -> None:
    img, n = _disc_image()
    otsu = create_model("otsu_threshold", 2, tile_px=96)
    ws = create_model("otsu_watershed", 2, tile_px=96)
    assert count_parameters(otsu) == 0 and not otsu.contract.trainable
    (det_otsu,) = predict(otsu, img)
    (det_ws,) = predict(ws, img)
    assert len(det_otsu["labels"]) == n - 1  # touching nuclei merge without watershed
    assert len(det_ws["labels"]) == n
    assert set(det_ws["labels"].tolist()) == {1}
    assert torch.all(det_ws["scores"] == 1)
    area = det_ws["masks"].sum((1, 2))
    assert torch.all((area > 250) & (area < 400))  # discs of radius 10: 317 px
    blank = torch.zeros(1, 3, 96, 96)
    assert len(predict(ws, blank)[0]["labels"]) == 0


def test_instance_targets_from_label_map() -> None:
    lab = torch.zeros(10, 12, dtype=torch.int64)
    lab[1:3, 2:5] = 4
    lab[6:9, 0:2] = 7
    t = instance_targets_from_label_map(lab, {4: 1, 7: 2})
    assert t["boxes"].tolist() == [[2, 1, 5, 3], [0, 6, 2, 9]]
    assert t["labels"].tolist() == [1, 2]
    assert t["masks"].shape == (2, 10, 12) and int(t["masks"].sum()) == 6 + 6
    empty = instance_targets_from_label_map(torch.zeros(4, 4, dtype=torch.int64))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 4, 4)


def test_predict_restores_training_mode() -> None:
    model = create_model("tiny_unet", 2, tile_px=32).train()
    predict(model, *make_inputs(model.contract, 1))
    assert model.training
    with pytest.raises(ModelError, match="takes 1 input"):
        predict(model, *make_inputs(model.contract, 1), torch.zeros(1))


def test_tiny_unet_size() -> None:
    n = model_info("tiny_unet", 2)["parameters"]
    assert 100_000 <= n <= 500_000


@pytest.mark.slow
def test_pretrained_resnet101_fills_mask_rcnn_backbone(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    res = torchvision.models.resnet101(weights=None).state_dict()
    path = tmp_path / "resnet101.pth"
    torch.save(res, path)
    model = create_model("maskrcnn_resnet101", 2, tile_px=64, frozen_bn=True, pretrained=path)
    body = model.backbone.body
    assert torch.equal(body.layer3[22].conv2.weight, res["layer3.22.conv2.weight"])
    assert torch.equal(body.bn1.running_var, res["bn1.running_var"])
    assert body.conv1.weight.requires_grad  # trainable_layers=5 (default) trains the stem
