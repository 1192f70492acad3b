"""Straightforward formulations of the models: the yardstick of the exact fast paths (pure PyTorch).

Each function computes what a model of this package computes, the way the published code does it: full
77-token prompts through CLIP's stock text transformer (sequence-first, with its own causal mask), one image
at a time where the prompts depend on the image, and CLIP's stock image encoder. They read the model's
learnable parameters (and run its prompt learner where that is the method itself), never its fast encoders,
so the exactness tests compare the two (logits and gradients, fp32) and ``tools.bench`` times them.
A new method writes its reference here once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from clip import clip as openai_clip
from clip.model import CLIP
from torch import nn

from models.prompts import bpe_length


# ------------------------------------------------------------------------------------------ stock encoders
def stock_text(
    clip: CLIP, prompts: torch.Tensor, eot: torch.Tensor, deep: Sequence[torch.Tensor] = (), n_ctx: int = 0
) -> torch.Tensor:
    """CLIP's text transformer, block by block, on full-length prompt embeddings (N, 77, D) -> features (N, E).

    ``eot`` (N,) are the end-of-text positions. ``deep[i]`` (n_ctx, D) replaces positions ``1..n_ctx`` of every
    prompt before block ``i + 1`` (MaPLe's deep prompts). The input is cast to the model's dtype as
    ``CLIP.encode_text`` does (half precision after ``clip.model.convert_weights``, i.e. ``PREC fp16``).
    """
    x = (prompts.to(clip.dtype) + clip.positional_embedding.to(clip.dtype)).permute(1, 0, 2)
    for i, block in enumerate(clip.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:1], deep[i - 1].unsqueeze(1).expand(-1, x.shape[1], -1), x[1 + n_ctx :]])
        x = block(x)
    x = clip.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0], device=x.device), eot] @ clip.text_projection


def stock_vit(
    clip: CLIP, images: torch.Tensor, shallow: torch.Tensor | None = None, deep: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's ViT image encoder, block by block -> ``(features (B, E), final tokens before ln_post (B, T, W))``.

    ``shallow`` (n, W) prompt tokens are appended after the positional embedding; ``deep[i]`` replaces them
    before block ``i + 1`` (MaPLe's vision prompts).
    """
    vis = clip.visual
    x = vis.conv1(images).reshape(images.shape[0], vis.conv1.out_channels, -1).permute(0, 2, 1)
    cls = vis.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([cls, x], dim=1) + vis.positional_embedding
    n = 0 if shallow is None else shallow.shape[0]
    if shallow is not None:
        x = torch.cat([x, shallow.expand(x.shape[0], -1, -1)], dim=1)
    x = vis.ln_pre(x).permute(1, 0, 2)
    for i, block in enumerate(vis.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[: x.shape[0] - n], deep[i - 1].unsqueeze(1).expand(-1, x.shape[1], -1)])
        x = block(x)
    tokens = x.permute(1, 0, 2)
    return vis.ln_post(tokens[:, 0]) @ vis.proj, tokens


def logits(clip: CLIP, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale)`` times the cosine similarities of image (B, E) and text (C, E) features -> (B, C)."""
    return clip.logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()


def zeroshot_logits(model: nn.Module, clip: CLIP, images: torch.Tensor) -> torch.Tensor:
    """Zero-shot CLIP (:class:`models.zsclip.ZeroshotModel`): CLIP's stock ``encode_image`` against the class
    text features the model computed once from its templates (as the published zero-shot code does)."""
    return logits(clip, clip.encode_image(images), model.text_features)


# ------------------------------------------------------------------------------------------ prompts
def placeholder_prompts(clip: CLIP, classnames: Sequence[str], n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings (C, 77, D, detached) and ids (C, 77) of ``X X .. X <classname>.`` (n_ctx placeholders)."""
    return _embed(clip, [(" ".join(["X"] * n_ctx) + f" {name}.").strip() for name in classnames])


def _embed(clip: CLIP, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings (N, 77, D, detached) and ids (N, 77) of ``texts``, on the model's device."""
    tokens = openai_clip.tokenize(list(texts)).to(clip.token_embedding.weight.device)
    return clip.token_embedding(tokens).detach(), tokens


def coop_arrangement(
    emb: torch.Tensor, ctx: torch.Tensor, n_ctx: int, position: str, classnames: Sequence[str]
) -> torch.Tensor:
    """CoOp's prompts, one class at a time: context ``ctx`` ((n_ctx, D), or (C, n_ctx, D) per class) placed
    before (``end``), around (``middle``) or after (``front``) the class name in placeholder prompts ``emb``."""
    rows = []
    for i, name in enumerate(classnames):
        name_len = bpe_length(name)  # the tokenizer is built once per process
        ctx_i = ctx[i] if ctx.dim() == 3 else ctx
        sos, suffix = emb[i, :1], emb[i, 1 + n_ctx :]
        if position == "end":
            parts = [sos, ctx_i, suffix]
        elif position == "middle":
            half = n_ctx // 2
            parts = [sos, ctx_i[:half], suffix[:name_len], ctx_i[half:], suffix[name_len:]]
        else:
            parts = [sos, suffix[:name_len], ctx_i, suffix[name_len:]]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def per_image_text(clip: CLIP, prefixes: torch.Tensor, emb: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """Text features (B, C, E) of the prompts ``[prefixes[b]; emb[c, P:]]`` at full length, one image at a time.

    ``prefixes`` (B, P, D) is ``[SOS] + context`` per image; ``emb`` (C, 77, D) the class prompts it goes in.
    """
    n_pre = prefixes.shape[1]
    return torch.stack(
        [stock_text(clip, torch.cat([p.expand(len(emb), -1, -1), emb[:, n_pre:]], dim=1), eot) for p in prefixes]
    )


def per_image_context_logits(
    clip: CLIP, emb: torch.Tensor, tokens: torch.Tensor, feats: torch.Tensor, ctx: torch.Tensor
) -> torch.Tensor:
    """Logits (B, C), one image at a time, of prompts ``[SOS] ctx[b] <classname>.`` at full length.

    ``emb``/``tokens`` are :func:`placeholder_prompts` with ``ctx.shape[1]`` placeholders; ``feats`` (B, E) the
    image features; ``ctx`` (B, n_ctx, D) each image's context.
    """
    prefixes = torch.cat([emb[:1, :1].expand(len(ctx), -1, -1), ctx], dim=1)
    text = per_image_text(clip, prefixes, emb, tokens.argmax(-1))
    return torch.cat([logits(clip, feats[b : b + 1], text[b]) for b in range(len(feats))])


# ------------------------------------------------------------------------------------------ methods
def template_text(clip: CLIP, classnames: Sequence[str], templates: Sequence[str], normalize_each: bool) -> torch.Tensor:
    """Normalised mean (C, E) over ``templates`` of CLIP's ``encode_text`` features of every class, each template's
    features normalised first (``normalize_each``, zero-shot CLIP) or raw (PromptSRC)."""
    feats = [clip.encode_text(_embed(clip, [t.format(name) for name in classnames])[1]) for t in templates]
    feats = [F.normalize(f, dim=-1) if normalize_each else f for f in feats]
    return F.normalize(torch.stack(feats).mean(0), dim=-1)


def coop_text(model: nn.Module, clip: CLIP) -> torch.Tensor:
    """CoOp's class text features (C, E): upstream's prompt arrangement, 77 tokens, stock text transformer."""
    learner = model.prompt_learner
    names, n_ctx = learner.prompts.classnames, learner.ctx.shape[-2]
    emb, tokens = placeholder_prompts(clip, names, n_ctx)
    prompts = coop_arrangement(emb, learner.ctx, n_ctx, learner.class_token_position, names)
    return stock_text(clip, prompts, tokens.argmax(-1))


def coop_logits(model: nn.Module, clip: CLIP, images: torch.Tensor) -> torch.Tensor:
    """CoOp (:class:`models.coop.CoOpModel`, also KgCoOp's): :func:`coop_text` against stock image features."""
    return logits(clip, clip.encode_image(images), coop_text(model, clip))


def cocoop_logits(model: nn.Module, clip: CLIP, images: torch.Tensor) -> torch.Tensor:
    """CoCoOp (:class:`models.cocoop.CoCoOpModel`): per image, ``ctx + meta_net(f_b)`` in 77-token prompts."""
    learner = model.prompt_learner
    emb, tokens = placeholder_prompts(clip, learner.prompts.classnames, learner.ctx.shape[-2])
    feats = F.normalize(clip.encode_image(images), dim=-1)
    ctx = learner.ctx.unsqueeze(0) + learner.meta_net(feats).unsqueeze(1)  # (B, n_ctx, D)
    return per_image_context_logits(clip, emb, tokens, feats, ctx)


def bimors_logits(model: nn.Module, clip: CLIP, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """BiMoRS (:class:`models.bimors.BiMoRSModel`): per image, the prompt learner on that image's stock ViT
    tokens and caption vector, then 77-token prompts through the stock text transformer."""
    learner = model.prompt_learner
    emb, tokens = placeholder_prompts(clip, learner.prompts.classnames, learner.ctx.shape[0])
    feats, vis_tokens = stock_vit(clip, images)
    ctx = torch.cat([learner(vis_tokens[b : b + 1], captions[b : b + 1]) for b in range(len(images))])
    return per_image_context_logits(clip, emb, tokens, feats, ctx)


def deep_prompt_features(
    clip: CLIP, images: torch.Tensor, classnames: Sequence[str], ctx_init: str, ctx: torch.Tensor,
    deep_text: Sequence[torch.Tensor], shallow: torch.Tensor | None, deep_vision: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (B, E) and class text (C, E) features of CLIP prompted in both towers, stock blocks, 77 tokens.

    The prompts are ``{ctx_init} {classname}.`` with their first ``n_ctx`` word tokens replaced by ``ctx``;
    ``deep_text``, ``shallow`` and ``deep_vision`` go where :func:`stock_text` and :func:`stock_vit` put them.
    """
    n_ctx = ctx.shape[0]
    emb, tokens = _embed(clip, [f"{ctx_init} {name}." for name in classnames])
    prompts = torch.cat([emb[:, :1], ctx.expand(len(emb), -1, -1), emb[:, 1 + n_ctx :]], dim=1)
    text = stock_text(clip, prompts, tokens.argmax(-1), deep_text, n_ctx=n_ctx)
    image, _ = stock_vit(clip, images, shallow, deep_vision)
    return image, text


def maple_logits(model: nn.Module, clip: CLIP, images: torch.Tensor, ctx_init: str) -> torch.Tensor:
    """MaPLe (:class:`models.maple.MaPLeModel`) initialised from the words ``ctx_init``: the learned context
    replaces their first ``n_ctx`` tokens; deep prompts replace the prompt tokens of both stock towers."""
    learner = model.prompt_learner
    deep_text = list(learner.compound_prompts_text)
    deep_vision = [proj(p) for proj, p in zip(learner.compound_prompt_projections, deep_text)]
    image, text = deep_prompt_features(clip, images, learner.prompts.classnames, ctx_init, learner.ctx,
                                       deep_text, learner.proj(learner.ctx), deep_vision)  # fmt: skip
    return logits(clip, image, text)


def promptsrc_logits(model: nn.Module, clip: CLIP, images: torch.Tensor, ctx_init: str) -> tuple[torch.Tensor, ...]:
    """PromptSRC's prompted branch (what it evaluates): image (B, E) and class text (C, E) features of both stock
    towers with the learned prompts (``ctx_init`` as in :func:`promptsrc_views`)."""
    learner = model.prompt_learner
    return deep_prompt_features(clip, images, learner.prompts.classnames, ctx_init, learner.ctx,
                                list(learner.text_deep), learner.VPT, list(learner.vision_deep))  # fmt: skip


def promptsrc_views(
    model: nn.Module, clip: CLIP, images: torch.Tensor, ctx_init: str, templates: Sequence[str],
    frozen_text: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PromptSRC (:class:`models.promptsrc.PromptSRCModel`) initialised from ``ctx_init``: its prompted and its
    frozen branch, each ``{"logits", "text", "image"}`` (features normalised). The frozen text side is the mean
    of CLIP's raw ``encode_text`` features over ``templates`` (or ``frozen_text``, computed once as upstream does),
    the frozen image side CLIP's ``encode_image``."""
    names = model.prompt_learner.prompts.classnames
    image, text = promptsrc_logits(model, clip, images, ctx_init)
    frozen_image = clip.encode_image(images).detach()
    if frozen_text is None:
        frozen_text = template_text(clip, names, templates, normalize_each=False).detach()
    views = []
    for img, txt in ((image, text), (frozen_image, frozen_text)):
        views.append({"logits": logits(clip, img, txt), "text": F.normalize(txt, dim=-1),
                      "image": F.normalize(img, dim=-1)})  # fmt: skip
    return views[0], views[1]


# ------------------------------------------------------------------------------------------ APPLeNet
def stock_vit_layers(clip: CLIP, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CLIP's stock ``encode_image`` with every residual block's output (B, T, W) caught by forward hooks
    (upstream APPLeNet edits CLIP's ``Transformer`` to return them; hooks read the same tensors)."""
    layers: list[torch.Tensor] = []
    blocks = clip.visual.transformer.resblocks
    hooks = [b.register_forward_hook(lambda _m, _i, out: layers.append(out.permute(1, 0, 2))) for b in blocks]
    try:
        return clip.encode_image(images), layers
    finally:
        for hook in hooks:
            hook.remove()


def applenet_context(learner: nn.Module, feats: torch.Tensor, layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """APPLeNet's shifted context (B, n_ctx, D), step by step as upstream computes it, with ``learner``'s weights.

    ``feats`` (B, E) are the normalised image features, ``layers`` the ViT's token sequences (B, T, W).
    """
    scales = [linear(tokens.mean(dim=1)) for linear, tokens in zip(learner.multi.linear, layers)]
    fcs = torch.stack([*scales, feats], dim=1)  # (B, L + 1, E)
    pooled = fcs.mean(dim=1, keepdim=True)  # upstream: AdaptiveAvgPool2d((1, E)) over the scales
    block = learner.injection
    first = block.linearlayer1(torch.cat([block.attention(pooled) * pooled, pooled], dim=2))
    bias = block.linearlayer2(torch.cat([block.attention(first) * pooled, pooled], dim=2))  # (B, 1, D)
    n_ctx = learner.ctx.shape[0]
    alpha = torch.cat([learner.meta_net(bias) for _ in range(n_ctx)], dim=1)  # upstream: alpha1..alpha4
    return learner.ctx.unsqueeze(0) + alpha


def applenet_logits(model: nn.Module, clip: CLIP, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """APPLeNet (:class:`models.applenet.APPLeNetModel`): logits from 77-token prompts one image at a time, and
    the shifted context (B, n_ctx, D) the penalty reads."""
    learner = model.prompt_learner
    emb, tokens = placeholder_prompts(clip, learner.prompts.classnames, learner.ctx.shape[0])
    feats, layers = stock_vit_layers(clip, images)
    feats = F.normalize(feats, dim=-1)
    ctx = applenet_context(learner, feats, layers)
    return per_image_context_logits(clip, emb, tokens, feats, ctx), ctx


# ------------------------------------------------------------------------------------------ CLIP-Adapter
def clip_adapter_logits(model: nn.Module, clip: CLIP, images: torch.Tensor) -> torch.Tensor:
    """CLIP-Adapter (:class:`models.clip_adapter.CLIPAdapterModel`) as upstream computes it: the hand-crafted
    prompts through CLIP's stock ``encode_text`` on every call, the stock image feature blended with its
    adapted copy (``ratio * adapter(f) + (1 - ratio) * f``)."""
    text = template_text(clip, [c.replace("_", " ") for c in model.classnames], [model.template], normalize_each=True)
    image = clip.encode_image(images)
    image = model.ratio * model.prompt_learner(image) + (1 - model.ratio) * image
    return logits(clip, image, text)
