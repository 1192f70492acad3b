"""APPLeNet: exactness of the fast path against upstream's formulation, the loss on hand-computed examples,
learnable parameters at ViT-B/16 sizes against upstream's count, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP
from conftest import assert_close_fp32

from common.errors import ConfigError
from models import reference
from models.applenet import APPLeNetModel, applenet_loss, context_redundancy_penalty
from models.weights import random_clip

CLASSES = ["baseball_field", "dense residential area", "harbor", "tennis court", "river"]


@pytest.fixture
def make_model(make_clip):
    return lambda n_ctx=4, ctx_init="a photo of a": _model(make_clip, n_ctx, ctx_init)


def _model(make_clip, n_ctx: int, ctx_init: str) -> tuple[APPLeNetModel, CLIP]:
    """A small APPLeNet whose widths all differ (image feature 32, ViT 128, text 96) and whose learner is
    perturbed away from its initialisation (a zero-looking state would hide bugs)."""
    clip_model = make_clip(text_width=96)
    model = APPLeNetModel(clip_model, CLASSES, n_ctx=n_ctx, ctx_init=ctx_init)
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, clip_model


@pytest.mark.parametrize(("n_ctx", "ctx_init"), [(4, "a photo of a"), (2, "")])
def test_fast_path_equals_upstream_per_image_formulation(make_model, n_ctx, ctx_init):
    """Logits, shifted context and the gradients of the full loss (cross-entropy + penalty), fp32."""
    model, clip_model = make_model(n_ctx, ctx_init)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 4])
    params = list(model.prompt_learner.parameters())

    loss, fast, terms = model.training_loss(images, labels)
    _, ctx = model.forward_with_context(model.encode_visual(images))
    ref, ref_ctx = reference.applenet_logits(model, clip_model, images)
    assert fast.shape == (3, len(CLASSES)) and ctx.shape == (3, n_ctx, 96)
    assert_close_fp32(fast, ref, what="logits")
    assert_close_fp32(ctx, ref_ctx, what="shifted context")

    ref_loss = F.cross_entropy(ref, labels) + 0.05 * context_redundancy_penalty(ref_ctx)[0]
    assert terms["crp_defined"] == 1  # the penalty takes part in the gradients compared below
    assert_close_fp32(loss, ref_loss, what="loss")
    names = [n for n, _ in model.prompt_learner.named_parameters()]
    for name, a, b in zip(names, torch.autograd.grad(loss, params), torch.autograd.grad(ref_loss, params)):
        assert b.abs().max() > 0, f"the reference gradient of {name} is zero"
        assert_close_fp32(a, b, what=name)


def test_sizes_come_from_the_backbone(make_model):
    model, _ = make_model()
    learner = model.prompt_learner
    assert len(learner.multi.linear) == 3  # one map per ViT layer
    assert (learner.multi.linear[0].in_features, learner.multi.linear[0].out_features) == (128, 32)  # W -> E
    assert learner.injection.linearlayer1[0].weight.shape == (32, 64)  # 2E -> E
    assert learner.injection.linearlayer2[0].weight.shape == (96, 64)  # 2E -> D
    assert learner.meta_net.linear1.weight.shape == (96 // 16, 96)  # D -> D/16 -> D
    assert learner.prompts.seq_len < 20  # the text sequence is truncated (of 77)


def test_image_encoder_has_no_graph_and_clip_stays_frozen(make_model):
    model, _ = make_model()
    visual = model.encode_visual(torch.randn(2, 3, 32, 32))
    feats, means = visual["features"], visual["layer_means"]
    assert feats.grad_fn is None and means.grad_fn is None and means.shape == (2, 3, 128)
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("prompt_learner."))


# ------------------------------------------------------------------------------------------ the loss
def test_penalty_on_a_hand_computed_example():
    """Two images, two context vectors each, T = 1: ctx ctx^T - I is diag(3, -0.75) and diag(1, -1), whose
    determinants are -2.25 and -1; the penalty is log10(1.625) (no eye(4): any context length and batch)."""
    ctx = torch.tensor([[[2.0, 0.0], [0.0, 0.5]], [[1.0, 1.0], [0.0, 0.0]]], requires_grad=True)
    penalty, defined = context_redundancy_penalty(ctx, temperature=1.0)
    assert defined and penalty.item() == pytest.approx(math.log10(1.625), rel=1e-6)
    logits, labels = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]]), torch.tensor([1, 0])
    loss, terms = applenet_loss(logits, labels, ctx)  # cross-entropy of each row: log(4/3)
    assert loss.item() == pytest.approx(math.log(4 / 3) + 0.05 * math.log10(1.625), rel=1e-6)
    assert terms["loss_ce"].item() == pytest.approx(math.log(4 / 3), rel=1e-6) and terms["crp_defined"] == 1
    loss.backward()
    assert ctx.grad.abs().sum() > 0


def test_penalty_temperature():
    """T = 2 divides the Gram matrix by 8 and the identity by 2: for ctx = [[2, 0], [0, 4]] that is diag(0, 1.5),
    for [[0, 0], [0, 0]] diag(-0.5, -0.5): determinants 0 and 0.25, so -mean det < 0 and log10 has no value."""
    ctx = torch.tensor([[[2.0, 0.0], [0.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    penalty, defined = context_redundancy_penalty(ctx, temperature=2.0)
    assert not defined and penalty.item() == 0.0 and not penalty.requires_grad
    # at T = 0.5 the same contexts give 8 ctx ctx^T - 2 I = diag(30, 126) and diag(-2, -2): -mean det = -(3780 + 4) / 2
    assert not context_redundancy_penalty(ctx, temperature=0.5)[1]
    # a single image with diag(2, 0.5) at T = 1: det(diag(3, -0.75)) = -2.25
    penalty, defined = context_redundancy_penalty(torch.tensor([[[2.0, 0.0], [0.0, 0.5]]]), temperature=1.0)
    assert defined and penalty.item() == pytest.approx(math.log10(2.25), rel=1e-6)


def test_undefined_penalty_leaves_the_cross_entropy():
    ctx = torch.zeros(2, 4, 8, requires_grad=True)  # det(-I) = 1 > 0 for 4 context vectors
    logits = torch.randn(2, 3, requires_grad=True)
    labels = torch.tensor([0, 2])
    loss, terms = applenet_loss(logits, labels, ctx)
    assert terms["crp_defined"] == 0 and terms["loss_crp"] == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-7)


# ------------------------------------------------------------------------------------------ ViT-B/16 sizes
def test_learnable_parameters_at_vit_b16_sizes_match_upstream():
    """Upstream's count at ViT-B/16, read from its models/applenet.py: ctx 4 x 512; 12 x Linear(768, 512);
    attention Linear(512, 32) + Linear(32, 512) without bias; Linear(1024, 512) twice; meta-net
    Linear(512, 32) + Linear(32, 512)."""
    upstream = 4 * 512 + 12 * (768 * 512 + 512) + 2 * 512 * 32 + 2 * (1024 * 512 + 512) + (512 * 32 + 32 + 32 * 512 + 512)
    assert upstream == 5_842_464
    model = APPLeNetModel(random_clip("ViT-B/16"), CLASSES)  # ViT-B/16 architecture, random weights
    assert sum(p.numel() for p in model.prompt_learner.parameters()) == upstream
    state = model.prompt_learner.state_dict()
    expected = {"ctx", "injection.attention.0.weight", "injection.attention.2.weight"}
    expected |= {f"multi.linear.{i}.{k}" for i in range(12) for k in ("weight", "bias")}
    expected |= {f"injection.linearlayer{i}.0.{k}" for i in (1, 2) for k in ("weight", "bias")}
    expected |= {f"meta_net.linear{i}.{k}" for i in (1, 2) for k in ("weight", "bias")}
    assert set(state) == expected  # upstream's names; class-dependent buffers are never saved


def test_resnet_backbone_is_refused_in_one_line():
    torch.manual_seed(0)
    rn = CLIP(embed_dim=32, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=64, vision_patch_size=None,
              context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    with pytest.raises(ConfigError, match=r"APPLeNet needs a ViT backbone.*MODEL\.BACKBONE\.NAME") as err:
        APPLeNetModel(rn, CLASSES)
    assert "\n" not in str(err.value)
