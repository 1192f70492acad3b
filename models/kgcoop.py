"""KgCoOp (Yao et al., CVPR 2023): CoOp's context kept close to the hand-crafted prompt's knowledge.

The prompts, logits and learnable context are CoOp's (:class:`models.coop.CoOpModel`; upstream runs it with
``N_CTX 4`` initialised from "a photo of a"). Training adds the knowledge-guided term: one minus the mean
cosine similarity between the learned class text features and frozen CLIP's features of the dataset's
hand-written template, weighted by ``W`` (upstream ``TRAINER.COOP.W``, 8.0 in every upstream run):
``loss = CE + W * (1 - mean_c cos(w_c, w_c^clip))``. For unit vectors ``1 - cos`` is half the squared
Euclidean distance the paper writes. The image encoder is CLIP's, frozen and unprompted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.coop import CoOpModel
from models.prompts import template_text_features

#: upstream unused parameters of the KgCoOp prompt learner, present in its checkpoints (never trained there)
UPSTREAM_UNUSED_KEYS = ("bias_vectors", "meta_net.")


def knowledge_guided_loss(
    logits: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, clip_text: torch.Tensor, weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``CE(logits, labels) + weight * (1 - mean cos(text, clip_text))`` and its two terms (detached).

    ``text`` (C, E) are the learned class text features, ``clip_text`` (C, E) the hand-crafted prompt's.
    """
    ce = F.cross_entropy(logits, labels)
    kg = 1.0 - F.cosine_similarity(text, clip_text, dim=-1, eps=1e-7).mean()
    return ce + weight * kg, {"loss_ce": ce.detach(), "loss_kg": kg.detach()}


def upstream_kgcoop_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An upstream KgCoOp ``prompt_learner`` state dict without its unused ``bias_vectors`` and ``meta_net``."""
    return {k: v for k, v in state.items() if not k.startswith(UPSTREAM_UNUSED_KEYS)}


class KgCoOpModel(CoOpModel):
    """CoOp's model with the knowledge-guided training loss: ``forward(images) -> logits (B, C)``."""

    def __init__(
        self, clip_model: nn.Module, classnames: Sequence[str], template: str, weight: float = 8.0, **options
    ) -> None:
        """``template`` (e.g. ``"a satellite photo of a {}."``) is the hand-crafted prompt, ``weight`` is ``W``;
        ``options`` are CoOp's (n_ctx, ctx_init, csc, class_token_position)."""
        super().__init__(clip_model, classnames, **options)
        self.weight = float(weight)
        clip_text = template_text_features(clip_model, classnames, [template])
        self.register_buffer("clip_text_features", clip_text, persistent=False)

    def training_loss(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, logits (B, C), terms)`` of a training batch (docstring of the module)."""
        text = self.text_features()
        logits = self.logits(self.encode_visual(images)["features"], text)
        loss, terms = knowledge_guided_loss(logits, labels, text, self.clip_text_features, self.weight)
        return loss, logits, terms
