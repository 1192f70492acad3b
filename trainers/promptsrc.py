"""PromptSRC trainer (Dassl adapter for :class:`models.promptsrc.PromptSRCModel`), upstream keys
``TRAINER.PROMPTSRC.*``, with Gaussian prompt aggregation over the epochs.

The frozen text side of the self-regularisation is the dataset's template plus the remote-sensing ensemble
(:func:`models.prompts.ensemble_templates`). After every epoch the prompts are added to the Gaussian-weighted
sum; after the last one they are replaced by it, before the last checkpoint is written and the model tested,
so ``model.pth.tar-N`` holds the aggregated prompts, as upstream. The running sum is saved in every
checkpoint, so a resumed run aggregates exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging

from dassl.engine import TRAINER_REGISTRY
from yacs.config import CfgNode as CN

from models.prompts import ensemble_templates
from models.promptsrc import GaussianPromptAggregation, PromptSRCModel, upstream_promptsrc_state
from trainers.base import PromptTrainer

logger = logging.getLogger(__name__)


def add_config(cfg: CN) -> None:
    """``TRAINER.PROMPTSRC`` with upstream defaults."""
    cfg.TRAINER.PROMPTSRC = CN()
    cfg.TRAINER.PROMPTSRC.N_CTX_VISION = 4  # vision prompt tokens
    cfg.TRAINER.PROMPTSRC.N_CTX_TEXT = 4  # learned text context tokens (the first N_CTX_TEXT tokens of CTX_INIT)
    cfg.TRAINER.PROMPTSRC.CTX_INIT = "a photo of a"  # initialisation words of the text context
    cfg.TRAINER.PROMPTSRC.PREC = "fp16"  # fp16 | fp32 | amp | bf16
    cfg.TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION = 9  # vision layers with prompts (0 = no vision prompts)
    cfg.TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT = 9  # text layers with prompts, >= 1
    cfg.TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT = 25  # L1 between prompted and frozen text features
    cfg.TRAINER.PROMPTSRC.IMAGE_LOSS_WEIGHT = 10  # L1 between prompted and frozen image features
    cfg.TRAINER.PROMPTSRC.GPA_MEAN = 15  # Gaussian prompt aggregation: mean epoch (1-based)
    cfg.TRAINER.PROMPTSRC.GPA_STD = 1  # and its standard deviation in epochs


@TRAINER_REGISTRY.register()
class PromptSRC(PromptTrainer):
    """Self-regulating prompts: deep vision-language prompts kept near frozen CLIP, aggregated over epochs."""

    CONFIG_NODE = "PROMPTSRC"
    MODEL = PromptSRCModel

    @classmethod
    def model_arguments(cls, cfg, template, caption_dim=0):
        node = cfg.TRAINER.PROMPTSRC
        return {
            "templates": ensemble_templates(template),
            "text_weight": node.TEXT_LOSS_WEIGHT,
            "image_weight": node.IMAGE_LOSS_WEIGHT,
            "n_ctx_text": node.N_CTX_TEXT,
            "n_ctx_vision": node.N_CTX_VISION,
            "ctx_init": node.CTX_INIT,
            "prompt_depth_text": node.PROMPT_DEPTH_TEXT,
            "prompt_depth_vision": node.PROMPT_DEPTH_VISION,
        }

    def build_prompt_model(self, clip_model, classnames):
        node = self.cfg.TRAINER.PROMPTSRC
        self.gpa = GaussianPromptAggregation(self.cfg.OPTIM.MAX_EPOCH, node.GPA_MEAN, node.GPA_STD)
        return super().build_prompt_model(clip_model, classnames)

    def on_epoch_end(self) -> None:
        self.gpa.add(self.epoch, self.model.prompt_learner)

    def final_weights(self) -> None:
        self.gpa.load_into(self.model.prompt_learner)
        logger.info("Prompts: the Gaussian-weighted aggregate over %d epochs (GPA)", len(self.gpa.weights))

    def trainer_state(self) -> dict:
        return {"gpa": self.gpa.state_dict()}

    def load_trainer_state(self, state: dict) -> None:
        self.gpa.load_state_dict(state["gpa"])

    def convert_checkpoint_state(self, state, path):
        return upstream_promptsrc_state(state)
