"""CoCoOp (Zhou et al., CVPR 2022): context vectors shifted per image by a meta-net on the image feature.

For image b the prompts are ``[SOS] (ctx + pi_b) <classname> . [EOS]`` with ``pi_b = meta_net(f_b)`` and
``f_b`` the normalised image feature (Linear(E, E/16) -> ReLU -> Linear(E/16, D)). Every image has its own
C class prompts, so the text encoder sees B x C prompts. They go through one encoder call on the truncated
sequence, and ``[SOS] + ctx'`` (class independent) is encoded once per image and shared by its C class
suffixes (:meth:`models.encoders.TextEncoder.forward_shared_prefix`); both are exact (docs/design.md section 7).

State-dict keys of ``prompt_learner`` are upstream's (``ctx``, ``meta_net.linear1.weight``, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import FrozenImageModel, TextEncoder, VisualEncoder, freeze
from models.prompts import ClassPrompts, init_context, meta_net, per_image_logits

logger = logging.getLogger(__name__)


class CoCoOpPromptLearner(nn.Module):
    """Learnable ``ctx`` (n_ctx, D) and ``meta_net``; frozen class prompt pieces in ``prompts``."""

    def __init__(
        self, clip_model: nn.Module, classnames: Sequence[str], n_ctx: int = 16, ctx_init: str = ""
    ) -> None:
        super().__init__()
        vectors, prefix_text = init_context(clip_model, n_ctx, ctx_init)
        n_ctx = vectors.shape[-2]
        logger.info('CoCoOp: initial context "%s" (%d tokens)', prefix_text, n_ctx)
        self.ctx = nn.Parameter(vectors)
        vis_dim = clip_model.visual.output_dim
        self.meta_net = meta_net(vis_dim, self.ctx.shape[-1])
        self.prompts = ClassPrompts(clip_model, classnames, n_ctx)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Per-image prompt prefixes ``[SOS] + ctx + pi_b`` (B, 1 + n_ctx, D) for normalised features (B, E)."""
        bias = self.meta_net(image_features.to(self.ctx.dtype))
        return self.prompts.prefix(self.ctx.unsqueeze(0) + bias.unsqueeze(1))


class CoCoOpModel(FrozenImageModel):
    """CLIP with CoCoOp's instance-conditioned prompts: ``forward(images) -> logits (B, C)``."""

    def __init__(
        self, clip_model: nn.Module, classnames: Sequence[str], n_ctx: int = 16, ctx_init: str = ""
    ) -> None:
        super().__init__()
        freeze(clip_model)
        self.prompt_learner = CoCoOpPromptLearner(clip_model, classnames, n_ctx, ctx_init)
        self.text_encoder = TextEncoder(clip_model)
        self.visual = VisualEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale

    def forward_visual(self, visual: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, C) from the image features."""
        feats = F.normalize(visual["features"].float(), dim=-1)
        prefix = self.prompt_learner(feats)
        return per_image_logits(self.text_encoder, self.prompt_learner.prompts, self.logit_scale, feats, prefix)
