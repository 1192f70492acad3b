"""BiMoRS trainer: caption vectors come from the dataset's caption store, gathered per batch from memory."""

from __future__ import annotations

import logging

from dassl.engine import TRAINER_REGISTRY
from yacs.config import CfgNode as CN

from datasets.captions import DEFAULT_CAPTIONER, DEFAULT_ENCODER, load_caption_features, to_relpath
from models.bimors import BiMoRSModel
from trainers.base import CheckpointMismatchError, PromptTrainer

logger = logging.getLogger(__name__)


def add_config(cfg: CN) -> None:
    """``TRAINER.BIMORS`` keys (defaults follow the paper; see configs/trainers/BiMoRS/)."""
    cfg.TRAINER.BIMORS = CN()
    cfg.TRAINER.BIMORS.N_CTX = 4  # context vectors
    cfg.TRAINER.BIMORS.CTX_INIT = "a photo of a"  # their initialisation
    cfg.TRAINER.BIMORS.N_HEADS = 4  # cross-attention heads
    cfg.TRAINER.BIMORS.PREC = "amp"  # fp32 | fp16 | amp | bf16
    cfg.TRAINER.BIMORS.CAPTION_PROJ_TRAINABLE = True  # False = the published code's frozen random projection
    cfg.TRAINER.BIMORS.CAPTIONER = DEFAULT_CAPTIONER  # hub id or local folder (tools.captions --captioner)
    cfg.TRAINER.BIMORS.CAPTION_ENCODER = DEFAULT_ENCODER  # hub id or local folder (tools.captions --encoder)


@TRAINER_REGISTRY.register()
class BiMoRS(PromptTrainer):
    """Bi-modal prompt learning: context shifted by cross-attention over an image token and a caption token."""

    CONFIG_NODE = "BIMORS"
    MODEL = BiMoRSModel
    NEEDS_CAPTIONS = True

    def build_prompt_model(self, clip_model, classnames):
        node = self.cfg.TRAINER.BIMORS
        dataset = self.dm.dataset
        self.image_dir = dataset.image_dir
        captions = load_caption_features(
            dataset.dataset_dir, node.CAPTIONER, node.CAPTION_ENCODER, dataset=self.cfg.DATASET.NAME
        )
        # Fail before training, not in the middle of an epoch, if any image used by this run lacks a caption.
        used = [d.impath for split in (dataset.train_x, dataset.val, dataset.test) for d in split or []]
        captions.index(self.relpaths(used))
        self.caption_index = captions
        self.caption_table = captions.features.to(self.device)
        logger.info("Caption vectors: %d x %d from %s", len(captions), captions.dim, captions.path)
        return self.MODEL(clip_model, classnames, **self.model_arguments(self.cfg, self.dataset_template(), captions.dim))

    @classmethod
    def model_arguments(cls, cfg, template, caption_dim=0):
        node = cfg.TRAINER.BIMORS
        return {"caption_dim": caption_dim, "n_ctx": node.N_CTX, "ctx_init": node.CTX_INIT, "n_heads": node.N_HEADS,
                "caption_proj_trainable": node.CAPTION_PROJ_TRAINABLE}  # fmt: skip

    def relpaths(self, impaths: list[str]) -> list[str]:
        """Caption-store keys: image paths relative to the dataset's ``images/`` folder."""
        return [to_relpath(p, self.image_dir) for p in impaths]

    def batch_extras(self, batch: dict) -> dict:
        rows = self.caption_index.index(self.relpaths(batch["impath"])).to(self.device)
        return {"captions": self.caption_table[rows]}

    def convert_checkpoint_state(self, state: dict, path) -> dict:
        key = "caption_proj.weight"
        if key in state and state[key].shape[1] != self.caption_table.shape[1]:
            raise CheckpointMismatchError(
                f"Checkpoint {path} was trained with {state[key].shape[1]}-d caption vectors, but the caption store "
                f"for this dataset has {self.caption_table.shape[1]}-d vectors. Use the caption encoder the model "
                "was trained with (TRAINER.BIMORS.CAPTION_ENCODER)."
            )
        return state
