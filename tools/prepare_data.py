"""Download, check, extract and arrange a remote-sensing dataset as ``<root>/<Dir>/images/<class>/<file>``.

    python -m tools.prepare_data patternnet --root DATA [--verify]
    python -m tools.prepare_data toyrs --root DATA          # generated offline, deterministic

``dataset`` is a config stem of ``configs/datasets/``, a dataset yaml path or a catalogue name. Steps,
each skipped when its result is already there: fetch the official split file (HTTP, md5-checked);
fetch the images (Google Drive via gdown, or HTTP; md5-checked; written to ``<file>.part`` and renamed
only when complete, so an interrupted download resumes and never looks complete); extract every archive
in ``<Dir>/downloads/``; arrange the class folders (or, for flat archives, the split file's images) into
``images/``; check that every split image exists. ``--verify`` also decodes every image and, when any is
missing or damaged, rebuilds ``images/`` from the download (archives extracted again, ToyRS generated again)
and checks it again. Datasets without a direct download get exact instructions (exit code 2) and are checked
on the next run.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import zipfile
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from common.io import DownloadError, download, file_digest
from datasets.catalog import (
    CATALOG,
    DOWNLOADS_DIR,
    ChecksumError,
    CorruptImageError,
    DatasetError,
    DatasetSpec,
    ManualDownloadRequired,
    SplitError,
    config_files,
    resolve_dataset,
)
from datasets.splits import VERIFY_DOES, Splits, image_decodes, is_image_file, load_splits, read_split_file

logger = logging.getLogger(__name__)

_SHOW = 5
_RAR_MAGIC = b"Rar!\x1a\x07"
_7Z_MAGIC = b"7z\xbc\xaf\x27\x1c"


# ------------------------------------------------------------------------------------------ checksums
def _check_existing(path: Path, md5: str | None, allow_mismatch: bool) -> None:
    if not md5:
        return
    actual = file_digest(path, "md5")
    if actual == md5:
        return
    message = f"{path} has md5 {actual}, expected {md5}"
    if allow_mismatch:
        logger.warning("%s; using it anyway (--allow-checksum-mismatch).", message)
        return
    raise ChecksumError(
        f"{message}. It was left untouched: delete it to download it again, or rerun with "
        "--allow-checksum-mismatch to use it as it is."
    )


def _finish(part: Path, dest: Path, md5: str | None, allow_mismatch: bool, source: str) -> Path:
    """Check the md5 of a completed ``.part`` file, then rename it to ``dest``."""
    if md5:
        actual = file_digest(part, "md5")
        if actual != md5:
            if not allow_mismatch:
                part.unlink()
                raise ChecksumError(
                    f"{source} arrived with md5 {actual}, expected {md5}. The download was discarded and "
                    f"nothing was written to {dest}. If the source changed on purpose, rerun with "
                    "--allow-checksum-mismatch."
                )
            logger.warning("%s arrived with md5 %s, expected %s; kept (--allow-checksum-mismatch).", source, actual, md5)
    os.replace(part, dest)
    logger.info("Saved %s", dest)
    return dest


# ------------------------------------------------------------------------------------------ downloads
def _existing_or_part(dest: str | Path, md5: str | None, allow_mismatch: bool) -> tuple[Path, Path | None]:
    """``(dest, None)`` when ``dest`` already exists (md5-checked), else ``(dest, dest.part)`` to download into."""
    dest = Path(dest)
    if dest.is_file():
        _check_existing(dest, md5, allow_mismatch)
        logger.info("%s already exists, skipping the download", dest)
        return dest, None
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest, dest.with_name(dest.name + ".part")


def download_url(
    url: str, dest: str | Path, md5: str | None = None, allow_mismatch: bool = False, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part`` (resumed with an HTTP Range request).

    An existing ``dest`` is kept (and md5-checked). A wrong md5 is a :class:`ChecksumError`.
    """
    dest, part = _existing_or_part(dest, md5, allow_mismatch)
    if part is None:
        return dest
    try:
        download(url, part, resume=True, timeout=timeout)
    except DownloadError as err:
        raise DatasetError(str(err)) from err
    return _finish(part, dest, md5, allow_mismatch, url)


def download_gdrive(file_id: str, dest: str | Path, md5: str | None = None, allow_mismatch: bool = False) -> Path:
    """Download a Google Drive file with gdown through ``dest.part``; md5-checked like :func:`download_url`."""
    import gdown

    dest, part = _existing_or_part(dest, md5, allow_mismatch)
    if part is None:
        return dest
    by_hand = (
        f"If Google Drive refuses (quota, sign-in), download https://drive.google.com/file/d/{file_id}/view "
        f"in a browser, save it as {dest} and rerun the command."
    )
    try:
        result = gdown.download(id=file_id, output=str(part), quiet=False, resume=True)
    except Exception as err:  # gdown raises its own exception types, and requests' ones
        raise DatasetError(f"Downloading Google Drive file {file_id} failed ({err}). {by_hand}") from err
    if result is None or not part.is_file():
        raise DatasetError(f"Downloading Google Drive file {file_id} produced no file. {by_hand}")
    return _finish(part, dest, md5, allow_mismatch, f"Google Drive file {file_id}")


# ----------------------------------------------------------------------------------------- extraction
def archive_kind(path: str | Path) -> str | None:
    """``zip``, ``tar``, ``rar``, ``7z`` (by content, not by name) or None for other files."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_RAR_MAGIC):
        return "rar"
    if head.startswith(_7Z_MAGIC):
        return "7z"
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    return None


def _external_extract(archive: Path, out: Path) -> None:
    commands = [
        ("unrar", ["unrar", "x", "-idq", "-o+", str(archive), str(out) + os.sep]),
        ("7z", ["7z", "x", "-y", f"-o{out}", str(archive)]),
        ("bsdtar", ["bsdtar", "-xf", str(archive), "-C", str(out)]),
    ]
    for tool, command in commands:
        if shutil.which(tool):
            subprocess.run(command, check=True)
            return
    raise DatasetError(
        f"{archive} needs an external extractor (unrar, 7z or bsdtar), none of which is installed. "
        f"Extract it by hand into {archive.parent}/ and rerun the command."
    )


def extract_archive(archive: str | Path, dest: str | Path) -> Path:
    """Extract ``archive`` into ``dest`` (built as ``dest.partial``, renamed when complete; skipped if present)."""
    archive, dest = Path(archive), Path(dest)
    if dest.is_dir():
        logger.info("%s already extracted", archive.name)
        return dest
    kind = archive_kind(archive)
    if kind is None:
        raise DatasetError(f"{archive} is not a zip, tar, rar or 7z archive; delete it and rerun the command.")
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for member in tqdm(zf.infolist(), desc=f"extract {archive.name}", unit="file"):
                    zf.extract(member, partial)  # zipfile drops absolute and '..' path parts
        elif kind == "tar":
            with tarfile.open(archive) as tf:
                for member in tqdm(tf.getmembers(), desc=f"extract {archive.name}", unit="file"):
                    tf.extract(member, partial, filter="data")
        else:
            _external_extract(archive, partial)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, subprocess.CalledProcessError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise DatasetError(f"{archive} could not be extracted ({err}); delete it and rerun the command.") from err
    os.replace(partial, dest)
    return dest


_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".rar", ".7z")


def _archives(folder: Path) -> list[Path]:
    """Archives in ``folder``: any file at the top, and files with an archive suffix deeper down."""
    found = []
    for dirpath, _, filenames in _walk_dirs(folder):
        top = dirpath == folder
        for name in filenames:
            path = dirpath / name
            if name.endswith(".part") or (not top and not name.lower().endswith(_ARCHIVE_SUFFIXES)):
                continue
            if not path.with_name(name + ".extracted").is_dir() and archive_kind(path):
                found.append(path)
    return found


def extract_all(folder: Path) -> list[Path]:
    """Extract every archive under ``folder`` (archives inside archives too) into ``<archive>.extracted/``."""
    out: list[Path] = []
    if not folder.is_dir():
        return out
    while pending := _archives(folder):
        out.extend(extract_archive(path, path.with_name(path.name + ".extracted")) for path in pending)
    return out


# ---------------------------------------------------------------------------------------- arrangement
def _walk_dirs(top: Path) -> Iterable[tuple[Path, list[str], list[str]]]:
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not d.endswith(".partial") and not d.startswith("."))
        yield Path(dirpath), dirnames, sorted(filenames)


def find_class_dirs(search_dir: Path, classes: Iterable[str]) -> dict[str, Path]:
    """The shallowest folder named after each class anywhere under ``search_dir``."""
    wanted = set(classes)
    found: dict[str, tuple[int, Path]] = {}
    for dirpath, dirnames, _ in _walk_dirs(search_dir):
        depth = len(dirpath.relative_to(search_dir).parts)
        for name in dirnames:
            if name in wanted and (name not in found or depth < found[name][0]):
                found[name] = (depth, dirpath / name)
    return {name: path for name, (_, path) in found.items()}


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # no extra disk space; the extracted copy stays usable
    except OSError:
        shutil.copy2(src, dst)


def _split_classes(splits: Splits) -> list[str]:
    return list(dict.fromkeys(rel.split("/", 1)[0] for items in splits.values() for rel, _, _ in items))


def arrange_images(spec: DatasetSpec, search_dir: Path, splits: Splits | None = None) -> int:
    """Build ``spec.image_dir`` from the class folders found under ``search_dir`` and return the image count.

    Without class folders, a split file places flat files by name (``class/file`` from ``file``). The
    result is built in ``images.partial`` and renamed when complete.
    """
    if splits is not None:
        classes = _split_classes(splits)
    elif spec.classnames:
        classes = list(spec.classnames)
    else:
        raise DatasetError(f"Cannot arrange {spec.label}: neither a split file nor a class list is known.")
    partial = spec.image_dir.with_name(spec.image_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    class_dirs = find_class_dirs(search_dir, classes)
    jobs: list[tuple[Path, Path]] = []
    if len(class_dirs) == len(classes):
        skipped = []
        for cls in classes:
            for entry in sorted(class_dirs[cls].iterdir()):
                if entry.is_file() and is_image_file(entry.name):
                    jobs.append((entry, partial / cls / entry.name))
                elif not entry.name.startswith("."):
                    skipped.append(f"{cls}/{entry.name}")
        if skipped:
            logger.warning("Not copying %d non-image entries: %s", len(skipped), ", ".join(skipped[:_SHOW]))
    elif splits is not None:
        by_name: dict[str, Path] = {}
        for dirpath, _, filenames in _walk_dirs(search_dir):
            for name in filenames:
                by_name.setdefault(name, dirpath / name)
        relpaths = list(dict.fromkeys(rel for items in splits.values() for rel, _, _ in items))
        missing = [rel for rel in relpaths if Path(rel).name not in by_name]
        if missing:
            raise SplitError(
                f"{len(missing)} of {len(relpaths)} images of the split file were not found under {search_dir} "
                f"(by class folder or by file name): {', '.join(missing[:_SHOW])}. Check that the download is "
                "complete and extracted there, then rerun the command."
            )
        jobs = [(by_name[Path(rel).name], partial / rel) for rel in relpaths]
    else:
        absent = [c for c in classes if c not in class_dirs]
        raise DatasetError(
            f"Found {len(class_dirs)} of the {len(classes)} class folders of {spec.label} under {search_dir}; "
            f"missing: {', '.join(absent[:_SHOW])}{', ...' if len(absent) > _SHOW else ''}. Put the complete "
            "extracted dataset (or its archive) there and rerun the command."
        )
    for src, dst in tqdm(jobs, desc=f"arrange {spec.label}", unit="img"):
        _place(src, dst)
    os.replace(partial, spec.image_dir)
    logger.info("Arranged %d images in %s", len(jobs), spec.image_dir)
    return len(jobs)


# ------------------------------------------------------------------------------------------ the steps
def manual_instructions(spec: DatasetSpec) -> str:
    """What to download and where to put it, for a dataset without a direct download."""
    downloads = spec.dataset_dir / DOWNLOADS_DIR
    if spec.info is None:
        return (
            f"{spec.label}: put your images in {spec.image_dir}/<class name>/<image file> (one folder per class), "
            f"then run again:\n  {spec.prepare_command}"
        )
    what = spec.info.images_source.removeprefix("manual:")
    classes = list(spec.info.classnames)
    shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
    return (
        f"{spec.name} has no direct public download.\n"
        f"1. {what}.\n"
        f"2. Put the archive(s) (.zip, .tar[.gz], .rar, .7z) or the extracted folder in\n     {downloads}/\n"
        f"3. Run again:\n     {spec.prepare_command}\n"
        f"It extracts the archives, arranges {spec.image_dir}/<class>/<file> and checks the result.\n"
        f"Expected class folders ({len(classes)}): {shown}"
    )


def fetch_split(spec: DatasetSpec, allow_mismatch: bool = False) -> None:
    """Download the official split file when the catalogue has one and it is not there yet."""
    if spec.split_path is None or spec.split_path.is_file():
        return
    info = spec.info
    if info is None or not info.split_url or spec.split_path != spec.dataset_dir / str(info.split_file):
        raise DatasetError(
            f"Split file {spec.split_path} does not exist and has no download: put it there, or remove "
            "DATASET.SPLIT_FILE from the dataset yaml to use a generated 49/21/30 split."
        )
    download_url(info.split_url, spec.split_path, md5=spec.split_md5, allow_mismatch=allow_mismatch)


def fetch_images(spec: DatasetSpec, allow_mismatch: bool = False) -> None:
    """Build ``spec.image_dir``: generate (ToyRS), or download/extract/arrange, or explain the manual steps."""
    info = spec.info
    kind = info.source_kind if info else "manual"
    if kind == "generated":
        from datasets import toyrs

        spec.dataset_dir.mkdir(parents=True, exist_ok=True)
        toyrs.generate(spec.image_dir)
        return
    downloads = spec.dataset_dir / DOWNLOADS_DIR
    if info is not None and kind == "gdrive":
        download_gdrive(info.images_source.removeprefix("gdrive:"), downloads / f"{info.dir}.zip", info.images_md5,
                        allow_mismatch)  # fmt: skip
    elif info is not None and kind == "url":
        name = Path(urllib.parse.urlparse(info.images_source).path).name or f"{info.dir}.zip"
        download_url(info.images_source, downloads / name, info.images_md5, allow_mismatch)
    extract_all(downloads)
    has_content = downloads.is_dir() and any(p.is_dir() for p in downloads.iterdir())
    if info is None or not has_content:
        raise ManualDownloadRequired(manual_instructions(spec))
    splits = None
    if spec.split_path is not None:
        splits = read_split_file(spec.split_path, spec.split_md5, allow_mismatch or spec.allow_split_mismatch)
    arrange_images(spec, downloads, splits)


def verify_images(image_dir: Path, relpaths: Iterable[str]) -> list[str]:
    """Decode every image; return the relpaths that are missing or fail."""
    return [rel for rel in tqdm(list(relpaths), desc="verify", unit="img") if not image_decodes(image_dir / rel)]


def rebuild_images(spec: DatasetSpec, allow_mismatch: bool = False) -> None:
    """Build ``spec.image_dir`` again from the download: archives are extracted afresh (the arranged images are
    hard links to the extracted files, so a damaged image is damaged there too) and ToyRS is generated again.

    The old folder is kept aside until the new one is complete, and put back when rebuilding fails.
    """
    aside = spec.image_dir.with_name(spec.image_dir.name + ".broken")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(spec.image_dir, aside)
    try:
        downloads = spec.dataset_dir / DOWNLOADS_DIR
        for extracted in sorted(downloads.glob("*.extracted")) if downloads.is_dir() else []:
            if extracted.with_name(extracted.name.removesuffix(".extracted")).is_file():
                shutil.rmtree(extracted)
        fetch_images(spec, allow_mismatch)
    except BaseException:
        if not spec.image_dir.exists():
            os.replace(aside, spec.image_dir)
        raise
    shutil.rmtree(aside)


def _bad_images_message(spec: DatasetSpec, bad: list[str], total: int) -> str:
    return (
        f"{len(bad)} of {total} images under {spec.image_dir} are missing or cannot be decoded: "
        f"{', '.join(bad[:_SHOW])}{', ...' if len(bad) > _SHOW else ''}"
    )


def prepare(
    dataset: str | DatasetSpec, root: str | Path, verify: bool = False, allow_checksum_mismatch: bool = False
) -> tuple[DatasetSpec, Splits]:
    """Prepare one dataset under ``root`` (see the module docstring) and return its spec and splits.

    With ``verify``, every image of the split is decoded; missing or damaged ones make it rebuild ``images/``
    from the download (:func:`rebuild_images`); images still bad afterwards are a :class:`CorruptImageError`.
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else resolve_dataset(dataset, root)
    if allow_checksum_mismatch:
        spec.allow_split_mismatch = True
    fetch_split(spec, allow_checksum_mismatch)
    if spec.image_dir.is_dir():
        logger.info("%s exists, skipping download and arrangement%s", spec.image_dir, " (verifying it)" if verify else "")
    else:
        fetch_images(spec, allow_checksum_mismatch)
    if not verify:
        return spec, load_splits(spec)
    splits = load_splits(spec, check_images=False)
    relpaths = list(dict.fromkeys(rel for items in splits.values() for rel, _, _ in items))
    bad = verify_images(spec.image_dir, relpaths)
    if bad:
        logger.warning("%s; rebuilding %s from the download", _bad_images_message(spec, bad, len(relpaths)), spec.image_dir)
        try:
            rebuild_images(spec, allow_checksum_mismatch)
        except DatasetError as err:
            raise CorruptImageError(
                f"{_bad_images_message(spec, bad, len(relpaths))}. They could not be restored from the download "
                f"({str(err).splitlines()[0]}): replace them from the original dataset, then run this command again."
            ) from err
        still = verify_images(spec.image_dir, relpaths)
        if still:
            raise CorruptImageError(
                f"{_bad_images_message(spec, still, len(relpaths))}, even after rebuilding it from "
                f"{spec.dataset_dir / DOWNLOADS_DIR}: the download itself is damaged; delete it and run this "
                "command again to download it afresh (or replace the files by hand)."
            )
        logger.info("Restored %s: all %d images decode", spec.image_dir, len(relpaths))
    return spec, load_splits(spec)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2: manual download needed)."""
    names = ", ".join(config_files()) or ", ".join(name.lower() for name in CATALOG)
    parser = argparse.ArgumentParser(
        prog="python -m tools.prepare_data",
        description="Download, check, extract and arrange a dataset as <root>/<Dir>/images/<class>/<file>.",
        epilog=f"datasets: {names}; or a dataset yaml (NAME: ImageFolderRS). See docs/datasets.md.",
    )
    parser.add_argument("dataset", help="config stem (e.g. patternnet, toyrs), dataset yaml path or catalogue name")
    parser.add_argument("--root", required=True, help="folder that holds all datasets ($DATA)")
    parser.add_argument("--verify", action="store_true", help=f"decode every image; {VERIFY_DOES}")
    parser.add_argument(
        "--allow-checksum-mismatch",
        action="store_true",
        help="accept downloads and split files whose md5 differs from the catalogue's (with a warning)",
    )
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec, splits = prepare(args.dataset, args.root, args.verify, args.allow_checksum_mismatch)
    except ManualDownloadRequired as err:
        sys.stdout.write(f"{err}\n")
        return 2
    except DatasetError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    n_classes = len({label for items in splits.values() for _, label, _ in items})
    sizes = "/".join(str(len(splits[k])) for k in ("train", "val", "test"))
    sys.stdout.write(f"{spec.label} is ready in {spec.dataset_dir}: {n_classes} classes, train/val/test {sizes}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
