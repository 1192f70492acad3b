"""common.io: atomic writes leave no partial file, digests, downloads, and the run-folder lock."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os

import pytest

from common.io import (
    DownloadError,
    LockHeldError,
    atomic_dir,
    atomic_open,
    download,
    exclusive_lock,
    file_digest,
    write_json_atomic,
    write_text_atomic,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_json_atomic(target, {"x": 1}, indent=2)
    write_json_atomic(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_open(target) as fh:
        fh.write("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_open_refuses_append(tmp_path):
    with pytest.raises(ValueError, match="whole files"), atomic_open(tmp_path / "x", "a"):
        pass


def test_atomic_dir_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed while building")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "config.json").read_text() == "{}"
    with atomic_dir(target) as tmp:  # another process finished first: its folder is kept
        (tmp / "config.json").write_text("late")
    assert (target / "config.json").read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_download_failure_is_one_line_and_leaves_no_file(tmp_path):
    dest = tmp_path / "w.pt"
    with pytest.raises(DownloadError, match=r"^Downloading http://127\.0\.0\.1:9/w\.pt failed .*Check the network"):
        download("http://127.0.0.1:9/w.pt", dest, timeout=5)
    assert not dest.exists()


def test_file_digest_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert file_digest(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert file_digest(tmp_path / "f", "md5", chunk=1000) == hashlib.md5(data).hexdigest()


def _try_lock(path, queue) -> None:
    try:
        with exclusive_lock(path, describe=lambda pid: f"held by {pid}"):
            queue.put("acquired")
    except LockHeldError as exc:
        queue.put(str(exc))


def test_lock_excludes_another_process_and_is_released(tmp_path):
    lock = tmp_path / "run" / ".lock"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with exclusive_lock(lock):
        proc = ctx.Process(target=_try_lock, args=(lock, queue))
        proc.start()
        proc.join(300)
        assert queue.get(timeout=60) == f"held by {os.getpid()}"
    proc = ctx.Process(target=_try_lock, args=(lock, queue))
    proc.start()
    proc.join(300)
    assert queue.get(timeout=60) == "acquired"  # released on exit; a stale lock file does not block
