"""ZeroshotCLIP and ZeroshotCLIPEnsemble: hand-crafted prompts, no training.

``TRAINER.ZSCLIP.TEMPLATES`` names the prompts (:func:`models.prompts.resolve_templates`): a template set
(``dataset``, ``rs``, ``rs106``), a literal template with ``{}``, or several joined with ``+``. Empty means the
trainer's default: the dataset's template (ZeroshotCLIP) or it and the ``rs`` ensemble (ZeroshotCLIPEnsemble).
Several templates are an ensemble: their normalised text features are averaged.
"""

from __future__ import annotations

import logging

from dassl.engine import TRAINER_REGISTRY
from yacs.config import CfgNode as CN

from models.prompts import resolve_templates
from models.zsclip import ZeroshotModel
from trainers.base import PromptTrainer

logger = logging.getLogger(__name__)


def add_config(cfg: CN) -> None:
    """``TRAINER.ZSCLIP``: the zero-shot prompts."""
    cfg.TRAINER.ZSCLIP = CN()
    cfg.TRAINER.ZSCLIP.TEMPLATES = ""  # "" = the trainer's default; dataset | rs | rs106 | "a ... {}." | a+b


@TRAINER_REGISTRY.register()
class ZeroshotCLIP(PromptTrainer):
    """Zero-shot CLIP with the dataset's template (e.g. "a satellite photo of a {}.") or ``TEMPLATES``."""

    DEFAULT_TEMPLATES = "dataset"
    MODEL = ZeroshotModel

    @classmethod
    def model_arguments(cls, cfg, template, caption_dim=0):
        return {"templates": resolve_templates(cfg.TRAINER.ZSCLIP.TEMPLATES or cls.DEFAULT_TEMPLATES, template)}

    def templates(self) -> list[str]:
        """The prompts of ``TRAINER.ZSCLIP.TEMPLATES`` (or of the trainer's default)."""
        return self.model_arguments(self.cfg, self.dataset_template())["templates"]

    def build_prompt_model(self, clip_model, classnames):
        templates = self.templates()
        shown = templates if len(templates) <= 8 else [*templates[:3], "...", templates[-1]]
        logger.info("Zero-shot templates (%d): %s", len(templates), shown)
        return super().build_prompt_model(clip_model, classnames)

    def train(self) -> None:
        """Nothing to learn: evaluate on the test split."""
        logger.info("%s has no learnable parameters: skipping training, evaluating", type(self).__name__)
        self.test()


@TRAINER_REGISTRY.register()
class ZeroshotCLIPEnsemble(ZeroshotCLIP):
    """Zero-shot CLIP averaging the text features of the dataset template and a remote-sensing ensemble."""

    DEFAULT_TEMPLATES = "dataset+rs"
