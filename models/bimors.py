"""BiMoRS: bi-modal (image + caption) conditioning of CLIP text prompts (docs/design.md section 4).

Per image: a visual token (the ViT's token sequence before ``ln_post``, through a meta-net applied per token,
averaged over tokens) and a caption token (a projected caption-encoder vector) are the keys/values of a
LayerNorm'd multi-head cross-attention whose queries are the learnable context; the shifted context
``ctx' = ctx + Attn(LN(ctx), LN([vis; cap]))`` forms the prompts ``[SOS] ctx' <classname>. [EOS]`` for all
classes. Every size is read from the loaded backbone and from the caption store.

Module and parameter names inside ``prompt_learner`` follow the published code (``ctx``, ``meta_net.linear1``,
``cross_attn.cross_attend_blocks.{norm,norm_context,fn}``) so its checkpoints map onto ours.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import FrozenImageModel, TextEncoder, VisualEncoder, freeze, require_vit
from models.prompts import ClassPrompts, init_context, meta_net, per_image_logits

logger = logging.getLogger(__name__)


class FrozenLinear(nn.Module):
    """A linear map whose weights are buffers: saved in checkpoints, never trained.

    Reproduces the published code's caption projection, which stays at its random initialisation.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        init = nn.Linear(in_features, out_features)
        self.register_buffer("weight", init.weight.detach().clone())
        self.register_buffer("bias", init.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PreNormCrossAttention(nn.Module):
    """Multi-head attention of LayerNorm'd queries over LayerNorm'd keys/values."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.fn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        kv = self.norm_context(context)
        return self.fn(self.norm(query), kv, kv, need_weights=False)[0]


class CrossAttention(nn.Module):
    """Residual cross-attention: ``ctx + Attn(LN(ctx), LN(kv))``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.cross_attend_blocks = PreNormCrossAttention(dim, heads)

    def forward(self, ctx: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return ctx + self.cross_attend_blocks(ctx, kv)


class BiMoRSPromptLearner(nn.Module):
    """Every learnable part of BiMoRS (plus the caption projection, frozen in compat mode)."""

    def __init__(
        self,
        clip_model: nn.Module,
        classnames: Sequence[str],
        n_ctx: int,
        ctx_init: str,
        n_heads: int,
        caption_dim: int,
        caption_proj_trainable: bool,
    ) -> None:
        super().__init__()
        require_vit(clip_model, "BiMoRS")
        vis_width = clip_model.visual.conv1.weight.shape[0]
        ctx_dim = clip_model.ln_final.weight.shape[0]
        ctx, prefix_text = init_context(clip_model, n_ctx, ctx_init)
        self.ctx = nn.Parameter(ctx.float())
        n_ctx = self.ctx.shape[0]
        logger.info('BiMoRS initial context: "%s" (%d tokens); caption dim %d', prefix_text, n_ctx, caption_dim)
        self.meta_net = meta_net(vis_width, ctx_dim)  # applied per ViT token
        self.cross_attn = CrossAttention(ctx_dim, n_heads)
        self.caption_proj = (
            nn.Linear(caption_dim, ctx_dim) if caption_proj_trainable else FrozenLinear(caption_dim, ctx_dim)
        )
        self.caption_dim = caption_dim
        self.prompts = ClassPrompts(clip_model, classnames, n_ctx)

    def forward(self, vis_tokens: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Shifted context (B, n_ctx, D) from ViT tokens (B, T, W) and caption vectors (B, caption_dim)."""
        if captions.shape[-1] != self.caption_dim:
            raise ValueError(
                f"Caption vectors have dimension {captions.shape[-1]} but this model was built for "
                f"{self.caption_dim}: use the caption encoder the model was trained with (TRAINER.BIMORS.CAPTION_ENCODER)."
            )
        dtype = self.ctx.dtype
        visual = self.meta_net(vis_tokens.to(dtype)).mean(dim=1, keepdim=True)  # (B, 1, D)
        caption = self.caption_proj(captions.to(dtype)).unsqueeze(1)  # (B, 1, D)
        ctx = self.ctx.unsqueeze(0).expand(vis_tokens.shape[0], -1, -1)
        return self.cross_attn(ctx, torch.cat([visual, caption], dim=1))


class BiMoRSModel(FrozenImageModel):
    """Frozen CLIP + :class:`BiMoRSPromptLearner`; ``forward(images, captions) -> logits (B, C)``."""

    VISUAL_OUTPUTS = ("features", "tokens")

    def __init__(
        self,
        clip_model: nn.Module,
        classnames: Sequence[str],
        caption_dim: int,
        n_ctx: int = 4,
        ctx_init: str = "a photo of a",
        n_heads: int = 4,
        caption_proj_trainable: bool = True,
    ) -> None:
        super().__init__()
        freeze(clip_model)
        self.visual = VisualEncoder(clip_model)
        self.text_encoder = TextEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale
        self.prompt_learner = BiMoRSPromptLearner(
            clip_model, classnames, n_ctx, ctx_init, n_heads, caption_dim, caption_proj_trainable
        )

    def forward_visual(self, visual: dict[str, torch.Tensor], captions: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from the image features, the ViT tokens and the caption vectors (B, caption_dim)."""
        feats = F.normalize(visual["features"].float(), dim=-1)
        ctx = self.prompt_learner(visual["tokens"], captions)
        prompts = self.prompt_learner.prompts
        return per_image_logits(self.text_encoder, prompts, self.logit_scale, feats, prompts.prefix(ctx))
