"""APPLeNet trainer (Dassl adapter for :class:`models.applenet.APPLeNetModel`), upstream keys.

Upstream's config keys and defaults: ``TRAINER.APPLENET.{N_CTX, CTX_INIT, PREC}`` and the top-level ``LOSS``
node (``NAME "apple"``, ``T``); ``LOSS.CRP_WEIGHT`` makes upstream's hard-coded penalty weight 0.05 a key.
The loss is cross-entropy plus the context-redundancy penalty (:func:`models.applenet.applenet_loss`).
"""

from __future__ import annotations

import logging

from dassl.engine import TRAINER_REGISTRY
from yacs.config import CfgNode as CN

from models.applenet import CRP_WEIGHT, APPLeNetModel, applenet_loss
from trainers.base import PromptTrainer

logger = logging.getLogger(__name__)


def add_config(cfg: CN) -> None:
    """``TRAINER.APPLENET`` and ``LOSS`` with upstream defaults (its train.py)."""
    cfg.TRAINER.APPLENET = CN()
    cfg.TRAINER.APPLENET.N_CTX = 4  # number of context vectors (CTX_INIT's token count when it is set)
    cfg.TRAINER.APPLENET.CTX_INIT = ""  # initialisation words, e.g. "a photo of a" ("" = random)
    cfg.TRAINER.APPLENET.PREC = "fp16"  # fp16 | fp32 | amp | bf16
    cfg.LOSS = CN()
    cfg.LOSS.NAME = "apple"  # the only loss upstream implements: cross-entropy + context-redundancy penalty
    cfg.LOSS.T = 1.0  # temperature T of the penalty log10(-mean det(ctx ctx^T / T^3 - I / T))
    cfg.LOSS.CRP_WEIGHT = CRP_WEIGHT  # weight of the penalty (upstream hard-codes 0.05)


@TRAINER_REGISTRY.register()
class APPLeNet(PromptTrainer):
    """Visual-attention parameterised prompts: multi-scale visual features shift the context per image."""

    CONFIG_NODE = "APPLENET"

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        if cfg.LOSS.NAME != "apple":
            raise ValueError(f"LOSS.NAME is {cfg.LOSS.NAME!r}; APPLeNet implements only 'apple' (set LOSS.NAME apple).")
        if not cfg.LOSS.T > 0:
            raise ValueError(f"LOSS.T is {cfg.LOSS.T}; the penalty divides by it: set a positive LOSS.T (upstream: 1.0).")

    def build_prompt_model(self, clip_model, classnames):
        node = self.cfg.TRAINER.APPLENET
        return APPLeNetModel(clip_model, classnames, n_ctx=node.N_CTX, ctx_init=node.CTX_INIT)

    def compute_loss(self, images, labels, extras):
        logits, ctx = self.model.forward_with_context(images, **extras)
        loss, defined = applenet_loss(logits, labels, ctx, self.cfg.LOSS.T, self.cfg.LOSS.CRP_WEIGHT)
        if not defined:
            self._undefined_penalties = getattr(self, "_undefined_penalties", 0) + 1
            log = logger.warning if self._undefined_penalties == 1 else logger.debug
            log(
                "Context-redundancy penalty undefined for a batch (mean determinant >= 0, so its log10 has no "
                "value; upstream's loss would be NaN): this step trains on the cross-entropy alone "
                "(%d such batches so far; later ones are logged at debug level).",
                self._undefined_penalties,
            )
        return loss, logits
