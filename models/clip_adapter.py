"""CLIP-Adapter (Gao et al., IJCV 2024; gaopengcuhk/CLIP-Adapter): a residual bottleneck adapter on the image feature.

The frozen image feature ``f`` (B, E) is blended with its adapted copy, ``ratio * adapter(f) + (1 - ratio) * f``
(upstream: ratio 0.2), where the adapter is Linear(E, E/r) -> ReLU -> Linear(E/r, E) -> ReLU without biases
(upstream: reduction r = 4); the classifier is the frozen text feature of the dataset's hand-crafted template
for every class. Upstream re-encodes the class prompts at every step; they are frozen, so here they are
encoded once (exact). ``E`` comes from the loaded backbone (upstream hard-codes RN50's 1024).

The adapter is the model's ``prompt_learner`` (the module every trainer here optimises and saves); its
parameter names are upstream's (``fc.0.weight``, ``fc.2.weight``), so upstream's ``clip_adapter`` checkpoints load.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.errors import ConfigError
from models.encoders import FrozenImageModel, VisualEncoder, freeze
from models.prompts import cosine_logits, template_text_features


class Adapter(nn.Module):
    """Upstream's bottleneck: Linear(dim, dim/reduction) -> ReLU -> Linear(dim/reduction, dim) -> ReLU, no biases."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        if not 1 <= reduction <= dim:
            raise ConfigError(
                f"CLIP-Adapter reduction {reduction} does not fit the {dim}-d image feature: "
                f"set TRAINER.CLIP_ADAPTER.REDUCTION between 1 and {dim} (upstream: 4)."
            )
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class CLIPAdapterModel(FrozenImageModel):
    """Frozen CLIP, a learned feature adapter and a frozen template classifier: ``forward(images) -> logits (B, C)``.

    The image encoder is CLIP's, frozen and unprompted: the adapter acts on its output."""

    def __init__(
        self, clip_model: nn.Module, classnames: Sequence[str], template: str, reduction: int = 4, ratio: float = 0.2
    ) -> None:
        super().__init__()
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"CLIP-Adapter ratio {ratio} is not in [0, 1]: set TRAINER.CLIP_ADAPTER.RATIO (upstream: 0.2).")
        freeze(clip_model)
        self.visual = VisualEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale
        self.classnames, self.template, self.ratio = list(classnames), template, float(ratio)
        text = template_text_features(clip_model, classnames, [template])
        self.register_buffer("text_features", text, persistent=False)
        self.prompt_learner = Adapter(clip_model.visual.output_dim, reduction)

    def forward_visual(self, visual: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, C) from the image features."""
        feats = visual["features"].to(self.prompt_learner.fc[0].weight.dtype)
        feats = self.ratio * self.prompt_learner(feats) + (1.0 - self.ratio) * feats
        return cosine_logits(self.logit_scale, feats, self.text_features)
