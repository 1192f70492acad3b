"""File helpers: atomic writes (a reader never sees a half-written file), digests, downloads and file locks.

Every write goes to a temporary file (or folder) unique to the writing process in the target's folder, then
replaces the target with :func:`os.replace` (atomic on POSIX). Two processes writing the same file at once
therefore never corrupt it: the last complete write wins (for folders: the first).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from common.errors import ExpectedError

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "bimors-benchmark/1.0"


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
    """Open a temporary file for writing (``mode`` ``"w"``, UTF-8, or ``"wb"``) that replaces ``path`` on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; on success it becomes ``path``, on error it is removed.

    When ``path`` appeared meanwhile (another process finished the same folder first), that folder is kept
    and ours is discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes a 0700 folder; others (a shared data root) must read the result
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            logger.info("%s was completed by another process meanwhile; keeping that one", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


class DownloadError(ExpectedError, RuntimeError):
    """A download failed; the message names the URL, the cause and what to do."""


def download(url: str, path: str | os.PathLike, resume: bool = False, timeout: float = 60.0) -> None:
    """Stream ``url`` into the file ``path`` with a progress bar.

    With ``resume`` the bytes already in ``path`` are kept and the rest is asked for with an HTTP ``Range``
    request (a server that ignores it sends everything again); a failure then leaves what was received in
    ``path`` for the next attempt. Raises :class:`DownloadError` (one line, with the fix).
    """
    path = Path(path)
    offset = path.stat().st_size if resume and path.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    total = None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if offset and response.status != 206:
                logger.info("%s does not resume downloads; starting %s again", url, path.name)
                offset = 0
            elif offset:
                logger.info("Resuming %s at byte %d", path.name, offset)
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            with (
                open(path, "ab" if offset else "wb") as fh,
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=path.name) as bar,
            ):
                while chunk := response.read(CHUNK):
                    fh.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        if not (err.code == 416 and offset):  # 416 on a resume: the file is already complete
            raise DownloadError(f"Downloading {url} failed: HTTP {err.code} {err.reason}. Check the URL.") from err
        total = offset
    except (OSError, ValueError) as err:  # URLError, connection reset, timeout, IncompleteRead
        if path.is_file() and path.stat().st_size == 0:
            path.unlink()
        if not resume or not path.is_file():
            raise DownloadError(
                f"Downloading {url} failed ({err}). Check the network connection and the URL."
            ) from err
        raise DownloadError(
            f"Downloading {url} was interrupted ({err}). {path} keeps the {path.stat().st_size} bytes received: "
            "rerun the command to resume."
        ) from err
    received = path.stat().st_size if path.is_file() else 0
    if total is not None and received != total:
        keep = f" {path} keeps them: rerun the command to resume." if resume else " Try again."
        raise DownloadError(f"Downloading {url} stopped at {received} of {total} bytes.{keep}")


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
