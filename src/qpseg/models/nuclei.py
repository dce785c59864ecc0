"""Nuclei segmentation models of lagree2021 (Sci Rep 11:8025, 2021).

* ``unet_<encoder>`` — Methods, "U-net": U-Nets whose encoder is VGG-16, VGG-19, ResNet-50,
  ResNet-101, ResNet-152, DenseNet-121, DenseNet-201 or Inception-v3 (:mod:`qpseg.models.unet`),
  256×256 tiles of 40× images (≈0.25 µm/px), two classes (background, nucleus) by default.
* ``unet_ensemble`` — Methods, "Ensemble networks": "the pixel-wise mean of the probability maps
  from the U-Net like DCNNs with VGG-19, ResNet-101, and DenseNet-121 encoders".
* ``gb_unet`` — Methods, "Ensemble networks" and Fig. 1: the feature maps "taken from the last
  convolutional layer, just before the SoftMax activation" of the same three U-Nets are
  concatenated with the H&E image and fed to a second U-Net whose encoder has "repeated blocks
  of 3×3 convolutions, batch normalization, ReLU activation, and Dropout layers" and whose
  decoder is that of the other U-Nets.
* ``maskrcnn_resnet101`` — Methods, "Mask R-CNN": torchvision Mask R-CNN with a ResNet-101 FPN
  backbone (the paper used matterport's Keras implementation, initialised from COCO).
* ``otsu_threshold`` / ``otsu_watershed`` — Methods, "Classical segmentation techniques": Otsu
  threshold (scikit-image) and the watershed transform, here on the distance transform of the
  Otsu foreground; non-learned "models" with the same ``predict`` interface (instance output).

Choices the paper leaves open are marked "assumption" below.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN

from qpseg.errors import ModelError
from qpseg.models._backbones import ENCODERS, make_encoder
from qpseg.models._base import (
    NamedWeights,
    QpsegModule,
    as_int_tuple,
    check_fraction,
    check_positive_int,
)
from qpseg.models.contract import InputSpec, ModelContract, get_contract
from qpseg.models.registry import create_model, register_model
from qpseg.models.unet import DEFAULT_DECODER_FILTERS, EncoderUNet, PlainEncoder

__all__ = [
    "PRECISION_IOU",
    "THRESHOLD_GRID",
    "EnsembleUNet",
    "GBUNet",
    "OtsuWatershed",
    "PrecisionSweep",
    "QpsegMaskRCNN",
    "foreground_at",
    "gb_unet",
    "maskrcnn_resnet101",
    "nuclei_objects",
    "otsu_threshold",
    "otsu_watershed",
    "unet_ensemble",
]

PAPER = "lagree2021 (Sci Rep 11:8025)"
LAGREE_MPP = 0.25  # 40× MoNuSeg/TNBC images
ENSEMBLE_MEMBERS: tuple[str, ...] = ("unet_vgg19", "unet_resnet101", "unet_densenet121")


# --------------------------------------------------------------------- U-Nets with encoders

def _unet_builder(encoder_name: str) -> Any:
    def build(num_classes: int, *, width_mult: float = 1.0,
              decoder_filters: Sequence[int] = DEFAULT_DECODER_FILTERS,
              tile_px: int = 256) -> EncoderUNet:
        width_mult = check_fraction("width_mult", width_mult, low=1e-3, high=4.0)
        tile_px = check_positive_int("tile_px", tile_px, maximum=1 << 14)
        encoder = make_encoder(encoder_name, width_mult)
        model = EncoderUNet(num_classes, encoder, name=f"unet_{encoder_name}", tile_px=tile_px,
                            decoder_filters=decoder_filters,
                            center=encoder_name.startswith("vgg"),
                            paper=f"{PAPER}, Methods 'U-net' ({encoder.label} encoder)",
                            default_mpp=LAGREE_MPP)
        model.contract = replace(model.contract, objects="nuclei")  # lagree2021 segments nuclei
        return model

    build.__doc__ = f"U-Net with a torchvision {encoder_name} encoder (lagree2021)."
    return build


_TINY_DECODER = (16, 16, 8, 8, 8)
for _enc in ENCODERS:
    _tiny: dict[str, Any] = {"decoder_filters": _TINY_DECODER, "tile_px": 64}
    if _enc != "inception_v3":  # every encoder but Inception-v3 has a width option
        _tiny["width_mult"] = 0.125
    register_model(f"unet_{_enc}", paper=f"{PAPER}, Methods 'U-net'", tiny=_tiny,
                   summary=f"U-Net with a {_enc} encoder (lagree2021)", paper_init="imagenet",
                   paper_init_source="lagree2021 Methods 'U-net' (\"Weights pre-trained on the "
                                     "ImageNet dataset initialized each DCNN\")",
                   )(_unet_builder(_enc))


# --------------------------------------------------------------------- ensembles

def _build_members(members: Sequence[str], num_classes: int, tile_px: int,
                   member_kwargs: Mapping[str, Any] | None) -> list[QpsegModule]:
    if isinstance(members, str) or not members:
        raise ValueError("members must be a non-empty list of architecture names")
    if member_kwargs is not None and not isinstance(member_kwargs, Mapping):
        raise ValueError("member_kwargs must be an object of keyword arguments")
    built = []
    for name in members:
        model = create_model(name, num_classes, tile_px=tile_px, **dict(member_kwargs or {}))
        c = get_contract(model)
        if c.output != "pixel" or len(c.inputs) != 1 or c.output_px != tile_px:
            raise ValueError(f"member {name} is not a single-input pixel model at {tile_px} px")
        built.append(model)
    return built


def _load_member_packages(members: Sequence[nn.Module],
                          packages: Sequence[str | os.PathLike[str]] | None) -> None:
    if packages is None:
        return
    from qpseg.models.package import load_package

    if isinstance(packages, str | os.PathLike) or len(packages) != len(members):
        raise ModelError(f"member_packages must list one package per member ({len(members)})")
    for model, directory in zip(members, packages, strict=True):
        pkg = load_package(directory)
        want = getattr(model, "qpseg_config", {}).get("architecture")
        if pkg.architecture != want:
            raise ModelError(f"member package holds {pkg.architecture}, expected {want}",
                             directory)
        model.load_state_dict(pkg.model.state_dict())
        setattr(model, "qpseg_from_package", str(directory))  # noqa: B010 (nn.Module typing)


def _members_weights(members: Iterable[nn.Module]) -> NamedWeights:
    """The named weights of every member, per name (a name every member offers). Members
    loaded from ``member_packages`` are trained already and take none (when all are, ImageNet
    loads nothing)."""
    fresh = [m for m in members if not getattr(m, "qpseg_from_package", None)]
    if not fresh:
        return {"imagenet": []}
    offers = [m.pretrained_weights() if isinstance(m, QpsegModule) else {} for m in fresh]
    out: NamedWeights = {}
    for name in set().union(*offers):
        parts = [o.get(name) for o in offers]
        if all(isinstance(p, list) for p in parts):
            out[name] = [item for p in parts if isinstance(p, list) for item in p]
    return out


def _lcm(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


class EnsembleUNet(QpsegModule):
    """Pixel-wise mean of the members' softmax probabilities (returned as log-probabilities,
    which are valid logits: their softmax is the mean probability)."""

    def __init__(self, num_classes: int, members: Sequence[nn.Module], tile_px: int) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        contracts = [get_contract(m) for m in members]
        self.contract = ModelContract(
            architecture="unet_ensemble", num_classes=num_classes,
            inputs=(InputSpec("image", tile_px, 1.0, 3),), output="pixel", tile_px=tile_px,
            output_px=tile_px, size_multiple=_lcm([c.size_multiple for c in contracts]),
            margin_px=max(c.margin_px for c in contracts),
            paper=f"{PAPER}, Methods 'Ensemble networks' (U-Net ensemble)",
            default_mpp=LAGREE_MPP, objects="nuclei")

    def pretrained_weights(self) -> NamedWeights:
        """Each member's ImageNet encoder."""
        return _members_weights(self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(x), dim=1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))


@register_model("unet_ensemble", paper=f"{PAPER}, Methods 'Ensemble networks'",
                init_only=("member_packages",),
                tiny={"members": ["tiny_unet"] * 3, "member_kwargs": {"base_filters": 4},
                      "tile_px": 64})
def unet_ensemble(num_classes: int, *, members: Sequence[str] = ENSEMBLE_MEMBERS,
                  member_kwargs: Mapping[str, Any] | None = None, tile_px: int = 256,
                  member_packages: Sequence[str] | None = None) -> EnsembleUNet:
    """Mean of the probability maps of U-Nets with VGG-19, ResNet-101 and DenseNet-121 encoders.

    ``member_packages`` (build time only) loads each member from a trained model package.
    """
    tile_px = check_positive_int("tile_px", tile_px, maximum=1 << 14)
    built = _build_members(members, num_classes, tile_px, member_kwargs)
    _load_member_packages(built, member_packages)
    return EnsembleUNet(num_classes, built, tile_px)


class GBUNet(QpsegModule):
    """Two-stage "gradient boosting" U-Net: members' pre-softmax maps + image → second U-Net.

    With ``freeze_members`` (default) the members are trained beforehand and stay fixed (eval
    mode, no gradients) while the second stage trains, as in the paper's two-stage description.
    """

    def __init__(self, num_classes: int, members: Sequence[nn.Module], second: EncoderUNet,
                 freeze_members: bool) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.second = second
        self.freeze_members = freeze_members
        if freeze_members:
            for p in self.members.parameters():
                p.requires_grad_(False)
        c = second.contract
        self.contract = ModelContract(
            architecture="gb_unet", num_classes=num_classes,
            inputs=(InputSpec("image", c.tile_px, 1.0, 3),),
            output="pixel", tile_px=c.tile_px, output_px=c.output_px,
            size_multiple=_lcm([c.size_multiple] + [get_contract(m).size_multiple
                                                    for m in members]),
            margin_px=c.margin_px, paper=f"{PAPER}, Methods 'Ensemble networks' and Fig. 1 "
                                         "(GB U-Net)", default_mpp=LAGREE_MPP,
            objects="nuclei")

    def pretrained_weights(self) -> NamedWeights:
        """Each member's ImageNet encoder (members trained beforehand come from
        ``member_packages`` instead); the second stage has no published weights."""
        return _members_weights(self.members)

    def train(self, mode: bool = True) -> GBUNet:
        """Frozen members stay in eval mode (fixed batch-norm statistics)."""
        super().train(mode)
        if self.freeze_members:
            self.members.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_members:
            with torch.no_grad():
                maps = [m(x) for m in self.members]
        else:
            maps = [m(x) for m in self.members]
        return self.second(torch.cat([x, *maps], dim=1))


@register_model("gb_unet", paper=f"{PAPER}, Methods 'Ensemble networks', Fig. 1",
                init_only=("member_packages",),
                tiny={"members": ["tiny_unet"] * 3, "member_kwargs": {"base_filters": 4},
                      "encoder_filters": [4, 8, 8, 16, 16], "decoder_filters": [8, 8, 8, 4, 4],
                      "tile_px": 64})
def gb_unet(num_classes: int, *, members: Sequence[str] = ENSEMBLE_MEMBERS,
            member_kwargs: Mapping[str, Any] | None = None,
            encoder_filters: Sequence[int] = (64, 128, 256, 512, 512),
            decoder_filters: Sequence[int] = DEFAULT_DECODER_FILTERS, dropout: float = 0.2,
            freeze_members: bool = True, tile_px: int = 256,
            member_packages: Sequence[str] | None = None) -> GBUNet:
    """GB U-Net: three U-Nets' pre-softmax maps stacked with the image into a second U-Net.

    Assumptions (the paper gives no numbers): the second-stage encoder has VGG-16-like widths
    ``encoder_filters`` with dropout ``dropout`` after every conv-BN-ReLU.
    """
    tile_px = check_positive_int("tile_px", tile_px, maximum=1 << 14)
    dropout = check_fraction("dropout", dropout, high=0.95)
    enc_filters = as_int_tuple("encoder_filters", encoder_filters, maximum=4096)
    built = _build_members(members, num_classes, tile_px, member_kwargs)
    _load_member_packages(built, member_packages)
    in_ch = 3 + num_classes * len(built)
    second = EncoderUNet(num_classes, PlainEncoder(in_ch, enc_filters, dropout),
                         name="gb_unet_stage2", tile_px=tile_px, decoder_filters=decoder_filters,
                         in_channels=in_ch)
    return GBUNet(num_classes, built, second, bool(freeze_members))


# --------------------------------------------------------------------- Mask R-CNN

class QpsegMaskRCNN(MaskRCNN, QpsegModule):
    """torchvision Mask R-CNN that accepts a batched ``(N, 3, H, W)`` tensor and has a
    contract; images are normalised outside (the internal transform's mean/std are 0/1)."""

    def forward(self, images: Any, targets: Any = None) -> Any:
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        return super().forward(images, targets)

    def load_backbone_state_dict(self, state: Mapping[str, torch.Tensor],
                                 path: str | os.PathLike[str] | None) -> None:
        """Load torchvision ImageNet ResNet-101 weights into the FPN backbone's body, or a whole
        detector's weights with torchvision's Mask R-CNN key names (see
        :meth:`load_detector_state_dict`)."""
        from qpseg.models._weights import load_subset

        if any(k.startswith(("rpn.", "roi_heads.")) for k in state):
            self.load_detector_state_dict(state, path)
            return
        prefix = "backbone.body." if any(k.startswith("backbone.body.") for k in state) else ""
        body: Any = self.backbone
        load_subset(body.body, state, path, prefix=prefix, ignore=("fc.",),
                    what="ResNet-101 backbone")

    def load_detector_state_dict(self, state: Mapping[str, torch.Tensor],
                                 path: str | os.PathLike[str] | None) -> None:
        """Load a whole Mask R-CNN state dict with torchvision's key names (e.g. COCO weights).

        Every tensor must fit except the class-specific predictors
        (``roi_heads.box_predictor.*``, ``roi_heads.mask_predictor.mask_fcn_logits.*``): COCO's
        91 classes are not this model's, so those keep their fresh initialisation when the
        shapes differ. Anything else missing, surplus or misshapen is a ModelError.
        """
        from qpseg.models._weights import load_checked

        heads = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
        own = self.state_dict()
        kept = {k: v for k, v in state.items() if not (
            k.startswith(heads) and k in own and tuple(v.shape) != tuple(own[k].shape))}
        fresh = {k: own[k] for k in own if k.startswith(heads) and k not in kept}
        load_checked(self, {**kept, **fresh}, path, what="Mask R-CNN")

    def pretrained_weights(self) -> NamedWeights:
        """ImageNet ResNet-101 for the backbone body. lagree2021 (Methods, "Mask R-CNN")
        started from COCO weights, which torchvision does not publish for ResNet-101."""
        return {
            "imagenet": [("ResNet101_Weights.IMAGENET1K_V1", self.load_backbone_state_dict)],
            "coco": "torchvision publishes COCO Mask R-CNN weights for a ResNet-50 FPN only "
                    "(MaskRCNN_ResNet50_FPN_Weights.COCO_V1), not for the ResNet-101 of "
                    "lagree2021; use pretrained: imagenet, or convert a COCO ResNet-101 Mask "
                    "R-CNN (e.g. matterport's mask_rcnn_coco.h5) into a state dict with "
                    "torchvision's Mask R-CNN key names and give its path as pretrained (the "
                    "class-specific heads start fresh)",
        }


@register_model("maskrcnn_resnet101", paper=f"{PAPER}, Methods 'Mask R-CNN'", heavy=True,
                paper_init="coco",
                paper_init_source="lagree2021 Methods 'Mask R-CNN' (\"ResNet-101 was initialized"
                                  " with weights pre-trained on the common objects in context "
                                  "(COCO) dataset\")",
                tiny={"tile_px": 64, "proposals_train": 64, "rois_per_image": 32,
                      "detections_per_img": 16})
def maskrcnn_resnet101(num_classes: int, *, tile_px: int = 256, frozen_bn: bool = False,
                       trainable_layers: int = 5,
                       anchor_sizes: Sequence[int] = (8, 16, 32, 64, 128),
                       detections_per_img: int = 300, proposals_train: int = 2000,
                       rois_per_image: int = 512) -> QpsegMaskRCNN:
    """Mask R-CNN, ResNet-101 FPN backbone (torchvision), instance output.

    ``num_classes`` counts the background (2 = background + nucleus). Assumptions: anchor sizes
    8-128 px and up to 300 detections per 256 px tile follow matterport's nucleus sample (nuclei
    are small and many); images are not resized (``min_size = max_size = tile_px``); batch norm
    is trainable because no COCO weights can be downloaded (``frozen_bn=True`` with
    ``pretrained=`` ImageNet weights reproduces torchvision's fine-tuning setup).
    ``proposals_train`` (RPN proposals kept per image in training) and ``rois_per_image`` (RoIs
    sampled for the heads) default to torchvision's 2000 and 512.
    """
    import torchvision
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import misc as misc_nn_ops
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    if num_classes < 2:
        raise ValueError("Mask R-CNN needs num_classes >= 2 (background + objects)")
    tile_px = check_positive_int("tile_px", tile_px, maximum=1 << 14)
    trainable_layers = check_positive_int("trainable_layers", trainable_layers, maximum=5)
    sizes = as_int_tuple("anchor_sizes", anchor_sizes, maximum=4096)
    if len(sizes) != 5:
        raise ValueError("anchor_sizes needs 5 sizes (one per FPN level)")
    detections = check_positive_int("detections_per_img", detections_per_img, maximum=10000)
    proposals = check_positive_int("proposals_train", proposals_train, maximum=100000)
    rois = check_positive_int("rois_per_image", rois_per_image, maximum=100000)
    norm = misc_nn_ops.FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    # resnet_fpn_backbone(backbone_name="resnet101", weights=None) spelled out, to start the
    # residual branches at zero: from random init the un-normalised mask head otherwise sees
    # activations that grow over ResNet-101's 33 blocks (initial mask loss ~25 instead of ~0.7).
    resnet = torchvision.models.resnet101(weights=None, norm_layer=norm,
                                          zero_init_residual=True)
    train_layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train_layers.append("bn1")
    for pname, param in resnet.named_parameters():
        if not pname.startswith(tuple(train_layers)):
            param.requires_grad_(False)
    backbone = BackboneWithFPN(resnet, {"layer1": "0", "layer2": "1", "layer3": "2",
                                        "layer4": "3"}, [256, 512, 1024, 2048], 256,
                               extra_blocks=LastLevelMaxPool(), norm_layer=None)
    anchors = AnchorGenerator(sizes=tuple((s,) for s in sizes),
                              aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    model = QpsegMaskRCNN(backbone, num_classes=num_classes, min_size=tile_px, max_size=tile_px,
                          image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                          rpn_anchor_generator=anchors, box_detections_per_img=detections,
                          rpn_pre_nms_top_n_train=proposals, rpn_post_nms_top_n_train=proposals,
                          box_batch_size_per_image=rois)
    model.contract = ModelContract(
        architecture="maskrcnn_resnet101", num_classes=num_classes,
        inputs=(InputSpec("image", tile_px, 1.0, 3),), output="instance", tile_px=tile_px,
        output_px=tile_px, size_multiple=32, margin_px=tile_px // 8,
        paper=f"{PAPER}, Methods 'Mask R-CNN'", default_mpp=LAGREE_MPP, objects="nuclei",
        notes="train: model(images, targets) returns a dict of losses (torchvision API)")
    return model


# --------------------------------------------------------------------- classical baselines

# ITU-R 601 luma weights as in skimage.color.rgb2gray.
_GRAY = (0.2125, 0.7154, 0.0721)


class OtsuWatershed(QpsegModule):
    """Otsu threshold (+ optional distance-transform watershed) nuclei segmentation.

    Non-learned: no parameters, ``trainable=False`` in the contract. ``forward`` and
    ``predict`` both return instance dicts (boxes, labels, scores = 1, masks). Nuclei are the
    dark (haematoxylin) pixels: foreground is the gray level *below* the Otsu threshold. The
    threshold is invariant to the affine normalisation applied to the inputs.
    """

    def __init__(self, num_classes: int, *, name: str, watershed: bool, tile_px: int,
                 min_size: int, min_distance: int, sigma: float, dark_objects: bool) -> None:
        super().__init__()
        self.watershed = watershed
        self.min_size = min_size
        self.min_distance = min_distance
        self.sigma = sigma
        self.dark_objects = dark_objects
        self.contract = ModelContract(
            architecture=name, num_classes=num_classes,
            inputs=(InputSpec("image", tile_px, 1.0, 3),), output="instance", tile_px=tile_px,
            output_px=tile_px, trainable=False, margin_px=0,
            paper=f"{PAPER}, Methods 'Classical segmentation techniques'",
            default_mpp=LAGREE_MPP, objects="nuclei")

    def label_image(self, image: torch.Tensor) -> Any:
        """Instance label map (``(H, W)`` int32 numpy array, 0 = background) of one image."""
        import numpy as np
        from scipy import ndimage as ndi
        from skimage.filters import gaussian, threshold_otsu
        from skimage.measure import label

        img = image.detach().float().cpu().numpy()
        gray = np.tensordot(np.asarray(_GRAY[: img.shape[0]], dtype=np.float64),
                            img.astype(np.float64), axes=1) if img.shape[0] == 3 else img[0]
        if self.sigma > 0:
            gray = gaussian(gray, sigma=self.sigma)
        if not np.isfinite(gray).all() or float(gray.max() - gray.min()) <= 1e-12:
            return np.zeros(gray.shape, np.int32)
        t = threshold_otsu(gray)
        fg = gray < t if self.dark_objects else gray > t
        fg = ndi.binary_fill_holes(fg)
        if self.min_size > 1:  # drop specks (by hand: skimage renamed min_size in 0.26)
            lab, n = ndi.label(fg)
            if n:
                keep = np.bincount(lab.ravel()) >= self.min_size
                keep[0] = False
                fg = keep[lab]
        if not self.watershed:
            return label(fg).astype(np.int32)
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed

        dist = ndi.distance_transform_edt(fg)
        coords = peak_local_max(dist, min_distance=self.min_distance, labels=label(fg),
                                exclude_border=False)
        markers = np.zeros(fg.shape, np.int32)
        markers[tuple(coords.T)] = np.arange(1, len(coords) + 1)
        return watershed(-dist, markers, mask=fg).astype(np.int32)

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        from qpseg.models.contract import instance_targets_from_label_map

        out = []
        for image in x:
            det = instance_targets_from_label_map(self.label_image(image))
            n = det["labels"].shape[0]
            out.append({"boxes": det["boxes"], "labels": det["labels"],
                        "scores": torch.ones(n), "masks": det["masks"].float()})
        return out


def _classical(num_classes: int, name: str, watershed: bool, tile_px: int, min_size: int,
               min_distance: int, sigma: float, dark_objects: bool) -> OtsuWatershed:
    if num_classes < 2:
        raise ValueError("num_classes must be >= 2 (background + nucleus)")
    return OtsuWatershed(num_classes, name=name, watershed=watershed,
                         tile_px=check_positive_int("tile_px", tile_px, maximum=1 << 14),
                         min_size=check_positive_int("min_size", min_size, maximum=1 << 20),
                         min_distance=check_positive_int("min_distance", min_distance),
                         sigma=check_fraction("sigma", sigma, high=100.0),
                         dark_objects=bool(dark_objects))


@register_model("otsu_threshold", paper=f"{PAPER}, Methods 'Classical segmentation techniques'",
                tiny={"tile_px": 64})
def otsu_threshold(num_classes: int = 2, *, tile_px: int = 256, min_size: int = 10,
                   sigma: float = 0.0, dark_objects: bool = True) -> OtsuWatershed:
    """Classical baseline: Otsu threshold, connected components as nuclei (non-learned)."""
    return _classical(num_classes, "otsu_threshold", False, tile_px, min_size, 1, sigma,
                      dark_objects)


@register_model("otsu_watershed", paper=f"{PAPER}, Methods 'Classical segmentation techniques'",
                tiny={"tile_px": 64})
def otsu_watershed(num_classes: int = 2, *, tile_px: int = 256, min_size: int = 10,
                   min_distance: int = 4, sigma: float = 0.0,
                   dark_objects: bool = True) -> OtsuWatershed:
    """Classical baseline: Otsu foreground split by a distance-transform watershed."""
    return _classical(num_classes, "otsu_watershed", True, tile_px, min_size, min_distance,
                      sigma, dark_objects)


# --------------------------------------------------------------------- post-processing threshold

#: Probability thresholds tried when choosing lagree2021's threshold: 0.05, 0.10, ..., 0.95.
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
#: The IoU above which a predicted nucleus matches a true one when the threshold is chosen.
#: lagree2021 (Methods, "Testing datasets") says only "at a given intersections over union
#: (IoU) threshold"; 0.5 is the lowest IoU of its Table 2 and of its mAP (assumption).
PRECISION_IOU = 0.5


def foreground_at(p_background: Any, threshold: float) -> Any:
    """Pixels inference calls nucleus at ``threshold``: ``1 - P(Background) > threshold`` on
    P(Background) quantised as the stitched probability maps store it (uint8, 255 = 1, rounded
    half up), so a threshold chosen here acts on exactly the pixels it acts on there."""
    import numpy as np

    q = np.clip(np.floor(np.asarray(p_background, dtype=np.float64) * 255.0 + 0.5), 0, 255)
    return q < 255.0 * (1.0 - float(threshold))


def nuclei_objects(foreground: Any, *, min_area_px: float = 0.0,
                   max_hole_px: float = 0.0) -> Any:
    """Instance ids of the nuclei in a foreground mask, as inference makes them from a nuclei
    model's map: 4-connected components (nuclei touching at a corner stay apart), holes smaller
    than ``max_hole_px`` filled (background pieces enclosed away from the tile border), objects
    smaller than ``min_area_px`` dropped — lagree2021 (Methods): "morphological operations that
    filled missing pixels and removed small predicted artifacts"."""
    import numpy as np
    from scipy import ndimage as ndi

    fg = np.asarray(foreground, dtype=bool).copy()
    if max_hole_px > 0 and fg.any():
        holes, n = ndi.label(~fg, structure=np.ones((3, 3), bool))
        if n:
            sizes = np.bincount(holes.ravel(), minlength=n + 1)
            border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0],
                                               holes[:, -1]]))
            small = sizes < max_hole_px
            small[0] = False
            small[border] = False
            fg |= small[holes]
    lab, n = ndi.label(fg)  # 4-connectivity (scipy's default structure)
    if n and min_area_px > 0:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = sizes >= min_area_px
        keep[0] = False
        lab = np.where(keep[lab], lab, 0)
    return lab


class PrecisionSweep:
    """Object counts of nuclei predictions at every threshold of a grid, summed over tiles, and
    lagree2021's choice among them.

    lagree2021 (Methods, "Testing datasets"): "Post-processing the probability map [...]
    involved calculating a threshold that maximized precision at a given intersections over
    union (IoU) threshold". Precision is the object precision of the paper's Table 2:
    TP / (TP + FP), a prediction being a true positive when it matches a true nucleus one to one
    with IoU above ``iou`` (:func:`qpseg.metrics.instance.match_instances`). Counts are pooled
    over the tiles (every nucleus weighs the same).
    """

    def __init__(self, thresholds: Sequence[float] = THRESHOLD_GRID, *,
                 iou: float = PRECISION_IOU, min_area_px: float = 0.0,
                 max_hole_px: float = 0.0) -> None:
        import numpy as np

        ts = tuple(float(t) for t in thresholds)
        if not ts or any(not 0.0 < t < 1.0 for t in ts):
            raise ValueError("thresholds must be numbers strictly between 0 and 1")
        if not 0.0 <= float(iou) < 1.0:
            raise ValueError(f"iou must be in [0, 1), not {iou!r}")
        self.thresholds = ts
        self.iou = float(iou)
        self.min_area_px = float(min_area_px)
        self.max_hole_px = float(max_hole_px)
        self.counts = np.zeros((3, len(ts)), dtype=np.int64)  # TP, predictions, true nuclei
        self.tiles = 0

    def add(self, p_background: Any, truth: Any, ignore: Any = None) -> None:
        """Count one tile: ``p_background`` ``(H, W)`` P(Background), ``truth`` ``(H, W)``
        instance ids of the true nuclei (0: none), ``ignore`` ``(H, W)`` pixels whose truth is
        unknown (partial annotation): a prediction lying mostly there is not counted."""
        import numpy as np

        from qpseg.metrics.instance import instance_overlap, match_instances

        truth = np.asarray(truth)
        unknown = None if ignore is None else np.asarray(ignore, dtype=bool)
        for i, t in enumerate(self.thresholds):
            pred = nuclei_objects(foreground_at(p_background, t), min_area_px=self.min_area_px,
                                  max_hole_px=self.max_hole_px)
            if unknown is not None and unknown.any() and pred.any():
                n = int(pred.max())
                inside = np.bincount(pred[unknown].ravel(), minlength=n + 1)
                total = np.bincount(pred.ravel(), minlength=n + 1)
                drop = 2 * inside > total
                drop[0] = False
                pred = np.where(drop[pred], 0, pred)
            ov = instance_overlap(truth, pred)
            tp = match_instances(ov, self.iou)[0].size
            self.counts[:, i] += (tp, ov.n_pred, ov.n_true)
        self.tiles += 1

    def rows(self) -> list[dict[str, Any]]:
        """One row per threshold: counts, precision (None without predictions) and recall
        (None without true nuclei)."""
        out = []
        for t, (tp, n_pred, n_true) in zip(self.thresholds, self.counts.T.tolist(),
                                            strict=True):
            out.append({"threshold": t, "tp": tp, "fp": n_pred - tp, "fn": n_true - tp,
                        "precision": tp / n_pred if n_pred else None,
                        "recall": tp / n_true if n_true else None})
        return out

    def choose(self) -> float | None:
        """The threshold of largest precision; ties go to the larger recall, then to the
        threshold nearest 0.5 (the most probable class of a two-class model), then the lower.
        None when no threshold finds a single true nucleus (nothing to choose by)."""
        best: tuple[float, float, float, float] | None = None
        choice = None
        for row in self.rows():
            if not row["tp"]:
                continue
            key = (row["precision"], row["recall"] or 0.0, -abs(row["threshold"] - 0.5),
                   -row["threshold"])
            if best is None or key > best:
                best, choice = key, float(row["threshold"])
        return choice
