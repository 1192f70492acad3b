"""KgCoOp trainer (Dassl adapter for :class:`models.kgcoop.KgCoOpModel`).

As upstream, KgCoOp reads CoOp's config node ``TRAINER.COOP`` (``N_CTX``, ``CTX_INIT``, ``CSC``,
``CLASS_TOKEN_POSITION``, ``PREC``) plus its weight ``TRAINER.COOP.W``, so upstream command lines carry over.
The hand-crafted prompt is the dataset's template (the catalogue's or ``DATASET.TEMPLATE``).
"""

from __future__ import annotations

from dassl.engine import TRAINER_REGISTRY
from yacs.config import CfgNode as CN

from models.kgcoop import KgCoOpModel, upstream_kgcoop_state
from trainers.base import PromptTrainer
from trainers.coop import add_config as add_coop_config
from trainers.coop import coop_options


def add_config(cfg: CN) -> None:
    """``TRAINER.COOP.W``, the knowledge-guided weight, in CoOp's node (created first if it is missing)."""
    if "COOP" not in cfg.TRAINER:
        add_coop_config(cfg)
    cfg.TRAINER.COOP.W = 8.0  # upstream's code default is 1.0; every upstream script and the paper use 8.0


@TRAINER_REGISTRY.register()
class KgCoOp(PromptTrainer):
    """Knowledge-guided Context Optimization: CoOp whose class text features stay near the hand-crafted prompt's."""

    CONFIG_NODE = "COOP"
    MODEL = KgCoOpModel

    @classmethod
    def model_arguments(cls, cfg, template, caption_dim=0):
        return {"template": template, "weight": cfg.TRAINER.COOP.W, **coop_options(cfg.TRAINER.COOP)}

    def convert_checkpoint_state(self, state, path):
        return upstream_kgcoop_state(state)
