"""MaPLe trainer (Dassl adapter for :class:`models.maple.MaPLeModel`), upstream keys ``TRAINER.MAPLE.*``.

Upstream MaPLe saves the whole model under ``MultiModalPromptLearner/``, with keys ``prompt_learner.*``;
such a state dict loads here: the prefix is stripped and the frozen CLIP weights are ignored.
"""

from __future__ import annotations

from dassl.engine import TRAINER_REGISTRY
from yacs.config import CfgNode as CN

from models.maple import MaPLeModel, upstream_prompt_learner_state
from trainers.base import PromptTrainer


def add_config(cfg: CN) -> None:
    """``TRAINER.MAPLE`` with upstream defaults."""
    cfg.TRAINER.MAPLE = CN()
    cfg.TRAINER.MAPLE.N_CTX = 2  # number of learned context tokens (the first N_CTX tokens of CTX_INIT)
    cfg.TRAINER.MAPLE.CTX_INIT = "a photo of a"  # initialisation words
    cfg.TRAINER.MAPLE.PREC = "fp16"  # fp16 | fp32 | amp | bf16
    cfg.TRAINER.MAPLE.PROMPT_DEPTH = 9  # layers with prompts, >= 1 (1 = shallow MaPLe); capped at the layer count


@TRAINER_REGISTRY.register()
class MaPLe(PromptTrainer):
    """Multi-modal Prompt Learning: coupled deep prompts in the text and the image encoder."""

    CONFIG_NODE = "MAPLE"
    MODEL = MaPLeModel

    @classmethod
    def model_arguments(cls, cfg, template, caption_dim=0):
        node = cfg.TRAINER.MAPLE
        return {"n_ctx": node.N_CTX, "ctx_init": node.CTX_INIT, "prompt_depth": node.PROMPT_DEPTH}

    def convert_checkpoint_state(self, state, path):
        return upstream_prompt_learner_state(state)
