"""APPLeNet trainer (Dassl adapter for :class:`models.applenet.APPLeNetModel`), upstream keys.

Upstream's config keys and defaults: ``TRAINER.APPLENET.{N_CTX, CTX_INIT, PREC}`` and the top-level ``LOSS``
node (``NAME "apple"``, ``T``); ``LOSS.CRP_WEIGHT`` makes upstream's hard-coded penalty weight 0.05 a key.
The model's ``training_loss`` is cross-entropy plus the context-redundancy penalty
(:func:`models.applenet.applenet_loss`).
"""

from __future__ import annotations

from dassl.engine import TRAINER_REGISTRY
from yacs.config import CfgNode as CN

from common.errors import ConfigError
from models.applenet import CRP_WEIGHT, APPLeNetModel
from trainers.base import PromptTrainer


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
    MODEL = APPLeNetModel

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        if cfg.LOSS.NAME != "apple":
            raise ConfigError(f"LOSS.NAME is {cfg.LOSS.NAME!r}; APPLeNet implements only 'apple' (set LOSS.NAME apple).")

    @classmethod
    def model_arguments(cls, cfg, template, caption_dim=0):
        node, loss = cfg.TRAINER.APPLENET, cfg.LOSS
        return {"n_ctx": node.N_CTX, "ctx_init": node.CTX_INIT, "temperature": loss.T, "crp_weight": loss.CRP_WEIGHT}
