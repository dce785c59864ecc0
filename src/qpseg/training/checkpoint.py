"""Checkpoints that let an interrupted run continue exactly, and the RNG states they hold.

A checkpoint (``<stage dir>/checkpoints/step-00000123.pt``, written atomically: temp file,
fsync, rename) holds the model, optimizer, scheduler and grad-scaler states, the sampler's
seed and epoch plus how many batches of the epoch were consumed, boosting weights, early
stopping and best-metric state, the running epoch-loss sums, and the random states of Python,
numpy, torch (CPU and CUDA) and the batch augmenter of *every* rank. Restoring all of it
after the model and optimizer are rebuilt reproduces the uninterrupted run's losses (bitwise
on CPU with ``num_workers=0``).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "find_checkpoint",
    "get_rng_state",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "qpseg-checkpoint"
CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def get_rng_state(augmenter_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python, numpy, torch (CPU, CUDA) and augmenter generator states of this process."""
    import numpy as np
    import torch

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "augmenter": augmenter_generator.get_state() if augmenter_generator is not None
        else None,
    }
    return state


def set_rng_state(state: Mapping[str, Any],
                  augmenter_generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`get_rng_state`."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if augmenter_generator is not None and state.get("augmenter") is not None:
        augmenter_generator.set_state(state["augmenter"])


def save_checkpoint(directory: str | os.PathLike[str], step: int, state: Mapping[str, Any]
                    ) -> Path:
    """Write ``state`` as ``directory/step-<step>.pt`` atomically; returns the path."""
    import torch

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step-{int(step):08d}.pt"
    tmp = d / f".{path.name}.tmp"
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(directory: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints in ``directory``."""
    items = _checkpoints(Path(directory))
    for _, p in items[: max(0, len(items) - max(1, keep))]:
        p.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint (ConfigError naming the file when it is not one)."""
    import torch

    p = Path(path)
    try:
        # Checkpoints hold numpy RNG states and plain containers: not weights-only loadable.
        data = torch.load(p, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ConfigError("checkpoint not found", p) from None
    except Exception as exc:  # truncated / corrupt file
        raise ConfigError(f"cannot read checkpoint: {' '.join(str(exc).split())[:200]}",
                          p) from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError("not a qpseg checkpoint", p)
    if int(data.get("version", 0)) > CHECKPOINT_VERSION:
        raise ConfigError("checkpoint written by a newer qpseg", p)
    return data


def find_checkpoint(directory: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint in ``directory`` (a corrupt newest one, e.g. from a
    crash during writing, is skipped for the one before it), or None."""
    last_error: ConfigError | None = None
    for _, p in reversed(_checkpoints(Path(directory))):
        try:
            return p, load_checkpoint(p)
        except ConfigError as exc:
            last_error = exc
    if last_error is not None:
        raise last_error
    return None
