"""ZeroshotCLIP and ZeroshotCLIPEnsemble: hand-crafted prompts, no training."""

from __future__ import annotations

import logging

from dassl.engine import TRAINER_REGISTRY

from models.prompts import ensemble_templates
from models.zsclip import ZeroshotModel
from trainers.base import PromptTrainer

logger = logging.getLogger(__name__)


@TRAINER_REGISTRY.register()
class ZeroshotCLIP(PromptTrainer):
    """Zero-shot CLIP with the dataset's template (e.g. "a satellite photo of a {}.")."""

    def templates(self) -> list[str]:
        return [self.dataset_template()]

    def build_prompt_model(self, clip_model, classnames):
        templates = self.templates()
        logger.info("Zero-shot templates: %s", templates)
        return ZeroshotModel(clip_model, classnames, templates)

    def train(self) -> None:
        """Nothing to learn: evaluate on the test split."""
        logger.info("%s has no learnable parameters: skipping training, evaluating", type(self).__name__)
        self.test()


@TRAINER_REGISTRY.register()
class ZeroshotCLIPEnsemble(ZeroshotCLIP):
    """Zero-shot CLIP averaging the text features of the dataset template and a remote-sensing ensemble."""

    def templates(self) -> list[str]:
        return ensemble_templates(self.dataset_template())
