"""Caption a dataset's images with BLIP-2 and encode the captions into the BiMoRS caption store.

    python -m tools.captions DATASET --root DATA [--captioner Salesforce/blip2-flan-t5-xl]
        [--encoder bert-base-uncased] [--subset protocol|all] [--batch-size N] [--device cuda]
        [--shard i/n] [--show N]

Captioning follows docs/design.md section 4.1: each image is resized to 224x224, min-max normalised to
[0, 1] and given to the BLIP-2 processor with rescaling off; ``generate(max_length=16, num_beams=4,
early_stopping=True)``; each caption is encoded as the mean of the encoder's last hidden state over its
non-padding tokens ([CLS] and [SEP] included). The store is described in ``datasets/captions.py``.

Re-running after a kill loses nothing and redoes nothing: captions are appended (and fsynced) batch by
batch, and only images without a caption are captioned. ``--shard i/n`` (0 <= i < n) captions one
n-th of the images into its own log; the same command without ``--shard`` then merges the shard logs
and encodes. Unreadable images are recorded, reported and retried on the next run; they never stop it.

On a read-only data root the store goes to the user cache (``$BIMORS_CACHE``, see ``datasets/storage.py``),
where train.py looks for it too; a complete store already in the read-only data root is used as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from datasets import storage
from datasets.captions import (
    DEFAULT_CAPTIONER,
    DEFAULT_ENCODER,
    N_SHOWN,
    TOY_CAPTIONER,
    TOY_ENCODER,
    CaptionFeatures,
    CaptionLog,
    CaptionLogWriter,
    CaptionModelNotFoundError,
    CaptionStoreError,
    canonical_model_name,
    captions_command,
    check_settings,
    feature_settings,
    find_store_folder,
    is_local_model,
    read_caption_features,
    read_caption_log,
    shard_log_path,
    shard_log_paths,
    store_paths,
    write_caption_features,
)
from datasets.catalog import DatasetError, resolve_dataset
from datasets.splits import load_splits, protocol_relpaths

logger = logging.getLogger(__name__)

GENERATION_KWARGS: dict[str, Any] = {"max_length": 16, "num_beams": 4, "early_stopping": True}
IMAGE_SIZE = 224
PREPROCESSING: dict[str, Any] = {
    "resize": [IMAGE_SIZE, IMAGE_SIZE],
    "interpolation": "bilinear",
    "minmax_normalise": True,
    "processor_rescale": False,
}
ENCODING = "mean of last_hidden_state over non-padding tokens ([CLS] and [SEP] included), float32"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOY_MODELS = (TOY_CAPTIONER, TOY_ENCODER)


# ------------------------------------------------------------------------------------------- settings
def caption_settings(captioner: str, dtype: str = "float32") -> dict[str, Any]:
    """Settings that determine the captions (checked before a caption log is extended)."""
    return {
        "captioner": canonical_model_name(captioner),
        "generation": dict(GENERATION_KWARGS),
        "preprocessing": dict(PREPROCESSING),
        "dtype": dtype,
    }


def vector_settings(captions: dict[str, Any], encoder: str) -> dict[str, Any]:
    """Settings that determine the caption vectors: the caption settings plus the encoder and encoding."""
    return {**captions, "encoder": canonical_model_name(encoder), "encoding": ENCODING}


def library_info() -> dict[str, str]:
    """Versions recorded (not checked) in a store."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


# ------------------------------------------------------------------------------------------- models
def resolve_model(name: str, role: str) -> str:
    """What to pass to ``from_pretrained`` for ``name``: a toy model's built folder, a local folder or a hub id."""
    if name in TOY_MODELS:
        from tools.toy_captioner import toy_model_dir

        logger.warning(
            "!!! %s %r is a tiny RANDOM toy model: its output is junk, useful only for tests and the smoke run !!!",
            role, name,
        )
        return str(toy_model_dir(name))
    if is_local_model(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise CaptionModelNotFoundError(f"{role} folder {folder} does not exist; pass an existing model folder")
        return str(folder)
    return name


def _not_found(name: str, role: str, flag: str, err: Exception) -> CaptionModelNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    hub = "the local Hugging Face cache only (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub and cache"
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CaptionModelNotFoundError(
        f"cannot load {role} {name!r}. Tried:\n"
        f"  - the built-in toy models {', '.join(TOY_MODELS)}: not one of them\n"
        f"  - a local folder {name!r}: no such directory\n"
        f"  - {hub} for the id {name!r}: {first_line}\n"
        f"Fix: pass a folder that holds the model ({flag} /path/to/model), run once with network access to "
        f"fill the cache, or use {flag} {TOY_MODELS[0 if role == 'captioner' else 1]} for an offline smoke run."
    )


def _from_pretrained(loader: Any, name: str, source: str, role: str, flag: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as err:
        if source == name and not is_local_model(name):
            raise _not_found(name, role, flag, err) from err
        raise


@dataclass
class Captioner:
    """A BLIP-2 model and its processor, ready to caption batches of preprocessed images."""

    processor: Any
    model: Any
    device: torch.device
    dtype: torch.dtype

    @torch.no_grad()
    def caption(self, images: Sequence[torch.Tensor]) -> list[str]:
        """Captions of ``images`` (each 3 x H x W, float in [0, 1], see ``load_image``)."""
        inputs = self.processor(images=list(images), return_tensors="pt", do_rescale=False)
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        output = self.model.generate(pixel_values=pixel_values, **GENERATION_KWARGS)
        return [text.strip() for text in self.processor.batch_decode(output, skip_special_tokens=True)]


def load_captioner(name: str, device: str | torch.device = "cpu", dtype: str = "float32") -> Captioner:
    """Load a BLIP-2 captioner from a hub id, a local folder or a toy name."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    source = resolve_model(name, "captioner")
    processor = _from_pretrained(Blip2Processor, name, source, "captioner", "--captioner")
    model = _from_pretrained(Blip2ForConditionalGeneration, name, source, "captioner", "--captioner",
                             dtype=DTYPES[dtype])
    device = torch.device(device)
    logger.info("captioner %s loaded on %s (%s)", name, device, dtype)
    return Captioner(processor=processor, model=model.to(device).eval(), device=device, dtype=DTYPES[dtype])


@dataclass
class CaptionEncoder:
    """A text encoder and its tokenizer; a caption's vector is its masked mean last hidden state."""

    tokenizer: Any
    model: Any
    device: torch.device

    @property
    def dim(self) -> int:
        """Vector size (the encoder's hidden size)."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """len(captions) x D float32 vectors; padding never changes a caption's vector."""
        batch = self.tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu()


def load_encoder(name: str, device: str | torch.device = "cpu") -> CaptionEncoder:
    """Load a caption encoder (any Hugging Face text encoder) from a hub id, a local folder or a toy name."""
    from transformers import AutoModel, AutoTokenizer

    source = resolve_model(name, "encoder")
    tokenizer = _from_pretrained(AutoTokenizer, name, source, "encoder", "--encoder")
    model = _from_pretrained(AutoModel, name, source, "encoder", "--encoder", dtype=torch.float32)
    device = torch.device(device)
    logger.info("caption encoder %s loaded on %s", name, device)
    return CaptionEncoder(tokenizer=tokenizer, model=model.to(device).eval(), device=device)


# ------------------------------------------------------------------------------------------- images
def load_image(path: Path) -> torch.Tensor:
    """An image as the published code prepares it: RGB, 224x224 bilinear, min-max normalised to [0, 1]."""
    with Image.open(path) as img:
        img = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        array = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    low, high = tensor.min(), tensor.max()
    return (tensor - low) / (high - low).clamp_min(1e-12)


class ImageList(torch.utils.data.Dataset):
    """Images by relpath; an unreadable image yields its error message instead of a tensor."""

    def __init__(self, image_dir: Path, relpaths: Sequence[str]):
        self.image_dir, self.relpaths = Path(image_dir), list(relpaths)

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str | None]:
        relpath = self.relpaths[i]
        try:
            return relpath, load_image(self.image_dir / relpath), None
        except Exception as exc:  # any decoding failure is recorded, never fatal
            return relpath, None, f"{type(exc).__name__}: {exc}"


def _as_list(batch: list) -> list:
    return batch


# ------------------------------------------------------------------------------------------- steps
@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed); with ``wait=False`` raise if it is held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            logger.info("waiting for another tools.captions run on the same store (lock %s)", path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def lock_path(log_path: Path) -> Path:
    """The lock file guarding a caption log."""
    return log_path.with_name(f".{log_path.name}.lock")


def caption_images(
    captioner: Captioner,
    image_dir: Path,
    relpaths: Sequence[str],
    writer: CaptionLogWriter,
    batch_size: int = 16,
    workers: int = 0,
) -> None:
    """Caption ``relpaths`` batch by batch, appending each batch's records to ``writer`` durably."""
    loader = torch.utils.data.DataLoader(
        ImageList(image_dir, relpaths), batch_size=batch_size, num_workers=workers, collate_fn=_as_list
    )
    with tqdm(total=len(relpaths), unit="img", desc="captioning", dynamic_ncols=True) as bar:
        for batch in loader:
            readable = [(path, image) for path, image, error in batch if error is None]
            texts = captioner.caption([image for _, image in readable]) if readable else []
            captions = {path: text for (path, _), text in zip(readable, texts)}
            records = [
                {"path": path, "caption": captions[path]} if error is None else {"path": path, "error": error}
                for path, _, error in batch
            ]
            writer.write(records)
            bar.update(len(batch))


def merge_shards(writer: CaptionLogWriter, settings: dict[str, Any]) -> int:
    """Move the records of finished shard logs into ``writer``'s log; return how many were merged.

    A shard that is still running (its lock is held) is an error: wait for it, then run again.
    """
    merged = 0
    for shard in shard_log_paths(writer.path):
        try:
            with file_lock(lock_path(shard), wait=False):
                log = read_caption_log(shard)
                if log.settings is not None:
                    check_settings(shard, log.settings, settings)
                records = [{"path": p, "caption": c} for p, c in log.captions.items() if p not in writer.log.captions]
                records += [{"path": p, "error": e} for p, e in log.failures.items() if p not in writer.log.captions]
                writer.write(records)
                shard.unlink()
            lock_path(shard).unlink(missing_ok=True)
        except BlockingIOError:
            raise CaptionStoreError(
                f"shard log {shard} is still being written by a running `--shard` job; wait for it to "
                f"finish, then run this command again to merge the shards"
            ) from None
        merged += len(records)
        logger.info("merged %d records from %s", len(records), shard.name)
    return merged


def encode_captions(
    log: CaptionLog,
    features_path: Path,
    encoder_name: str,
    settings: dict[str, Any],
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> CaptionFeatures | None:
    """Encode every caption of ``log`` that has no vector yet and rewrite the vector file atomically."""
    existing = read_caption_features(features_path) if features_path.exists() else None
    if existing is not None:
        check_settings(features_path, feature_settings(existing.metadata), settings)
    todo = sorted(p for p in log.captions if existing is None or p not in existing)
    if not todo:
        return existing
    encoder = load_encoder(encoder_name, device)
    chunks = []
    with tqdm(total=len(todo), unit="caption", desc="encoding", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            part = todo[start:start + batch_size]
            chunks.append(encoder.encode([log.captions[p] for p in part]))
            bar.update(len(part))
    rows = dict(zip(todo, torch.cat(chunks)))
    if existing is not None:
        if existing.dim != encoder.dim:
            raise CaptionStoreError(f"{features_path} holds {existing.dim}-d vectors, the encoder gives {encoder.dim}")
        rows.update(zip(existing.relpaths, existing.features))
    relpaths = sorted(rows)
    write_caption_features(features_path, torch.stack([rows[p] for p in relpaths]), relpaths, settings,
                           library_info())
    logger.info("wrote %d caption vectors (%d new, %d-d) to %s", len(relpaths), len(todo), encoder.dim,
                features_path)
    return read_caption_features(features_path)


# ------------------------------------------------------------------------------------------- CLI
def select_relpaths(spec: Any, subset: str, shots: int = 16, seeds: Sequence[int] = (1, 2, 3)) -> list[str]:
    """The images to caption: ``protocol`` (few-shot train of ``seeds`` + val + test) or ``all`` (every split)."""
    if subset == "protocol":
        return protocol_relpaths(spec, shots=shots, seeds=tuple(seeds))
    if subset == "all":
        splits = load_splits(spec)
        return list(dict.fromkeys(rel for key in ("train", "val", "test") for rel, _, _ in splits[key]))
    raise ValueError(f"unknown --subset {subset!r}; use 'protocol' or 'all'")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)`` with 0 <= i < n."""
    if text is None:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: write it as i/n, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= i < n (shards are numbered from 0)")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.captions",
        description="Caption a dataset's images with BLIP-2 and store the encoded captions (BiMoRS).",
    )
    parser.add_argument("dataset", help="dataset: config stem (patternnet, toyrs), yaml path or catalogue name")
    parser.add_argument("--root", required=True, help="data root that holds the dataset folders")
    parser.add_argument("--captioner", default=DEFAULT_CAPTIONER,
                        help=f"BLIP-2 hub id or local folder (default {DEFAULT_CAPTIONER}; {TOY_CAPTIONER} = tiny random)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER,
                        help=f"caption encoder hub id or local folder (default {DEFAULT_ENCODER}; {TOY_ENCODER} = tiny random)")
    parser.add_argument("--subset", choices=("protocol", "all"), default="protocol",
                        help="protocol: few-shot train of --seeds + val + test; all: every image of the split")
    parser.add_argument("--shots", type=int, default=16, help="shots of the protocol subset (default 16)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the protocol subset")
    parser.add_argument("--batch-size", type=int, default=16, help="images per captioning batch (default 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="captioner precision (default float32, as the published code); part of the store settings")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-loading processes")
    parser.add_argument("--shard", type=parse_shard, default=None, metavar="i/n",
                        help="caption only shard i of n (0 <= i < n); rerun without --shard to merge and encode")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print N sample captions and the store's status, compute nothing")
    return parser


def show_samples(relpaths: Sequence[str], log: CaptionLog, n: int) -> list[tuple[str, str]]:
    """Up to ``n`` (relpath, caption) pairs spread evenly over ``relpaths``."""
    done = [p for p in relpaths if p in log.captions]
    if not done or n <= 0:
        return []
    step = max(1, len(done) // n)
    return [(p, log.captions[p]) for p in done[::step][:n]]


def show(args: argparse.Namespace) -> list[str]:
    """Lines for ``--show N``: the store's status for the subset, then N sample captions (path TAB caption)."""
    spec = resolve_dataset(args.dataset, args.root)
    relpaths = select_relpaths(spec, args.subset, args.shots, args.seeds)
    folder = find_store_folder(spec.dataset_dir, args.captioner, args.encoder)
    log_path, features_path = store_paths(spec.dataset_dir, args.captioner, args.encoder, folder)
    log = read_caption_log(log_path)
    vectors = len(read_caption_features(features_path)) if features_path.exists() else 0
    lines = [
        f"{spec.label}: {sum(p in log.captions for p in relpaths)} of {len(relpaths)} images of the "
        f"'{args.subset}' subset captioned, {sum(p in log.failures for p in relpaths)} unreadable, "
        f"{vectors} caption vectors ({log_path.parent})"
    ]
    return lines + [f"{path}\t{caption}" for path, caption in show_samples(relpaths, log, args.show)]


def run(args: argparse.Namespace) -> CaptionFeatures | None:
    """Caption, merge and encode as ``args`` asks; return the caption vectors (None for a shard run)."""
    spec = resolve_dataset(args.dataset, args.root)
    relpaths = select_relpaths(spec, args.subset, args.shots, args.seeds)
    if torch.device(args.device).type == "cpu" and args.captioner in TOY_MODELS:
        torch.set_num_threads(1)  # tiny models: extra threads only contend (several times slower on busy CPUs)
    settings = caption_settings(args.captioner, args.dtype)
    vsettings = vector_settings(settings, args.encoder)
    folder = find_store_folder(spec.dataset_dir, args.captioner, args.encoder)
    if not storage.can_write(folder):
        features_path = store_paths(spec.dataset_dir, args.captioner, args.encoder, folder)[1]
        if features_path.exists():
            store = read_caption_features(features_path)
            check_settings(features_path, feature_settings(store.metadata), vsettings)
            if all(p in store for p in relpaths):
                logger.info("%s (read-only) holds the captions of all %d images: nothing to do", features_path,
                            len(relpaths))
                return store
        folder = storage.writable_folder(folder, "caption stores")
    log_path, features_path = store_paths(spec.dataset_dir, args.captioner, args.encoder, folder)
    command = captions_command(args.dataset, args.root, args.captioner, args.encoder, args.subset)

    if features_path.exists():  # refuse a store made with other settings before any work
        check_settings(features_path, feature_settings(read_caption_features(features_path).metadata), vsettings)

    if args.shard is not None:
        index, count = args.shard
        main_log = read_caption_log(log_path)
        if main_log.settings is not None:
            check_settings(log_path, main_log.settings, settings)
        target = shard_log_path(log_path, index, count)
        mine = sorted(relpaths)[index::count]
        with file_lock(lock_path(target)), CaptionLogWriter(target, settings, library_info()) as writer:
            todo = [p for p in mine if p not in main_log.captions and p not in writer.log.captions]
            logger.info("shard %d/%d: %d images, %d to caption", index, count, len(mine), len(todo))
            if todo:
                captioner = load_captioner(args.captioner, args.device, args.dtype)
                caption_images(captioner, spec.image_dir, todo, writer, args.batch_size, args.workers)
            failures = {p: writer.log.failures[p] for p in mine if p in writer.log.failures}
        report_failures(failures, command)
        logger.info("shard %d/%d done; when all shards are done, run the command without --shard to merge "
                    "and encode:\n  %s", index, count, command)
        return None

    with file_lock(lock_path(log_path)), CaptionLogWriter(log_path, settings, library_info()) as writer:
        merge_shards(writer, settings)
        todo = [p for p in relpaths if p not in writer.log.captions]
        logger.info("%s: %d images in the '%s' subset, %d already captioned, %d to caption",
                    spec.label, len(relpaths), args.subset, len(relpaths) - len(todo), len(todo))
        if todo:
            captioner = load_captioner(args.captioner, args.device, args.dtype)
            caption_images(captioner, spec.image_dir, todo, writer, args.batch_size, args.workers)
            del captioner
        store = encode_captions(writer.log, features_path, args.encoder, vsettings, args.device)
        failures = {p: writer.log.failures[p] for p in relpaths if p in writer.log.failures}
    report_failures(failures, command)
    if store is not None:
        logger.info("caption store ready: %d vectors of size %d in %s", len(store), store.dim, features_path)
    return store


def report_failures(failures: dict[str, str], command: str) -> None:
    """Warn about unreadable images (they are retried on the next run)."""
    if not failures:
        return
    first = list(failures.items())[:N_SHOWN]
    logger.warning(
        "%d images could not be read and have no caption:\n  %s\nFix or replace them, then run again (only they "
        "will be captioned):\n  %s", len(failures), "\n  ".join(f"{p}: {e}" for p, e in first), command,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tools.captions``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        build_parser().error("--batch-size must be at least 1")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.show:
            print("\n".join(show(args)))  # noqa: T201 - the CLI's result
        else:
            run(args)
    except (CaptionStoreError, CaptionModelNotFoundError, DatasetError) as err:
        logger.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
