"""Shared prompt pieces: class prompts as frozen token embeddings, context initialisation, the meta-net, templates,
and the logits of per-image prompts."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from clip.simple_tokenizer import SimpleTokenizer
from torch import nn

from models.encoders import TextEncoder, eot_positions, tokenize

logger = logging.getLogger(__name__)

_TOKENIZER: SimpleTokenizer | None = None

#: Hand-written prompt ensemble for remote-sensing scenes (ZeroshotCLIPEnsemble).
RS_ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "a satellite photo of a {}.",
    "an aerial photo of a {}.",
    "a remote sensing image of a {}.",
    "an overhead view of a {}.",
    "a satellite image showing {}.",
    "a high-resolution aerial image of {}.",
)


def _rs106_templates() -> tuple[str, ...]:
    """The 106 prompts RS-TransCLIP averages for its zero-shot tables (elkhouryk/RS-TransCLIP).

    "a satellite photo of a {}." and, for each of three image words, 35 variations in the style of CLIP's
    ImageNet prompts: "<kind> of a/the/many {}.", "... of a/the hard to see {}.", ten qualities before the kind
    ("a blurry <kind> of a/the {}.") and five adjectives before the class ("<kind> of a/the large {}.").
    """
    qualities = ("low resolution", "bad", "cropped", "bright", "dark", "close-up", "black and white",
                 "jpeg corrupted", "blurry", "good")  # fmt: skip
    sizes = ("large", "nice", "small", "weird", "cool")
    out = ["a satellite photo of a {}."]
    for kind in ("remote sensing image", "aerial image", "satellite image"):
        article = "an" if kind[0] in "aeiou" else "a"
        out.append(f"{article} {kind} of many {{}}.")
        for det in ("a", "the"):
            out += [f"{article} {kind} of {det} {{}}.", f"{article} {kind} of {det} hard to see {{}}."]
            out += [f"a {quality} {kind} of {det} {{}}." for quality in qualities]
            out += [f"{article} {kind} of {det} {size} {{}}." for size in sizes]
    return tuple(out)


#: Named template sets for the zero-shot trainers (``TRAINER.ZSCLIP.TEMPLATES``); ``dataset`` is the dataset's
#: own template, filled in by the trainer.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "dataset": (),
    "rs": RS_ENSEMBLE_TEMPLATES,
    "rs106": _rs106_templates(),
}


def resolve_templates(spec: str, dataset_template: str) -> list[str]:
    """The templates a spec names: ``+``-joined set names of :data:`TEMPLATE_SETS` or literal templates with ``{}``.

    ``"rs106"`` is an ensemble, ``"dataset+rs"`` the dataset template then the ``rs`` set, ``"a satellite photo
    of a {}."`` a single template. Duplicates are dropped, the order kept.
    """
    out: list[str] = []
    for part in (p.strip() for p in spec.split("+")):
        if "{}" in part:
            out.append(part)
        elif part == "dataset":
            out.append(dataset_template)
        elif part in TEMPLATE_SETS:
            out += TEMPLATE_SETS[part]
        else:
            raise ValueError(
                f"Unknown zero-shot template set {part!r} in {spec!r}: use {', '.join(TEMPLATE_SETS)}, a template "
                "with {} (e.g. 'a satellite photo of a {}.'), or several joined with '+'."
            )
    return list(dict.fromkeys(out))


def ensemble_templates(template: str) -> list[str]:
    """The dataset's ``template`` followed by the remote-sensing ensemble, without repeats."""
    return resolve_templates("dataset+rs", template)


@torch.no_grad()
def template_text_features(
    clip_model: nn.Module, classnames: Sequence[str], templates: Sequence[str], normalize_each: bool = True
) -> torch.Tensor:
    """Frozen CLIP's class text features (C, E) for hand-written ``templates`` (``"a photo of a {}."``), fp32.

    The features of the templates are averaged (each normalised first when ``normalize_each``, as zero-shot
    CLIP's ensemble does; raw, as PromptSRC's does) and the mean is normalised.
    """
    encoder = TextEncoder(clip_model)
    names = [clean_classname(c) for c in classnames]
    total = 0
    for template in templates:
        tokens = tokenize([template.format(name) for name in names]).to(clip_model.token_embedding.weight.device)
        feats = encoder(clip_model.token_embedding(tokens), eot_positions(tokens)).float()
        total = total + (F.normalize(feats, dim=-1) if normalize_each else feats)
    return F.normalize(total / len(templates), dim=-1)


def bpe_length(text: str) -> int:
    """Number of CLIP BPE tokens of ``text`` (without start/end tokens)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = SimpleTokenizer()
    return len(_TOKENIZER.encode(text))


def clean_classname(name: str) -> str:
    """Display form of a raw class folder name (underscores to spaces)."""
    return name.replace("_", " ").strip()


def meta_net(in_dim: int, out_dim: int, reduction: int = 16) -> nn.Sequential:
    """CoCoOp's meta-net: Linear(in, in/16) -> ReLU -> Linear(in/16, out), with upstream module names."""
    hidden = in_dim // reduction
    layers = [
        ("linear1", nn.Linear(in_dim, hidden)),
        ("relu", nn.ReLU(inplace=True)),
        ("linear2", nn.Linear(hidden, out_dim)),
    ]
    return nn.Sequential(OrderedDict(layers))


@torch.no_grad()
def init_context(
    clip_model: nn.Module, n_ctx: int, ctx_init: str = "", n_cls: int = 0
) -> tuple[torch.Tensor, str]:
    """Initial context vectors and the prompt prefix text they stand for.

    With ``ctx_init`` (e.g. ``"a photo of a"``) the vectors are the word embeddings of its ``n_ctx`` tokens;
    otherwise they are drawn from N(0, 0.02). ``n_cls > 0`` gives class-specific context (n_cls, n_ctx, D).
    """
    width = clip_model.ln_final.weight.shape[0]
    dtype = clip_model.token_embedding.weight.dtype
    if ctx_init:
        ctx_init = ctx_init.replace("_", " ")
        n_words = bpe_length(ctx_init)
        if n_words != n_ctx:
            logger.info("CTX_INIT %r has %d tokens: using N_CTX=%d instead of %d", ctx_init, n_words, n_words, n_ctx)
            n_ctx = n_words
        emb = clip_model.token_embedding(tokenize([ctx_init]))[0, 1 : 1 + n_ctx].to(dtype)
        vectors = emb.unsqueeze(0).repeat(n_cls, 1, 1) if n_cls > 0 else emb.clone()
        return vectors, ctx_init
    shape = (n_cls, n_ctx, width) if n_cls > 0 else (n_ctx, width)
    vectors = torch.empty(shape, dtype=dtype)
    nn.init.normal_(vectors, std=0.02)
    return vectors, " ".join(["X"] * n_ctx)


class ClassPrompts(nn.Module):
    """Frozen pieces of ``[SOS] <n_ctx placeholders> <classname>. [EOS]`` for every class.

    Buffers (non-persistent: rebuilt from the class list, never stored in checkpoints):
    ``token_prefix`` (1, 1, D) the ``[SOS]`` embedding; ``token_suffix`` (C, S, D) the class name, '.', EOT,
    truncated after the longest prompt's EOT (exact under the causal mask); ``eot`` (C,) EOT positions in the
    full sequence; ``tokens`` (C, 77) the token ids.
    """

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], n_ctx: int) -> None:
        super().__init__()
        names = [clean_classname(c) for c in classnames]
        placeholder = " ".join(["X"] * n_ctx)
        tokens = tokenize([f"{placeholder} {name}.".strip() for name in names])
        eot = eot_positions(tokens)
        length = int(eot.max()) + 1
        with torch.no_grad():
            emb = clip_model.token_embedding(tokens).to(clip_model.token_embedding.weight.dtype)
        self.n_ctx = n_ctx
        self.classnames = names
        self.name_lens = [bpe_length(name) for name in names]
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        self.register_buffer("token_prefix", emb[:1, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", emb[:, 1 + n_ctx : length].clone(), persistent=False)

    @property
    def seq_len(self) -> int:
        """Truncated sequence length (longest EOT position + 1)."""
        return int(self.eot.max()) + 1

    def prefix(self, ctx: torch.Tensor) -> torch.Tensor:
        """``[SOS] + ctx`` for context ``ctx`` (..., n_ctx, D) -> (..., 1 + n_ctx, D)."""
        sos = self.token_prefix[0].to(ctx.dtype).expand(*ctx.shape[:-2], 1, ctx.shape[-1])
        return torch.cat([sos, ctx], dim=-2)

    def full(self, ctx: torch.Tensor) -> torch.Tensor:
        """Full truncated prompts for class-shared (n_ctx, D) or class-specific (C, n_ctx, D) context -> (C, L, D)."""
        n_cls = self.token_suffix.shape[0]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
        suffix = self.token_suffix.to(ctx.dtype)
        return torch.cat([self.prefix(ctx), suffix], dim=-2)


def cosine_logits(logit_scale: torch.Tensor, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Logits (B, C): ``exp(logit_scale)`` times the cosine similarities of image features (B, E), normalised here
    in fp32, with normalised class text features (C, E)."""
    feats = F.normalize(image_features.float(), dim=-1)
    return logit_scale.exp().float() * feats @ text_features.t()


def per_image_logits(
    text_encoder: TextEncoder,
    prompts: ClassPrompts,
    logit_scale: torch.Tensor,
    image_features: torch.Tensor,
    prefix: torch.Tensor,
) -> torch.Tensor:
    """Logits (B, C) when every image has its own prompts (CoCoOp, BiMoRS, APPLeNet).

    ``prefix`` (B, 1 + n_ctx, D) is each image's ``[SOS] + context``; it is completed with every class's suffix
    and encoded through the exact shared-prefix text path (docs/design.md section 7). ``image_features``
    (B, E) are normalised; the result is ``exp(logit_scale)`` times the cosine similarities.
    """
    suffix = prompts.token_suffix.to(prefix.dtype)
    text = text_encoder.forward_shared_prefix(prefix, suffix, prompts.eot)  # (B, C, E)
    text = F.normalize(text.float(), dim=-1)
    return logit_scale.exp().float() * torch.einsum("be,bce->bc", image_features, text)
