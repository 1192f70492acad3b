"""Where derived dataset files go when the data root is read-only (pure: no Dassl, no torch).

Few-shot draws, generated splits and caption stores normally live inside the dataset folder
(``DATA/<Dir>/...``), so that every user of a data root shares them. On shared read-only storage they cannot
be written there; they then go to the same relative place under the user cache folder:
``$BIMORS_CACHE`` (default ``$XDG_CACHE_HOME/bimors``, else ``~/.cache/bimors``), in a sub-folder named
after the dataset folder and a short hash of its absolute path, so two data roots never share files.
Readers look in the dataset folder first, then in the cache.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
from pathlib import Path

from common.io import write_json_atomic

logger = logging.getLogger(__name__)

CACHE_ENV = "BIMORS_CACHE"
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def user_cache_root() -> Path:
    """``$BIMORS_CACHE``, else ``$XDG_CACHE_HOME/bimors``, else ``~/.cache/bimors``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "bimors"


def fallback_for(folder: str | Path) -> Path:
    """The user-cache stand-in for ``folder``, a folder inside a dataset folder (e.g. ``DATA/ToyRS/captions``)."""
    folder = Path(folder).absolute()
    dataset_dir = folder.parent
    tag = hashlib.sha1(str(dataset_dir).encode()).hexdigest()[:10]
    return user_cache_root() / f"{dataset_dir.name}-{tag}" / folder.name


def candidates(path: str | Path) -> list[Path]:
    """Where a derived file may be: inside the dataset folder, then its user-cache stand-in."""
    path = Path(path)
    return [path, fallback_for(path.parent) / path.name]


def existing(path: str | Path) -> Path | None:
    """The first of :func:`candidates` that exists, or None."""
    return next((p for p in candidates(path) if p.is_file()), None)


def is_read_only_error(exc: OSError) -> bool:
    """True for the errors a read-only or foreign-owned folder gives (EROFS, EACCES, EPERM)."""
    return exc.errno in READ_ONLY_ERRNOS


def can_write(folder: str | Path) -> bool:
    """True when files can be created in ``folder`` (created if missing): probed with a temporary file."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
    except OSError as exc:
        if is_read_only_error(exc):
            return False
        raise
    os.close(fd)
    os.unlink(name)
    return True


def writable_folder(folder: str | Path, what: str) -> Path:
    """``folder`` when it can be written, else its user-cache stand-in (with a note naming both)."""
    folder = Path(folder)
    if can_write(folder):
        return folder
    other = fallback_for(folder)
    logger.warning("%s is read-only: %s go to %s instead", folder, what, other)
    other.mkdir(parents=True, exist_ok=True)
    return other


def write_json(path: str | Path, obj: object, what: str) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically, or, when its folder is read-only, to the user-cache
    stand-in (with a note); return where it went."""
    path = Path(path)
    try:
        write_json_atomic(path, obj)
        return path
    except OSError as exc:
        if not is_read_only_error(exc):
            raise
    other = fallback_for(path.parent) / path.name
    logger.warning("%s is read-only: the %s goes to %s instead", path.parent, what, other)
    write_json_atomic(other, obj)
    return other
