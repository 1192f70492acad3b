"""Zero-shot CLIP with a hand-crafted template (or an ensemble of templates)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.encoders import FrozenImageModel, VisualEncoder, freeze
from models.prompts import cosine_logits, template_text_features


class ZeroshotModel(FrozenImageModel):
    """CLIP classifier whose class weights are the (averaged) text features of ``templates``."""

    prompt_learner = None  # nothing is learned

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], templates: Sequence[str]) -> None:
        super().__init__()
        freeze(clip_model)
        self.visual = VisualEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale
        weights = template_text_features(clip_model, classnames, templates)
        self.register_buffer("text_features", weights, persistent=False)

    def forward_visual(self, visual: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, C) from the image features."""
        return cosine_logits(self.logit_scale, visual["features"], self.text_features)
