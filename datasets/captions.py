"""The BiMoRS caption store (docs/design.md section 4.4). Pure: no Dassl import.

Per dataset, under ``<dataset_dir>/captions/``:

- ``<captioner-slug>.jsonl``: the caption log. Its first line is a header ``{"meta": {"settings": ...,
  "info": ...}}``; every further line is ``{"path": relpath, "caption": text}`` or, for an image that
  could not be read, ``{"path": relpath, "error": message}``. Lines are appended as captions are
  produced; a torn last line (a kill while writing) is ignored and cut off on the next append.
- ``<captioner-slug>__<encoder-slug>.safetensors``: the caption vectors, one float32 row per image
  (rows sorted by relpath), with the ordered relpaths and the settings in the file's metadata. It is
  written atomically (:func:`common.io.atomic_open`).

When the data root is read-only, the store lives in the user cache instead (:func:`store_folders`,
:mod:`datasets.storage`); readers look in ``<dataset_dir>/captions/`` first.

Keys are paths relative to ``<dataset_dir>/images/`` in POSIX form. ``settings`` (model ids, generation
and preprocessing settings, encoding) must match exactly for a store to be extended or used: a store
made with other settings is refused, never mixed in. ``info`` (library versions) is informational.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import ExpectedError
from common.io import atomic_open
from datasets import storage

logger = logging.getLogger(__name__)

DEFAULT_CAPTIONER = "Salesforce/blip2-flan-t5-xl"
DEFAULT_ENCODER = "bert-base-uncased"
TOY_CAPTIONER = "toy-blip2"
TOY_ENCODER = "toy-bert"

CAPTIONS_DIRNAME = "captions"
STORE_FORMAT = "bimors-caption-store"
STORE_VERSION = 1
FEATURES_KEY = "features"
N_SHOWN = 5  # how many paths an error message lists


class CaptionStoreError(ExpectedError, ValueError):
    """A caption store cannot be used as it is (damaged file, wrong settings, missing rows)."""


class MissingCaptionsError(CaptionStoreError):
    """Caption vectors are missing for some images (or the whole store is missing)."""


class CaptionStoreMismatchError(CaptionStoreError):
    """A store was made with other settings than the ones asked for."""


class CaptionModelNotFoundError(ExpectedError, ValueError):
    """A captioner or caption encoder could not be found locally, in the cache or on the hub."""


def model_slug(name: str) -> str:
    """Filesystem-safe, stable name of a model: ``org/name`` -> ``org--name``; a local folder -> its name.

    A name is a local folder when it is an existing directory or is written as a path (``/``, ``./``,
    ``../`` or ``~`` first); see ``is_local_model``.
    """
    name = str(name).strip()
    if not name:
        raise ValueError("empty model name: pass a Hugging Face id (org/name) or a local folder")
    if is_local_model(name):
        slug = Path(name).expanduser().resolve().name
    else:
        slug = name.strip("/").replace("/", "--")
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", slug).strip("._")
    if not slug:
        raise ValueError(f"cannot derive a file name from model name {name!r}: pass a hub id or a folder")
    return slug


def is_local_model(name: str) -> bool:
    """True when ``name`` is a local folder (an existing directory, or written as a path)."""
    return Path(name).expanduser().is_dir() or str(name).startswith(("/", "./", "../", "~"))


def canonical_model_name(name: str) -> str:
    """The model name recorded in a store: a local folder as an absolute path, anything else as given."""
    name = str(name).strip()
    return str(Path(name).expanduser().resolve()) if is_local_model(name) else name


def captions_dir(dataset_dir: Path) -> Path:
    """The folder of a dataset's caption stores."""
    return Path(dataset_dir) / CAPTIONS_DIRNAME


def store_folders(dataset_dir: Path) -> list[Path]:
    """Where a dataset's caption stores may be: ``<dataset_dir>/captions``, then its user-cache stand-in (used
    when the data root is read-only)."""
    primary = captions_dir(dataset_dir)
    return [primary, storage.fallback_for(primary)]


def find_store_folder(dataset_dir: Path, captioner: str, encoder: str) -> Path:
    """The first of :func:`store_folders` that holds this captioner/encoder's vectors (else the first)."""
    folders = store_folders(dataset_dir)
    return next((f for f in folders if store_paths(dataset_dir, captioner, encoder, f)[1].exists()), folders[0])


def store_paths(dataset_dir: Path, captioner: str, encoder: str, folder: Path | None = None) -> tuple[Path, Path]:
    """(caption log ``captions/<captioner>.jsonl``, vectors ``captions/<captioner>__<encoder>.safetensors``),
    in ``folder`` when given (one of :func:`store_folders`)."""
    folder = Path(folder) if folder is not None else captions_dir(dataset_dir)
    cap = model_slug(captioner)
    return folder / f"{cap}.jsonl", folder / f"{cap}__{model_slug(encoder)}.safetensors"


def shard_log_path(log_path: Path, index: int, count: int) -> Path:
    """Caption log written by shard ``index`` (0-based) of ``count``; merged into ``log_path`` later."""
    return log_path.with_name(f"{log_path.stem}.shard-{index}-of-{count}.jsonl")


def shard_log_paths(log_path: Path) -> list[Path]:
    """The shard logs of ``log_path`` present on disk, in a stable order."""
    return sorted(log_path.parent.glob(f"{_glob_escape(log_path.stem)}.shard-*-of-*.jsonl"))


def _glob_escape(text: str) -> str:
    """Escape glob metacharacters in a literal file-name part."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def captions_command(
    dataset: str,
    root: Path | str,
    captioner: str = DEFAULT_CAPTIONER,
    encoder: str = DEFAULT_ENCODER,
    subset: str = "all",
) -> str:
    """The exact ``python -m tools.captions`` command that computes a dataset's missing captions."""
    parts = ["python", "-m", "tools.captions", dataset, "--root", str(root)]
    if captioner != DEFAULT_CAPTIONER:
        parts += ["--captioner", captioner]
    if encoder != DEFAULT_ENCODER:
        parts += ["--encoder", encoder]
    parts += ["--subset", subset]
    return shlex.join(parts)


def to_relpath(path: Path | str, image_dir: Path | str) -> str:
    """Store key of an image: its path relative to ``image_dir``, POSIX form (no string surgery)."""
    path, image_dir = Path(path), Path(image_dir)
    try:
        return path.relative_to(image_dir).as_posix()
    except ValueError:
        try:
            return path.resolve().relative_to(image_dir.resolve()).as_posix()
        except ValueError:
            raise ValueError(f"image {path} is not under the image folder {image_dir}") from None


def settings_mismatch(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two settings dicts (empty when they match)."""
    diffs = []
    for key in sorted(set(found) | set(wanted)):
        if found.get(key) != wanted.get(key):
            diffs.append(f"{key}: store has {found.get(key)!r}, asked for {wanted.get(key)!r}")
    return diffs


def check_settings(path: Path, found: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    """Raise ``CaptionStoreMismatchError`` when a store's settings differ from the ones asked for."""
    diffs = settings_mismatch(found, wanted)
    if diffs:
        raise CaptionStoreMismatchError(
            f"caption store {path} was made with other settings; refusing to mix them:\n  "
            + "\n  ".join(diffs)
            + f"\nUse the settings it was made with, or move {path} away to start a new store."
        )


# ----------------------------------------------------------------------------------------- caption log
@dataclass
class CaptionLog:
    """Contents of a caption log: settings, captions and failures by relpath."""

    path: Path
    settings: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    valid_bytes: int = 0  # length of the complete (newline-terminated) part of the file

    def add(self, record: Mapping[str, Any]) -> None:
        """Apply one record: the first caption of a path wins; a caption clears an earlier failure."""
        path = record["path"]
        if "caption" in record:
            self.captions.setdefault(path, str(record["caption"]))
            self.failures.pop(path, None)
        elif path not in self.captions:
            self.failures[path] = str(record.get("error", "unknown error"))


def read_caption_log(path: Path) -> CaptionLog:
    """Read a caption log; a missing file gives an empty log, a torn last line is ignored."""
    path = Path(path)
    log = CaptionLog(path=path)
    if not path.exists():
        return log
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
    if end < len(data):
        logger.warning("%s: ignoring a torn last line (%d bytes) left by an interrupted run", path, len(data) - end)
    log.valid_bytes = end
    for lineno, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CaptionStoreError(
                f"{path}, line {lineno}: not valid JSON ({exc}); the file is damaged. "
                f"Move it away to recompute its captions."
            ) from None
        if "meta" in record:
            if lineno != 1:
                raise CaptionStoreError(f"{path}, line {lineno}: a header may only be the first line")
            meta = record["meta"]
            log.settings, log.info = dict(meta.get("settings", {})), dict(meta.get("info", {}))
        elif "path" in record:
            if log.settings is None:
                raise CaptionStoreError(f"{path}: records before the header line; move the file away")
            log.add(record)
        else:
            raise CaptionStoreError(f"{path}, line {lineno}: neither a header nor a caption record")
    return log


class CaptionLogWriter:
    """Append-only writer of a caption log: checks the header's settings, cuts a torn tail, fsyncs.

    Nothing is written (not even the header) until the first record arrives.
    """

    def __init__(self, path: Path, settings: Mapping[str, Any], info: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.log = read_caption_log(self.path)
        self._header: dict[str, Any] | None = None
        if self.log.settings is not None:
            check_settings(self.path, self.log.settings, settings)
        else:
            self.log.settings, self.log.info = dict(settings), dict(info or {})
            self._header = {"meta": {"format": STORE_FORMAT, "version": STORE_VERSION,
                                     "settings": self.log.settings, "info": self.log.info}}
        self._file: Any = None

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append records (``{"path", "caption"}`` or ``{"path", "error"}``) durably."""
        if not records:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # appends always go to the end, after the cut below
            self._file.truncate(self.log.valid_bytes)
        lines = ([self._header] if self._header else []) + list(records)
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._header = None
        for record in records:
            self.log.add(record)

    def close(self) -> None:
        """Close the file (if anything was written)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> CaptionLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------- caption vectors
@dataclass
class CaptionFeatures:
    """Caption vectors of one dataset, in memory: row ``i`` of ``features`` belongs to ``relpaths[i]``."""

    features: torch.Tensor
    relpaths: list[str]
    metadata: dict[str, Any]
    path: Path | None = None
    command: str = ""  # the tools.captions command that fills this store
    failures: dict[str, str] = field(default_factory=dict)  # relpath -> why it could not be captioned

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.features.shape[0] != len(self.relpaths):
            raise CaptionStoreError(
                f"caption store {self.path}: {tuple(self.features.shape)} features for {len(self.relpaths)} "
                f"paths; expected N x D with N = number of paths. Recompute it."
            )
        self._rows = {p: i for i, p in enumerate(self.relpaths)}

    @property
    def dim(self) -> int:
        """Caption vector size D (768 for bert-base-uncased)."""
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return len(self.relpaths)

    def __contains__(self, relpath: object) -> bool:
        return relpath in self._rows

    def index(self, relpaths: Sequence[str]) -> torch.LongTensor:
        """Row indices of ``relpaths``; ``MissingCaptionsError`` if any has no caption vector."""
        rows = [self._rows.get(p, -1) for p in relpaths]
        missing = [p for p, r in zip(relpaths, rows) if r < 0]
        if missing:
            raise self.missing_error(missing, total=len(relpaths))
        return torch.tensor(rows, dtype=torch.long)

    def missing_error(self, missing: Sequence[str], total: int | None = None) -> MissingCaptionsError:
        """The error for images without caption vectors: count, first paths, failures, command."""
        unique = list(dict.fromkeys(missing))
        of = f" of {total}" if total is not None else ""
        msg = (f"{len(unique)}{of} images have no caption vector in {self.path} "
               f"(first: {', '.join(unique[:N_SHOWN])}).")
        failed = [p for p in unique if p in self.failures]
        if failed:
            msg += (f" {len(failed)} of them could not be read when captioned "
                    f"(first: {failed[0]}: {self.failures[failed[0]]}); fix or replace those images.")
        return MissingCaptionsError(f"{msg} Compute the missing captions with:\n  {self.command}")


def write_caption_features(
    path: Path,
    features: torch.Tensor,
    relpaths: Sequence[str],
    settings: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
) -> None:
    """Write caption vectors atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save

    if features.ndim != 2 or features.shape[0] != len(relpaths):
        raise ValueError(f"features {tuple(features.shape)} do not match {len(relpaths)} relpaths")
    metadata = {
        "format": STORE_FORMAT,
        "version": str(STORE_VERSION),
        "settings": json.dumps(dict(settings), sort_keys=True),
        "info": json.dumps(dict(info or {}), sort_keys=True),
        "relpaths": json.dumps(list(relpaths)),
    }
    data = save({FEATURES_KEY: features.detach().to("cpu", torch.float32).contiguous()}, metadata)
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def read_caption_features(path: Path) -> CaptionFeatures:
    """Read a caption-vector file (no settings check; see ``load_caption_features``)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != STORE_FORMAT:
                raise CaptionStoreError(f"{path} is not a BiMoRS caption store (format {meta.get('format')!r})")
            if int(meta.get("version", -1)) != STORE_VERSION:
                raise CaptionStoreError(
                    f"{path} has store version {meta.get('version')}, this code reads version {STORE_VERSION}; "
                    f"move it away and recompute it"
                )
            features = fh.get_tensor(FEATURES_KEY).float()
    except CaptionStoreError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CaptionStoreError(f"cannot read caption store {path}: {exc}. Move it away and recompute it.") from exc
    settings = json.loads(meta["settings"])
    metadata = {**settings, "info": json.loads(meta.get("info", "{}"))}
    return CaptionFeatures(features=features, relpaths=json.loads(meta["relpaths"]), metadata=metadata, path=path)


def feature_settings(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The checked settings part of a ``CaptionFeatures.metadata`` dict."""
    return {k: v for k, v in metadata.items() if k != "info"}


def load_caption_features(
    dataset_dir: Path,
    captioner: str = DEFAULT_CAPTIONER,
    encoder: str = DEFAULT_ENCODER,
    *,
    dataset: str | None = None,
) -> CaptionFeatures:
    """Load a dataset's caption vectors into memory.

    ``dataset`` is the name given to ``tools.captions`` in error messages (default: the folder name).
    Raises ``MissingCaptionsError`` (with the command to run) when the store does not exist, and
    ``CaptionStoreMismatchError`` when it was made with another captioner or encoder.
    """
    dataset_dir = Path(dataset_dir)
    log_path, path = store_paths(dataset_dir, captioner, encoder, find_store_folder(dataset_dir, captioner, encoder))
    command = captions_command(dataset or dataset_dir.name, dataset_dir.parent, captioner, encoder)
    if not path.exists():
        raise MissingCaptionsError(
            f"no caption vectors for {dataset_dir.name} with captioner {captioner!r} and encoder {encoder!r} "
            f"(expected {path}). Compute them with:\n  {command}"
        )
    store = read_caption_features(path)
    for key, wanted in (("captioner", canonical_model_name(captioner)), ("encoder", canonical_model_name(encoder))):
        found = store.metadata.get(key)
        if found != wanted:
            if found is not None and model_slug(found) == model_slug(wanted):
                logger.warning("%s was made with %s %r; using it for %r (same model name)", path, key, found, wanted)
            else:
                raise CaptionStoreMismatchError(
                    f"{path} was made with {key} {found!r}, not {wanted!r}; move it away and recompute it "
                    f"with:\n  {command}"
                )
    store.command = command
    log = read_caption_log(log_path)
    store.failures = {p: e for p, e in log.failures.items() if p not in store}
    logger.info("loaded %d caption vectors of size %d from %s", len(store), store.dim, path)
    return store
