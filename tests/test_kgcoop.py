"""KgCoOp (pure PyTorch): the knowledge-guided loss by hand, the fast path against the stock formulation,
upstream's learnable-parameter count and checkpoint keys."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_fp32, assert_same, grads

from models import reference
from models.coop import CoOpPromptLearner
from models.kgcoop import KgCoOpModel, knowledge_guided_loss, upstream_kgcoop_state
from models.weights import random_clip

CLASSNAMES = ["baseball_field", "dense residential area", "harbor", "overpass", "storage tanks"]
TEMPLATE = "a satellite photo of a {}."


def test_knowledge_guided_loss_on_a_hand_computed_example():
    """Two classes: cosines 1 and 0.6 * 1 + 0.8 * 0 = 0.6, so the term is 1 - 0.8 = 0.2; one image whose
    logits (0, ln 3) give p = (1/4, 3/4), so CE for label 1 is ln(4/3)."""
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    clip_text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    logits = torch.tensor([[0.0, math.log(3.0)]])
    loss, terms = knowledge_guided_loss(logits, torch.tensor([1]), text, clip_text, weight=8.0)
    assert terms["loss_kg"].item() == pytest.approx(0.2, abs=1e-7)
    assert terms["loss_ce"].item() == pytest.approx(math.log(4 / 3), abs=1e-7)
    assert loss.item() == pytest.approx(math.log(4 / 3) + 8.0 * 0.2, abs=1e-6)
    # identical features: no knowledge-guided penalty, whatever their length (cosine, not dot product)
    _, same = knowledge_guided_loss(logits, torch.tensor([1]), 3.0 * clip_text, clip_text, weight=8.0)
    assert same["loss_kg"].item() == pytest.approx(0.0, abs=1e-7)


def test_kgcoop_training_loss_equals_stock_formulation(make_clip, images):
    """Loss, logits and gradients of the fast path (upstream's settings) equal 77-token prompts through CLIP's
    stock modules and the template's features from CLIP's ``encode_text``."""
    clip = make_clip()
    model = KgCoOpModel(clip, CLASSNAMES, TEMPLATE, weight=8.0, n_ctx=4, ctx_init="a photo of a")
    assert isinstance(model.prompt_learner, CoOpPromptLearner)  # the learnable part is CoOp's
    with torch.no_grad():  # trained-looking context, so the knowledge-guided term is far from zero
        model.prompt_learner.ctx.add_(0.3 * torch.randn_like(model.prompt_learner.ctx))
    labels = torch.tensor([0, 3, 4])
    ctx = model.prompt_learner.ctx
    loss, logits, terms = model.training_loss(images, labels)

    names = model.prompt_learner.prompts.classnames
    clip_text = reference.template_text(clip, names, [TEMPLATE], normalize_each=True)
    ref_logits = reference.coop_logits(model, clip, images)
    ref_text = F.normalize(reference.coop_text(model, clip), dim=-1)
    ref_loss, ref_terms = knowledge_guided_loss(ref_logits, labels, ref_text, clip_text, 8.0)
    assert terms["loss_kg"] > 1e-3  # the term is exercised
    assert_close_fp32(model.clip_text_features, clip_text)
    assert_close_fp32(logits, ref_logits)
    assert_same(loss, ref_loss, grads(loss, [ctx]), grads(ref_loss, [ctx]))
    assert_close_fp32(model(images), logits)  # evaluation logits are the training ones


def test_kgcoop_image_encoder_is_frozen_and_unprompted(make_clip, images):
    clip = make_clip()
    model = KgCoOpModel(clip, CLASSNAMES, TEMPLATE, n_ctx=4)
    assert KgCoOpModel.IMAGE_ENCODER_PROMPTED is False
    loss, _, _ = model.training_loss(images, torch.tensor([0, 1, 2]))
    loss.backward()
    learned = {n for n, p in model.named_parameters() if p.grad is not None}
    assert learned == {"prompt_learner.ctx"}  # the image side contributes no gradient anywhere


def test_learnable_parameters_at_vit_b16_sizes():
    """Upstream (N_CTX 4, "a photo of a", shared context): only ``ctx`` trains, 4 x 512 = 2,048 parameters."""
    learner = CoOpPromptLearner(random_clip("ViT-B/16"), CLASSNAMES, n_ctx=4, ctx_init="a photo of a")
    assert sum(p.numel() for p in learner.parameters()) == 2_048


def test_upstream_checkpoint_keys_map_onto_ours():
    """Upstream's prompt learner also saves an unused ``bias_vectors`` and ``meta_net``: they are dropped."""
    upstream = {"ctx": torch.zeros(4, 8), "bias_vectors": torch.zeros(1, 512), "token_prefix": torch.zeros(1),
                "meta_net.linear1.weight": torch.zeros(512, 512), "meta_net.linear1.bias": torch.zeros(512)}  # fmt: skip
    assert set(upstream_kgcoop_state(upstream)) == {"ctx", "token_prefix"}  # class buffers: the trainer ignores them
