"""Forward passes of one model (or one stage of a two-stage model) at inference: uint8 NHWC
tiles -> the package's colour normaliser and mean/std -> the model on the run's device, in
the run's arithmetic precision (:class:`_Runner`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qpseg.models.package import ModelPackage


class _Runner:
    """Forward passes of one model (stage) on batches of uint8 NHWC tiles."""

    def __init__(self, module: torch.nn.Module, pkg: ModelPackage, stage: int | None,
                 device: torch.device, precision: str, channels_last: bool,
                 compile_model: bool) -> None:
        import torch

        from qpseg.models.contract import get_contract

        self.contract = get_contract(module)
        self.pkg = pkg
        self.stage = stage
        self.device = device
        self.channels_last = channels_last
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        module = module.to(device).eval()
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.forward: Any = module
        # The colour normaliser training applied to every tile (stored in the package); the
        # whole-slide stage of a two-stage pipeline never went through it.
        self.stain = pkg.stain_normalizer() if stage in (None, 0) else None
        if compile_model:
            self.forward = torch.compile(module)
            self.forward.contract = self.contract  # predict() reads the contract

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) -> normalised float (N, C, H, W) on the device: the package's
        colour normaliser per tile (as training's TileDataset did), then mean/std."""
        import numpy as np
        import torch

        if self.stain is not None:
            tiles = x.cpu().numpy()
            x = torch.from_numpy(np.stack([np.asarray(self.stain(t), dtype=np.uint8)
                                           for t in tiles]))
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = self.pkg.normalize(x, self.stage)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last
                            else torch.contiguous_format)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        import torch

        from qpseg.models.contract import predict

        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None):
            return predict(self.forward, *inputs)
