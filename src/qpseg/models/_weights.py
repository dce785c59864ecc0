"""Reading, checking and writing state dicts safely (``weights_only`` pickles, safetensors).

Torch is imported inside the functions; ``safetensors`` only when a ``.safetensors`` file is
read or written (it is an optional dependency).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpseg._io import sha256_file
from qpseg.errors import ModelError, OutputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "WEIGHT_FILES",
    "check_state_dict",
    "expected_shapes",
    "fetch_torchvision_state_dict",
    "load_checked",
    "load_subset",
    "read_state_dict",
    "save_torch_atomic",
    "sha256_file",
    "torch_load_refusal",
    "torchvision_weights",
    "write_state_dict",
]

# The weight file names a package may hold, in order of preference when reading.
WEIGHT_FILES: tuple[str, ...] = ("weights.safetensors", "weights.pt")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg[:300]


# What torch's weights-only unpickler names when it refuses a pickled object, e.g. "Trying to
# load unsupported GLOBAL posix.system" (torch/_weights_only_unpickler.py, Unpickler.load).
_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]{0,100})")


def torch_load_refusal(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in qpseg's words.

    Torch's own message advises retrying with the unsafe loader, which would run whatever code
    the file carries; that text is never passed on. What is said instead: the file holds more
    than tensors and plain data (naming the pickled callable when torch names one), or it is
    not a readable torch file at all.
    """
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        m = _GLOBAL.search(text)
        what = f" ({m.group(1)})" if m else ""
        return (f"it holds pickled Python objects{what}, not only tensors and plain data; qpseg "
                "reads such files with torch.load(weights_only=True) and never runs pickled code")
    return "it is not a readable torch file (truncated or corrupt)"


def _is_torch_write_failure(exc: RuntimeError) -> bool:
    """True for the RuntimeError torch's zip writer raises when the file system refuses bytes
    (``PytorchStreamWriter failed writing file ...``, or its ``inline_container.cc`` checks)."""
    text = str(exc)
    return any(s in text for s in ("PytorchStreamWriter", "inline_container", "file write failed"))


def save_torch_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file, fsync, rename); returns ``path``.

    Every torch file qpseg writes (weights, training checkpoints) goes through here. On any
    failure the temp file is removed and ``path`` is left as it was; an ``OSError`` (read-only
    folder, disk full, a parent that is a file) or torch's writer failing part-way becomes an
    :class:`~qpseg.errors.OutputError` naming ``path``.
    """
    import torch

    from qpseg._io import atomic_write

    path = Path(path)
    try:
        with atomic_write(path, "wb", backup=False) as fh:
            torch.save(obj, fh)
    except OSError as exc:
        raise OutputError.from_os_error(exc, path) from exc
    except RuntimeError as exc:
        if not _is_torch_write_failure(exc):
            raise
        raise OutputError("the write failed part-way (disk full, or the file system refused "
                          "it)", path) from exc
    return path


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` state dict from ``.pt``/``.pth`` or ``.safetensors``.

    ``.pt`` files are read with ``torch.load(..., weights_only=True)``, so a pickle of anything
    but tensors and containers is refused. A dict holding the state dict under ``state_dict``
    or ``model`` (a common checkpoint layout) is unwrapped. Anything else is a ModelError.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError("weights file not found", path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ModelError("reading .safetensors needs the 'safetensors' package "
                             "(pip install safetensors)", path) from exc
        try:
            data: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"not a readable safetensors file ({_first_line(exc)})",
                             path) from exc
    else:
        try:
            with warnings.catch_warnings():  # torch's notes on odd pickles: we judge the result
                warnings.simplefilter("ignore")
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
            raise ModelError(f"not a plain state dict of tensors: {torch_load_refusal(exc)}",
                             path) from exc
    if isinstance(data, Mapping):
        for key in ("state_dict", "model"):
            inner = data.get(key)
            if isinstance(inner, Mapping) and len(data) <= 4:
                data = inner
                break
    if not isinstance(data, Mapping):
        raise ModelError(f"expected a state dict (name -> tensor), found {type(data).__name__}",
                         path)
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"state dict entry {bad[0]!r} is not a named tensor", path)
    return dict(data)


def write_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Write a state dict as ``.safetensors`` (if the suffix says so) or a torch ``.pt`` file.

    Tensors are made contiguous CPU copies (safetensors refuses shared storage, and a package
    must not depend on the device it was saved from). The write is atomic; a failure to write
    is an OutputError naming ``path``.
    """
    from qpseg._io import atomic_write

    path = Path(path)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import save
        except ImportError as exc:
            raise ModelError("writing .safetensors needs the 'safetensors' package "
                             "(pip install safetensors)", path) from exc
        blob = save(plain)
        try:
            with atomic_write(path, "wb", backup=False) as fh:
                fh.write(blob)
        except OSError as exc:
            raise OutputError.from_os_error(exc, path) from exc
    else:
        save_torch_atomic(plain, path)


def _short(keys: Iterable[str], n: int = 3) -> str:
    items = list(keys)
    shown = ", ".join(repr(k) for k in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def check_state_dict(expected: Mapping[str, tuple[int, ...]],
                     state: Mapping[str, torch.Tensor], path: str | os.PathLike[str] | None, *,
                     ignore_unexpected: tuple[str, ...] = (), what: str = "model",
                     strict_counters: bool = False) -> None:
    """Compare a state dict with the expected ``{name: shape}``; one-line ModelError if unfit.

    Missing or surplus ``num_batches_tracked`` counters are tolerated unless
    ``strict_counters`` (old torchvision checkpoints lack them, frozen batch norm has none);
    unexpected keys starting with one of
    ``ignore_unexpected`` are ignored (an ImageNet classifier head a segmentation backbone does
    not have).
    """
    missing = [k for k in expected if k not in state
               and (strict_counters or not k.endswith("num_batches_tracked"))]
    unexpected = [k for k in state if k not in expected
                  and not any(k.startswith(p) for p in ignore_unexpected)
                  # frozen batch norm has no counter; it drops the checkpoint's on load
                  and not (k.endswith("num_batches_tracked") and not strict_counters)]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    problems = []
    if wrong:
        k = wrong[0]
        problems.append(f"shape mismatch for {k!r}: file {tuple(state[k].shape)} vs {what} "
                        f"{tuple(expected[k])}" + (f" ({len(wrong) - 1} more)" if len(wrong) > 1
                                                   else ""))
    if missing:
        problems.append(f"{len(missing)} {what} key(s) missing from the file: {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_short(unexpected)}")
    if problems:
        raise ModelError(f"weights do not fit the {what}: " + "; ".join(problems), path)


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a module's state dict (works for meta-device modules)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor],
                 path: str | os.PathLike[str] | None, *, ignore_unexpected: tuple[str, ...] = (),
                 what: str = "model") -> None:
    """Check ``state`` against ``module`` (see :func:`check_state_dict`) and load it."""
    check_state_dict(expected_shapes(module), state, path, ignore_unexpected=ignore_unexpected,
                     what=what)
    wanted = {k: v for k, v in state.items()
              if not any(k.startswith(p) for p in ignore_unexpected) or k in module.state_dict()}
    try:
        module.load_state_dict(wanted, strict=False)
    except RuntimeError as exc:  # dtype that cannot be copied, ...
        raise ModelError(f"cannot load weights into the {what}: {_first_line(exc)}",
                         path) from exc


def load_subset(module: nn.Module, state: Mapping[str, torch.Tensor],
                path: str | os.PathLike[str] | None, *, prefix: str = "",
                ignore: tuple[str, ...] = (), what: str = "backbone") -> None:
    """Load the entries of ``state`` under ``prefix`` (prefix removed) into ``module``.

    Keys outside ``prefix`` must start with one of ``ignore`` (e.g. ``"classifier."`` of an
    ImageNet checkpoint); anything else, and any missing key or wrong shape, is a ModelError.
    """
    stray = [k for k in state if not k.startswith(prefix) and not k.startswith(ignore)]
    if stray:
        raise ModelError(f"weights do not fit the {what}: {len(stray)} unexpected key(s): "
                         f"{_short(stray)}", path)
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    load_checked(module, sub, path, ignore_unexpected=ignore, what=what)


# ------------------------------------------------------------------ torchvision's weights

def torchvision_weights(spec: str) -> tuple[str, Path]:
    """The download URL and torch-cache file of a torchvision weights enum member.

    ``spec`` names the member as torchvision does (``"VGG16_Weights.IMAGENET1K_V1"``). The file
    is ``torch.hub.get_dir()/checkpoints/<basename of the URL>``, the place torchvision's own
    builders read and download to (so ``$TORCH_HOME`` moves it, and a file fetched by any
    torchvision program is reused).
    """
    import torch
    from torchvision.models import get_weight

    try:
        weights = get_weight(spec)
    except (ValueError, KeyError, AttributeError) as exc:
        raise ModelError(f"torchvision has no weights {spec!r} ({_first_line(exc)})") from exc
    url = str(weights.url)
    name = os.path.basename(url.split("?", 1)[0])
    return url, Path(torch.hub.get_dir()) / "checkpoints" / name


def fetch_torchvision_state_dict(spec: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of torchvision weights ``spec`` and the cache file it came from.

    The cache file is read when present (nothing touches the network then); otherwise it is
    downloaded once with torch's own downloader (``torch.hub.download_url_to_file``, hash
    checked against the file name as torchvision does). Offline, with the file absent, this is a
    one-line ModelError naming the file, the URL and where to put it. The file is read with
    ``weights_only=True`` like every other weight file.
    """
    import torch

    url, path = torchvision_weights(spec)
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            match = torch.hub.HASH_REGEX.search(path.name)
            torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None,
                                           progress=False)
        except Exception as exc:  # URLError/OSError offline, HTTPError, hash mismatch, ...
            raise ModelError(
                f"pretrained weights not found and could not be downloaded "
                f"({_first_line(exc)}); download {url} on a machine with internet and put it "
                f"at {path}", path) from exc
    return read_state_dict(path), path
