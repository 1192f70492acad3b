"""CoOp, CoCoOp and MaPLe models (pure PyTorch): exactness of the fast paths and upstream state-dict keys.

Every fast path is compared, in fp32, with a straightforward formulation written here: full 77-token
prompts through CLIP's stock ``transformer`` blocks (sequence-first, stock causal mask), one image at a time
for CoCoOp, and CLIP's stock ``encode_image``/``encode_text`` where no prompt is involved.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP
from clip.simple_tokenizer import SimpleTokenizer
from conftest import assert_close_fp32

from models.backbone import tokenize
from models.cocoop import CoCoOpModel
from models.coop import CoOpModel, class_token_order
from models.maple import MaPLeModel, upstream_prompt_learner_state

CLASSNAMES = ["baseball_field", "dense residential area", "harbor", "overpass", "storage tanks"]


@pytest.fixture(scope="module")
def make_clip():
    """A small random CLIP with 2 attention heads and 3 layers per tower, non-trivial layer norms."""

    def make() -> CLIP:
        torch.manual_seed(0)
        model = CLIP(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=128, vision_patch_size=16,
                     context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                     transformer_layers=3).float().eval()  # fmt: skip
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ln" in name:
                    p.add_(0.1 * torch.randn_like(p))
        return model

    return make


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


# --------------------------------------------------------------------------------------------- references
def names() -> list[str]:
    return [c.replace("_", " ") for c in CLASSNAMES]


def ref_text(clip: CLIP, prompts: torch.Tensor, tokens: torch.Tensor, deep=(), n_ctx: int = 0) -> torch.Tensor:
    """Stock text transformer on full-length prompts (N, 77, D); deep[i] replaces positions 1..n_ctx before block i+1."""
    x = (prompts + clip.positional_embedding).permute(1, 0, 2)
    for i, block in enumerate(clip.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:1], deep[i - 1].unsqueeze(1).expand(-1, x.shape[1], -1), x[1 + n_ctx :]])
        x = block(x)
    x = clip.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ clip.text_projection


def ref_image(clip: CLIP, images: torch.Tensor, shallow: torch.Tensor, deep=()) -> torch.Tensor:
    """Stock vision transformer with ``shallow`` prompt tokens appended; deep[i] replaces them before block i+1."""
    vis = clip.visual
    x = vis.conv1(images).reshape(images.shape[0], vis.conv1.out_channels, -1).permute(0, 2, 1)
    x = torch.cat([vis.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    x = torch.cat([x + vis.positional_embedding, shallow.expand(x.shape[0], -1, -1)], dim=1)
    x = vis.ln_pre(x).permute(1, 0, 2)
    n = shallow.shape[0]
    for i, block in enumerate(vis.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[: x.shape[0] - n], deep[i - 1].unsqueeze(1).expand(-1, x.shape[1], -1)])
        x = block(x)
    return vis.ln_post(x.permute(1, 0, 2)[:, 0]) @ vis.proj


def logits_from(clip: CLIP, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    return clip.logit_scale.exp() * F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).t()


def placeholder_prompts(clip: CLIP, n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = tokenize([(" ".join(["X"] * n_ctx) + f" {name}.").strip() for name in names()])
    return clip.token_embedding(tokens).detach(), tokens


def upstream_coop_prompts(emb: torch.Tensor, ctx: torch.Tensor, n_ctx: int, position: str) -> torch.Tensor:
    """CoOp's arrangement, one class at a time, at full length."""
    tok = SimpleTokenizer()
    rows = []
    for i, name in enumerate(names()):
        name_len = len(tok.encode(name))
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


def grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    labels = torch.arange(logits.shape[0]) % logits.shape[1]
    return F.cross_entropy(logits, labels)


def assert_same(fast: torch.Tensor, ref: torch.Tensor, fast_g, ref_g) -> None:
    assert_close_fp32(fast, ref)
    assert len(fast_g) == len(ref_g) > 0
    for a, b in zip(fast_g, ref_g):
        assert b.abs().max() > 0  # the reference gradient is not trivially zero
        assert_close_fp32(a, b)


# --------------------------------------------------------------------------------------------- CoOp
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_coop_equals_full_length_stock_formulation(make_clip, images, position, csc):
    clip = make_clip()
    model = CoOpModel(clip, CLASSNAMES, n_ctx=4, csc=csc, class_token_position=position)
    ctx = model.prompt_learner.ctx
    assert ctx.shape == ((len(CLASSNAMES), 4, 128) if csc else (4, 128))
    fast = model(images)
    emb, tokens = placeholder_prompts(clip, 4)
    with torch.no_grad():
        image_feats = clip.encode_image(images)
    ref = logits_from(clip, image_feats, ref_text(clip, upstream_coop_prompts(emb, ctx, 4, position), tokens))
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

    emb, tokens = placeholder_prompts(clip, 4)
    with torch.no_grad():
        feats = F.normalize(clip.encode_image(images), dim=-1)
    bias = learner.meta_net(feats)
    rows = []
    for b in range(images.shape[0]):  # the published formulation: one image at a time, 77 tokens
        ctx_b = (learner.ctx + bias[b]).unsqueeze(0).expand(len(CLASSNAMES), -1, -1)
        prompts = torch.cat([emb[:, :1], ctx_b, emb[:, 5:]], dim=1)
        text = F.normalize(ref_text(clip, prompts, tokens), dim=-1)
        rows.append(clip.logit_scale.exp() * feats[b] @ text.t())
    ref = torch.stack(rows)
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
        ref = logits_from(clip, clip.encode_image(images), clip.encode_text(tokenize(
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

    tokens = tokenize([f"a photo of a {n}." for n in names()])
    emb = clip.token_embedding(tokens).detach()
    prompts = torch.cat([emb[:, :1], learner.ctx.expand(len(CLASSNAMES), -1, -1), emb[:, 3:]], dim=1)
    deep_text = list(learner.compound_prompts_text)
    deep_vis = [proj(p) for proj, p in zip(learner.compound_prompt_projections, deep_text)]
    text = ref_text(clip, prompts, tokens, deep_text, n_ctx=2)
    image = ref_image(clip, images, learner.proj(learner.ctx), deep_vis)
    ref = logits_from(clip, image, text)
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
