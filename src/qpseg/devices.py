"""Choosing the torch device for training and inference (one rule for both)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qpseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``cuda`` picks
    the local rank's GPU; anything else must be an available torch device (cpu, cuda, mps)."""
    import torch

    d = (device or "auto").strip().lower()
    if d == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(d)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a torch device (auto, cpu, cuda)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank % max(1, torch.cuda.device_count())}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("--device mps, but MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device!r}: qpseg runs on cpu, cuda or mps")
    return dev
