"""Split files, seeded split generation, few-shot sampling and base/new halves (pure: no Dassl import).

An :data:`Item` is ``(relpath under images/, label, raw class name)``, exactly one entry of the
APPLeNet/CoOp split format ``{"train"|"val"|"test": [[relpath, label, classname], ...]}``. The label
order of a split file is kept as it is (it is not alphabetical).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from common.io import file_digest
from datasets import storage
from datasets.catalog import ChecksumError, DatasetNotFoundError, DatasetSpec, SplitError

logger = logging.getLogger(__name__)

Item = tuple[str, int, str]
Splits = dict[str, list[Item]]

SPLIT_NAMES = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})
GENERATED_SPLIT_SEED = 1
TEST_FRACTION = 0.3  # of each class; then VAL_FRACTION of the rest: 49/21/30 overall, like CoOp
VAL_FRACTION = 0.3
MAX_VAL_SHOTS = 4
_SHOW = 5  # how many offending paths an error message lists


# ------------------------------------------------------------------------------------------- helpers
def _first(paths: Sequence[str]) -> str:
    shown = ", ".join(str(p) for p in paths[:_SHOW])
    return shown + (", ..." if len(paths) > _SHOW else "")


def _counts(splits: Splits) -> str:
    n_classes = len({label for items in splits.values() for _, label, _ in items})
    return "/".join(str(len(splits.get(k, []))) for k in SPLIT_NAMES) + f" (train/val/test), {n_classes} classes"


def is_image_file(name: str) -> bool:
    """True for file names with a known image extension (case-insensitive)."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def image_decodes(path: str | Path) -> bool:
    """True when Pillow can open and fully decode the image at ``path`` (False when it is missing or broken)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
    except Exception:  # PIL raises many types for broken files
        return False
    return True


# ---------------------------------------------------------------------------------------- split files
def _parse_split(data: Any, path: Path) -> Splits:
    if not isinstance(data, dict) or any(k not in data for k in SPLIT_NAMES):
        raise SplitError(
            f"{path} is not a split file: expected a JSON object with keys 'train', 'val' and 'test', "
            "each a list of [relpath, label, classname]."
        )
    splits: Splits = {}
    label_to_name: dict[int, str] = {}
    for key in SPLIT_NAMES:
        items: list[Item] = []
        for index, entry in enumerate(data[key]):
            if (
                not isinstance(entry, (list, tuple))
                or len(entry) != 3
                or not isinstance(entry[0], str)
                or isinstance(entry[1], bool)
                or not isinstance(entry[1], int)
            ):
                raise SplitError(
                    f"{path}: entry {index} of '{key}' is {entry!r}; expected [relpath, integer label, classname]."
                )
            relpath, label, classname = entry[0], int(entry[1]), str(entry[2])
            known = label_to_name.setdefault(label, classname)
            if known != classname:
                raise SplitError(
                    f"{path}: label {label} is {known!r} in one entry and {classname!r} in '{key}' entry "
                    f"{index}; each label must name one class."
                )
            items.append((relpath, label, classname))
        splits[key] = items
    return splits


def read_split_file(
    path: str | Path,
    expected_md5: str | None = None,
    allow_mismatch: bool = False,
    expected_sizes: tuple[int, int, int] | None = None,
    prepare: str = "python -m tools.prepare_data DATASET --root DATA",
) -> Splits:
    """Read a split file ``{"train"|"val"|"test": [[relpath, label, classname], ...]}``.

    When ``expected_md5`` is given and differs, raise :class:`ChecksumError` saying what differs (md5,
    and the split sizes when ``expected_sizes`` is known) and the two ways out (``prepare``, the command that
    fetches the official file, or the options that accept this one) unless ``allow_mismatch`` (then warn).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"Split file {path} does not exist.")
    actual = file_digest(path, "md5") if expected_md5 else None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SplitError(f"{path} is not valid JSON ({err}); delete it and prepare the dataset again.") from err
    splits = _parse_split(data, path)
    if expected_md5 and actual != expected_md5:
        message = f"Split file {path} has md5 {actual}, expected {expected_md5}; it has {_counts(splits)}"
        if expected_sizes:
            message += ", the expected file has " + "/".join(map(str, expected_sizes)) + " (train/val/test)"
        if allow_mismatch:
            logger.warning("%s. Using it anyway (split mismatch allowed).", message)
        else:
            raise ChecksumError(
                f"{message}. Replace it with the official file (delete it, then run `{prepare}`), or use it "
                "anyway: add `DATASET.ALLOW_SPLIT_MISMATCH True` to the train.py command "
                "(tools.prepare_data: --allow-checksum-mismatch)."
            )
    return splits


def check_images_exist(splits: Splits, image_dir: Path, source: str | Path, fix: str) -> None:
    """Raise :class:`SplitError` naming how many listed images are missing under ``image_dir``."""
    missing = [rel for items in splits.values() for rel, _, _ in items if not (image_dir / rel).is_file()]
    if missing:
        total = sum(len(items) for items in splits.values())
        raise SplitError(
            f"{len(missing)} of {total} images listed in {source} are missing under {image_dir}: "
            f"{_first(missing)}. {fix}"
        )


# ---------------------------------------------------------------------------------- generated splits
def list_image_tree(image_dir: str | Path, classnames: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Map each class folder of ``image_dir`` to its sorted image relpaths (``class/file``).

    Class order: ``classnames`` when given (all must exist; other folders are ignored with a warning),
    otherwise the sorted folder names. Non-image files and sub-folders are ignored with a warning; an
    empty class folder is an error.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DatasetNotFoundError(f"Image folder {image_dir} does not exist.")
    folders = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classnames is None:
        order = folders
        if not order:
            raise SplitError(f"{image_dir} has no class folders: expected {image_dir}/<class>/<image files>.")
    else:
        order = list(classnames)
        absent = [c for c in order if c not in folders]
        if absent:
            raise SplitError(
                f"{len(absent)} class folders are missing under {image_dir}: {_first(absent)}. "
                "Prepare the dataset again, or check the folder names against docs/datasets.md."
            )
        extra = [f for f in folders if f not in set(order)]
        if extra:
            logger.warning("Ignoring %d folders under %s that are not classes: %s", len(extra), image_dir, _first(extra))
    tree: dict[str, list[str]] = {}
    ignored: list[str] = []
    for cls in order:
        files = []
        for entry in sorted((image_dir / cls).iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_file() and is_image_file(entry.name):
                files.append(f"{cls}/{entry.name}")
            else:
                ignored.append(f"{cls}/{entry.name}")
        if not files:
            raise SplitError(
                f"Class folder {image_dir / cls} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
                "add images to it or remove the folder."
            )
        tree[cls] = files
    if ignored:
        logger.warning(
            "Ignoring %d non-image entries in the class folders of %s: %s", len(ignored), image_dir, _first(ignored)
        )
    return tree


def split_sizes(n: int | float) -> tuple[int | float, int, int]:
    """Train, val and test sizes of a class of ``n`` images in a generated split: 30% test, then 30% of the rest
    val, the remainder train (``n`` may be an average, as in :mod:`tools.cost`)."""
    n_test = round(n * TEST_FRACTION)
    n_val = round((n - n_test) * VAL_FRACTION)
    return n - n_test - n_val, n_val, n_test


def generate_split(tree: dict[str, list[str]], seed: int = GENERATED_SPLIT_SEED) -> Splits:
    """Seeded per-class split: 30% test, then 30% of the rest val, the remainder train (49/21/30).

    Labels follow the order of ``tree``; files are shuffled with ``random.Random(seed)``.
    """
    rng = random.Random(seed)
    splits: Splits = {key: [] for key in SPLIT_NAMES}
    for label, (cls, files) in enumerate(tree.items()):
        files = sorted(files)
        rng.shuffle(files)
        n_train, n_val, _ = split_sizes(len(files))
        parts = {"train": files[:n_train], "val": files[n_train : n_train + n_val], "test": files[n_train + n_val :]}
        for key, rels in parts.items():
            splits[key].extend((rel, label, cls) for rel in rels)
    return splits


def load_splits(spec: DatasetSpec, check_images: bool = True) -> Splits:
    """The train/val/test split of a dataset: its split file, or the generated split (made once, reused).

    Checks that the dataset folder and the image folder exist, that the class folders on disk are the
    split's classes and (``check_images``) that every listed image exists.
    """
    fix = f"Prepare it with: {spec.prepare_command}"
    if not spec.dataset_dir.is_dir():
        raise DatasetNotFoundError(f"Dataset {spec.label} not found: {spec.dataset_dir} does not exist. {fix}")
    if not spec.image_dir.is_dir():
        raise DatasetNotFoundError(
            f"Dataset {spec.label} has no image folder {spec.image_dir} (expected images/<class>/<file>). {fix}"
        )
    if spec.split_path is not None:
        if not spec.split_path.is_file():
            raise DatasetNotFoundError(
                f"Split file {spec.split_path} of dataset {spec.label} does not exist. {fix} "
                "(it downloads the official split), or point DATASET.SPLIT_FILE at your split file."
            )
        splits = read_split_file(
            spec.split_path, spec.split_md5, spec.allow_split_mismatch, spec.split_sizes, spec.prepare_command
        )
        source: Path = spec.split_path
    else:
        found = storage.existing(spec.generated_split_path)
        if found is not None:
            splits, source = read_split_file(found), found
        else:
            splits = generate_split(list_image_tree(spec.image_dir, spec.classnames))
            data = {key: [list(item) for item in items] for key, items in splits.items()}
            source = storage.write_json(spec.generated_split_path, data, "generated split")
            logger.info("Wrote the generated split of %s (%s) to %s", spec.label, _counts(splits), source)
    check_class_folders(spec, splits, source)
    if check_images:
        check_images_exist(splits, spec.image_dir, source, f"Run `{spec.prepare_command} --verify`: {VERIFY_DOES}")
    return splits


VERIFY_DOES = "it checks every image and restores missing or damaged ones from the download"


def check_class_folders(spec: DatasetSpec, splits: Splits, source: Path) -> None:
    """Raise :class:`SplitError` when ``images/`` holds class folders that the split does not list.

    (Folders the split lists but that are missing show up as missing images.)
    """
    listed = {rel.split("/", 1)[0] for items in splits.values() for rel, _, _ in items}
    on_disk = {p.name for p in spec.image_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    extra = sorted(on_disk - listed)
    if not extra:
        return
    if spec.split_path is None and spec.classnames is None:
        fix = (
            f"To train on them, delete {source} (the next run generates the split again from the folders on disk, "
            "which changes every draw); otherwise move them out of images/."
        )
    else:
        fix = f"The classes of {spec.label} are fixed by {'its split file' if spec.split_path else 'the catalogue'}: move them out of images/."
    raise SplitError(
        f"{len(extra)} class folders under {spec.image_dir} are not in the split {source}: {_first(extra)}. {fix}"
    )


# ---------------------------------------------------------------------------------------- few-shot
def _fingerprint(splits: Splits) -> str:
    payload = json.dumps([splits["train"], splits["val"]], separators=(",", ":"))
    return hashlib.md5(payload.encode()).hexdigest()


def _sample_per_label(items: Sequence[Item], k: int, rng: random.Random) -> list[Item]:
    by_label: dict[int, list[Item]] = {}
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    out: list[Item] = []
    for group in by_label.values():  # labels in order of first appearance, like Dassl/CoOp
        out.extend(rng.sample(group, k) if len(group) >= k else group)
    return out


def _checksum(record: dict) -> str:
    """sha256 of a few-shot record's content (every key but ``checksum``), in a canonical JSON form."""
    payload = json.dumps({k: v for k, v in record.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def _draw(splits: Splits, num_shots: int, seed: int) -> tuple[list[Item], list[Item]]:
    rng = random.Random(seed)
    train = _sample_per_label(splits["train"], num_shots, rng)
    val = _sample_per_label(splits["val"], min(num_shots, MAX_VAL_SHOTS), rng)
    return train, val


def _read_cache(path: Path, splits: Splits, num_shots: int, seed: int) -> tuple[list[Item], list[Item]] | None:
    """The verified draws of a cache file, or None when it was drawn from another split (draw again).

    Raises :class:`SplitError` when the file was changed after it was written (its checksum does not match its
    content, or it names other shots or another seed).
    """
    fix = f"Delete {path}: the next run draws it again from the split with seed {seed} (the original draws)."
    try:
        data = json.loads(path.read_text())
        draws = [tuple(item) for item in data["train"]], [tuple(item) for item in data["val"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SplitError(f"Few-shot file {path} is not readable ({err}). {fix}") from err
    if data.get("source") != _fingerprint(splits):
        logger.warning("%s was drawn from a different split; drawing it again.", path)
        return None
    if "checksum" not in data:  # written before few-shot files had a checksum: check it against a fresh draw
        if [data["train"], data["val"]] != json.loads(json.dumps(_draw(splits, num_shots, seed))):
            raise SplitError(f"Few-shot file {path} differs from the draws of seed {seed}: it was edited. {fix}")
        return draws  # type: ignore[return-value]
    if data.get("checksum") != _checksum(data) or (data.get("num_shots"), data.get("seed")) != (num_shots, seed):
        raise SplitError(f"Few-shot file {path} was changed after it was drawn (its checksum does not match). {fix}")
    return draws  # type: ignore[return-value]


def few_shot(splits: Splits, num_shots: int, seed: int, cache_dir: str | Path) -> Splits:
    """K training and min(K, 4) validation items per class, drawn with ``random.Random(seed)``.

    Same draws as CoOp (``random.seed(seed)`` then ``random.sample`` per label, train then val), cached as
    ``<cache_dir>/shot_{K}-seed_{S}.json`` (or its user-cache stand-in when ``cache_dir`` is read-only, see
    :mod:`datasets.storage`) and shared by the all/base/new runs. The file carries a checksum of its content;
    a file changed by hand is refused. ``test`` is returned unchanged. ``num_shots <= 0`` returns the full splits.
    """
    if num_shots <= 0:
        return {key: list(splits[key]) for key in SPLIT_NAMES}
    cache = Path(cache_dir) / f"shot_{num_shots}-seed_{seed}.json"
    found = storage.existing(cache)
    draws = _read_cache(found, splits, num_shots, seed) if found is not None else None
    if draws is not None:
        logger.info("Loading few-shot split from %s", found)
        train, val = draws
    else:
        train, val = _draw(splits, num_shots, seed)
        record = {"num_shots": num_shots, "seed": seed, "source": _fingerprint(splits), "train": train, "val": val}
        record = json.loads(json.dumps(record))  # the checksum covers the JSON form (tuples become lists)
        record["checksum"] = _checksum(record)
        where = storage.write_json(cache, record, "few-shot split")
        logger.info("Saved few-shot split (%d shots, seed %d) to %s", num_shots, seed, where)
    return {"train": train, "val": val, "test": list(splits["test"])}


# ---------------------------------------------------------------------------------------- base/new
def subsample_labels(labels: Iterable[int], subsample: str) -> list[int]:
    """The sorted ``labels`` that ``DATASET.SUBSAMPLE_CLASSES`` keeps: all, the base half (first ceil(n/2)) or
    the new half."""
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"DATASET.SUBSAMPLE_CLASSES is {subsample!r}; use 'all', 'base' or 'new'.")
    labels = sorted(labels)
    half = math.ceil(len(labels) / 2)
    return labels if subsample == "all" else labels[:half] if subsample == "base" else labels[half:]


def subsample_classes(*split_lists: Sequence[Item], subsample: str = "all") -> tuple[list[Item], ...]:
    """Keep all classes, the base half (first ceil(n/2) sorted labels) or the new half, relabelled from 0."""
    selected = subsample_labels({label for items in split_lists for _, label, _ in items}, subsample)
    if subsample == "all":
        return tuple(list(items) for items in split_lists)
    relabel = {old: new for new, old in enumerate(selected)}
    return tuple(
        [(rel, relabel[label], cls) for rel, label, cls in items if label in relabel] for items in split_lists
    )


# ------------------------------------------------------------------------------------------ protocols
def protocol_relpaths(spec: DatasetSpec, shots: int = 16, seeds: Iterable[int] = (1, 2, 3)) -> list[str]:
    """Every image a protocol run on this dataset reads: few-shot train and val of each seed, and test.

    Deduplicated, in a stable order (seed by seed: train, val; then test).
    """
    splits = load_splits(spec)
    paths: list[str] = []
    for seed in seeds:
        sampled = few_shot(splits, shots, seed, spec.fewshot_dir)
        paths.extend(rel for rel, _, _ in sampled["train"])
        paths.extend(rel for rel, _, _ in sampled["val"])
    paths.extend(rel for rel, _, _ in splits["test"])
    return list(dict.fromkeys(paths))
