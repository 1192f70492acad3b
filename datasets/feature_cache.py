"""The feature cache: what a frozen, unprompted image encoder outputs at evaluation, computed once and read by
every later run, seed and trainer (docs/design.md section 7.1). Pure: no Dassl import.

Per dataset, in ``<dataset_dir>/features/`` (or its user-cache stand-in when the data root is read-only,
:mod:`datasets.storage`)::

    features/<setting>/setting.json                        what the setting is (for people; written once)
    features/<setting>/<batch>.<output>.safetensors       one output of the image encoder for one batch

``<setting>`` is a hash of everything the outputs depend on besides the images (:class:`Setting`): the image
encoder's fingerprint (structure, weights and the code that runs them), the exact description of the evaluation
transform, the precision, the device model and torch's version. ``<batch>`` is a hash of the setting and the
batch's images in order, each named by its path relative to ``images/`` and the SHA-256 of its file.
``<output>`` is one of :data:`models.encoders.VISUAL_OUTPUTS` (``features``, ``tokens``, ``layer_means``).

An entry is one evaluation batch, not one image: a matrix product's rows are not guaranteed to come out
bit-identical when the batch around them changes (on this project's CPU the projected features of 8 images
differ in the last bits from those of the same images in batches of 3 and 5), so an entry holds what the
encoder gave for exactly the batch that an evaluation loads (same images, same order, same batch size), and an
evaluation from the cache is bit-equal to one without it by construction.

Each file holds the output tensor (in the dtype it was computed in) and metadata: format and version, the full
setting, the output name, the images (paths and digests) and the SHA-256 of the tensor's bytes. A file that
cannot be read, or whose metadata or digest is not what the reader asks for (damaged, or another backbone,
transform, precision or batch), is reported and recomputed, never used. Files are written atomically
(:mod:`common.io`): a reader never sees half a file, and two processes writing the same entry at once each
replace it with a complete file holding the same bits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common.io import atomic_path, file_digest, write_json_atomic
from datasets import storage
from datasets.captions import to_relpath

logger = logging.getLogger(__name__)

FOLDER = "features"
FORMAT = "bimors-feature-cache"
VERSION = 1
SETTING_FILE = "setting.json"
SUFFIX = ".safetensors"
TENSOR_KEY = "output"


@dataclass(frozen=True)
class Setting:
    """Everything an entry's values depend on besides its images."""

    backbone: str  # the backbone's name (for people: ``encoder`` identifies the weights)
    encoder: str  # :meth:`models.encoders.VisualEncoder.fingerprint`
    transform: str  # :func:`describe_transform` of the evaluation transform
    precision: str  # the run's effective precision (fp32, fp16, amp, bf16)
    device: str  # :func:`device_name`
    torch: str  # torch's version (its kernels)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    @property
    def key(self) -> str:
        """The folder name of this setting: 16 hex digits of the SHA-256 of its fields."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


def describe_transform(transform: object) -> str:
    """The exact description of an evaluation transform: its ``repr`` (every step with its parameters) and the
    versions of the libraries that decode and resample the images."""
    import PIL
    import torchvision

    return f"{transform!r}; torchvision {torchvision.__version__}; Pillow {PIL.__version__}"


def device_name(device: torch.device) -> str:
    """The device model the kernels run on: the GPU's name, or the CPU architecture and its vector unit."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"{device.type} {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (any dtype)."""
    data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def cache_roots(dataset_dir: Path) -> list[Path]:
    """Where a dataset's feature cache may be: ``<dataset_dir>/features``, then its user-cache stand-in (written
    when the data root is read-only)."""
    primary = Path(dataset_dir) / FOLDER
    return [primary, storage.fallback_for(primary)]


@dataclass(frozen=True)
class BatchKey:
    """A batch's images in order, as (path relative to ``images/``, SHA-256 of the file), and its entry name."""

    images: tuple[tuple[str, str], ...]
    name: str


@dataclass
class CacheStats:
    """What a :class:`FeatureCache` did: batches read and computed, bytes written, entries rejected."""

    read: int = 0
    computed: int = 0
    written_bytes: int = 0
    rejected: int = 0


@dataclass
class FeatureCache:
    """A dataset's cached image-encoder outputs ``outputs`` under one :class:`Setting` (module docstring)."""

    dataset_dir: Path
    image_dir: Path
    setting: Setting
    outputs: tuple[str, ...]
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self.dataset_dir, self.image_dir = Path(self.dataset_dir), Path(self.image_dir)
        self.folders = [root / self.setting.key for root in cache_roots(self.dataset_dir)]
        self._write_folder: Path | None = None
        self._writes_failed = False
        self.used: Path | None = None  # the folder this cache last read from or wrote to

    # -- keys ------------------------------------------------------------------------------------------
    def batch_key(self, impaths: Sequence[str]) -> BatchKey | None:
        """The key of a batch of image files; None when one of them cannot be read (the evaluation then loads
        the batch as usual and reports the file)."""
        try:
            images = tuple((to_relpath(p, self.image_dir), file_digest(p)) for p in impaths)
        except (OSError, ValueError) as exc:
            logger.debug("no feature-cache key for a batch: %s", exc)
            return None
        text = json.dumps([self.setting.key, images])
        return BatchKey(images, hashlib.sha256(text.encode()).hexdigest()[:32])

    def _names(self, key: BatchKey) -> dict[str, str]:
        return {output: f"{key.name}.{output}{SUFFIX}" for output in self.outputs}

    def has(self, key: BatchKey) -> bool:
        """True when a file of every output of ``key`` exists (not yet checked: :meth:`read` checks)."""
        return all(any((f / name).is_file() for f in self.folders) for name in self._names(key).values())

    # -- reading ---------------------------------------------------------------------------------------
    def read(self, key: BatchKey) -> dict[str, torch.Tensor] | None:
        """Every output of ``key`` (CPU tensors), or None when one is missing, damaged or foreign (reported)."""
        found = {}
        for output, name in self._names(key).items():
            tensor = None
            for path in (folder / name for folder in self.folders):
                if path.is_file():
                    tensor = self._read_file(path, key, output)
                    if tensor is not None:
                        self.used = path.parent
                        break
            if tensor is None:
                return None
            found[output] = tensor
        self.stats.read += 1
        return found

    def _read_file(self, path: Path, key: BatchKey, output: str) -> torch.Tensor | None:
        """The tensor of one entry file, or None (with a warning naming the reason) when it cannot be used."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                # a fresh (64-byte aligned) copy: the file's data is only 8-byte aligned, and a matrix product's
                # last bits may depend on the alignment of its operands
                tensor = fh.get_tensor(TENSOR_KEY).clone()
        except Exception as exc:  # safetensors raises its own error types for damaged files
            return self._reject(path, f"cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
        problem = self._mismatch(meta, key, output, tensor)
        return self._reject(path, problem) if problem else tensor

    def _mismatch(self, meta: Mapping[str, str], key: BatchKey, output: str, tensor: torch.Tensor) -> str:
        """Why an entry's metadata or bytes are not those asked for ('' when they are)."""
        if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
            return f"is not a version-{VERSION} feature-cache entry (format {meta.get('format')!r})"
        try:
            setting = json.loads(meta.get("setting", "null"))
            images = [tuple(item) for item in json.loads(meta.get("images", "[]"))]
        except (ValueError, TypeError):
            return "has unreadable metadata"
        if setting != self.setting.as_dict():
            differs = sorted(k for k in self.setting.as_dict() if not isinstance(setting, dict) or setting.get(k) !=
                             self.setting.as_dict()[k])  # fmt: skip
            return f"was made with another {', '.join(differs) or 'setting'}"
        if meta.get("output") != output:
            return f"holds the output {meta.get('output')!r}, not {output!r}"
        if images != list(key.images):
            return "was made for other images"
        if tensor.shape[:1] != (len(key.images),):
            return f"holds {tuple(tensor.shape)} for {len(key.images)} images"
        if tensor_digest(tensor) != meta.get("sha256"):
            return "is damaged (its bytes do not match their checksum)"
        return ""

    def _reject(self, path: Path, reason: str) -> None:
        self.stats.rejected += 1
        logger.warning("Feature-cache entry %s %s: not used; it is recomputed", path, reason)
        return None

    # -- writing ---------------------------------------------------------------------------------------
    def write(self, key: BatchKey, outputs: Mapping[str, torch.Tensor]) -> None:
        """Store ``outputs`` (every output of the cache) of the batch ``key``, atomically. A failed write (a full
        disk, no writable folder) is reported once and the run goes on without storing."""
        from safetensors.torch import save_file

        self.stats.computed += 1
        if self._writes_failed:
            return
        try:
            folder = self._folder_for_writing()
            for output, name in self._names(key).items():
                tensor = outputs[output].detach().cpu().contiguous()
                metadata = {"format": FORMAT, "version": str(VERSION), "output": output,
                            "setting": json.dumps(self.setting.as_dict(), sort_keys=True),
                            "images": json.dumps([list(item) for item in key.images]),
                            "sha256": tensor_digest(tensor)}  # fmt: skip
                with atomic_path(folder / name) as tmp:
                    save_file({TENSOR_KEY: tensor}, str(tmp), metadata=metadata)
                    size = tmp.stat().st_size
                self.stats.written_bytes += size
            self.used = folder
        except OSError as exc:
            self._writes_failed = True
            logger.warning("Cannot store image features in %s (%s): this run goes on without storing them",
                           self._write_folder or self.folders[0], exc)  # fmt: skip

    def _folder_for_writing(self) -> Path:
        if self._write_folder is None:
            folder = storage.writable_folder(self.folders[0].parent, "cached image features") / self.setting.key
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / SETTING_FILE).is_file():
                write_json_atomic(folder / SETTING_FILE, self.setting.as_dict(), indent=2)
            self._write_folder = folder
        return self._write_folder

    def summary(self) -> str:
        """One line: batches read and computed, what was written, where."""
        s = self.stats
        where = self.used or self.folders[0]
        rejected = f", {s.rejected} unusable entries replaced" if s.rejected else ""
        return (f"feature cache {where}: {s.read} batches read, {s.computed} computed "
                f"({s.written_bytes / 2**20:.1f} MB stored){rejected}")  # fmt: skip


# ------------------------------------------------------------------------------------------- disk use
@dataclass
class FolderUse:
    """Disk use of one setting folder: bytes and files per output, and the setting it holds."""

    path: Path
    setting: dict
    bytes: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)


def disk_use(dataset_dirs: Iterable[Path]) -> list[FolderUse]:
    """The setting folders of the feature caches of ``dataset_dirs`` (and their user-cache stand-ins)."""
    found = []
    for dataset_dir in dataset_dirs:
        for root in cache_roots(dataset_dir):
            if not root.is_dir():
                continue
            for folder in sorted(p for p in root.iterdir() if p.is_dir()):
                try:
                    setting = json.loads((folder / SETTING_FILE).read_text())
                except (OSError, ValueError):
                    setting = {}
                use = FolderUse(folder, setting)
                for entry in os.scandir(folder):
                    if entry.name.endswith(SUFFIX) and entry.is_file():
                        output = entry.name[: -len(SUFFIX)].rpartition(".")[2]
                        use.bytes[output] = use.bytes.get(output, 0) + entry.stat().st_size
                        use.files[output] = use.files.get(output, 0) + 1
                found.append(use)
    return found
