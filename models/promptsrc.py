"""PromptSRC (Khattak et al., ICCV 2023): independent vision-language deep prompts that regularise themselves.

- Prompts: independent deep prompts in both towers (upstream's IVLP design; no coupling, unlike MaPLe). Text:
  ``[SOS] ctx_1..ctx_n <rest of CTX_INIT> <classname> . [EOS]`` with the context replaced before text layers
  ``1..PROMPT_DEPTH_TEXT-1`` by ``text_deep``; vision: ``VPT`` (N_CTX_VISION tokens) appended to the patch
  tokens, replaced before vision layers ``1..PROMPT_DEPTH_VISION-1`` by ``vision_deep``
  (:class:`models.deep_prompts.DeepPromptModel`, shared with MaPLe). PROMPT_DEPTH_VISION 0 prompts no image.
- Self-regularisation (training only): the prompted text features are pulled towards frozen CLIP's features of
  a template ensemble (L1, ``TEXT_LOSS_WEIGHT``), the prompted image features towards frozen CLIP's image
  features (L1, ``IMAGE_LOSS_WEIGHT``), and the prompted logits towards the zero-shot logits of those frozen
  features (KL(zero-shot || prompted) summed and divided by B x C, weight 1):
  ``loss = CE + w_t L1(t, t_zs) + w_i L1(f, f_zs) + KL / (B C)``.
  Upstream averages the raw (unnormalised) features of its templates, then normalises: so does this model.
- Gaussian prompt aggregation (GPA): after the last epoch the prompts become ``sum_e w_e theta_e`` over the
  epochs' prompts ``theta_e``, with ``w_e`` proportional to a Gaussian density at epoch ``e = 1..N`` (mean
  ``GPA_MEAN``, std ``GPA_STD``) and summing to one (:class:`GaussianPromptAggregation`).

State-dict keys of ``prompt_learner``: ``ctx``, ``VPT``, ``text_deep.K``, ``vision_deep.K`` (K = layer - 1).
Upstream saves the whole model; :func:`upstream_promptsrc_state` maps its prompt keys onto these.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError, ExpectedError
from models.deep_prompts import (
    DeepPromptModel,
    capped_depth,
    random_prompt,
    random_prompts,
    require_vit,
    word_context,
)
from models.prompts import ClassPrompts, template_text_features

logger = logging.getLogger(__name__)

UPSTREAM_DEEP_KEY = re.compile(r"(text|image)_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow")


def upstream_promptsrc_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``prompt_learner`` state from an upstream PromptSRC state dict (the whole model); ours unchanged.

    Upstream keys: ``prompt_learner.ctx``, ``image_encoder.VPT`` and ``{text,image}_encoder.transformer.
    resblocks.L.VPT_shallow`` (L >= 1); its frozen CLIP weights and class buffers are dropped.
    """
    if "prompt_learner.ctx" not in state:
        return dict(state)
    out = {"ctx": state["prompt_learner.ctx"]}
    if "image_encoder.VPT" in state:
        out["VPT"] = state["image_encoder.VPT"]
    for key, value in state.items():
        match = UPSTREAM_DEEP_KEY.fullmatch(key)
        if match:
            tower = "text" if match.group(1) == "text" else "vision"
            out[f"{tower}_deep.{int(match.group(2)) - 1}"] = value
    return out


class PromptSRCPromptLearner(nn.Module):
    """Every learnable PromptSRC parameter: text context and deep text prompts, vision prompts."""

    def __init__(
        self,
        clip_model: nn.Module,
        classnames: Sequence[str],
        n_ctx_text: int = 4,
        n_ctx_vision: int = 4,
        ctx_init: str = "a photo of a",
        prompt_depth_text: int = 9,
        prompt_depth_vision: int = 9,
    ) -> None:
        super().__init__()
        width = clip_model.ln_final.weight.shape[0]
        vis_width = clip_model.visual.conv1.weight.shape[0]
        depth_text = capped_depth(
            "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", prompt_depth_text, len(clip_model.transformer.resblocks)
        )
        depth_vision = capped_depth(
            "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", prompt_depth_vision,
            len(clip_model.visual.transformer.resblocks), minimum=0,
        )  # fmt: skip
        ctx, fixed, text = word_context(clip_model, n_ctx_text, ctx_init, "PromptSRC")
        logger.info(
            'PromptSRC: initial text "%s", %d text / %d vision prompt tokens, depth %d text / %d vision',
            text, n_ctx_text, n_ctx_vision if depth_vision else 0, depth_text, depth_vision,
        )  # fmt: skip
        self.n_ctx = n_ctx_text
        self.ctx = nn.Parameter(ctx)
        self.register_buffer("fixed_ctx", fixed, persistent=False)  # words of CTX_INIT after the learned ones
        self.text_deep = random_prompts(depth_text - 1, n_ctx_text, width)
        self.VPT = random_prompt(n_ctx_vision, vis_width) if depth_vision else None
        self.vision_deep = random_prompts(max(depth_vision - 1, 0), n_ctx_vision, vis_width)
        self.prompts = ClassPrompts(clip_model, classnames, n_ctx_text + fixed.shape[0])

    def forward(self) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
        """``(text prompts (C, L, D), deep text prompts, vision prompt (n, Dv) or None, deep vision prompts)``."""
        context = torch.cat([self.ctx, self.fixed_ctx.to(self.ctx.dtype)], dim=0)
        return self.prompts.full(context), list(self.text_deep), self.VPT, list(self.vision_deep)


class Views(NamedTuple):
    """What one branch (prompted, or frozen zero-shot) says about a batch."""

    logits: torch.Tensor  # (B, C)
    text: torch.Tensor  # normalised class text features (C, E)
    image: torch.Tensor  # normalised image features (B, E)


def self_regularised_loss(
    prompted: Views, frozen: Views, labels: torch.Tensor, text_weight: float, image_weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PromptSRC's training loss and its four terms (weighted, detached); see the module docstring."""
    ce = F.cross_entropy(prompted.logits, labels)
    text = text_weight * F.l1_loss(prompted.text, frozen.text)
    image = image_weight * F.l1_loss(prompted.image, frozen.image)
    log_p, log_q = F.log_softmax(prompted.logits, dim=-1), F.log_softmax(frozen.logits, dim=-1)
    kl = F.kl_div(log_p, log_q, reduction="sum", log_target=True) / prompted.logits.numel()  # KL(q || p)
    terms = {"loss_ce": ce, "loss_text": text, "loss_image": image, "loss_logits": kl}
    return ce + text + image + kl, {k: v.detach() for k, v in terms.items()}


class PromptSRCModel(DeepPromptModel):
    """CLIP with PromptSRC's prompts: ``forward(images) -> logits (B, C)``, ``training_loss`` for training."""

    def __init__(
        self,
        clip_model: nn.Module,
        classnames: Sequence[str],
        templates: Sequence[str],
        text_weight: float = 25.0,
        image_weight: float = 10.0,
        **options,
    ) -> None:
        """``templates``: the frozen text side's ensemble; ``options``: those of :class:`PromptSRCPromptLearner`."""
        require_vit(clip_model, "PromptSRC")
        super().__init__(clip_model, PromptSRCPromptLearner(clip_model, classnames, **options))
        self.text_weight, self.image_weight = float(text_weight), float(image_weight)
        frozen = template_text_features(clip_model, classnames, templates, normalize_each=False)
        self.register_buffer("frozen_text_features", frozen, persistent=False)

    def frozen_views(self, images: torch.Tensor) -> Views:
        """Frozen CLIP's (zero-shot) logits, text and image features of a batch (no graph)."""
        with torch.no_grad():
            feats, _ = self.visual(images)
            image = F.normalize(feats.float(), dim=-1)
            return Views(self.similarity(image, self.frozen_text_features), self.frozen_text_features, image)

    def training_loss(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, logits (B, C), terms)`` of a training batch (:func:`self_regularised_loss`)."""
        image, text = self.features(images)
        prompted = Views(self.similarity(image, text), text, image)
        loss, terms = self_regularised_loss(
            prompted, self.frozen_views(images), labels, self.text_weight, self.image_weight
        )
        return loss, prompted.logits, terms


# ----------------------------------------------------------------------------------------------------------
# Gaussian prompt aggregation
# ----------------------------------------------------------------------------------------------------------
def gaussian_epoch_weights(n_epochs: int, mean: float, std: float) -> list[float]:
    """Weights of epochs 1..n: a Gaussian density (``mean``, ``std``) at each epoch, normalised to sum 1.

    Computed from the log-densities (a softmax), so a mean far from every epoch cannot underflow to 0/0.
    """
    if std <= 0:
        raise ConfigError(f"TRAINER.PROMPTSRC.GPA_STD is {std}; it must be > 0 (upstream: 1 for base-to-new).")
    log_density = torch.tensor([-0.5 * ((e - mean) / std) ** 2 for e in range(1, n_epochs + 1)], dtype=torch.float64)
    return torch.softmax(log_density, dim=0).tolist()


class GaussianPromptAggregation:
    """Running Gaussian-weighted sum over epochs of a module's parameters (accumulated in fp32)."""

    def __init__(self, n_epochs: int, mean: float, std: float) -> None:
        self.weights = gaussian_epoch_weights(n_epochs, mean, std)
        self.epochs: list[int] = []
        self.total: dict[str, torch.Tensor] = {}

    def add(self, epoch: int, module: nn.Module) -> None:
        """Add the parameters of ``module`` after epoch ``epoch`` (0-based) with that epoch's weight."""
        weight = self.weights[epoch]
        with torch.no_grad():
            for name, param in module.named_parameters():
                term = weight * param.detach().float()
                self.total[name] = self.total[name].to(term.device) + term if name in self.total else term
        self.epochs.append(epoch)

    def load_into(self, module: nn.Module) -> None:
        """Set the parameters of ``module`` to the aggregate; every epoch must have been added."""
        if sorted(self.epochs) != list(range(len(self.weights))):
            raise ExpectedError(
                f"Gaussian prompt aggregation holds epochs {[e + 1 for e in sorted(self.epochs)]} of "
                f"1..{len(self.weights)}: the run resumed from a checkpoint without the aggregation state. "
                "Train again from scratch (remove the output folder)."
            )
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(self.total[name])

    def state_dict(self) -> dict:
        """Tensors and plain numbers (loads with ``torch.load(weights_only=True)``)."""
        return {"epochs": list(self.epochs), "total": {k: v.cpu() for k, v in self.total.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.epochs = [int(e) for e in state["epochs"]]
        self.total = dict(state["total"])
