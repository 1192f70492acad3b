"""CLIP-Adapter: exactness against upstream's formulation, the residual blend, learnable parameters, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_fp32

from common.errors import ConfigError
from models import reference
from models.clip_adapter import CLIPAdapterModel
from models.weights import random_clip
from models.zsclip import ZeroshotModel

CLASSES = ["baseball_field", "dense residential area", "harbor", "tennis court", "river"]
TEMPLATE = "a satellite photo of a {}."


def test_fast_path_equals_upstream_formulation(make_clip):
    """Logits and adapter gradients against stock encode_image/encode_text recomputed per call (fp32)."""
    clip_model = make_clip(text_width=96)
    model = CLIPAdapterModel(clip_model, CLASSES, TEMPLATE)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 4])
    params = list(model.prompt_learner.parameters())
    fast = model(images)
    ref = reference.clip_adapter_logits(model, clip_model, images)
    assert fast.shape == (3, len(CLASSES))
    assert_close_fp32(fast, ref, what="logits")
    grads = zip(torch.autograd.grad(F.cross_entropy(fast, labels), params),
                torch.autograd.grad(F.cross_entropy(ref, labels), params))  # fmt: skip
    for a, b in grads:
        assert b.abs().max() > 0
        assert_close_fp32(a, b, what="adapter gradient")


def test_ratio_blends_the_adapted_feature(make_clip):
    """Ratio 0 is zero-shot CLIP with the same template; ratio 1 classifies the adapter's output alone."""
    clip_model = make_clip()
    images = torch.randn(2, 3, 32, 32)
    zero_shot = ZeroshotModel(clip_model, CLASSES, [TEMPLATE])
    with torch.no_grad():
        assert_close_fp32(CLIPAdapterModel(clip_model, CLASSES, TEMPLATE, ratio=0.0)(images), zero_shot(images))
        model = CLIPAdapterModel(clip_model, CLASSES, TEMPLATE, ratio=1.0)
        adapted = F.normalize(model.prompt_learner(clip_model.encode_image(images)), dim=-1)
        expected = clip_model.logit_scale.exp() * adapted @ zero_shot.text_features.t()
        assert_close_fp32(model(images), expected)


def test_learnable_parameters_at_vit_b16_sizes():
    """Upstream's Adapter(1024, 4) is RN50's: 2 x 1024 x 256 = 524,288 weights, no biases. Its width comes from
    the backbone here: the same count with RN50, 2 x 512 x 128 = 131,072 with ViT-B/16 (where upstream's
    hard-coded 1024 would fail on the 512-d feature)."""
    vit = CLIPAdapterModel(random_clip("ViT-B/16"), CLASSES, TEMPLATE)
    assert sum(p.numel() for p in vit.prompt_learner.parameters()) == 2 * 512 * 128 == 131_072
    assert set(vit.prompt_learner.state_dict()) == {"fc.0.weight", "fc.2.weight"}  # upstream's names
    rn50 = CLIPAdapterModel(random_clip("RN50"), CLASSES, TEMPLATE)
    assert sum(p.numel() for p in rn50.prompt_learner.parameters()) == 2 * 1024 * 256 == 524_288


@pytest.mark.parametrize(("options", "message"), [
    ({"ratio": 1.5}, r"ratio 1\.5 is not in \[0, 1\].*TRAINER\.CLIP_ADAPTER\.RATIO"),
    ({"reduction": 0}, r"reduction 0 does not fit the 32-d image feature.*TRAINER\.CLIP_ADAPTER\.REDUCTION"),
])  # fmt: skip
def test_bad_settings_are_named(make_clip, options, message):
    with pytest.raises(ConfigError, match=message):
        CLIPAdapterModel(make_clip(), CLASSES, TEMPLATE, **options)
