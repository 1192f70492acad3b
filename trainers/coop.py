"""CoOp trainer (Dassl adapter for :class:`models.coop.CoOpModel`), upstream keys ``TRAINER.COOP.*``."""

from __future__ import annotations

from dassl.engine import TRAINER_REGISTRY
from yacs.config import CfgNode as CN

from models.coop import CoOpModel
from trainers.base import PromptTrainer


def add_config(cfg: CN) -> None:
    """``TRAINER.COOP`` with upstream defaults."""
    cfg.TRAINER.COOP = CN()
    cfg.TRAINER.COOP.N_CTX = 16  # number of context vectors (CTX_INIT's token count when it is set)
    cfg.TRAINER.COOP.CSC = False  # class-specific context
    cfg.TRAINER.COOP.CTX_INIT = ""  # initialisation words, e.g. "a photo of a" ("" = random)
    cfg.TRAINER.COOP.PREC = "fp16"  # fp16 | fp32 | amp | bf16
    cfg.TRAINER.COOP.CLASS_TOKEN_POSITION = "end"  # end | middle | front


def coop_options(node: CN) -> dict:
    """The options of :class:`models.coop.CoOpModel` from ``TRAINER.COOP`` (CoOp's and KgCoOp's node)."""
    return {"n_ctx": node.N_CTX, "ctx_init": node.CTX_INIT, "csc": node.CSC,
            "class_token_position": node.CLASS_TOKEN_POSITION}  # fmt: skip


@TRAINER_REGISTRY.register()
class CoOp(PromptTrainer):
    """Context Optimization: learned prompt context shared by all classes (or one per class)."""

    CONFIG_NODE = "COOP"
    MODEL = CoOpModel

    @classmethod
    def model_arguments(cls, cfg, template, caption_dim=0):
        return coop_options(cfg.TRAINER.COOP)
