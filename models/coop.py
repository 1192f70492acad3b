"""CoOp (Zhou et al., IJCV 2022): learnable context vectors in front of (or around) the class name.

Prompts are ``[SOS] ctx_1..ctx_n <classname> . [EOS]`` with the class name at the end, in the middle of the
context or in front of it, and one context shared by all classes or one per class (CSC). The text encoder
runs once per forward on the C class prompts, truncated after the longest end-of-text token (exact); the
frozen image encoder runs under ``no_grad``.

State-dict keys of ``prompt_learner`` are upstream's (``ctx``), so a released CoOp checkpoint loads. One
deliberate difference: with ``CSC`` and ``CTX_INIT`` both set, upstream silently learns a shared context;
here every class gets its own copy of the initial words, as ``CSC`` asks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from models.encoders import FrozenImageModel, TextEncoder, VisualEncoder, freeze
from models.prompts import ClassPrompts, cosine_logits, init_context

logger = logging.getLogger(__name__)

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


def class_token_order(n_ctx: int, name_lens: Sequence[int], length: int, position: str) -> torch.Tensor:
    """Per-class permutation (C, length) of ``[SOS] ctx suffix`` positions that moves the class name.

    ``end`` keeps ``[SOS] ctx name . [EOS]``; ``middle`` gives ``[SOS] ctx[:n/2] name ctx[n/2:] . [EOS]``;
    ``front`` gives ``[SOS] name ctx . [EOS]``. The end-of-text position never moves.
    """
    if position not in CLASS_TOKEN_POSITIONS:
        raise ConfigError(
            f"CLASS_TOKEN_POSITION {position!r} is not one of {', '.join(CLASS_TOKEN_POSITIONS)}: "
            "set TRAINER.COOP.CLASS_TOKEN_POSITION to one of them."
        )
    rows = []
    for name_len in name_lens:
        ctx = list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + name_len))
        rest = list(range(1 + n_ctx + name_len, length))
        if position == "end":
            body = ctx + name
        elif position == "middle":
            half = n_ctx // 2
            body = ctx[:half] + name + ctx[half:]
        else:
            body = name + ctx
        rows.append([0, *body, *rest])
    return torch.tensor(rows, dtype=torch.long)


class CoOpPromptLearner(nn.Module):
    """The learnable context ``ctx`` ((n_ctx, D), or (C, n_ctx, D) with CSC) and the frozen class prompts."""

    def __init__(
        self,
        clip_model: nn.Module,
        classnames: Sequence[str],
        n_ctx: int = 16,
        ctx_init: str = "",
        csc: bool = False,
        class_token_position: str = "end",
    ) -> None:
        super().__init__()
        vectors, prefix_text = init_context(clip_model, n_ctx, ctx_init, n_cls=len(classnames) if csc else 0)
        n_ctx = vectors.shape[-2]
        logger.info(
            'CoOp: initial context "%s" (%d tokens, %s), class token at the %s',
            prefix_text, n_ctx, "class-specific" if csc else "shared", class_token_position,
        )  # fmt: skip
        self.ctx = nn.Parameter(vectors)
        self.prompts = ClassPrompts(clip_model, classnames, n_ctx)
        self.class_token_position = class_token_position
        order = class_token_order(n_ctx, self.prompts.name_lens, self.prompts.seq_len, class_token_position)
        self.register_buffer("order", order, persistent=False)

    def forward(self) -> torch.Tensor:
        """Prompt embeddings (C, L, D) for every class (L: truncated length)."""
        prompts = self.prompts.full(self.ctx)
        if self.class_token_position == "end":
            return prompts
        index = self.order.unsqueeze(-1).expand(-1, -1, prompts.shape[-1])
        return prompts.gather(1, index)


class CoOpModel(FrozenImageModel):
    """CLIP with CoOp's learned prompts: ``forward(images) -> logits (B, C)``."""

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], **options) -> None:
        """``options``: those of :class:`CoOpPromptLearner` (n_ctx, ctx_init, csc, class_token_position)."""
        super().__init__()
        freeze(clip_model)
        self.prompt_learner = CoOpPromptLearner(clip_model, classnames, **options)
        self.text_encoder = TextEncoder(clip_model)
        self.visual = VisualEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale

    def text_features(self) -> torch.Tensor:
        """Normalised class text features (C, E)."""
        prompts = self.prompt_learner()
        feats = self.text_encoder(prompts, self.prompt_learner.prompts.eot)
        return F.normalize(feats.float(), dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of image features (B, E) against normalised class text features (C, E)."""
        return cosine_logits(self.logit_scale, image_features, text_features)

    def forward_visual(self, visual: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, C) from the image features."""
        return self.logits(visual["features"], self.text_features())
