"""Small file helpers: atomic writes that never destroy what they replace, and file locks.

Rules every qpseg writer gets from :func:`atomic_write` / :func:`replace_file`:

* A file is written to a temporary name in its folder, fsynced and renamed over the target,
  so a reader never sees half a file and a crash leaves the old one intact.
* qpseg never writes through a symbolic link: a target that is a link (or not a regular file)
  is refused with :class:`~qpseg.errors.OutputError`, and backups are made by hard link or by
  a copy opened with ``O_EXCL | O_NOFOLLOW``, so a planted ``<name>.bak`` link cannot redirect
  a write to another file.
* Backups are numbered (``x.bak``, ``x.bak.1``, ``x.bak.2``, ...; the highest number is the
  newest). A new backup replaces the newest one only when that one holds a version qpseg wrote
  itself; a backup of anything else (a user's file, an annotation export, a file edited since)
  is never replaced. What qpseg wrote is known from the folder's ledger ``.qpseg_written``:
  one JSON line ``[sha256, name]`` per file written with ``backup=True``.
* An ``OSError`` while writing names the target (not the temporary file), so the one-line
  message says which file could not be written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from qpseg.errors import OutputError

__all__ = ["LEDGER_NAME", "FileLock", "atomic_write", "backup_path", "backups",
           "ensure_writable_dir", "keep_backup", "replace_file", "replace_with_copy",
           "sha256_file", "write_json_atomic"]

#: The per-folder record of the files qpseg wrote (with ``backup=True``), by SHA-256.
LEDGER_NAME = ".qpseg_written"
_LEDGER_MAX_BYTES = 1 << 20  # compacted to its newest half beyond this
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def backup_path(path: str | os.PathLike[str], number: int = 0) -> Path:
    """Backup slot ``number`` of ``path``: ``name.bak`` (0), ``name.bak.1``, ``name.bak.2``..."""
    p = Path(path)
    return p.with_name(p.name + ".bak" + (f".{number}" if number else ""))


def backups(path: str | os.PathLike[str]) -> list[Path]:
    """The existing backup slots of ``path`` (links included), oldest first."""
    p = Path(path)
    pattern = re.compile(re.escape(p.name) + r"\.bak(?:\.([1-9][0-9]*))?")
    found: list[tuple[int, Path]] = []
    try:
        names = os.listdir(p.parent)
    except OSError:
        return []
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            found.append((int(m.group(1) or 0), p.parent / name))
    return [q for _, q in sorted(found)]


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask changes it
    for every thread while it is read)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _named(exc: OSError, path: Path, tmp: str | os.PathLike[str] | None = None) -> OSError:
    """``exc`` naming ``path`` (the target) when it names nothing or the temporary file
    ``tmp``; an error about another file (a backup, the caller's own input) is kept."""
    if exc.errno is None or (exc.filename is not None and (
            tmp is None or os.fspath(exc.filename) != os.fspath(tmp))):
        return exc
    new = OSError(exc.errno, exc.strerror or os.strerror(exc.errno), os.fspath(path))
    new.__cause__ = exc
    return new


def _check_target(path: Path) -> bool:
    """True when ``path`` is an existing regular file, False when nothing is there;
    OutputError for a link or anything else qpseg must not replace."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise OutputError.from_os_error(exc, path) from None
    if stat.S_ISLNK(st.st_mode):
        raise OutputError("is a symbolic link; qpseg does not write through links (remove the "
                          "link or write somewhere else)", path)
    if stat.S_ISDIR(st.st_mode):
        raise OutputError("is a folder, not a file", path)
    if not stat.S_ISREG(st.st_mode):
        raise OutputError("is not a regular file; qpseg will not replace it", path)
    return True


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _ledger_hashes(folder: Path, name: str) -> set[str]:
    """SHA-256 of every version of ``name`` qpseg wrote in ``folder`` (from the ledger)."""
    try:
        fd = os.open(folder / LEDGER_NAME, os.O_RDONLY | _O_NOFOLLOW)
    except OSError:
        return set()
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as fh:
        out = set()
        for line in fh:
            try:
                digest, entry = json.loads(line)
            except (ValueError, TypeError):
                continue
            if entry == name and isinstance(digest, str):
                out.add(digest)
    return out


def _record_written(path: Path, digest: str) -> None:
    """Add ``[digest, name]`` to the folder's ledger (best effort: a lost line only means a
    later backup of this version is kept rather than replaced)."""
    ledger = path.parent / LEDGER_NAME
    line = json.dumps([digest, path.name], ensure_ascii=False) + "\n"
    with contextlib.suppress(OSError):
        fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW,
                     0o666 & ~_umask())
        try:
            os.write(fd, line.encode("utf-8"))
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > _LEDGER_MAX_BYTES:
            with open(ledger, encoding="utf-8", errors="replace") as fh:
                lines = fh.readlines()
            fd, tmp = tempfile.mkstemp(prefix=f".{LEDGER_NAME}.", suffix=".tmp",
                                       dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    out.writelines(lines[len(lines) // 2:])
                os.replace(tmp, ledger)
            finally:
                Path(tmp).unlink(missing_ok=True)


def _copy_nofollow(src: Path, dst_fd: int) -> None:
    """Copy the regular file ``src`` (never through a link) into the open ``dst_fd``."""
    fd = os.open(src, os.O_RDONLY | _O_NOFOLLOW)
    try:
        while block := os.read(fd, 1 << 20):
            view = memoryview(block)
            while view:
                view = view[os.write(dst_fd, view):]
        os.fsync(dst_fd)
    finally:
        os.close(fd)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` (which must not exist) hold ``src``'s content: a hard link, else a copy.
    FileExistsError when ``dst`` exists, whatever it is (a link included)."""
    try:
        os.link(src, dst, follow_symlinks=False)
        return
    except FileExistsError:
        raise
    except (OSError, NotImplementedError):
        pass  # no hard links on this file system: copy
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o666 & ~_umask())
    try:
        _copy_nofollow(src, fd)
    except BaseException:
        os.close(fd)
        dst.unlink(missing_ok=True)
        raise
    os.close(fd)


def _replace_slot(src: Path, slot: Path) -> None:
    """Replace the backup ``slot`` (a regular file) by ``src``'s content, atomically."""
    tmp = slot.with_name(f".{slot.name}.{secrets.token_hex(6)}.tmp")
    try:
        _link_or_copy(src, tmp)
        os.replace(tmp, slot)
    finally:
        tmp.unlink(missing_ok=True)


def replace_with_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Make ``dst`` a copy of the regular file ``src``, atomically (a temporary file in
    ``dst``'s folder renamed over it): a link planted at ``dst`` is replaced, never written
    through. A real copy, not a hard link: the file it backs up may be rewritten in place by
    another program (QuPath's ``data.qpdata``). For backups with one fixed name."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o666 & ~_umask())
    try:
        try:
            _copy_nofollow(Path(src), fd)
        finally:
            os.close(fd)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def keep_backup(path: str | os.PathLike[str]) -> Path:
    """Keep the current content of the regular file ``path`` in a backup slot; returns it.

    The newest slot is reused only when it holds a version qpseg wrote (see the module
    docstring); otherwise the next number is taken. Links are never followed or written.
    """
    p = Path(path)
    _check_target(p)
    slots = backups(p)
    number = 0
    if slots:
        newest = slots[-1]
        if _is_regular(newest):
            written = _ledger_hashes(p.parent, p.name)
            if written and sha256_file(newest) in written:
                _replace_slot(p, newest)
                return newest
        m = re.search(r"\.bak(?:\.(\d+))?$", newest.name)
        number = int(m.group(1) or 0) + 1 if m else len(slots)
    while True:
        slot = backup_path(p, number)
        try:
            _link_or_copy(p, slot)
            return slot
        except FileExistsError:  # taken meanwhile (or a link was planted there): next one
            number += 1


def replace_file(tmp: str | os.PathLike[str], path: str | os.PathLike[str], *,
                 backup: bool = True) -> None:
    """Rename the finished temporary file ``tmp`` over ``path`` (same folder).

    With ``backup`` the previous file is kept (:func:`keep_backup`) and the new content is
    recorded in the folder's ledger as written by qpseg. OutputError when ``path`` is a link
    or not a regular file; an OSError names ``path``.
    """
    tmp, path = Path(tmp), Path(path)
    exists = _check_target(path)
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would, so
        # predictions in a shared project folder stay readable by the group.
        os.chmod(tmp, 0o666 & ~_umask())
        digest = sha256_file(tmp) if backup else ""
        if backup and exists:
            keep_backup(path)
        os.replace(tmp, path)
    except OSError as exc:
        raise _named(exc, path, tmp) from exc
    if backup:
        _record_written(path, digest)


@contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", *, backup: bool = True, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Write ``path`` atomically: a temp file in the same folder, fsync, then rename over it.

    A reader never sees a half-written file, and a crash leaves the old file intact. When the
    file already exists and ``backup`` is true, its previous content is kept in a numbered
    backup that never replaces a backup of a file qpseg did not write (module docstring).
    OutputError when ``path`` is a symbolic link or not a regular file; an OSError while
    writing names ``path``.
    """
    path = Path(path)
    _check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _named(exc, path) from exc
    try:
        kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": encoding, "newline": "\n"}
        try:
            with os.fdopen(fd, mode, **kwargs) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise _named(exc, path, tmp) from exc
        replace_file(tmp, path, backup=backup)
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


class FileLock:
    """An exclusive lock on the file ``path`` (created if needed), held by one process.

    The kernel lock (``flock``; ``msvcrt.locking`` on Windows) belongs to the open file, so it
    is released when :meth:`release` is called or the process dies in any way (SIGKILL, power
    loss of a client): a lock left by a dead process is never stale. Two threads of one
    process with separate ``FileLock`` objects exclude each other too. The file holds the
    holder's ``pid@host`` for messages. Works on local disks and NFSv4 (Linux maps flock to
    NFS byte-range locks).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = -1

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd >= 0

    def acquire(self, *, timeout_s: float = 0.0) -> bool:
        """Take the lock; False when another holder keeps it for ``timeout_s`` seconds.
        OutputError when the lock file cannot be created (or is a link)."""
        if self.held:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW, 0o666 & ~_umask())
        except OSError as exc:
            raise OutputError.from_os_error(exc, self.path) from None
        deadline = time.monotonic() + timeout_s
        while True:
            if _try_lock(fd):
                break
            if time.monotonic() >= deadline:
                os.close(fd)
                return False
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return True

    def holder(self) -> str:
        """``pid@host`` of the last holder ("" when unknown)."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                return fh.read(200).strip()
        except OSError:
            return ""

    def release(self) -> None:
        """Release the lock (idempotent). The lock file stays: removing it would let a third
        process lock a new file while a second still waits on the old one."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                _unlock(fd)
            os.close(fd)

    def __enter__(self) -> FileLock:
        if not self.acquire():
            raise OutputError(f"locked by another process ({self.holder() or 'unknown'})",
                              self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover - Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)
