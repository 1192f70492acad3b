"""Tiny random BLIP-2 captioner and BERT caption encoder for tests and the offline smoke run.

``toy_model_dir("toy-blip2")`` / ``toy_model_dir("toy-bert")`` build the model once (seeded, so every
machine builds the same weights), save it with ``save_pretrained`` under the cache folder
(``$BIMORS_CACHE/toy-models`` or ``~/.cache/bimors/toy-models``) and return that folder, which is then
loaded through the same ``from_pretrained(folder)`` path as a real model. The weights are random: the
captions they produce are junk and only exercise the pipeline.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from common.io import atomic_dir
from datasets.captions import TOY_CAPTIONER, TOY_ENCODER

logger = logging.getLogger(__name__)

TOY_VERSION = 1  # bump when a builder changes, so cached copies are rebuilt
TOY_SEED = 0
TOY_IMAGE_SIZE = 224
TOY_QUERY_TOKENS = 4
TOY_WIDTH = 32
TOY_ENCODER_WIDTH = 32

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = """a an the of in on with and near next to aerial view satellite image top many some two large small
green blue gray white brown dense sparse river lake sea beach forest trees field farmland road highway bridge
railway building buildings house houses parking lot cars airport runway harbor ships bare land desert meadow
mountain residential area industrial stadium church school pond swimming pool tennis court baseball golf course
intersection overpass circular square ##s ##ing""".split()


def toy_cache_dir() -> Path:
    """Folder holding the built toy models (``$BIMORS_CACHE/toy-models`` or ``~/.cache/bimors/toy-models``)."""
    base = os.environ.get("BIMORS_CACHE") or Path.home() / ".cache" / "bimors"
    return Path(base).expanduser() / "toy-models"


def write_vocab(folder: Path) -> Path:
    """Write the toy WordPiece vocabulary (``vocab.txt``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(SPECIAL_TOKENS + sorted(set(WORDS))) + "\n", encoding="utf-8")
    return path


def _tokenizer(work: Path):
    from transformers import BertTokenizer

    vocab_dir = work / "vocab"
    write_vocab(vocab_dir)
    return BertTokenizer.from_pretrained(str(vocab_dir))


def build_toy_captioner(out_dir: Path) -> None:
    """Save a tiny random ``Blip2ForConditionalGeneration`` (T5-style language model) and its processor."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    with tempfile.TemporaryDirectory() as work:
        tokenizer = _tokenizer(Path(work))
    image_processor = BlipImageProcessor(size={"height": TOY_IMAGE_SIZE, "width": TOY_IMAGE_SIZE})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=TOY_QUERY_TOKENS)
    tok = processor.tokenizer
    vocab_size = len(tok)
    sep = tok.convert_tokens_to_ids("[SEP]")
    layer = dict(hidden_size=TOY_WIDTH, intermediate_size=2 * TOY_WIDTH, num_hidden_layers=1, num_attention_heads=2)
    factor = 5.0  # larger random weights make captions depend more on the image
    config = Blip2Config(
        vision_config=dict(layer, image_size=TOY_IMAGE_SIZE, patch_size=32, initializer_range=0.02 * factor),
        qformer_config=dict(layer, encoder_hidden_size=TOY_WIDTH, vocab_size=vocab_size),
        text_config=dict(
            model_type="t5", vocab_size=vocab_size, d_model=TOY_WIDTH, d_kv=TOY_WIDTH // 2, d_ff=2 * TOY_WIDTH,
            num_layers=1, num_decoder_layers=1, num_heads=2, initializer_factor=factor,
            pad_token_id=tok.pad_token_id, eos_token_id=sep, bos_token_id=sep, decoder_start_token_id=tok.pad_token_id,
        ),
        num_query_tokens=TOY_QUERY_TOKENS,
        image_token_index=tok.convert_tokens_to_ids(processor.image_token.content),
        initializer_range=0.02 * factor,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TOY_SEED)
        model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))


def build_toy_encoder(out_dir: Path) -> None:
    """Save a tiny random ``BertModel`` and a WordPiece tokenizer built from the toy vocabulary."""
    from transformers import BertConfig, BertModel

    with tempfile.TemporaryDirectory() as work:
        tokenizer = _tokenizer(Path(work))
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=TOY_ENCODER_WIDTH, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * TOY_ENCODER_WIDTH, max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TOY_SEED)
        model = BertModel(config).eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


TOY_BUILDERS: dict[str, Callable[[Path], None]] = {
    TOY_CAPTIONER: build_toy_captioner,
    TOY_ENCODER: build_toy_encoder,
}


def toy_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Folder of toy model ``name`` (``toy-blip2`` or ``toy-bert``), built on first use."""
    if name not in TOY_BUILDERS:
        raise ValueError(f"unknown toy model {name!r}; choose one of {sorted(TOY_BUILDERS)}")
    cache = Path(cache_dir) if cache_dir is not None else toy_cache_dir()
    folder = cache / f"{name}-v{TOY_VERSION}"
    if (folder / "config.json").exists():
        return folder
    with atomic_dir(folder) as tmp:  # another process building it at the same time is harmless
        TOY_BUILDERS[name](tmp)
    logger.info("built toy model %s in %s", name, folder)
    return folder
