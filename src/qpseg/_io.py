"""Small file helpers: atomic writes with a backup of anything replaced."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from qpseg.errors import OutputError

__all__ = ["atomic_write", "backup_path", "ensure_writable_dir", "sha256_file",
           "write_json_atomic"]


def backup_path(path: Path) -> Path:
    """Where the previous version of ``path`` is kept when it is replaced (``name.bak``)."""
    return path.with_name(path.name + ".bak")


@contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", *, backup: bool = True, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Write ``path`` atomically: a temp file in the same folder, fsync, then rename over it.

    A reader never sees a half-written file, and a crash leaves the old file intact. When the
    file already exists and ``backup`` is true, its previous content is kept as ``<name>.bak``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": encoding, "newline": "\n"}
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would, so
        # predictions in a shared project folder stay readable by the group.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if backup and path.exists():
            shutil.copy2(path, backup_path(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, backup: bool = True,
                      indent: int | None = 2) -> None:
    """Serialise ``data`` as UTF-8 JSON (non-ASCII kept) to ``path`` atomically."""
    with atomic_write(path, "w", backup=backup) as fh:
        json.dump(data, fh, indent=indent, ensure_ascii=False, allow_nan=False)
        fh.write("\n")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create the output folder ``path`` (with parents) and prove a file can be written in it.

    Commands call this before any long work starts, so a read-only folder, a full disk or an
    ``--out`` that names a file fails at once with ``OutputError`` naming the folder, rather
    than after hours of training or inference.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError("is not a folder (an output folder is needed here)", p)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".qpseg-write-test.", dir=p)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError.from_os_error(exc, p) from None
    return p
