"""APPLeNet (Jha, Singha et al., CVPR-W EarthVision 2023): visual-attention parameterised prompts (pure PyTorch).

Per image, the multi-scale visual feature is the token mean of each ViT layer's output, each through its own
linear map to the image-feature width E, stacked with the final (normalised) image feature: (B, L + 1, E).
The injection block averages these L + 1 scales, applies a squeeze-excitation attention (E -> E/16 -> E,
sigmoid) twice with shared weights, each time with a residual concatenation and a linear map
(2E -> E, then 2E -> D); the meta-net (D -> D/16 -> D) turns the result into a shift of every context vector,
so image b's prompts are ``[SOS] (ctx + pi_b) <classname> . [EOS]``, CoCoOp-style, through the exact
shared-prefix text path (docs/design.md section 7). The loss adds the context-redundancy penalty
(:func:`context_redundancy_penalty`) to the cross-entropy.

Every size comes from the loaded backbone: upstream's ``12`` layers, ``768`` and ``512`` widths and
``eye(4)`` (batch size and context length) are the ViT's layer count and widths, ``N_CTX`` and the batch.
Parameter names inside ``prompt_learner`` are upstream's (``ctx``, ``multi.linear.N``,
``injection.attention.{0,2}``, ``injection.linearlayer{1,2}.0``, ``meta_net.linear{1,2}``), so its
checkpoints load.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from models.encoders import FrozenImageModel, TextEncoder, VisualEncoder, freeze, require_vit
from models.prompts import ClassPrompts, init_context, meta_net, per_image_logits

logger = logging.getLogger(__name__)

#: Upstream's weight of the context-redundancy penalty (``0.05 * log10(...)``).
CRP_WEIGHT = 0.05


class MultiScale(nn.Module):
    """One linear map per ViT layer, from that layer's token mean (width W) to the image-feature width E."""

    def __init__(self, width: int, out_dim: int, layers: int) -> None:
        super().__init__()
        self.linear = nn.ModuleList(nn.Linear(width, out_dim) for _ in range(layers))

    def forward(self, layer_means: torch.Tensor) -> torch.Tensor:
        """(B, L, W) token means -> (B, L, E)."""
        return torch.stack([linear(layer_means[:, i]) for i, linear in enumerate(self.linear)], dim=1)


class InjectionBlock(nn.Module):
    """Upstream's injection block: squeeze-excitation attention applied twice with shared weights.

    With ``v`` the mean of the scales (B, E): ``h = linearlayer1([a(v) * v; v])`` and the output is
    ``linearlayer2([a(h) * v; v])`` (B, D), where ``a`` is Linear(E, E/16) -> ReLU -> Linear(E/16, E) ->
    sigmoid without biases. Both products scale ``v``, as upstream's code does.
    """

    def __init__(self, vis_dim: int, ctx_dim: int, reduction: int = 16) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            nn.Linear(vis_dim, vis_dim // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(vis_dim // reduction, vis_dim, bias=False),
            nn.Sigmoid(),
        )
        self.linearlayer1 = nn.Sequential(nn.Linear(2 * vis_dim, vis_dim))
        self.linearlayer2 = nn.Sequential(nn.Linear(2 * vis_dim, ctx_dim))

    def forward(self, scales: torch.Tensor) -> torch.Tensor:
        """(B, S, E) visual scales -> (B, D)."""
        pooled = scales.mean(dim=1)
        hidden = self.linearlayer1(torch.cat([self.attention(pooled) * pooled, pooled], dim=-1))
        return self.linearlayer2(torch.cat([self.attention(hidden) * pooled, pooled], dim=-1))


class APPLeNetPromptLearner(nn.Module):
    """Learnable context, multi-scale maps, injection block and meta-net; frozen class prompt pieces."""

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str], n_ctx: int = 4, ctx_init: str = "") -> None:
        super().__init__()
        require_vit(clip_model, "APPLeNet")
        visual = clip_model.visual
        width, layers = visual.conv1.weight.shape[0], len(visual.transformer.resblocks)
        feat_dim, ctx_dim = visual.output_dim, clip_model.ln_final.weight.shape[0]
        vectors, prefix_text = init_context(clip_model, n_ctx, ctx_init)
        n_ctx = vectors.shape[-2]
        logger.info('APPLeNet: initial context "%s" (%d tokens), %d visual scales', prefix_text, n_ctx, layers + 1)
        self.ctx = nn.Parameter(vectors)
        self.multi = MultiScale(width, feat_dim, layers)
        self.injection = InjectionBlock(feat_dim, ctx_dim)
        self.meta_net = meta_net(ctx_dim, ctx_dim)
        self.prompts = ClassPrompts(clip_model, classnames, n_ctx)

    def forward(self, image_features: torch.Tensor, layer_means: torch.Tensor) -> torch.Tensor:
        """Shifted context (B, n_ctx, D) from normalised features (B, E) and per-layer token means (B, L, W)."""
        dtype = self.ctx.dtype
        scales = torch.cat([self.multi(layer_means.to(dtype)), image_features.to(dtype).unsqueeze(1)], dim=1)
        shift = self.meta_net(self.injection(scales))
        return self.ctx.unsqueeze(0) + shift.unsqueeze(1)


class APPLeNetModel(FrozenImageModel):
    """Frozen CLIP + :class:`APPLeNetPromptLearner`: ``forward(images) -> logits (B, C)``; ``training_loss``
    adds the context-redundancy penalty (temperature ``temperature``, weight ``crp_weight``) to cross-entropy.
    The image encoder's layer outputs are read, never changed."""

    VISUAL_OUTPUTS = ("features", "layer_means")

    def __init__(
        self,
        clip_model: nn.Module,
        classnames: Sequence[str],
        n_ctx: int = 4,
        ctx_init: str = "a photo of a",
        temperature: float = 1.0,
        crp_weight: float = CRP_WEIGHT,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"APPLeNet's temperature LOSS.T is {temperature}; set a positive value (upstream: 1.0).")
        freeze(clip_model)
        self.temperature, self.crp_weight = float(temperature), float(crp_weight)
        self.undefined_penalties = 0  # training batches whose penalty had no value (see applenet_loss)
        self.prompt_learner = APPLeNetPromptLearner(clip_model, classnames, n_ctx, ctx_init)
        self.visual = VisualEncoder(clip_model)
        self.text_encoder = TextEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale

    def forward_with_context(self, visual: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C) and each image's shifted context (B, n_ctx, D), which the penalty reads, from the image
        encoder's outputs (features, per-layer token means)."""
        feats = F.normalize(visual["features"].float(), dim=-1)
        ctx = self.prompt_learner(feats, visual["layer_means"])
        prompts = self.prompt_learner.prompts
        return per_image_logits(self.text_encoder, prompts, self.logit_scale, feats, prompts.prefix(ctx)), ctx

    def forward_visual(self, visual: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, C) from the image encoder's outputs."""
        return self.forward_with_context(visual)[0]

    def training_loss(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, logits (B, C), terms)`` of a training batch (:func:`applenet_loss`)."""
        logits, ctx = self.forward_with_context(self.encode_visual(images))
        loss, terms = applenet_loss(logits, labels, ctx, self.temperature, self.crp_weight)
        if not terms["crp_defined"]:
            self.undefined_penalties += 1
            (logger.warning if self.undefined_penalties == 1 else logger.debug)(
                "Context-redundancy penalty undefined for a batch (mean determinant >= 0: its log10 has no value; "
                "upstream's loss would be NaN): this step trains on the cross-entropy alone (%d such batches so "
                "far; later ones are logged at debug level).",
                self.undefined_penalties,
            )
        return loss, logits, terms


def context_redundancy_penalty(ctx: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, bool]:
    """Upstream's context-redundancy penalty ``log10(-mean_b det(ctx_b ctx_b^T / T^3 - I / T))`` and whether
    it is defined.

    ``ctx`` (B, n, D) is every image's shifted context; the determinants are taken in fp32, outside autocast.
    The logarithm needs a negative mean determinant. Where it is not (upstream's loss is then NaN and its
    weights turn to NaN), the penalty is 0 with no gradient and the second value is False.
    """
    with torch.autocast(ctx.device.type, enabled=False):
        ctx = ctx.float()
        t = float(temperature)
        eye = torch.eye(ctx.shape[-2], dtype=ctx.dtype, device=ctx.device)
        value = -torch.linalg.det(ctx @ ctx.transpose(-1, -2) / t**3 - eye / t).mean()
        defined = bool(value > 0)
        return (torch.log10(value) if defined else value.new_zeros(())), defined


def applenet_loss(
    logits: torch.Tensor, labels: torch.Tensor, ctx: torch.Tensor, temperature: float = 1.0, weight: float = CRP_WEIGHT
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy plus ``weight`` times :func:`context_redundancy_penalty` (upstream: weight 0.05, T 1), and its
    terms (detached): ``loss_ce``, ``loss_crp`` and ``crp_defined`` (1 where the penalty had a value, else 0)."""
    ce = F.cross_entropy(logits.float(), labels)
    penalty, defined = context_redundancy_penalty(ctx, temperature)
    terms = {"loss_ce": ce.detach(), "loss_crp": penalty.detach(), "crp_defined": ce.new_tensor(float(defined))}
    return ce + weight * penalty, terms
