"""File helpers: atomic writes (a reader never sees a half-written file), digests, and file locks.

Every write goes to a temporary file unique to the writing process in the target's folder, then replaces the
target with :func:`os.replace` (atomic on POSIX). Two processes writing the same file at once therefore
never corrupt it: the last complete write wins.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from common.errors import ExpectedError

logger = logging.getLogger(__name__)


def _umask() -> int:
    """The process's umask (read by setting it, then restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    For writers that want a file name rather than a file object (``torch.save``, ``safetensors``)::

        with atomic_path(target) as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; the result gets a plain new file's mode
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing (``mode`` ``"w"`` or ``"wb"``) that replaces ``path`` on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a trailing newline when indented)."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + ("\n" if indent is not None else ""))


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest (``sha256``, ``md5``, ...) of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class LockHeldError(ExpectedError, RuntimeError):
    """Another live process holds the lock."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, describe: Callable[[str], str] | None = None) -> Iterator[Path]:
    """Hold an exclusive, non-blocking ``flock`` on ``path`` (created if needed) for the ``with`` block.

    The lock file records the holder's PID while it is held and is emptied on a normal exit. The kernel
    releases an ``flock`` when its process dies, so a lock file left by a killed process is taken over, with
    a logged note naming the dead holder. Raises :class:`LockHeldError` when a live process holds it;
    ``describe(holder_pid_text)`` builds that error's message.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            msg = describe(holder) if describe else f"{path} is locked by process {holder}"
            raise LockHeldError(msg) from None
        stale = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if stale:
            logger.warning("Taking over the lock %s of process %s, which ended without releasing it", path, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # a normal exit leaves an empty file: only a killed holder leaves its PID
    finally:
        os.close(fd)  # closing the descriptor releases the lock
