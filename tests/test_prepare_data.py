"""tools.prepare_data with faked downloads: a local HTTP server on 127.0.0.1 and a monkeypatched gdown."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from test_splits import PNG, logging_enabled, make_tree, write_official_split  # noqa: F401 (autouse fixture)

from datasets import toyrs
from datasets.catalog import CATALOG, ChecksumError, CorruptImageError, DatasetError, DatasetInfo, SplitError
from datasets.splits import load_splits
from tools import prepare_data
from tools.prepare_data import download_url, extract_archive, main, prepare

CLASSES = ("tennis_court", "airport", "lake")  # label order of the fake split file, not alphabetical


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class FakeServer:
    """Serves ``files`` (path -> bytes); supports Range; ``truncate`` paths are cut short once."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.ranges: list[str | None] = []
        self.honour_range = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                header = self.headers.get("Range")
                server.ranges.append(header)
                start = int(header.split("=")[1].rstrip("-")) if header and server.honour_range else 0
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.truncate:
                    server.truncate.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FakeServer()
    yield srv
    srv.close()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_gz_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def split_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "made" / "split.json"
    write_official_split(path, CLASSES, (3, 1, 2))
    return path.read_bytes()


def add_row(monkeypatch, **fields) -> DatasetInfo:
    row = dict(
        name="FakeRS", dir="FakeRS", num_classes=3, classnames=CLASSES, display_names={}, split_file=None,
        split_md5=None, split_url=None, images_source="manual:Download it from nowhere", images_md5=None,
        template="a photo of a {}.", license="test", citation="test",
    )  # fmt: skip
    row.update(fields)
    info = DatasetInfo(**row)
    monkeypatch.setitem(CATALOG, "FakeRS", info)
    return info


# ------------------------------------------------------------------------------------------- downloads
def test_download_checks_md5_and_skips_existing(server, tmp_path):
    server.files["/a.bin"] = b"x" * 5000
    dest = download_url(server.url + "/a.bin", tmp_path / "a.bin", md5=md5(b"x" * 5000))
    assert dest.read_bytes() == b"x" * 5000 and not (tmp_path / "a.bin.part").exists()
    download_url(server.url + "/a.bin", dest, md5=md5(b"x" * 5000))
    assert len(server.ranges) == 1  # second call: nothing downloaded


def test_download_checksum_failure_writes_nothing(server, tmp_path):
    server.files["/a.bin"] = b"payload"
    dest = tmp_path / "a.bin"
    with pytest.raises(ChecksumError) as err:
        download_url(server.url + "/a.bin", dest, md5="0" * 32)
    assert md5(b"payload") in str(err.value) and "--allow-checksum-mismatch" in str(err.value)
    assert not dest.exists() and not (tmp_path / "a.bin.part").exists()
    download_url(server.url + "/a.bin", dest, md5="0" * 32, allow_mismatch=True)
    assert dest.read_bytes() == b"payload"


def test_existing_file_with_wrong_md5_is_left_untouched(tmp_path):
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"old")
    with pytest.raises(ChecksumError, match="left untouched"):
        download_url("http://127.0.0.1:9/never-contacted", dest, md5="0" * 32)
    assert dest.read_bytes() == b"old"


def test_resume_after_an_interrupted_download(server, tmp_path):
    data = bytes(range(256)) * 400
    server.files["/big.zip"] = data
    server.truncate.add("/big.zip")
    dest = tmp_path / "big.zip"
    with pytest.raises(DatasetError, match="resume"):
        download_url(server.url + "/big.zip", dest, md5=md5(data))
    part = tmp_path / "big.zip.part"
    assert not dest.exists(), "an interrupted download must never look complete"
    assert 0 < part.stat().st_size < len(data)
    received = part.stat().st_size
    download_url(server.url + "/big.zip", dest, md5=md5(data))
    assert server.ranges[-1] == f"bytes={received}-"
    assert dest.read_bytes() == data and not part.exists()


def test_restart_when_the_server_ignores_range(server, tmp_path):
    data = b"abcdef" * 1000
    server.files["/f"] = data
    server.honour_range = False
    (tmp_path / "f.part").write_bytes(b"garbage")
    assert download_url(server.url + "/f", tmp_path / "f", md5=md5(data)).read_bytes() == data


def test_extract_archive_is_atomic_and_skips_existing(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"top/x.txt": b"1"}))
    out = extract_archive(archive, tmp_path / "out")
    assert (out / "top" / "x.txt").read_bytes() == b"1" and not (tmp_path / "out.partial").exists()
    archive.write_bytes(b"not an archive any more")
    assert extract_archive(archive, tmp_path / "out") == out  # already extracted: skipped
    with pytest.raises(DatasetError, match="not a zip"):
        extract_archive(archive, tmp_path / "other")


# ------------------------------------------------------------------------------------------- prepare
def test_prepare_gdrive_dataset_with_official_split(server, tmp_path, monkeypatch):
    archive = zip_bytes({f"FakeRS/images/{c}/{c}_{i:03d}.png": PNG for c in CLASSES for i in range(6)})
    split = split_bytes(tmp_path)
    server.files["/fakers.json"] = split
    add_row(monkeypatch, images_source="gdrive:FAKEID", images_md5=md5(archive), split_file="fakers.json",
            split_md5=md5(split), split_url=server.url + "/fakers.json")  # fmt: skip
    calls = []

    def fake_gdown(id=None, output=None, quiet=False, resume=False, **kwargs):
        calls.append(id)
        Path(output).write_bytes(archive)
        return output

    monkeypatch.setattr("gdown.download", fake_gdown)
    root = tmp_path / "data"
    spec, splits = prepare("FakeRS", root)
    assert calls == ["FAKEID"]
    assert (root / "FakeRS" / "downloads" / "FakeRS.zip").read_bytes() == archive
    assert sorted(p.name for p in spec.image_dir.iterdir()) == sorted(CLASSES)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [9, 3, 6]
    assert {lab: cls for _, lab, cls in splits["train"]} == dict(enumerate(CLASSES))
    assert main(["FakeRS", "--root", str(root), "--verify"]) == 0  # second run: everything skipped
    assert calls == ["FAKEID"] and len(server.ranges) == 1


def test_prepare_gdrive_checksum_failure(tmp_path, monkeypatch):
    add_row(monkeypatch, images_source="gdrive:FAKEID", images_md5="0" * 32)
    monkeypatch.setattr("gdown.download", lambda id=None, output=None, **kw: Path(output).write_bytes(b"bad") and output)
    with pytest.raises(ChecksumError):
        prepare("FakeRS", tmp_path)
    assert not (tmp_path / "FakeRS" / "images").exists()
    assert not (tmp_path / "FakeRS" / "downloads" / "FakeRS.zip").exists()


def test_prepare_flat_tar_arranged_by_the_split_file(server, tmp_path, monkeypatch):
    # RSICD-style: all images in one flat folder; the split file says which class each belongs to.
    archive = tar_gz_bytes({f"all_images/{c}_{i:03d}.png": PNG for c in CLASSES for i in range(6)})
    split = split_bytes(tmp_path)
    server.files["/imgs.tar.gz"] = archive
    server.files["/fakers.json"] = split
    add_row(monkeypatch, images_source=server.url + "/imgs.tar.gz", images_md5=md5(archive),
            split_file="fakers.json", split_md5=md5(split), split_url=server.url + "/fakers.json")  # fmt: skip
    spec, splits = prepare("FakeRS", tmp_path)
    assert (spec.image_dir / "lake" / "lake_005.png").is_file()
    assert sum(len(v) for v in splits.values()) == 18


def test_prepare_reports_split_images_missing_from_the_download(server, tmp_path, monkeypatch):
    archive = zip_bytes({f"flat/{c}_{i:03d}.png": PNG for c in CLASSES for i in range(5)})  # one short
    split = split_bytes(tmp_path)
    server.files["/i.zip"], server.files["/s.json"] = archive, split
    add_row(monkeypatch, images_source=server.url + "/i.zip", split_file="fakers.json", split_md5=md5(split),
            split_url=server.url + "/s.json")  # fmt: skip
    with pytest.raises(SplitError, match="3 of 18 images") as err:
        prepare("FakeRS", tmp_path)
    assert "airport/airport_005.png" in str(err.value)
    assert not (tmp_path / "FakeRS" / "images").exists()


def test_split_file_checksum_failure(server, tmp_path, monkeypatch):
    server.files["/s.json"] = split_bytes(tmp_path)
    add_row(monkeypatch, split_file="fakers.json", split_md5="0" * 32, split_url=server.url + "/s.json")
    assert main(["FakeRS", "--root", str(tmp_path)]) == 1
    assert not (tmp_path / "FakeRS" / "fakers.json").exists()


def test_manual_dataset_prints_instructions_then_arranges(tmp_path, monkeypatch, capsys, caplog):
    add_row(monkeypatch)
    assert main(["FakeRS", "--root", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    downloads = tmp_path / "FakeRS" / "downloads"
    assert "Download it from nowhere" in out and f"{downloads}/" in out
    assert f"python -m tools.prepare_data FakeRS --root {tmp_path}" in out
    assert "tennis_court" in out
    make_tree(downloads / "MyDownload" / "nested", CLASSES, 10, ext=".jpg")  # the user's extracted folder
    (downloads / "MyDownload" / "nested" / "lake" / "Thumbs.db").write_bytes(b"x")
    assert main(["FakeRS", "--root", str(tmp_path)]) == 0
    assert "lake/Thumbs.db" in caplog.text
    spec_dir = tmp_path / "FakeRS"
    assert len(list((spec_dir / "images" / "lake").iterdir())) == 10  # non-image file left behind
    assert (spec_dir / "split_generated.json").is_file()


def test_manual_dataset_with_archives_inside_an_archive(tmp_path, monkeypatch):
    # MLRSNet-style: one archive per class, all inside the archive the user downloaded.
    add_row(monkeypatch)
    inner = {f"Images/{c}.zip": zip_bytes({f"{c}/{c}_{i}.jpg": PNG for i in range(10)}) for c in CLASSES}
    downloads = tmp_path / "FakeRS" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "everything.zip").write_bytes(zip_bytes(inner))
    spec, splits = prepare("FakeRS", tmp_path)
    assert sorted(p.name for p in spec.image_dir.iterdir()) == sorted(CLASSES)
    assert sum(len(v) for v in splits.values()) == 30
    assert (downloads / "everything.zip.extracted" / "Images" / "lake.zip.extracted").is_dir()


def test_manual_dataset_with_incomplete_download(tmp_path, monkeypatch):
    add_row(monkeypatch)
    make_tree(tmp_path / "FakeRS" / "downloads" / "x", CLASSES[:2], 3)
    with pytest.raises(DatasetError, match="2 of the 3 class folders") as err:
        prepare("FakeRS", tmp_path)
    assert "lake" in str(err.value)


def test_missing_dataset_root_for_generic_yaml(tmp_path, capsys):
    yaml = tmp_path / "mine.yaml"
    yaml.write_text('DATASET:\n  NAME: "ImageFolderRS"\n  FOLDER: "Mine"\n')
    assert main([str(yaml), "--root", str(tmp_path)]) == 2
    assert f"{tmp_path / 'Mine' / 'images'}/<class name>" in capsys.readouterr().out


def test_verify_reports_corrupt_images(tmp_path, monkeypatch, capsys):
    add_row(monkeypatch)
    make_tree(tmp_path / "FakeRS" / "images", CLASSES, 10)
    prepare("FakeRS", tmp_path, verify=True)
    (tmp_path / "FakeRS" / "images" / "lake" / "lake_003.png").write_bytes(PNG[:40])
    with pytest.raises(CorruptImageError, match="1 of 30") as err:
        prepare("FakeRS", tmp_path, verify=True)
    assert "lake/lake_003.png" in str(err.value)
    prepare("FakeRS", tmp_path)  # without --verify the tree still looks complete
    assert main(["FakeRS", "--root", str(tmp_path), "--verify"]) == 1
    assert "lake_003.png" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- ToyRS
def test_toyrs_is_deterministic():
    a = [np.asarray(toyrs.draw_scene(c, 3, size=32)) for c in toyrs.PAINTERS]
    b = [np.asarray(toyrs.draw_scene(c, 3, size=32)) for c in toyrs.PAINTERS]
    assert all(x.shape == (32, 32, 3) and np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(toyrs.draw_scene("forest", 4, size=32)), a[4])


def test_toyrs_classes_are_distinguishable():
    """Nearest class mean on colour statistics beats chance (1/8) by far: a prompt learner can learn it."""

    def features(img):
        arr = np.asarray(img, dtype=np.float32) / 255
        return np.concatenate([arr.mean((0, 1)), arr.std((0, 1))])

    train = {c: np.mean([features(toyrs.draw_scene(c, i, size=32)) for i in range(8)], 0) for c in toyrs.PAINTERS}
    hits = total = 0
    for c in toyrs.PAINTERS:
        for i in range(8, 12):
            f = features(toyrs.draw_scene(c, i, size=32))
            hits += min(train, key=lambda k: np.linalg.norm(train[k] - f)) == c
            total += 1
    assert hits / total >= 0.75


def test_prepare_toyrs_end_to_end(tmp_path, capsys):
    assert main(["toyrs", "--root", str(tmp_path)]) == 0
    assert "ToyRS is ready" in capsys.readouterr().out
    image_dir = tmp_path / "ToyRS" / "images"
    files = sorted(image_dir.rglob("*.png"))
    assert len(files) == 8 * toyrs.PER_CLASS
    split = json.loads((tmp_path / "ToyRS" / "split_generated.json").read_text())
    assert [len(split[k]) for k in ("train", "val", "test")] == [8 * 29, 8 * 13, 8 * 18]  # >= 16 shots per class
    digest = hashlib.md5(b"".join(f.read_bytes() for f in files[:: 37])).hexdigest()
    assert main(["toyrs", "--root", str(tmp_path)]) == 0  # second run: skipped, untouched
    assert hashlib.md5(b"".join(f.read_bytes() for f in files[:: 37])).hexdigest() == digest
    with pytest.raises(FileExistsError):
        toyrs.generate(image_dir)


def test_generic_spec_is_accepted_directly(tmp_path):
    from test_splits import generic_spec

    spec = generic_spec(tmp_path, folder="Direct")
    make_tree(spec.image_dir, ["x", "y"], 4)
    returned, splits = prepare(spec, tmp_path)
    assert returned is spec and load_splits(spec) == splits
    assert prepare_data.archive_kind(spec.generated_split_path) is None
