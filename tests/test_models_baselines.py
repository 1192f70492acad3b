"""CoOp, CoCoOp and MaPLe models (pure PyTorch): exactness of the fast paths and upstream state-dict keys.

Every fast path is compared, in fp32, with its straightforward formulation in :mod:`models.reference`: full
77-token prompts through CLIP's stock ``transformer`` blocks (sequence-first, stock causal mask), one image at
a time for CoCoOp, and CLIP's stock ``encode_image``/``encode_text`` where no prompt is involved.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP
from conftest import assert_close_fp32, assert_same, grads

from models import reference
from models.cocoop import CoCoOpModel
from models.coop import CoOpModel, class_token_order
from models.encoders import tokenize
from models.maple import MaPLeModel, upstream_prompt_learner_state

CLASSNAMES = ["baseball_field", "dense residential area", "harbor", "overpass", "storage tanks"]


# --------------------------------------------------------------------------------------------- helpers
def names() -> list[str]:
    return [c.replace("_", " ") for c in CLASSNAMES]


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    labels = torch.arange(logits.shape[0]) % logits.shape[1]
    return F.cross_entropy(logits, labels)


# --------------------------------------------------------------------------------------------- CoOp
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_coop_equals_full_length_stock_formulation(make_clip, images, position, csc):
    clip = make_clip()
    model = CoOpModel(clip, CLASSNAMES, n_ctx=4, csc=csc, class_token_position=position)
    ctx = model.prompt_learner.ctx
    assert ctx.shape == ((len(CLASSNAMES), 4, 128) if csc else (4, 128))
    fast = model(images)
    ref = reference.coop_logits(model, clip, images)
    assert fast.shape == (3, len(CLASSNAMES))
    assert_same(fast, ref, grads(loss_of(fast), [ctx]), grads(loss_of(ref), [ctx]))


def test_coop_word_init_sets_n_ctx_from_the_words(make_clip):
    clip = make_clip()
    model = CoOpModel(clip, CLASSNAMES, n_ctx=16, ctx_init="a photo of a")
    words = clip.token_embedding(tokenize(["a photo of a"]))[0, 1:5]
    torch.testing.assert_close(model.prompt_learner.ctx.detach(), words.detach())
    assert set(model.prompt_learner.state_dict()) == {"ctx"}  # upstream key; class buffers are not persistent


def test_coop_unknown_class_token_position_is_named():
    with pytest.raises(ValueError, match="'top'.*end, middle, front"):
        class_token_order(4, [1, 2], 10, "top")


# --------------------------------------------------------------------------------------------- CoCoOp
@pytest.mark.parametrize("ctx_init", ["", "a photo of a"])
def test_cocoop_batched_truncated_equals_per_image_full_length(make_clip, images, ctx_init):
    clip = make_clip()
    model = CoCoOpModel(clip, CLASSNAMES, n_ctx=4, ctx_init=ctx_init)
    learner = model.prompt_learner
    with torch.no_grad():  # a non-trivial meta-net output
        for p in learner.meta_net.parameters():
            p.normal_(std=0.2)
    params = [learner.ctx, *learner.meta_net.parameters()]
    fast = model(images)
    ref = reference.cocoop_logits(model, clip, images)
    assert fast.shape == (3, len(CLASSNAMES))
    assert_same(fast, ref, grads(loss_of(fast), params), grads(loss_of(ref), params))


def test_cocoop_state_dict_keys_are_upstream(make_clip):
    model = CoCoOpModel(make_clip(), CLASSNAMES, n_ctx=4)
    state = model.prompt_learner.state_dict()
    assert set(state) == {"ctx", *(f"meta_net.linear{i}.{k}" for i in (1, 2) for k in ("weight", "bias"))}
    assert state["meta_net.linear1.weight"].shape == (32 // 16, 32)  # hidden = image feature dim / 16
    assert state["meta_net.linear2.weight"].shape == (128, 32 // 16)


# --------------------------------------------------------------------------------------------- MaPLe
@pytest.mark.parametrize("depth", [1, 3])
def test_maple_without_prompt_tokens_is_zero_shot_clip(make_clip, images, depth):
    """No learned tokens (N_CTX 0): MaPLe is zero-shot CLIP with the CTX_INIT template, at any depth."""
    clip = make_clip()
    model = MaPLeModel(clip, CLASSNAMES, n_ctx=0, ctx_init="a photo of a", prompt_depth=depth)
    assert len(model.prompt_learner.compound_prompts_text) == depth - 1
    with torch.no_grad():
        fast = model(images)
        ref = reference.logits(clip, clip.encode_image(images), clip.encode_text(tokenize(
            [f"a photo of a {n}." for n in names()])))  # fmt: skip
    assert_close_fp32(fast, ref)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_maple_equals_stock_transformer_reference(make_clip, images, depth):
    clip = make_clip()
    model = MaPLeModel(clip, CLASSNAMES, n_ctx=2, ctx_init="a photo of a", prompt_depth=depth)
    learner = model.prompt_learner
    # initial context: the first two words; "of a" stays as fixed words
    words = clip.token_embedding(tokenize(["a photo of a"]))[0, 1:3].detach()
    torch.testing.assert_close(learner.ctx.detach(), words)
    with torch.no_grad():  # trained-looking parameters (upstream clones start identical)
        for p in learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = list(learner.parameters())
    fast = model(images)

    ref = reference.maple_logits(model, clip, images, "a photo of a")
    assert_same(fast, ref, grads(loss_of(fast), params), grads(loss_of(ref), params))


def test_maple_depth_is_checked_and_capped(make_clip):
    with pytest.raises(ValueError, match="PROMPT_DEPTH is 0.*>= 1"):
        MaPLeModel(make_clip(), CLASSNAMES, prompt_depth=0)
    model = MaPLeModel(make_clip(), CLASSNAMES, prompt_depth=9)  # 3-layer towers: 2 deep prompts
    assert len(model.prompt_learner.compound_prompts_text) == 2


def test_maple_state_dict_keys_are_upstream(make_clip):
    learner = MaPLeModel(make_clip(), CLASSNAMES, n_ctx=2, prompt_depth=3).prompt_learner
    state = learner.state_dict()
    expected = {"ctx", "proj.weight", "proj.bias", "compound_prompts_text.0", "compound_prompts_text.1"}
    expected |= {f"compound_prompt_projections.{i}.{k}" for i in (0, 1) for k in ("weight", "bias")}
    assert set(state) == expected
    assert state["proj.weight"].shape == (128, 128) and state["compound_prompts_text.0"].shape == (2, 128)
    # upstream saves the whole model: prompt_learner.* keys are kept (prefix stripped), the rest dropped
    upstream = {f"prompt_learner.{k}": v for k, v in state.items()}
    upstream |= {"prompt_learner.token_prefix": torch.zeros(1), "image_encoder.conv1.weight": torch.zeros(1)}
    converted = upstream_prompt_learner_state(upstream)
    assert set(converted) == expected | {"token_prefix"}
    assert upstream_prompt_learner_state(state).keys() == state.keys()


def test_maple_rejects_resnet_backbones():
    torch.manual_seed(0)
    rn = CLIP(embed_dim=32, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=64, vision_patch_size=None,
              context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    with pytest.raises(ValueError, match="ViT backbone"):
        MaPLeModel(rn, CLASSNAMES)
