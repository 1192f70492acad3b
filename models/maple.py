"""MaPLe (Khattak et al., CVPR 2023): coupled deep prompts in the language and the vision branch.

- Language: ``[SOS] ctx_1..ctx_n <rest of CTX_INIT> <classname> . [EOS]``; before transformer layers
  ``1..J-1`` the n context positions are replaced by the layer's own learnable prompts
  (``compound_prompts_text``). As upstream, the context is the first N_CTX tokens of CTX_INIT
  (``"a photo of a"`` and 2 tokens: ``a photo`` is learned, ``of a`` stays as fixed words).
- Vision: ``proj(ctx)`` (language-to-vision coupling, Linear(text width, vision width)) is appended to the
  patch tokens after the positional embedding; before layers ``1..J-1`` those n tokens are replaced by
  ``compound_prompt_projections[i](compound_prompts_text[i])``.

``J`` is ``prompt_depth`` (upstream ``PROMPT_DEPTH``, 1 = shallow MaPLe); it is capped at the number of
layers of the shallower tower. The prompted towers are :class:`models.deep_prompts.DeepPromptModel`'s
(shared with PromptSRC): CLIP's stock residual blocks with the prompt tokens replaced between blocks.

State-dict keys of ``prompt_learner`` are upstream's (``ctx``, ``proj.*``, ``compound_prompts_text.N``,
``compound_prompt_projections.N.*``); upstream checkpoints prefix them with ``prompt_learner.``, which
:func:`upstream_prompt_learner_state` strips.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from models.deep_prompts import DeepPromptModel, capped_depth, random_prompts, require_vit, word_context
from models.prompts import ClassPrompts

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
        width = clip_model.ln_final.weight.shape[0]
        vis_width = clip_model.visual.conv1.weight.shape[0]
        n_layers = min(len(clip_model.transformer.resblocks), len(clip_model.visual.transformer.resblocks))
        depth = capped_depth("TRAINER.MAPLE.PROMPT_DEPTH", prompt_depth, n_layers)
        ctx, fixed, text = word_context(clip_model, n_ctx, ctx_init, "MaPLe")
        logger.info('MaPLe: initial text "%s", %d learned context tokens, prompt depth %d', text, n_ctx, depth)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx)
        self.register_buffer("fixed_ctx", fixed, persistent=False)  # words of CTX_INIT after the learned ones
        self.proj = nn.Linear(width, vis_width)
        self.compound_prompts_text = random_prompts(depth - 1, n_ctx, width)
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


class MaPLeModel(DeepPromptModel):
    """CLIP with MaPLe's multi-modal prompts: ``forward(images) -> logits (B, C)``."""

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], **options) -> None:
        """``options``: those of :class:`MaPLePromptLearner` (n_ctx, ctx_init, prompt_depth)."""
        require_vit(clip_model, "MaPLe")
        super().__init__(clip_model, MaPLePromptLearner(clip_model, classnames, **options))
