"""Optimisers and learning-rate schedules from the ``optimizer`` / ``scheduler`` sections.

Schedulers step once per optimizer step (``plateau`` once per validation, on the validation
loss); ``warmup_steps`` ramps the learning rate linearly from 0 first. Every one has a
``state_dict`` so a resumed run continues the schedule exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["build_optimizer", "build_scheduler", "current_lr"]


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Mapping[str, Any]
                    ) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over the trainable ``params``."""
    import torch

    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    name = cfg["name"]
    lr, wd = float(cfg["lr"]), float(cfg["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg["momentum"]), weight_decay=wd,
                               nesterov=bool(cfg["nesterov"]) and float(cfg["momentum"]) > 0)
    if name in ("adam", "adamw"):
        betas = tuple(float(b) for b in cfg["betas"])
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {betas}")
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=(betas[0], betas[1]), eps=float(cfg["eps"]),
                   weight_decay=wd)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, rho=float(cfg["rho"]), eps=float(cfg["eps"]),
                                    weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=float(cfg["momentum"]),
                                   eps=float(cfg["eps"]), weight_decay=wd)
    raise ConfigError(f"unknown optimizer {name!r}")


class _Plateau:
    """ReduceLROnPlateau behind the same interface (stepped with the validation loss)."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: Mapping[str, Any]) -> None:
        import torch

        self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=float(cfg["factor"]), patience=int(cfg["patience"]),
            min_lr=float(cfg["min_lr"]))

    def step(self) -> None:
        """Per-step call: nothing (the plateau schedule moves on validations)."""

    def step_metric(self, value: float) -> None:
        """One validation result."""
        if math.isfinite(value):
            self.inner.step(value)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = self.inner.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(dict(state))


class _Lambda:
    """A per-step multiplicative schedule (LambdaLR) with an optional linear warm-up."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: Mapping[str, Any], total: int) -> None:
        import torch

        name = cfg["name"]
        warm = int(cfg["warmup_steps"])
        gamma = float(cfg["gamma"])
        base = float(opt.param_groups[0]["lr"])
        floor = float(cfg["min_lr"]) / base if base > 0 else 0.0
        milestones = sorted(int(m) for m in cfg["milestones"] or [])
        step_size = max(1, int(cfg["step_size"]))
        power = float(cfg["power"])
        total = max(1, int(total))

        def factor(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            s = step - warm
            span = max(1, total - warm)
            if name == "constant":
                f = 1.0
            elif name == "step":
                f = gamma ** (s // step_size)
            elif name == "multistep":
                f = gamma ** sum(1 for m in milestones if step >= m)
            elif name == "exponential":
                f = gamma ** (s / step_size)
            elif name == "cosine":
                f = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / span)))
            elif name == "poly":
                f = (1 - min(1.0, s / span)) ** power
            else:  # pragma: no cover - validated before
                raise ConfigError(f"unknown scheduler {name!r}")
            return max(f, floor)

        self.inner = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def step(self) -> None:
        """Advance one optimizer step."""
        self.inner.step()

    def step_metric(self, value: float) -> None:
        """Validation results do not move this schedule."""

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.inner.state_dict().items() if k != "lr_lambdas"}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict({**dict(state), "lr_lambdas": [None]})


def build_scheduler(opt: torch.optim.Optimizer, cfg: Mapping[str, Any],
                    total_steps: int) -> _Lambda | _Plateau:
    """The schedule of ``cfg`` over ``total_steps`` optimizer steps."""
    if cfg["name"] == "plateau":
        return _Plateau(opt, cfg)
    return _Lambda(opt, cfg, total_steps)


def current_lr(opt: torch.optim.Optimizer) -> float:
    """Learning rate of the first parameter group."""
    return float(opt.param_groups[0]["lr"])
