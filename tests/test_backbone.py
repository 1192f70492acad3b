"""Backbone table and weight loading (every source, offline), and the exactness of the fast encoders."""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import threading
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import assert_close_fp32

from common.io import file_digest
from models import reference, weights
from models.encoders import SuffixRows, TextEncoder, VisualEncoder, eot_positions, tokenize
from models.weights import build_toy_clip, load_clip

PROMPTS = [
    "a satellite photo of a baseball field.",
    "a photo of a dense residential area with many houses.",
    "x y z w harbor.",
]


@pytest.fixture(scope="module")
def toy():
    return build_toy_clip(seed=3)


def _tiny_hf_clip(act: str = "quick_gelu"):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=1, max_position_embeddings=77, hidden_act=act,
                bos_token_id=49406, eos_token_id=2)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                  image_size=32, patch_size=16, hidden_act=act)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial layer norms and embeddings
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_conversion_matches_hf_model(tmp_path, act):
    hf = _tiny_hf_clip(act)
    oa = weights.from_state_dict(weights.hf_to_openai_state_dict(hf.state_dict()), weights._hf_activation(hf.config))
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


def toy_arch() -> weights.CLIPArch:
    return weights.BACKBONES["toy"].arch


def _fake_openai_name(monkeypatch, tmp_path, model):
    """Register a fake OpenAI model whose URL carries the SHA-256 of a saved toy state dict."""
    src = tmp_path / "src.pt"
    torch.save(model.state_dict(), src)
    sha = file_digest(src)
    url = f"https://openaipublic.invalid/clip/models/{sha}/Toy-B-16.pt"
    monkeypatch.setitem(weights.BACKBONES, "Toy-B/16", weights.Backbone(toy_arch(), url))
    return src, sha


def test_load_from_cache_dir(tmp_path, toy, monkeypatch):
    src, _ = _fake_openai_name(monkeypatch, tmp_path, toy)
    cache = tmp_path / "cache"
    cache.mkdir()
    src.rename(cache / "Toy-B-16.pt")
    monkeypatch.setenv("CLIP_CACHE", str(cache))
    model = load_clip("Toy-B/16", download=False)
    assert torch.equal(model.token_embedding.weight, toy.token_embedding.weight)


@pytest.fixture
def web_root(tmp_path):
    """A folder served over HTTP on localhost: ``(folder, base URL)``."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_from_the_openai_url_is_checked_then_cached(tmp_path, toy, monkeypatch, web_root):
    root, base = web_root
    src, sha = _fake_openai_name(monkeypatch, tmp_path, toy)
    (root / sha).mkdir()
    shutil.copy(src, root / sha / "Toy-B-16.pt")
    monkeypatch.setitem(weights.BACKBONES, "Toy-B/16", weights.Backbone(toy_arch(), f"{base}/{sha}/Toy-B-16.pt"))
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIP_CACHE", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path))
    model = load_clip("Toy-B/16", download=True)
    assert torch.equal(model.token_embedding.weight, toy.token_embedding.weight)
    assert [p.name for p in cache.iterdir()] == ["Toy-B-16.pt"]  # no temporary file left
    (cache / "Toy-B-16.pt").unlink()
    (root / sha / "Toy-B-16.pt").write_bytes(b"tampered on the way")
    with pytest.raises(weights.CorruptWeightsError, match=f"SHA-256 .*expected {sha}"):
        load_clip("Toy-B/16")
    assert list(cache.iterdir()) == []  # a download that fails its checksum is never cached


def test_corrupt_cache_file_names_file_and_checksum(tmp_path, toy, monkeypatch):
    _, sha = _fake_openai_name(monkeypatch, tmp_path, toy)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "Toy-B-16.pt").write_bytes(b"truncated download")
    monkeypatch.setenv("CLIP_CACHE", str(cache))
    with pytest.raises(weights.CorruptWeightsError) as err:
        load_clip("Toy-B/16")
    assert str(cache / "Toy-B-16.pt") in str(err.value) and sha in str(err.value)


def test_corrupt_explicit_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(weights.CorruptWeightsError, match="bad.pt"):
        load_clip("ViT-B/16", path=bad)


def test_nothing_found_lists_every_source(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    caplog.set_level(logging.INFO)
    with pytest.raises(weights.BackboneNotFoundError) as err:
        load_clip("ViT-B/16")
    msg = str(err.value)
    assert "local cache" in msg and "OpenAI URL" in msg and "Hugging Face hub: openai/clip-vit-base-patch16" in msg
    assert "MODEL.BACKBONE.PATH" in msg  # says how to provide weights offline
    assert "ViT-B-16.pt" in caplog.text


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(weights.UnknownBackboneError) as err:
        load_clip("ViT-X/99")
    assert "ViT-B/16" in str(err.value) and "toy" in str(err.value)


def test_toy_is_seeded_and_loud(caplog):
    caplog.set_level(logging.WARNING)
    a, b = build_toy_clip(seed=1), build_toy_clip(seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert "RANDOM" in caplog.text
    assert a.visual.input_resolution == 224 and a.visual.conv1.weight.shape[0] % 64 == 0


# ---------------------------------------------------------------------------------------------- the table
def test_every_openai_model_has_a_row_with_its_file():
    from clip import clip as openai_clip

    assert set(openai_clip.available_models()) <= set(weights.BACKBONES)
    for name in openai_clip.available_models():
        row = weights.BACKBONES[name]
        assert row.filename.endswith(".pt") and len(row.sha256) == 64, name


@pytest.mark.parametrize("name", sorted(weights.BACKBONES))
def test_row_architecture_is_what_clip_builds(name):
    """Each row's sizes survive a build: reading them back from the built model's state dict gives the row."""
    arch = weights.BACKBONES[name].arch
    with torch.device("meta"):  # shapes only: even RN50x64 costs nothing
        state = arch.build().state_dict()
    assert weights.CLIPArch.from_state_dict(state, arch.activation) == arch


def test_gelu_architecture_builds_gelu_blocks_and_the_encoders_stay_exact():
    arch = dataclasses.replace(weights.BACKBONES["toy"].arch, activation="gelu")
    torch.manual_seed(0)
    model = arch.build()
    blocks = [*model.transformer.resblocks, *model.visual.transformer.resblocks]
    assert all(isinstance(b.mlp.gelu, torch.nn.GELU) for b in blocks)
    tokens = tokenize(PROMPTS)
    emb = model.token_embedding(tokens).detach()
    eot = eot_positions(tokens)
    with torch.no_grad():
        assert_close_fp32(TextEncoder(model)(emb, eot), reference.stock_text(model, emb, eot))
        images = torch.randn(2, 3, 224, 224)
        assert_close_fp32(VisualEncoder(model)(images)[0], model.encode_image(images))
    with pytest.raises(ValueError, match="'relu' is not one of quick_gelu, gelu"):
        dataclasses.replace(arch, activation="relu")


def test_explicit_path_takes_the_activation_of_the_named_row(tmp_path, toy, monkeypatch):
    torch.save(toy.state_dict(), tmp_path / "w.pt")
    toy_arch = weights.BACKBONES["toy"].arch
    monkeypatch.setitem(weights.BACKBONES, "Toy-GELU", weights.Backbone(dataclasses.replace(toy_arch, activation="gelu")))
    gelu_model, openai_model = load_clip("Toy-GELU", path=tmp_path / "w.pt"), load_clip("ViT-B/16", path=tmp_path / "w.pt")
    assert isinstance(gelu_model.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert not isinstance(openai_model.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert weights.CLIPArch.from_state_dict(toy.state_dict()) == toy_arch


def test_random_clip_is_seeded_and_leaves_the_global_generator_alone():
    before = torch.random.get_rng_state()
    a, b = weights.random_clip("toy", seed=5), weights.random_clip("toy", seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(weights.UnknownBackboneError, match="Valid names: RN50"):
        weights.random_clip("ViT-Z/1")


# ---------------------------------------------------------------------------------------------- encoders
def assert_same_values_and_grads(out, ref, inp, inp_ref) -> None:
    """``out`` equals ``ref`` and so do the gradients of a (seeded) random projection w.r.t. their inputs."""
    assert_close_fp32(out, ref)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0)).to(ref.device)
    (ref * weights).sum().backward()
    (out * weights).sum().backward()
    assert inp_ref.grad.abs().max() > 0  # the reference gradient is not trivially zero
    assert_close_fp32(inp.grad, inp_ref.grad)


def test_text_encoder_truncated_equals_full(toy):
    encoder = TextEncoder(toy)
    tokens = tokenize(PROMPTS)
    prompts = toy.token_embedding(tokens).detach().requires_grad_(True)
    eot = eot_positions(tokens)
    full = prompts.detach().clone().requires_grad_(True)
    ref = reference.stock_text(toy, full, eot)
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
    ref = reference.stock_text(toy, full.reshape(12, 77, -1), eot.repeat(4)).view(4, 3, -1)
    assert_same_values_and_grads(encoder.forward_shared_prefix(prefix, suffix, eot), ref, prefix, prefix_ref)


def test_suffix_rows_pack_and_grid():
    eot = torch.tensor([1, 3, 0])
    rows = SuffixRows(eot, 4)
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
    assert SuffixRows(torch.tensor([3, 3]), 4).full


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
        _, x = reference.stock_vit(toy, images)
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
