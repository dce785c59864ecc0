"""pedersen2022 §2.3-2.4 cluster guiding for patch classifiers (the CWCE loss).

Before training, features of ``batches`` x ``batch_size`` (100 x 32 in the paper) training
patches are clustered with :class:`qpseg.data.weights.ClusterModel` (z-score, PCA to 95 %
variance, k-means with k = 10); during training every batch is assigned to the frozen clusters
and the loss is the cross-entropy macro-averaged over the clusters of the batch.

Features: ``vgg16`` (the paper: an ImageNet VGG-16; pass its torchvision state dict as
``weights``, nothing is downloaded; without it the features come from a randomly initialised
VGG-16 and a warning says so) or ``rgb`` (per-channel mean, standard deviation and an 8-bin
histogram of the de-normalised patch: cheap colour/texture clusters).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from qpseg.data.weights import ClusterModel
    from qpseg.training.data import StageData
    from qpseg.training.distributed import Dist

__all__ = ["fit_cluster_guide"]

_KEYS = {"k", "variance", "batches", "batch_size", "features", "weights"}


def _features(kind: str, weights: str | None, data: StageData, device: Any
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch

    if kind == "rgb":
        mean = torch.tensor(data.mean).view(1, -1, 1, 1)
        std = torch.tensor(data.std).view(1, -1, 1, 1)

        def rgb(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                img = (x.float() * std.to(x.device) + mean.to(x.device)).clamp(0, 1)
                flat = img.flatten(2)
                hist = torch.stack([torch.stack([((flat[:, c] >= b / 8) & (flat[:, c] < (b + 1) / 8
                                                  + (b == 7))).float().mean(1)
                                                 for b in range(8)], 1)
                                    for c in range(flat.shape[1])], 1).flatten(1)
                return torch.cat([flat.mean(2), flat.std(2), hist], 1)

        return rgb
    if kind != "vgg16":
        raise ConfigError(f"loss.clusters.features must be vgg16 or rgb, not {kind!r}")
    import torchvision

    net = torchvision.models.vgg16(weights=None).features
    if weights:
        from qpseg.models._weights import read_state_dict

        state = read_state_dict(weights)
        sub = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        try:
            net.load_state_dict(sub)
        except RuntimeError as exc:
            raise ConfigError(f"loss.clusters.weights is not a torchvision VGG-16 state dict: "
                              f"{' '.join(str(exc).split())[:200]}", weights) from None
    else:
        from qpseg.training.data import TrainingWarning

        warnings.warn("cluster features from a randomly initialised VGG-16 (give "
                      "loss.clusters.weights: an ImageNet VGG-16 state dict, as pedersen2022)",
                      TrainingWarning, stacklevel=3)
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)

    def vgg(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(x.float()).mean(dim=(2, 3))

    return vgg


def fit_cluster_guide(data: StageData, cfg: Mapping[str, Any], dist: Dist, seed: int
                      ) -> tuple[ClusterModel, Callable[[torch.Tensor], torch.Tensor]]:
    """Fit the frozen clustering on training patches (rank 0; shared with the others)."""
    import numpy as np
    import torch

    from qpseg.data.augment import normalize
    from qpseg.data.weights import N_CLUSTERS, PCA_VARIANCE, ClusterModel

    unknown = set(cfg) - _KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) in loss.clusters: {', '.join(sorted(unknown))}")
    feat = _features(str(cfg.get("features", "vgg16")), cfg.get("weights"), data, dist.device)
    model: ClusterModel | None = None
    if dist.is_main:
        n = int(cfg.get("batches", 100)) * int(cfg.get("batch_size", 32))
        order = np.random.default_rng([seed, 11]).permutation(len(data.train))[:n]
        rows = []
        for start in range(0, len(order), 32):
            items = [data.train[int(i)] for i in order[start:start + 32]]
            x = torch.stack([it["image"] for it in items]).to(dist.device)
            rows.append(feat(normalize(x, data.mean, data.std)).cpu().numpy())
        model = ClusterModel().fit(np.concatenate(rows), k=int(cfg.get("k", N_CLUSTERS)),
                                   variance=float(cfg.get("variance", PCA_VARIANCE)), seed=seed)
    blob = dist.broadcast(model.to_json() if model is not None else None)
    return ClusterModel.from_json(blob), feat
