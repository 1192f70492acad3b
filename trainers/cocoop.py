"""CoCoOp trainer (Dassl adapter for :class:`models.cocoop.CoCoOpModel`), upstream keys ``TRAINER.COCOOP.*``."""

from __future__ import annotations

from dassl.engine import TRAINER_REGISTRY
from yacs.config import CfgNode as CN

from models.cocoop import CoCoOpModel
from trainers.base import PromptTrainer


def add_config(cfg: CN) -> None:
    """``TRAINER.COCOOP`` with upstream defaults."""
    cfg.TRAINER.COCOOP = CN()
    cfg.TRAINER.COCOOP.N_CTX = 16  # number of context vectors (CTX_INIT's token count when it is set)
    cfg.TRAINER.COCOOP.CTX_INIT = ""  # initialisation words, e.g. "a photo of a" ("" = random)
    cfg.TRAINER.COCOOP.PREC = "fp16"  # fp16 | fp32 | amp | bf16


@TRAINER_REGISTRY.register()
class CoCoOp(PromptTrainer):
    """Conditional Context Optimization: context shifted per image by a meta-net on the image feature."""

    CONFIG_NODE = "COCOOP"
    MODEL = CoCoOpModel

    @classmethod
    def model_arguments(cls, cfg, template, caption_dim=0):
        return {"n_ctx": cfg.TRAINER.COCOOP.N_CTX, "ctx_init": cfg.TRAINER.COCOOP.CTX_INIT}
