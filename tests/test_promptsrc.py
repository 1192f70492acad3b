"""PromptSRC (pure PyTorch): each loss term by hand, the fast path against the stock formulation, Gaussian
prompt aggregation, upstream's learnable-parameter count and checkpoint keys."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_fp32, assert_same, grads

from common.errors import ExpectedError
from models import reference
from models.promptsrc import (
    GaussianPromptAggregation,
    PromptSRCModel,
    PromptSRCPromptLearner,
    Views,
    gaussian_epoch_weights,
    self_regularised_loss,
    upstream_promptsrc_state,
)
from models.weights import random_clip

CLASSNAMES = ["baseball_field", "dense residential area", "harbor", "overpass", "storage tanks"]
TEMPLATES = ["a satellite photo of a {}.", "an aerial photo of a {}.", "an overhead view of a {}."]


# --------------------------------------------------------------------------------------------- loss terms
def test_each_loss_term_on_a_hand_computed_example():
    """One image, two classes, 2-d features.

    - CE: prompted logits (0, 0) give p = (1/2, 1/2): ln 2 for either label;
    - text: |1 - 0.6| and |0 - 0.8| over 2 elements: L1 0.6, times 25 = 15;
    - image: |0 - 0.6| and |1 - 0.8| over 2 elements: L1 0.4, times 10 = 4;
    - logits: zero-shot logits (0, ln 3) give q = (1/4, 3/4); KL(q || p) = 1/4 ln(1/2) + 3/4 ln(3/2), over
      B x C = 2 logits.
    """
    prompted = Views(logits=torch.tensor([[0.0, 0.0]]), text=torch.tensor([[1.0, 0.0]]), image=torch.tensor([[0.0, 1.0]]))
    frozen = Views(logits=torch.tensor([[0.0, math.log(3.0)]]), text=torch.tensor([[0.6, 0.8]]),
                   image=torch.tensor([[0.6, 0.8]]))  # fmt: skip
    loss, terms = self_regularised_loss(prompted, frozen, torch.tensor([1]), text_weight=25.0, image_weight=10.0)
    kl = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2
    expected = {"loss_ce": math.log(2.0), "loss_text": 15.0, "loss_image": 4.0, "loss_logits": kl}
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(sum(expected.values()), abs=1e-5)
    # the KL term's direction is KL(zero-shot || prompted): KL(p || q) = 0.0719 / 2 differs from 0.0654 / 2
    reverse = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2
    assert terms["loss_logits"].item() != pytest.approx(reverse, abs=1e-3)


# --------------------------------------------------------------------------------------------- exactness
def _model(clip, **options) -> PromptSRCModel:
    model = PromptSRCModel(clip, CLASSNAMES, TEMPLATES, text_weight=25.0, image_weight=10.0, **options)
    with torch.no_grad():  # trained-looking prompts
        for p in model.prompt_learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    ("n_ctx_text", "n_ctx_vision", "depth_text", "depth_vision"),
    [(4, 4, 3, 3), (2, 3, 2, 1), (4, 2, 1, 0)],  # upstream-like; fixed words "of a"; shallow text, no vision
)
def test_promptsrc_training_loss_equals_stock_formulation(make_clip, images, n_ctx_text, n_ctx_vision,
                                                          depth_text, depth_vision):  # fmt: skip
    """Loss, both branches and the gradients of every learnable parameter equal the stock formulation:
    77-token prompts through CLIP's stock blocks, CLIP's stock ViT, templates through ``encode_text``."""
    clip = make_clip()
    model = _model(clip, n_ctx_text=n_ctx_text, n_ctx_vision=n_ctx_vision, ctx_init="a photo of a",
                   prompt_depth_text=depth_text, prompt_depth_vision=depth_vision)  # fmt: skip
    learner = model.prompt_learner
    assert len(learner.text_deep) == depth_text - 1 and len(learner.vision_deep) == max(depth_vision - 1, 0)
    assert (learner.VPT is None) == (depth_vision == 0)
    labels = torch.tensor([0, 3, 4])
    params = list(learner.parameters())
    loss, logits, terms = model.training_loss(images, labels)

    ref_prompted, ref_frozen = reference.promptsrc_views(model, clip, images, "a photo of a", TEMPLATES)
    ref_loss, ref_terms = self_regularised_loss(Views(**ref_prompted), Views(**ref_frozen), labels, 25.0, 10.0)
    frozen = model.frozen_views(images)
    for key, value in ref_frozen.items():
        assert_close_fp32(getattr(frozen, key), value, what=f"frozen {key}")
    assert_close_fp32(logits, ref_prompted["logits"])
    for key, value in ref_terms.items():
        assert_close_fp32(terms[key], value, what=key)
    assert_same(loss, ref_loss, grads(loss, params), grads(ref_loss, params))
    assert_close_fp32(model(images), logits)  # evaluation logits are the training ones


def test_image_encoder_is_prompted_unless_vision_depth_is_zero(make_clip, images):
    clip = make_clip()
    assert PromptSRCModel.IMAGE_ENCODER_PROMPTED is True
    model = _model(clip, prompt_depth_text=2, prompt_depth_vision=2)
    frozen = model.frozen_views(images).image
    assert (model.features(images)[0] - frozen).abs().max() > 1e-3  # the vision prompts change the features
    flat = _model(clip, prompt_depth_text=2, prompt_depth_vision=0)
    assert_close_fp32(flat.features(images)[0], frozen)
    _, _, terms = flat.training_loss(images, torch.tensor([0, 1, 2]))
    assert terms["loss_image"].abs() < 1e-6


def test_depths_are_checked_and_capped(make_clip):
    with pytest.raises(ValueError, match="PROMPT_DEPTH_TEXT is 0; it must be >= 1"):
        PromptSRCPromptLearner(make_clip(), CLASSNAMES, prompt_depth_text=0)
    with pytest.raises(ValueError, match="PROMPT_DEPTH_VISION is -1; it must be >= 0"):
        PromptSRCPromptLearner(make_clip(), CLASSNAMES, prompt_depth_vision=-1)
    learner = PromptSRCPromptLearner(make_clip(), CLASSNAMES)  # depth 9 on 3-layer towers: 2 deep prompts each
    assert len(learner.text_deep) == 2 and len(learner.vision_deep) == 2


# --------------------------------------------------------------------------------------------- aggregation
def test_gaussian_epoch_weights_by_hand():
    """Mean 2, std 1 over epochs 1..3: densities proportional to e^-1/2, 1, e^-1/2."""
    a = math.exp(-0.5)
    assert gaussian_epoch_weights(3, 2, 1) == pytest.approx([a / (1 + 2 * a), 1 / (1 + 2 * a), a / (1 + 2 * a)])
    far = gaussian_epoch_weights(2, 60, 1)  # densities underflow to 0 in float64: the weights still sum to 1
    assert far == pytest.approx([0.0, 1.0]) and sum(far) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="GPA_STD is 0; it must be > 0"):
        gaussian_epoch_weights(3, 2, 0)


def test_aggregated_prompt_is_the_gaussian_weighted_mean_of_the_epoch_prompts():
    """Upstream base-to-new settings (20 epochs, mean 15, std 1); the state survives a save and reload midway."""
    n, mean, std = 20, 15, 1
    module = torch.nn.ParameterDict({"ctx": torch.nn.Parameter(torch.zeros(4, 8)),
                                     "VPT": torch.nn.Parameter(torch.zeros(2, 6))})  # fmt: skip
    per_epoch = [{k: torch.randn_like(p) for k, p in module.items()} for _ in range(n)]
    gpa = GaussianPromptAggregation(n, mean, std)
    for epoch, values in enumerate(per_epoch):
        if epoch == 7:  # a resumed run: a fresh aggregator from the saved state
            state = gpa.state_dict()
            gpa = GaussianPromptAggregation(n, mean, std)
            gpa.load_state_dict(state)
        with torch.no_grad():
            for k, p in module.items():
                p.copy_(values[k])
        gpa.add(epoch, module)
    gpa.load_into(module)
    density = [math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, n + 1)]
    for k, p in module.items():
        expected = sum(d * v[k].double() for d, v in zip(density, per_epoch)) / sum(density)
        assert_close_fp32(p.detach().double(), expected, what=k)


def test_aggregation_with_a_missing_epoch_is_refused():
    module = torch.nn.ParameterDict({"ctx": torch.nn.Parameter(torch.ones(2))})
    gpa = GaussianPromptAggregation(3, 2, 1)
    gpa.add(1, module)
    gpa.add(2, module)
    with pytest.raises(ExpectedError, match=r"holds epochs \[2, 3\] of 1..3.*from scratch"):
        gpa.load_into(module)


# --------------------------------------------------------------------------------------------- upstream
def test_learnable_parameters_at_vit_b16_sizes():
    """Upstream (4 + 4 tokens, depth 9 and 9): text 9 x 4 x 512 = 18,432, vision 9 x 4 x 768 = 27,648: 46,080."""
    learner = PromptSRCPromptLearner(random_clip("ViT-B/16"), CLASSNAMES)
    shapes = {k: tuple(v.shape) for k, v in learner.named_parameters()}
    assert shapes["ctx"] == shapes["text_deep.7"] == (4, 512) and shapes["VPT"] == shapes["vision_deep.7"] == (4, 768)
    assert len(shapes) == 18 and sum(p.numel() for p in learner.parameters()) == 46_080


def test_upstream_checkpoint_keys_map_onto_ours(make_clip):
    """Upstream saves the whole model; its prompt keys become ours, CLIP's weights and class buffers go."""
    ours = PromptSRCPromptLearner(make_clip(), CLASSNAMES, prompt_depth_text=3, prompt_depth_vision=2).state_dict()
    upstream = {"prompt_learner.ctx": ours["ctx"], "image_encoder.VPT": ours["VPT"],
                "text_encoder.transformer.resblocks.1.VPT_shallow": ours["text_deep.0"],
                "text_encoder.transformer.resblocks.2.VPT_shallow": ours["text_deep.1"],
                "image_encoder.transformer.resblocks.1.VPT_shallow": ours["vision_deep.0"],
                "prompt_learner.token_prefix": torch.zeros(1), "image_encoder.conv1.weight": torch.zeros(1),
                "prompt_learner.ZS_image_encoder.proj": torch.zeros(1), "logit_scale": torch.zeros(())}  # fmt: skip
    converted = upstream_promptsrc_state(upstream)
    assert converted.keys() == ours.keys()
    assert all(converted[k] is ours[k] for k in ours)
    assert upstream_promptsrc_state(ours) == ours  # ours pass unchanged
