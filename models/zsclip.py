"""Zero-shot CLIP with a hand-crafted template (or an ensemble of templates)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import VisualEncoder, freeze
from models.prompts import template_text_features


class ZeroshotModel(nn.Module):
    """CLIP classifier whose class weights are the (averaged) text features of ``templates``."""

    prompt_learner = None  # nothing is learned
    #: the image encoder is CLIP's, frozen and unprompted
    IMAGE_ENCODER_PROMPTED = False

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], templates: Sequence[str]) -> None:
        super().__init__()
        freeze(clip_model)
        self.visual = VisualEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale
        weights = template_text_features(clip_model, classnames, templates)
        self.register_buffer("text_features", weights, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C)."""
        feats, _ = self.visual(images)
        feats = F.normalize(feats.float(), dim=-1)
        return self.logit_scale.exp().float() * feats @ self.text_features.t()
