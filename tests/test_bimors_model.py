"""BiMoRS model: exactness of the fast path, learnable parameter set, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_fp32

from models import reference
from models.bimors import BiMoRSModel
from models.weights import build_toy_clip, random_clip

CLASSES = ["baseball_field", "dense residential area", "harbor", "tennis court", "river"]


def _model(caption_dim: int = 32, trainable: bool = True, seed: int = 0) -> BiMoRSModel:
    torch.manual_seed(seed)
    clip_model = build_toy_clip(seed=seed)
    return BiMoRSModel(clip_model, CLASSES, caption_dim=caption_dim, caption_proj_trainable=trainable)


def test_fast_path_equals_per_image_full_length_formulation():
    torch.manual_seed(1)
    clip_model = build_toy_clip(seed=1)
    model = BiMoRSModel(clip_model, CLASSES, caption_dim=32)
    with torch.no_grad():  # a non-trivial learner state (zero-init layers would hide bugs)
        for p in model.prompt_learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images, captions = torch.randn(3, 3, 224, 224), torch.randn(3, 32)
    labels = torch.tensor([0, 3, 4])
    params = [p for p in model.prompt_learner.parameters() if p.requires_grad]

    fast = model(images, captions)
    g_fast = torch.autograd.grad(F.cross_entropy(fast, labels), params)
    ref = reference.bimors_logits(model, clip_model, images, captions)
    g_ref = torch.autograd.grad(F.cross_entropy(ref, labels), params)

    assert fast.shape == (3, len(CLASSES))
    assert_close_fp32(fast, ref)
    for a, b in zip(g_fast, g_ref):
        assert b.abs().max() > 0  # the reference gradient is not trivially zero
        assert_close_fp32(a, b)


def test_sequence_is_truncated():
    model = _model()
    assert model.prompt_learner.prompts.seq_len < 20  # of 77


@pytest.mark.parametrize("trainable", [True, False])
def test_learnable_parameters_at_vit_b16_sizes(trainable):
    """Published count: 1,116,720 learnable parameters with the frozen caption projection (compat)."""
    clip_model = random_clip("ViT-B/16")  # ViT-B/16 architecture, random weights
    model = BiMoRSModel(clip_model, CLASSES, caption_dim=768, caption_proj_trainable=trainable)
    learnable = sum(p.numel() for p in model.prompt_learner.parameters())
    projection = 768 * 512 + 512
    assert learnable == (1_116_720 + projection if trainable else 1_116_720)
    state = model.prompt_learner.state_dict()
    assert "caption_proj.weight" in state and state["caption_proj.weight"].shape == (512, 768)
    assert "ctx" in state and "meta_net.linear1.weight" in state
    assert "cross_attn.cross_attend_blocks.fn.in_proj_weight" in state
    assert not any(k.startswith("prompts.") for k in state)  # class-dependent buffers are never saved
    assert model.prompt_learner.meta_net.linear1.in_features == 768


def test_caption_dimension_mismatch_is_clear():
    model = _model(caption_dim=32)
    with pytest.raises(ValueError, match="dimension 16 .* built for 32"):
        model(torch.randn(1, 3, 224, 224), torch.randn(1, 16))


def test_clip_stays_frozen_and_image_encoder_has_no_graph():
    model = _model()
    frozen = [n for n, p in model.named_parameters() if not n.startswith("prompt_learner.")]
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    visual = model.encode_visual(torch.randn(2, 3, 224, 224))
    feats, tokens = visual["features"], visual["tokens"]
    assert feats.grad_fn is None and tokens.grad_fn is None
