"""Backbone loading (every source, offline) and the exactness of the fast encoders."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import assert_close_fp32

from models import backbone as bb
from models.backbone import TextEncoder, VisualEncoder, build_toy_clip, eot_positions, load_clip, tokenize

PROMPTS = [
    "a satellite photo of a baseball field.",
    "a photo of a dense residential area with many houses.",
    "x y z w harbor.",
]


@pytest.fixture(scope="module")
def toy():
    return build_toy_clip(seed=3)


def _tiny_hf_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=2)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                  image_size=32, patch_size=16, hidden_act="quick_gelu")
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial layer norms and embeddings
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output


def test_hf_conversion_matches_hf_model(tmp_path):
    hf = _tiny_hf_clip()
    oa = bb._from_state_dict(bb.hf_to_openai_state_dict(hf.state_dict()))
    images = torch.randn(3, 3, 32, 32)
    tokens = tokenize(PROMPTS)
    with torch.no_grad():
        hf_img = _features(hf.get_image_features(pixel_values=images))
        hf_txt = _features(hf.get_text_features(input_ids=tokens))
        oa_img, oa_txt = oa.encode_image(images), oa.encode_text(tokens)
    assert oa_img.shape == hf_img.shape and oa_txt.shape == hf_txt.shape
    assert (oa_img - hf_img).abs().max() <= 1e-5
    assert (oa_txt - hf_txt).abs().max() <= 1e-5
    assert torch.allclose(oa.logit_scale, hf.logit_scale)


def test_load_from_hf_folder(tmp_path):
    hf = _tiny_hf_clip()
    hf.save_pretrained(tmp_path / "hf")
    model = load_clip("ViT-B/16", path=tmp_path / "hf")
    tokens = tokenize(PROMPTS[:1])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), _features(hf.get_text_features(input_ids=tokens)), atol=1e-5)


@pytest.mark.parametrize("nested", [False, True])
def test_load_from_state_dict_file(tmp_path, toy, nested):
    state = toy.state_dict()
    torch.save({"state_dict": state} if nested else state, tmp_path / "w.pt")
    model = load_clip("ViT-B/16", path=tmp_path / "w.pt")
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def _fake_openai_name(monkeypatch, tmp_path, model):
    """Register a fake OpenAI model whose URL carries the SHA-256 of a saved toy state dict."""
    src = tmp_path / "src.pt"
    torch.save(model.state_dict(), src)
    sha = bb.sha256_file(src)
    monkeypatch.setitem(bb.OPENAI_URLS, "Toy-B/16", f"https://openaipublic.invalid/clip/models/{sha}/Toy-B-16.pt")
    return src, sha


def test_load_from_cache_dir(tmp_path, toy, monkeypatch):
    src, _ = _fake_openai_name(monkeypatch, tmp_path, toy)
    cache = tmp_path / "cache"
    cache.mkdir()
    src.rename(cache / "Toy-B-16.pt")
    monkeypatch.setenv("CLIP_CACHE", str(cache))
    model = load_clip("Toy-B/16", download=False)
    assert torch.equal(model.token_embedding.weight, toy.token_embedding.weight)


def test_corrupt_cache_file_names_file_and_checksum(tmp_path, toy, monkeypatch):
    _, sha = _fake_openai_name(monkeypatch, tmp_path, toy)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "Toy-B-16.pt").write_bytes(b"truncated download")
    monkeypatch.setenv("CLIP_CACHE", str(cache))
    with pytest.raises(bb.CorruptWeightsError) as err:
        load_clip("Toy-B/16")
    assert str(cache / "Toy-B-16.pt") in str(err.value) and sha in str(err.value)


def test_corrupt_explicit_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(bb.CorruptWeightsError, match="bad.pt"):
        load_clip("ViT-B/16", path=bad)


def test_nothing_found_lists_every_source(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(bb.urllib.request, "urlopen", no_network)
    caplog.set_level(logging.INFO)
    with pytest.raises(bb.BackboneNotFoundError) as err:
        load_clip("ViT-B/16")
    msg = str(err.value)
    assert "local cache" in msg and "OpenAI URL" in msg and "Hugging Face hub: openai/clip-vit-base-patch16" in msg
    assert "MODEL.BACKBONE.PATH" in msg  # says how to provide weights offline
    assert "ViT-B-16.pt" in caplog.text


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(bb.UnknownBackboneError) as err:
        load_clip("ViT-X/99")
    assert "ViT-B/16" in str(err.value) and "toy" in str(err.value)


def test_toy_is_seeded_and_loud(caplog):
    caplog.set_level(logging.WARNING)
    a, b = build_toy_clip(seed=1), build_toy_clip(seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert "RANDOM" in caplog.text
    assert a.visual.input_resolution == 224 and a.visual.conv1.weight.shape[0] % 64 == 0


def assert_same_values_and_grads(out, ref, inp, inp_ref) -> None:
    """``out`` equals ``ref`` and so do the gradients of a (seeded) random projection w.r.t. their inputs."""
    assert_close_fp32(out, ref)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    (ref * weights).sum().backward()
    (out * weights).sum().backward()
    assert inp_ref.grad.abs().max() > 0  # the reference gradient is not trivially zero
    assert_close_fp32(inp.grad, inp_ref.grad)


def _stock_text(toy, prompts: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """Straightforward formulation: the stock transformer over all 77 tokens of (N, 77, D) prompts."""
    x = toy.transformer((prompts + toy.positional_embedding).permute(1, 0, 2)).permute(1, 0, 2)
    return toy.ln_final(x)[torch.arange(len(prompts)), eot] @ toy.text_projection


def test_text_encoder_truncated_equals_full(toy):
    encoder = TextEncoder(toy)
    tokens = tokenize(PROMPTS)
    prompts = toy.token_embedding(tokens).detach().requires_grad_(True)
    eot = eot_positions(tokens)
    full = prompts.detach().clone().requires_grad_(True)
    ref = _stock_text(toy, full, eot)
    assert_same_values_and_grads(encoder(prompts, eot), ref, prompts, full)


def test_text_encoder_any_leading_shape(toy):
    encoder = TextEncoder(toy)
    tokens = tokenize(PROMPTS)
    emb = toy.token_embedding(tokens).detach()
    batched = encoder(emb.expand(2, -1, -1, -1), eot_positions(tokens).expand(2, -1))
    assert batched.shape == (2, 3, toy.text_projection.shape[1])
    assert torch.allclose(batched[1], encoder(emb, eot_positions(tokens)), atol=1e-6)


def test_shared_prefix_equals_full_prompts(toy):
    encoder = TextEncoder(toy)
    tokens = tokenize(PROMPTS)
    emb = toy.token_embedding(tokens).detach()
    n_pre = 5
    prefix = (emb[:1, :n_pre] + 0.1 * torch.randn(4, n_pre, emb.shape[-1])).requires_grad_(True)
    suffix = emb[:, n_pre:]
    eot = eot_positions(tokens)
    assert len(set(eot.tolist())) == 3  # prompts end at different positions: the ragged rows are exercised
    prefix_ref = prefix.detach().clone().requires_grad_(True)
    full = torch.cat([prefix_ref[:, None].expand(-1, 3, -1, -1), suffix[None].expand(4, -1, -1, -1)], dim=2)
    ref = _stock_text(toy, full.reshape(12, 77, -1), eot.repeat(4)).view(4, 3, -1)
    assert_same_values_and_grads(encoder.forward_shared_prefix(prefix, suffix, eot), ref, prefix, prefix_ref)


def test_suffix_rows_pack_and_grid():
    eot = torch.tensor([1, 3, 0])
    rows = bb.SuffixRows(eot, 4)
    assert not rows.full and rows.n_rows == 2 + 4 + 1
    grid = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4, 1)
    packed = rows.pack(grid)
    assert packed.shape == (2 * 7, 1)
    assert packed[:7, 0].tolist() == [0, 1, 4, 5, 6, 7, 8]
    back = rows.grid(packed, 2)
    valid = torch.arange(4)[None, :] <= eot[:, None]
    assert torch.equal(back[:, valid], grid[:, valid])
    # a slot after a prompt's end holds that prompt's end-of-text row
    assert back[0, 0, 3, 0] == grid[0, 0, 1, 0] and back[1, 2, 2, 0] == grid[1, 2, 0, 0]
    assert packed.view(2, 7)[:, rows.eot_rows].tolist() == [[1, 7, 8], [13, 19, 20]]
    assert bb.SuffixRows(torch.tensor([3, 3]), 4).full


def test_shared_prefix_rejects_eot_inside_prefix(toy):
    encoder = TextEncoder(toy)
    tokens = tokenize(["a b"])
    emb = toy.token_embedding(tokens).detach()
    with pytest.raises(ValueError, match="prefix"):
        encoder.forward_shared_prefix(emb[:, :5], emb[:, 5:], eot_positions(tokens))


def test_visual_encoder_matches_encode_image_and_exposes_tokens(toy):
    images = torch.randn(2, 3, 224, 224)
    feats, tokens = VisualEncoder(toy)(images)
    with torch.no_grad():
        ref = toy.encode_image(images)
        x = toy.visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([toy.visual.class_embedding.expand(2, 1, -1), x], 1) + toy.visual.positional_embedding
        x = toy.visual.transformer(toy.visual.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
    assert (feats - ref).abs().max() <= 1e-5
    assert tokens.shape == (2, 197, 64)
    assert (tokens - x).abs().max() <= 1e-5


def test_transformers_imports_cleanly_from_repo_root():
    """Our top-level `datasets/` package must not shadow Hugging Face `datasets` for transformers."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    code = "import transformers, transformers.models.clip; print(transformers.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_load_from_openai_jit_archive(tmp_path, toy):
    """OpenAI ships TorchScript archives; a traced toy CLIP stands in for one."""
    with torch.no_grad():
        traced = torch.jit.trace(toy, (torch.randn(1, 3, 224, 224), tokenize(PROMPTS[:1])))
    traced.save(str(tmp_path / "ViT-toy.pt"))
    model = load_clip("ViT-B/16", path=tmp_path / "ViT-toy.pt")
    for key, value in toy.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
