"""Deep prompts in both CLIP towers, shared by MaPLe and PromptSRC (pure PyTorch).

Both methods prompt the two encoders the same way; only where the prompts come from differs (MaPLe projects
its text prompts into the vision tower, PromptSRC learns the two sets independently):

- text: ``[SOS] ctx_1..ctx_n <fixed words> <classname> . [EOS]``; before text layer ``i`` (``1 <= i <=
  len(deep)``) the n context positions are replaced by ``deep[i - 1]``;
- vision: n prompt tokens are appended to the patch tokens after the positional embedding (before ``ln_pre``);
  before vision layer ``i`` they are replaced by ``deep[i - 1]``.

A prompt learner used with :class:`DeepPromptModel` has ``n_ctx`` (text context tokens), ``prompts``
(:class:`models.prompts.ClassPrompts`) and ``forward() -> (text prompts (C, L, D), deep text prompts,
shallow vision prompt (n, Dv) or None, deep vision prompts)``. CLIP's stock residual blocks run one by one
(:func:`models.encoders.residual_block`) and prompt tokens are replaced between blocks; CLIP is never edited.
The text sequence is truncated after the longest end-of-text token (exact under the causal mask).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from clip.model import VisionTransformer
from torch import nn

from common.errors import ConfigError
from models.encoders import TextEncoder, VisualEncoder, freeze, residual_block, tokenize
from models.prompts import bpe_length

logger = logging.getLogger(__name__)


def require_vit(clip_model: nn.Module, method: str) -> None:
    """Raise a clear error unless ``clip_model`` has a ViT image encoder (vision prompts are tokens)."""
    if not isinstance(clip_model.visual, VisionTransformer):
        raise ConfigError(
            f"{method} needs a ViT backbone (its vision prompts are tokens); set MODEL.BACKBONE.NAME ViT-B/16."
        )


def capped_depth(key: str, depth: int, n_layers: int, minimum: int = 1) -> int:
    """``depth`` (the config value ``key``) checked against ``minimum`` and capped at ``n_layers`` with a warning."""
    if depth < minimum:
        raise ConfigError(f"{key} is {depth}; it must be >= {minimum}: set {key} to a value in {minimum}..{n_layers}.")
    if depth > n_layers:
        logger.warning("%s %d exceeds the backbone's %d layers: using %d", key, depth, n_layers, n_layers)
    return min(depth, n_layers)


@torch.no_grad()
def word_context(
    clip_model: nn.Module, n_ctx: int, ctx_init: str, method: str
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Learned context (n_ctx, D), the fixed words after it (m, D) and the prompt text they stand for.

    With ``ctx_init`` of at least ``n_ctx`` tokens the context is the embedding of its first ``n_ctx`` tokens
    and its remaining tokens stay as fixed words (``"a photo of a"`` with 2 tokens: ``a photo`` is learned,
    ``of a`` is fixed), as MaPLe and PromptSRC do upstream. Otherwise the context is drawn from N(0, 0.02)
    and there are no fixed words.
    """
    width = clip_model.ln_final.weight.shape[0]
    dtype = clip_model.token_embedding.weight.dtype
    ctx_init = ctx_init.replace("_", " ").strip()
    n_words = bpe_length(ctx_init) if ctx_init else 0
    if ctx_init and n_ctx <= n_words:
        emb = clip_model.token_embedding(tokenize([ctx_init]))[0, 1 : 1 + n_words].to(dtype)
        return emb[:n_ctx].clone(), emb[n_ctx:].clone(), ctx_init
    if ctx_init:
        logger.warning("%s CTX_INIT %r has fewer than %d tokens: random init", method, ctx_init, n_ctx)
    ctx = nn.init.normal_(torch.empty(n_ctx, width, dtype=dtype), std=0.02)
    return ctx, ctx.new_zeros(0, width), " ".join(["X"] * n_ctx)


def random_prompt(n_tokens: int, width: int) -> nn.Parameter:
    """A learnable prompt (n_tokens, width) drawn from N(0, 0.02), as upstream initialises deep prompts."""
    return nn.Parameter(nn.init.normal_(torch.empty(n_tokens, width), std=0.02))


def random_prompts(count: int, n_tokens: int, width: int) -> nn.ParameterList:
    """``count`` prompts of :func:`random_prompt`."""
    return nn.ParameterList([random_prompt(n_tokens, width) for _ in range(count)])


class DeepPromptModel(nn.Module):
    """Frozen CLIP prompted in both towers by ``prompt_learner``: ``forward(images) -> logits (B, C)``."""

    #: the image encoder runs with learned prompts: its features cannot be cached across steps
    IMAGE_ENCODER_PROMPTED = True

    def __init__(self, clip_model: nn.Module, prompt_learner: nn.Module) -> None:
        """``prompt_learner`` holds every learnable parameter (see the module docstring); a ViT backbone
        (:func:`require_vit`, checked by the subclass before it builds its prompt learner)."""
        super().__init__()
        freeze(clip_model)
        self.visual = VisualEncoder(clip_model)
        self.prompt_learner = prompt_learner
        self.text_encoder = TextEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale

    def encode_text(
        self, prompts: torch.Tensor, eot: torch.Tensor, deep: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Text features (C, E) of prompts (C, L, D); ``deep[i]`` replaces the context before layer i+1."""
        enc = self.text_encoder
        n_ctx = self.prompt_learner.n_ctx
        x = prompts.to(enc.dtype) + enc.positional_embedding[: prompts.shape[1]].to(enc.dtype)
        for i, block in enumerate(enc.blocks):
            if 1 <= i <= len(deep):
                ctx = deep[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], ctx, x[:, 1 + n_ctx :]], dim=1)
            x = residual_block(block, x, is_causal=True)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return enc.ln_final(x) @ enc.text_projection

    def encode_image(
        self, images: torch.Tensor, shallow: torch.Tensor | None, deep: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Image features (B, E) with ``shallow`` (n, Dv) appended after the positional embedding (None: none)."""
        vis = self.visual.visual
        x = self.visual.embed(images)
        n_ctx = 0 if shallow is None else shallow.shape[0]
        if n_ctx:
            x = torch.cat([x, shallow.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = vis.ln_pre(x)
        for i, block in enumerate(vis.transformer.resblocks):
            if 1 <= i <= len(deep):
                prompt = deep[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, : x.shape[1] - n_ctx], prompt], dim=1)
            x = residual_block(block, x)
        return self.visual.head(x)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised prompted image features (B, E) and class text features (C, E), in fp32."""
        text, deep_text, shallow, deep_vision = self.prompt_learner()
        text_feats = self.encode_text(text, self.prompt_learner.prompts.eot, deep_text)
        image_feats = self.encode_image(images, shallow, deep_vision)
        return F.normalize(image_feats.float(), dim=-1), F.normalize(text_feats.float(), dim=-1)

    def similarity(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Logits (B, C): ``exp(logit_scale)`` times normalised image (B, E) against text (C, E) features."""
        return self.logit_scale.exp().float() * image_feats @ text_feats.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C)."""
        return self.similarity(*self.features(images))
