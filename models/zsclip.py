"""Zero-shot CLIP with a hand-crafted template (or an ensemble of templates)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import TextEncoder, VisualEncoder, eot_positions, freeze, tokenize
from models.prompts import clean_classname


@torch.no_grad()
def template_text_features(clip_model: nn.Module, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Frozen class weights (C, E): the normalised mean of each template's normalised text features (fp32)."""
    text = TextEncoder(clip_model)
    names = [clean_classname(c) for c in classnames]
    weights = 0
    for template in templates:
        tokens = tokenize([template.format(name) for name in names])
        feats = text(clip_model.token_embedding(tokens), eot_positions(tokens)).float()
        weights = weights + F.normalize(feats, dim=-1)
    return F.normalize(weights / len(templates), dim=-1)


class ZeroshotModel(nn.Module):
    """CLIP classifier whose class weights are the (averaged) text features of ``templates``."""

    prompt_learner = None  # nothing is learned

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], templates: Sequence[str]) -> None:
        super().__init__()
        freeze(clip_model)
        self.visual = VisualEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale
        self.register_buffer("text_features", template_text_features(clip_model, classnames, templates), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C)."""
        feats, _ = self.visual(images)
        feats = F.normalize(feats.float(), dim=-1)
        return self.logit_scale.exp().float() * feats @ self.text_features.t()
