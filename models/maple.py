"""MaPLe (Khattak et al., CVPR 2023): coupled deep prompts in the language and the vision branch.

- Language: ``[SOS] ctx_1..ctx_n <rest of CTX_INIT> <classname> . [EOS]``; before transformer layers
  ``1..J-1`` the n context positions are replaced by the layer's own learnable prompts
  (``compound_prompts_text``). As upstream, the context is the first N_CTX tokens of CTX_INIT
  (``"a photo of a"`` and 2 tokens: ``a photo`` is learned, ``of a`` stays as fixed words).
- Vision: ``proj(ctx)`` (language-to-vision coupling, Linear(text width, vision width)) is appended to the
  patch tokens after the positional embedding; before layers ``1..J-1`` those n tokens are replaced by
  ``compound_prompt_projections[i](compound_prompts_text[i])``.

``J`` is ``prompt_depth`` (upstream ``PROMPT_DEPTH``, 1 = shallow MaPLe); it is capped at the number of
layers of the shallower tower. Both towers run CLIP's stock residual blocks
(:func:`models.encoders.residual_block`) and replace prompt tokens between blocks; CLIP is never edited.
The text sequence is truncated after the longest end-of-text token (exact under the causal mask).

State-dict keys of ``prompt_learner`` are upstream's (``ctx``, ``proj.*``, ``compound_prompts_text.N``,
``compound_prompt_projections.N.*``); upstream checkpoints prefix them with ``prompt_learner.``, which
:func:`upstream_prompt_learner_state` strips.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import TextEncoder, VisualEncoder, freeze, require_vit, residual_block, tokenize
from models.prompts import ClassPrompts, bpe_length

logger = logging.getLogger(__name__)

UPSTREAM_PREFIX = "prompt_learner."


def upstream_prompt_learner_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``prompt_learner`` part of an upstream MaPLe state dict (whole model, keys ``prompt_learner.*``).

    A state dict without that prefix (ours) is returned unchanged.
    """
    if not any(k.startswith(UPSTREAM_PREFIX) for k in state):
        return dict(state)
    return {k[len(UPSTREAM_PREFIX) :]: v for k, v in state.items() if k.startswith(UPSTREAM_PREFIX)}


class MaPLePromptLearner(nn.Module):
    """Every learnable MaPLe parameter: shallow context, its projection, deep text prompts and projections."""

    def __init__(
        self,
        clip_model: nn.Module,
        classnames: Sequence[str],
        n_ctx: int = 2,
        ctx_init: str = "a photo of a",
        prompt_depth: int = 9,
    ) -> None:
        super().__init__()
        if prompt_depth < 1:
            raise ValueError(
                f"MaPLe PROMPT_DEPTH is {prompt_depth}; it must be >= 1 (1 = shallow MaPLe, upstream default 9)."
            )
        width = clip_model.ln_final.weight.shape[0]
        vis_width = clip_model.visual.conv1.weight.shape[0]
        text_layers = len(clip_model.transformer.resblocks)
        vis_layers = len(clip_model.visual.transformer.resblocks)
        depth = min(prompt_depth, text_layers, vis_layers)
        if depth < prompt_depth:
            logger.warning(
                "MaPLe PROMPT_DEPTH %d exceeds the backbone's %d text / %d vision layers: using %d",
                prompt_depth, text_layers, vis_layers, depth,
            )  # fmt: skip
        dtype = clip_model.token_embedding.weight.dtype
        ctx_init = ctx_init.replace("_", " ").strip()
        n_words = bpe_length(ctx_init) if ctx_init else 0
        if ctx_init and n_ctx <= n_words:
            with torch.no_grad():
                emb = clip_model.token_embedding(tokenize([ctx_init]))[0, 1 : 1 + n_words].to(dtype)
            ctx, fixed = emb[:n_ctx].clone(), emb[n_ctx:].clone()
            text = ctx_init
        else:
            if ctx_init:
                logger.warning("MaPLe CTX_INIT %r has fewer than N_CTX=%d tokens: random init", ctx_init, n_ctx)
            ctx = torch.empty(n_ctx, width, dtype=dtype)
            nn.init.normal_(ctx, std=0.02)
            fixed = ctx.new_zeros(0, width)
            text = " ".join(["X"] * n_ctx)
        logger.info('MaPLe: initial text "%s", %d learned context tokens, prompt depth %d', text, n_ctx, depth)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx)
        self.register_buffer("fixed_ctx", fixed, persistent=False)  # words of CTX_INIT after the learned ones
        self.proj = nn.Linear(width, vis_width)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(nn.init.normal_(torch.empty(n_ctx, width), std=0.02)) for _ in range(depth - 1)]
        )
        layer = nn.Linear(width, vis_width)  # upstream clones one layer: every projection starts identical
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(layer) for _ in range(depth - 1)])
        self.prompts = ClassPrompts(clip_model, classnames, n_ctx + fixed.shape[0])

    def forward(self) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """``(text prompts (C, L, D), deep text prompts, shallow vision prompt (n, Dv), deep vision prompts)``."""
        context = torch.cat([self.ctx, self.fixed_ctx.to(self.ctx.dtype)], dim=0)
        text = self.prompts.full(context)
        deep_text = list(self.compound_prompts_text)
        deep_vision = [proj(p) for proj, p in zip(self.compound_prompt_projections, deep_text)]
        return text, deep_text, self.proj(self.ctx), deep_vision


class MaPLeModel(nn.Module):
    """CLIP with MaPLe's multi-modal prompts: ``forward(images) -> logits (B, C)``."""

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], **options) -> None:
        """``options``: those of :class:`MaPLePromptLearner` (n_ctx, ctx_init, prompt_depth)."""
        super().__init__()
        freeze(clip_model)
        require_vit(clip_model, "MaPLe")
        self.visual = VisualEncoder(clip_model)
        self.prompt_learner = MaPLePromptLearner(clip_model, classnames, **options)
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
        self, images: torch.Tensor, shallow: torch.Tensor, deep: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Image features (B, E) with ``shallow`` (n, Dv) appended after the positional embedding."""
        vis = self.visual.visual
        n_ctx = shallow.shape[0]
        x = self.visual.embed(images)
        x = torch.cat([x, shallow.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = vis.ln_pre(x)
        for i, block in enumerate(vis.transformer.resblocks):
            if 1 <= i <= len(deep):
                prompt = deep[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, : x.shape[1] - n_ctx], prompt], dim=1)
            x = residual_block(block, x)
        return self.visual.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C)."""
        text, deep_text, shallow, deep_vision = self.prompt_learner()
        text_feats = self.encode_text(text, self.prompt_learner.prompts.eot, deep_text)
        image_feats = self.encode_image(images, shallow, deep_vision)
        text_feats = F.normalize(text_feats.float(), dim=-1)
        image_feats = F.normalize(image_feats.float(), dim=-1)
        return self.logit_scale.exp().float() * image_feats @ text_feats.t()
