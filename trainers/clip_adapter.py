"""CLIP-Adapter trainer (Dassl adapter for :class:`models.clip_adapter.CLIPAdapterModel`).

Upstream (gaopengcuhk/CLIP-Adapter) registers the trainer ``CLIP_Adapter`` and hard-codes the reduction (4)
and the residual ratio (0.2); here they are ``TRAINER.CLIP_ADAPTER.{REDUCTION, RATIO}``. Upstream runs CLIP in
fp32 (``PREC fp32``). The classifier uses the dataset's hand-crafted template, as ZeroshotCLIP does.
"""

from __future__ import annotations

import logging

from dassl.engine import TRAINER_REGISTRY
from yacs.config import CfgNode as CN

from models.clip_adapter import CLIPAdapterModel
from trainers.base import PromptTrainer

logger = logging.getLogger(__name__)


def add_config(cfg: CN) -> None:
    """``TRAINER.CLIP_ADAPTER`` with upstream's values."""
    cfg.TRAINER.CLIP_ADAPTER = CN()
    cfg.TRAINER.CLIP_ADAPTER.REDUCTION = 4  # bottleneck: feature width / REDUCTION
    cfg.TRAINER.CLIP_ADAPTER.RATIO = 0.2  # residual ratio: RATIO * adapter(f) + (1 - RATIO) * f
    cfg.TRAINER.CLIP_ADAPTER.PREC = "fp32"  # fp32 | fp16 | amp | bf16 (upstream: fp32)


@TRAINER_REGISTRY.register()
class CLIP_Adapter(PromptTrainer):  # upstream's registered name
    """CLIP-Adapter: a residual bottleneck adapter on the frozen image feature, frozen template classifier."""

    CONFIG_NODE = "CLIP_ADAPTER"
    MODEL = CLIPAdapterModel

    @classmethod
    def model_arguments(cls, cfg, template, caption_dim=0):
        node = cfg.TRAINER.CLIP_ADAPTER
        return {"template": template, "reduction": node.REDUCTION, "ratio": node.RATIO}

    def build_prompt_model(self, clip_model, classnames):
        logger.info("CLIP-Adapter classifier template: %r", self.dataset_template())
        return super().build_prompt_model(clip_model, classnames)
