"""The model card of a model package: ``MODEL_CARD.md`` beside ``config.json``.

A model card (Mitchell et al. 2019, "Model Cards for Model Reporting") says in one page what a
model is, what it was trained on and how well it did, and what it is for. qpseg writes it from
what the package records: the architecture and its paper (the registry), the classes and their
QuPath colours, the pixel size and tile, the ``training`` summary in ``config.json`` (split,
slides, initialisation, validation scores of the packaged weights) and, when the training run
left it in the package folder, ``run_metadata.json`` (labelled pixels per class and subset)
and ``training_curves.png``. :func:`~qpseg.models.save_package` writes it;
``qpseg model-info`` prints it, generating it for packages saved before cards existed.

This module is the entry point (import from here) and handles the file: it writes
``MODEL_CARD.md`` from a package folder's ``config.json`` and reads it back safely. The text
itself is made in :mod:`qpseg.models.card_text`, which :mod:`qpseg.models.package` uses when it
saves a package; that module never imports this one or the package module.

Nothing here imports torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from qpseg.models.card_text import _MAX_READ, CURVES_NAME, MODEL_CARD_NAME, model_card

__all__ = ["CURVES_NAME", "MODEL_CARD_NAME", "model_card", "read_model_card", "write_model_card"]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")


def write_model_card(directory: str | os.PathLike[str]) -> Path:
    """(Re)write ``MODEL_CARD.md`` of the package in ``directory`` from its ``config.json``
    (and ``run_metadata.json``, training curves when present). Returns its path."""
    from qpseg._io import atomic_write
    from qpseg.errors import OutputError
    from qpseg.models.package import read_package_config

    directory = Path(directory)
    text = model_card(read_package_config(directory), directory)
    path = directory / MODEL_CARD_NAME
    try:
        with atomic_write(path, "w", backup=False) as fh:
            fh.write(text)
    except OSError as exc:
        raise OutputError.from_os_error(exc, path) from exc
    return path


def read_model_card(directory: str | os.PathLike[str]) -> str | None:
    """The package's ``MODEL_CARD.md`` as text safe to print (control characters removed);
    None when it has none (or it is a link out of the package, or unreadable)."""
    directory = Path(directory)
    path = directory / MODEL_CARD_NAME
    try:
        if not path.is_file() or path.stat().st_size > _MAX_READ:
            return None
        if not path.resolve(strict=True).is_relative_to(directory.resolve(strict=True)):
            return None
        text = path.read_text(encoding="utf-8", errors="replace")
    except (OSError, RuntimeError):
        return None
    return _CONTROL.sub("", text)
