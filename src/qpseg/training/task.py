"""How the batches of a stage become model inputs and targets (:class:`Task`): device
transfer, augmentation (geometric only on a refinement stage's heatmap), normalisation, border
weight maps, instance targets, the training loss, the validation loss and class predictions of
dense, patch, instance and two-stage models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qpseg.labels import ClassMap
    from qpseg.losses import LossSpec
    from qpseg.models.contract import ModelContract

__all__ = ["Prepared", "Task"]


@dataclass
class Prepared:
    """One batch ready for the model: its inputs, target and extras."""

    inputs: list[Any]
    target: Any
    n: int
    weight_map: Any = None
    clusters: Any = None
    instances: Any = None
    positions: Any = None


class Task:
    """How batches of a stage become model inputs and targets.

    ``output`` is the contract's (``pixel``, ``patch`` or ``instance``); ``heatmap`` marks the
    refinement stage of a two-stage model (inputs: slide image and heatmap, the latter
    augmented geometrically only).
    """

    def __init__(self, *, output: str, contract: ModelContract, class_map: ClassMap,
                 loss: LossSpec, mean: Sequence[float], std: Sequence[float], device: Any,
                 augment: Mapping[str, Any], seed: int, patch_labels: Sequence[int] | None,
                 val_patch_labels: Sequence[int] | None, extents: Sequence[float],
                 border: tuple[float, float] = (10.0, 5.0), heatmap: bool = False,
                 channels_last: bool = False) -> None:
        import torch

        from qpseg.data.augment import AugmentConfig, Augmenter

        self.output = output
        self.contract = contract
        self.class_map = class_map
        self.num_classes = len(class_map)
        self.ignore = class_map.ignore_index
        self.loss = loss
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.device = device
        self.heatmap = heatmap
        self.extents = tuple(extents)
        self.border = border
        self.channels_last = channels_last
        aug = dict(augment)
        preset = aug.pop("preset", "none")
        for key in ("zoom",):
            if isinstance(aug.get(key), list):
                aug[key] = tuple(aug[key])
        for key in ("stain_sigma",):
            if isinstance(aug.get(key), list):
                aug[key] = tuple(aug[key])
        self.aug_config = AugmentConfig.preset(preset, ignore_index=self.ignore, **aug)
        self.augmenter = Augmenter(self.aug_config, seed=seed)
        self.patch_labels = None if patch_labels is None else torch.as_tensor(
            list(patch_labels), dtype=torch.long)
        self.val_patch_labels = None if val_patch_labels is None else torch.as_tensor(
            list(val_patch_labels), dtype=torch.long)
        self.cluster_model: Any = None
        self.cluster_features: Any = None

    # ----------------------------------------------------------------------------- helpers
    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        from qpseg.data.augment import normalize

        if x.shape[1] == len(self.mean):
            x = normalize(x, self.mean, self.std)
        if self.channels_last and x.dim() == 4:
            import torch

            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _patch_target(self, batch: Mapping[str, Any], train: bool) -> torch.Tensor:
        labels = self.patch_labels if train else self.val_patch_labels
        assert labels is not None
        return labels[batch["meta"]["tile"].long()].to(self.device)

    def _geometry_only(self, state: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
        """Replay the augmenter's geometric draws on the heatmap (fill 0, no colour)."""
        from dataclasses import replace

        from qpseg.data.augment import Augmenter

        cfg = replace(self.aug_config, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
                      hsv_shift=0.0, stain_sigma=None, fill=0.0, mean=None, std=None)
        geo = Augmenter(cfg, seed=0)
        geo.generator.set_state(state)
        return geo(heat).inputs[0]

    # ---------------------------------------------------------------------------- prepare
    def prepare(self, batch: Mapping[str, Any], *, train: bool) -> Prepared:
        """Move a collated batch to the device, augment it (training) and normalise it."""

        views = [v.to(self.device, non_blocking=True).float() for v in batch["inputs"]]
        label = batch["label"].to(self.device, non_blocking=True).long()
        inst = batch.get("instances")
        inst = None if inst is None else inst.to(self.device, non_blocking=True).long()
        n = int(views[0].shape[0])
        positions = batch["meta"]["index"]
        if self.heatmap:
            image, heat = views[0], views[1]
            if train:
                state = self.augmenter.generator.get_state()
                res = self.augmenter(image, label)
                image, label = res.inputs[0], res.label
                heat = self._geometry_only(state, heat)
            return Prepared([self._norm(image), heat], label, n, positions=positions)
        if train:
            elastic = batch["meta"].get("elastic")
            res = self.augmenter(views, None if self.output == "patch" else label,
                                 instances=inst, elastic_mask=elastic, extents=self.extents)
            views = res.inputs
            if self.output != "patch":
                label = res.label if res.label is not None else label
            inst = res.instances if inst is not None else None
        views = [self._norm(v) for v in views]
        if self.output == "patch":
            target = self._patch_target(batch, train)
            clusters = None
            if self.cluster_model is not None and train:
                clusters = self.cluster_model.predict(self.cluster_features(views[0]))
            return Prepared(views, target, n, clusters=clusters, positions=positions)
        wmap = None
        if self.loss.needs_weight_map and train:
            wmap = self._weight_maps(label, inst)
        return Prepared(views, label, n, weight_map=wmap, instances=inst, positions=positions)

    def _weight_maps(self, label: torch.Tensor, inst: torch.Tensor | None) -> torch.Tensor:
        """lagree2021 eq. (2) border weight maps (Ronneberger), one per sample, on the CPU."""
        import numpy as np
        import torch
        from scipy import ndimage as ndi

        from qpseg.losses import unet_weight_map

        lab = label.cpu().numpy()
        ins = None if inst is None else inst.cpu().numpy()
        out = []
        for i in range(lab.shape[0]):
            if ins is not None:
                objects = ins[i]
            else:  # semantic labels: connected components of each foreground class
                objects = np.zeros(lab[i].shape, np.int64)
                nxt = 0
                for c in range(1, self.num_classes):
                    comp, k = ndi.label(lab[i] == c)
                    objects[comp > 0] = comp[comp > 0] + nxt
                    nxt += k
            out.append(unet_weight_map(objects, lab[i], n_classes=self.num_classes,
                                       w0=self.border[0], sigma=self.border[1],
                                       ignore_index=self.ignore))
        return torch.from_numpy(np.stack(out)).to(self.device)

    # ------------------------------------------------------------------------------ model
    def _instance_targets(self, p: Prepared) -> list[dict[str, torch.Tensor]]:
        import torch

        from qpseg.models.contract import instance_targets_from_label_map

        targets = []
        inst = p.instances.cpu()
        lab = p.target.cpu()
        for i in range(p.n):
            ids = inst[i]
            classes: dict[int, int] = {}
            if bool((ids > 0).any()):
                m = ids > 0
                pairs = torch.stack([ids[m], lab[i][m]], 1)
                uniq, counts = torch.unique(pairs, dim=0, return_counts=True)
                # Each object's class is its most frequent label (ascending counts: last wins).
                for (k, c), _n in sorted(zip(uniq.tolist(), counts.tolist(), strict=True),
                                         key=lambda t: t[1]):
                    classes[int(k)] = max(1, min(self.num_classes - 1, int(c)))
            t = instance_targets_from_label_map(ids, classes)
            targets.append({k: v.to(self.device) for k, v in t.items()})
        return targets

    def forward_loss(self, model: Any, p: Prepared) -> tuple[torch.Tensor, Any]:
        """Training loss of a prepared batch and the model output (None for instance)."""
        if self.output == "instance":
            losses = model(p.inputs[0], self._instance_targets(p))
            return self.loss(losses, p.target), None
        out = model(*p.inputs)
        return self.loss(out, p.target, weight_map=p.weight_map, clusters=p.clusters), out

    def predict_labels(self, model: Any, p: Prepared) -> torch.Tensor:
        """Class predictions ``(N, H, W)`` (``(N,)`` for patch models) in eval mode."""
        import torch

        if self.output == "instance":
            dets = model(p.inputs[0])
            h, w = p.target.shape[-2:]
            pred = torch.zeros((p.n, h, w), dtype=torch.long, device=p.target.device)
            for i, det in enumerate(dets):
                masks = det.get("masks")
                if masks is None or masks.shape[0] == 0:
                    continue
                order = torch.argsort(det["scores"])  # best painted last
                for j in order.tolist():
                    pred[i][masks[j, 0] > 0.5] = int(det["labels"][j])
            return pred
        return model(*p.inputs).argmax(1)

    def eval_loss(self, model: Any, p: Prepared) -> tuple[float, Any, int]:
        """(summed loss, output, count) of a validation batch (no augmentation; the lagree2021
        loss without its border term, which needs instance maps of augmented tiles)."""
        out = model(*p.inputs)
        spec = self.loss if self.loss.name != "cwce" else replace(self.loss, name="ce")
        loss = spec(out, p.target, weight_map=None, clusters=None)
        return float(loss) * p.n, out, p.n
