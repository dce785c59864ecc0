"""Checkpoints that let an interrupted run continue exactly, and the RNG states they hold.

A checkpoint (``<stage dir>/checkpoints/step-00000123.pt``, written atomically: temp file,
fsync, rename) holds the model, optimizer, scheduler and grad-scaler states, the sampler's
seed and epoch plus how many batches of the epoch were consumed, boosting weights, early
stopping and best-metric state, the running epoch-loss sums, and the random states of Python,
numpy, torch (CPU and CUDA) and the batch augmenter of *every* rank. Restoring all of it
after the model and optimizer are rebuilt reproduces the uninterrupted run's losses (bitwise
on CPU with ``num_workers=0``).

Everything in a checkpoint is a tensor or plain data (dicts, lists, tuples, strings, numbers),
so it is read with ``torch.load(..., weights_only=True)``: a checkpoint in a folder someone sent
cannot run code. numpy's generator state is therefore stored as a tensor and integers, not as
the ``ndarray`` numpy hands out. A checkpoint that cannot be read that way is an error naming
the file, never skipped: with the atomic rename a crash cannot leave a half-written one.
"""

from __future__ import annotations

import os
import random
import re
from collections import OrderedDict
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
    "load_best",
    "load_checkpoint",
    "load_torch_file",
    "plain_state",
    "prune_checkpoints",
    "save_best",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "qpseg-checkpoint"
# 2: every value a tensor or plain data (format 1 pickled numpy's RNG state as an ndarray).
CHECKPOINT_VERSION = 2
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def get_rng_state(augmenter_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python, numpy, torch (CPU, CUDA) and augmenter generator states of this process, as
    tensors and plain data (see the module docstring)."""
    import numpy as np
    import torch

    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"bit_generator": str(name),
                  "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
                  "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "augmenter": augmenter_generator.get_state() if augmenter_generator is not None
        else None,
    }
    return state


def _python_state(value: Any) -> tuple[Any, ...]:
    """``random.setstate`` wants tuples; check the shape of what a checkpoint holds."""
    if (not isinstance(value, list | tuple) or len(value) != 3
            or not isinstance(value[1], list | tuple)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value[1])):
        raise ConfigError("the Python random state in the checkpoint is malformed")
    return (value[0], tuple(value[1]), value[2])


def _numpy_state(value: Any) -> tuple[Any, ...]:
    """numpy's legacy state tuple back from the tensor form :func:`get_rng_state` stores."""
    import numpy as np
    import torch

    if not isinstance(value, Mapping) or not isinstance(value.get("key"), torch.Tensor) \
            or value.get("bit_generator") != "MT19937":
        raise ConfigError("the numpy random state in the checkpoint is malformed")
    key = value["key"]
    if key.dtype != torch.int64 or tuple(key.shape) != (624,) or bool(
            ((key < 0) | (key >= 1 << 32)).any()):
        raise ConfigError("the numpy random state in the checkpoint is malformed")
    return ("MT19937", key.numpy().astype(np.uint32), int(value["pos"]),
            int(value["has_gauss"]), float(value["cached_gaussian"]))


def set_rng_state(state: Mapping[str, Any],
                  augmenter_generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`get_rng_state`; ConfigError when the state is malformed."""
    import numpy as np
    import torch

    if not isinstance(state, Mapping):
        raise ConfigError("the random state in the checkpoint is malformed")
    py = _python_state(state.get("python"))
    npy = _numpy_state(state.get("numpy"))
    try:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if augmenter_generator is not None and state.get("augmenter") is not None:
            augmenter_generator.set_state(state["augmenter"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError("the random state in the checkpoint is malformed "
                          f"({' '.join(str(exc).split())[:120]})") from exc


def plain_state(value: Any, where: str = "checkpoint") -> Any:
    """``value`` with numpy scalars and arrays made Python numbers and tensors, checked to hold
    only what ``torch.load(weights_only=True)`` reads back: tensors, dicts, lists, tuples,
    strings, numbers, booleans and None.

    A TypeError naming the entry otherwise: that is a bug in whatever built the state, found
    when the first checkpoint is written rather than when a resume needs it.
    """
    import numpy as np
    import torch

    if value is None or isinstance(value, bool | int | float | str | bytes | torch.Tensor
                                   | torch.Size | torch.dtype):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, Mapping):
        out = OrderedDict() if isinstance(value, OrderedDict) else {}
        for k, v in value.items():
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise TypeError(f"{where}: key {k!r} is not a string or integer")
            out[k] = plain_state(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, list | tuple):
        items = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where} is a {type(value).__name__}, which a weights-only checkpoint "
                    "cannot hold")


def save_checkpoint(directory: str | os.PathLike[str], step: int, state: Mapping[str, Any]
                    ) -> Path:
    """Write ``state`` as ``directory/step-<step>.pt`` atomically; returns the path.

    OutputError naming the file when it cannot be written (the temp file is removed).
    """
    from qpseg.models._weights import save_torch_atomic

    path = Path(directory) / f"step-{int(step):08d}.pt"
    payload = plain_state({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                           **state})
    return save_torch_atomic(payload, path)


def save_best(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write the selected weights (``best.pt``: model state dict and metric) atomically."""
    from qpseg.models._weights import save_torch_atomic

    return save_torch_atomic(plain_state(dict(state), "best"), path)


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


def load_torch_file(path: str | os.PathLike[str], what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ConfigError naming the file for
    anything else than a readable file of tensors and plain data. Never runs pickled code."""
    import warnings

    import torch

    from qpseg.models._weights import torch_load_refusal

    p = Path(path)
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles: the result is judged
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found", p) from None
    except IsADirectoryError:
        raise ConfigError(f"{what} is a folder, not a file", p) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} ({exc.strerror or exc})", p) from None
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        hint = ""
        if "GLOBAL numpy" in str(exc):
            hint = " (checkpoints of older qpseg versions held numpy objects: start the run " \
                   "again without --resume)"
        raise ConfigError(f"this {what} cannot be loaded safely: {torch_load_refusal(exc)}"
                          f"{hint}", p) from None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint (ConfigError naming the file when it is not one, or cannot be read
    with ``weights_only=True``)."""
    p = Path(path)
    data = load_torch_file(p)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError("not a qpseg checkpoint", p)
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigError("not a qpseg checkpoint (no format version)", p)
    if version > CHECKPOINT_VERSION:
        raise ConfigError("checkpoint written by a newer qpseg", p)
    if version < CHECKPOINT_VERSION:
        raise ConfigError(f"checkpoint format {version} of an older qpseg cannot be resumed; "
                          "start the run again without --resume", p)
    return data


def load_best(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``best.pt`` as written by :func:`save_best`; ConfigError naming it otherwise."""
    import torch

    p = Path(path)
    data = load_torch_file(p, "best-weights file")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise ConfigError("not a qpseg best-weights file (no state dict of tensors)", p)
    return data


def find_checkpoint(directory: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` and its content, or None when there is none.

    A newest checkpoint that cannot be read is an error naming it, not a reason to fall back
    to an older one: checkpoints are renamed into place complete, so an unreadable one was
    damaged or replaced after it was written, and resuming silently from an older step would
    hide that.
    """
    items = _checkpoints(Path(directory))
    if not items:
        return None
    path = items[-1][1]
    return path, load_checkpoint(path)
