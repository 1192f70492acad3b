"""Remote-sensing CLIP backbones across libraries: open_clip models, saved as each release saves them, loaded
through our loader under the RS names, give open_clip's own image and text embeddings.

Nothing is mocked but the network boundary (``huggingface_hub.hf_hub_download``, which returns the file saved
here). The open_clip models are real (``open-clip-torch``, a dev requirement) with random weights: the
published ``ViT-B-32`` (GELU) and ``ViT-B-32-quickgelu`` configs, and small custom configs (open_clip's own
config dicts) in every release's layout. A GELU checkpoint built as QuickGELU must fail the comparison, so the
tests show the activation matters.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import pytest
import torch
from conftest import REPO_ROOT, assert_close_fp32
from torch import nn

from models import weights
from models.applenet import APPLeNetModel
from models.bimors import BiMoRSModel
from models.clip_adapter import CLIPAdapterModel
from models.cocoop import CoCoOpModel
from models.coop import CoOpModel
from models.encoders import TextEncoder, VisualEncoder, eot_positions, tokenize
from models.kgcoop import KgCoOpModel
from models.maple import MaPLeModel
from models.promptsrc import PromptSRCModel
from models.weights import BACKBONES, load_clip
from models.zsclip import ZeroshotModel
from tools import results as R

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import open_clip

PROMPTS = ["a satellite photo of a harbor.", "an aerial image of a dense residential area.", "x y z w forest."]
RS_NAMES = sorted(n for n, row in BACKBONES.items() if row.hf_file or row.manual)
# How each release packs its weights (their loading code: README of RemoteCLIP and GeoRSCLIP, SkyScript's
# training checkpoints as RS-TransCLIP unpacks them).
RELEASE_LAYOUT = {"RemoteCLIP": "plain", "GeoRSCLIP": "plain", "SkyCLIP50": "training"}


def release_layout(name: str) -> str:
    return RELEASE_LAYOUT[name.split("-")[0]]


# ------------------------------------------------------------------------------------------ open_clip side
def tiny_open_clip(arch: weights.CLIPArch, seed: int = 0, custom_text: bool = False) -> nn.Module:
    """A small random open_clip CLIP of ``arch``'s kind (ViT or ResNet), input size, patch size (so token count),
    activation and ViT head width; narrow and shallow.

    Built from open_clip's own config dicts; layer norms, embeddings and the logit scale are perturbed so that
    every weight matters to the comparison.
    """
    vit = arch.vision_patch_size is not None
    width = 4 * arch.vision_head_width if vit else 16  # several heads; OpenAI's width // 64 rule would differ
    vision = (
        dict(image_size=arch.image_resolution, patch_size=arch.vision_patch_size, layers=2, width=width,
             head_width=arch.vision_head_width)
        if vit else dict(image_size=arch.image_resolution, layers=(1, 1, 1, 1), width=width)
    )  # fmt: skip
    text = dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)
    cls = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    torch.manual_seed(seed)
    model = cls(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=arch.activation == "quick_gelu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "embedding" in name or "logit_scale" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_release(model: nn.Module, path, layout: str) -> None:
    """Save ``model`` as a release does: ``plain`` state dict, ``module``-prefixed, or a ``training`` checkpoint."""
    state = model.state_dict()
    if layout in ("module", "training"):
        state = {f"module.{k}": v for k, v in state.items()}
    if layout == "training":  # open_clip's training loop: epoch, name, state_dict, optimizer
        opt = torch.optim.AdamW([p for p in model.parameters()][:2], lr=1e-9)
        state = {"epoch": 20, "name": "SkyCLIP", "state_dict": state, "optimizer": opt.state_dict()}
    torch.save(state, path)


def inputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random images of the open_clip model's input size and three tokenised prompts."""
    side = model.visual.image_size
    side = side[0] if isinstance(side, tuple) else side
    torch.manual_seed(1)
    return torch.randn(2, 3, side, side), tokenize(PROMPTS)


def embeddings(ours: nn.Module, theirs: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(ours, open_clip's) image and text embeddings: our stock CLIP and our fast encoders against open_clip's own."""
    images, tokens = inputs(theirs)
    with torch.no_grad():
        ref_img, ref_txt = theirs.encode_image(images), theirs.encode_text(tokens)
        return {
            "image embeddings": (ours.encode_image(images), ref_img),
            "text embeddings": (ours.encode_text(tokens), ref_txt),
            "fast image encoder": (VisualEncoder(ours)(images)[0], ref_img),
            "fast text encoder": (TextEncoder(ours)(ours.token_embedding(tokens), eot_positions(tokens)), ref_txt),
        }


def relative_error(pair: tuple[torch.Tensor, torch.Tensor]) -> float:
    """max |ours - theirs| / max |theirs|: what :func:`conftest.assert_close_fp32` bounds by 1e-5."""
    got, ref = pair
    return float((got - ref).abs().max() / ref.abs().max())


def compare(ours: nn.Module, theirs: nn.Module, what: str) -> dict[str, float]:
    """Assert our CLIP gives open_clip's embeddings (fp32, 1e-5 of the largest); the relative errors by output."""
    pairs = embeddings(ours, theirs)
    for label, (got, ref) in pairs.items():
        assert_close_fp32(got, ref, what=f"{what}: {label}")
    assert torch.equal(ours.logit_scale, theirs.logit_scale)
    return {label: relative_error(pair) for label, pair in pairs.items()}


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """The network boundary: ``hf_hub_download`` serves files registered here (and records each request)."""
    import huggingface_hub

    served: dict[tuple[str, str], object] = {}
    requests: list[tuple[str, str]] = []

    def hf_hub_download(repo_id: str, filename: str, **kwargs):
        requests.append((repo_id, filename))
        if (repo_id, filename) not in served:
            raise OSError(f"offline: {repo_id}/{filename}")
        return str(served[repo_id, filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.cache/clip is empty too
    return served, requests


# ------------------------------------------------------------------------------- every RS name, its layout
def test_every_rs_name_has_a_release_layout_and_a_source():
    assert len(RS_NAMES) == 9
    for name in RS_NAMES:
        row = BACKBONES[name]
        assert release_layout(name) in ("plain", "training")
        assert row.licence and row.cache_name
        assert bool(row.hf_file) != bool(row.manual), name  # a hub file, or where to get it by hand


def docs_table() -> dict[str, list[str]]:
    """docs/backbones.md's backbone table: name -> its cells (architecture, source, activation, licence, zero-shot)."""
    rows = {}
    for line in (REPO_ROOT / "docs" / "backbones.md").read_text().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_the_docs_table_names_every_row_with_its_activation_licence_and_published_numbers():
    table = docs_table()
    assert list(table) == list(BACKBONES)
    for name, (_arch, _source, activation, licence, _zero_shot) in table.items():
        row = BACKBONES[name]
        assert activation.split()[0] == row.arch.activation and licence == row.licence, name
    datasets = ["AID", "EuroSAT", "MLRSNet", "OPTIMAL31", "PatternNet", "RESISC45", "WHURS19"]
    for entry in R.load_published()[R.ZEROSHOT_BLOCK]["results"].values():
        shown = [float(v) for v in table[entry["backbone"]][4].split(" / ")]
        assert shown == [entry["accuracy"][d] for d in datasets], entry["backbone"]


@pytest.mark.parametrize("name", RS_NAMES)
def test_rs_name_loads_its_release_layout_with_open_clip_embeddings(name, fake_hub, tmp_path, caplog):
    row = BACKBONES[name]
    theirs = tiny_open_clip(row.arch)
    path = tmp_path / "release.pt"
    save_release(theirs, path, release_layout(name))
    served, requests = fake_hub
    caplog.set_level(logging.INFO)
    if row.hf_file:  # the hub serves the release's file
        served[row.hf_repo, row.hf_file] = path
        ours = load_clip(name)
        assert requests == [(row.hf_repo, row.hf_file)]
    else:  # no hub copy: MODEL.BACKBONE.PATH
        ours = load_clip(name, path=path)
        assert requests == []
    assert weights.arch_of(ours).activation == row.arch.activation
    compare(ours, theirs, name)
    # tiny weights under a real name: the loader says the sizes differ from the row's, and uses the weights'
    assert "differs from the table's row" in caplog.text


@pytest.mark.parametrize("layout", ["plain", "module", "training"])
def test_every_layout_loads_from_an_explicit_path_and_from_the_cache(layout, fake_hub, tmp_path, monkeypatch):
    name = "SkyCLIP50-ViT-B-32"
    row = BACKBONES[name]
    theirs = tiny_open_clip(row.arch, seed=2)
    cache = tmp_path / "cache"
    target = cache / row.cache_name  # SkyCLIP_ViT_B32_top50pct/epoch_20.pt, as the zip unpacks
    target.parent.mkdir(parents=True)
    save_release(theirs, target, layout)
    compare(load_clip(name, path=target), theirs, f"{layout} via MODEL.BACKBONE.PATH")
    monkeypatch.setenv("CLIP_CACHE", str(cache))
    compare(load_clip(name), theirs, f"{layout} via the cache")


def test_open_clip_custom_text_tower_layout_converts(tmp_path):
    arch = BACKBONES["RemoteCLIP-ViT-B-32"].arch
    theirs = tiny_open_clip(arch, seed=3, custom_text=True)
    assert any(k.startswith("text.") for k in theirs.state_dict())  # open_clip's CustomTextCLIP layout
    save_release(theirs, tmp_path / "w.pt", "plain")
    compare(load_clip("RemoteCLIP-ViT-B-32", path=tmp_path / "w.pt"), theirs, "CustomTextCLIP")


def test_vit_h_head_width_comes_from_the_row(tmp_path):
    """open_clip's ViT-H-14 has 80-wide heads; OpenAI's width // 64 rule would build another attention."""
    row = BACKBONES["GeoRSCLIP-ViT-H-14"]
    assert row.arch.vision_head_width == 80
    theirs = tiny_open_clip(row.arch, seed=4)  # width 320: 4 heads of 80 (the 64 rule: 5)
    save_release(theirs, tmp_path / "w.pt", "plain")
    ours = load_clip("GeoRSCLIP-ViT-H-14", path=tmp_path / "w.pt")
    assert ours.visual.transformer.resblocks[0].attn.num_heads == 4
    compare(ours, theirs, "head width 80")
    wrong = weights.from_state_dict(weights.to_openai_layout(theirs.state_dict()), row.arch.activation)  # 5 heads
    with pytest.raises(AssertionError):
        compare(wrong, theirs, "head width 64")


# -------------------------------------------------------------------- the published open_clip configs
@pytest.fixture(scope="module")
def published_configs(tmp_path_factory):
    """Random open_clip ``ViT-B-32`` (GELU) and ``ViT-B-32-quickgelu``, each saved once as a plain state dict."""
    folder = tmp_path_factory.mktemp("open_clip")
    out = {}
    for seed, config in enumerate(("ViT-B-32", "ViT-B-32-quickgelu")):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = open_clip.create_model(config, pretrained=None).eval()
        torch.save(model.state_dict(), folder / f"{config}.pt")
        out[config] = (model, folder / f"{config}.pt")
    return out


def test_open_clip_configs_have_the_activations_the_rows_record(published_configs):
    gelu, quick = (published_configs[c][0] for c in ("ViT-B-32", "ViT-B-32-quickgelu"))
    assert type(gelu.transformer.resblocks[0].mlp.gelu) is nn.GELU
    assert type(quick.transformer.resblocks[0].mlp.gelu) is open_clip.transformer.QuickGELU
    assert BACKBONES["RemoteCLIP-ViT-B-32"].arch.activation == "gelu"  # README: plain open_clip ViT-B-32
    assert BACKBONES["GeoRSCLIP-ViT-B-32"].arch.activation == "quick_gelu"  # README: pretrained="openai"


@pytest.mark.parametrize(("config", "name"), [("ViT-B-32", "RemoteCLIP-ViT-B-32"),
                                              ("ViT-B-32-quickgelu", "GeoRSCLIP-ViT-B-32")])  # fmt: skip
def test_published_config_loads_under_its_rs_name(published_configs, fake_hub, config, name, caplog):
    theirs, path = published_configs[config]
    row = BACKBONES[name]
    fake_hub[0][row.hf_repo, row.hf_file] = path
    caplog.set_level(logging.WARNING)
    ours = load_clip(name)
    assert "differs from the table's row" not in caplog.text  # the real ViT-B/32 sizes: the row's
    assert weights.arch_of(ours) == row.arch
    errors = compare(ours, theirs, f"{config} as {name}")
    print(f"{config} as {name}: max relative error {errors}")


def test_gelu_weights_built_as_quickgelu_fail_the_comparison(published_configs, fake_hub):
    """The activation is part of the weights: open_clip's GELU ViT-B-32 built with QuickGELU gives other features."""
    theirs, path = published_configs["ViT-B-32"]
    row = BACKBONES["GeoRSCLIP-ViT-B-32"]  # a QuickGELU row
    fake_hub[0][row.hf_repo, row.hf_file] = path
    pairs = embeddings(load_clip("GeoRSCLIP-ViT-B-32"), theirs)
    for label, (got, ref) in pairs.items():
        with pytest.raises(AssertionError, match="not close"):
            assert_close_fp32(got, ref, what=label)
    errors = {label: relative_error(pair) for label, pair in pairs.items()}
    print(f"GELU weights built as QuickGELU: max relative error {errors}")
    # Random weights keep pre-activations small, where GELU and QuickGELU are closest; still > 100x the tolerance.
    assert min(errors.values()) > 1e-3


# ------------------------------------------------------------------------------------ sources and errors
def test_cache_comes_before_the_hub_and_each_step_is_logged(fake_hub, tmp_path, monkeypatch, caplog):
    name = "RemoteCLIP-ViT-L-14"
    row = BACKBONES[name]
    theirs = tiny_open_clip(row.arch, seed=5)
    cache = tmp_path / "cache"
    cache.mkdir()
    save_release(theirs, cache / "RemoteCLIP-ViT-L-14.pt", "plain")
    monkeypatch.setenv("CLIP_CACHE", str(cache))
    caplog.set_level(logging.INFO)
    compare(load_clip(name), theirs, "cached RemoteCLIP")
    assert fake_hub[1] == []  # the hub was not asked
    assert "loading cached file" in caplog.text and "no published checksum" in caplog.text


def test_hub_failure_lists_every_source_and_how_to_get_the_file(fake_hub, caplog):
    caplog.set_level(logging.INFO)
    with pytest.raises(weights.BackboneNotFoundError) as err:
        load_clip("GeoRSCLIP-ViT-L-14-336")
    msg = str(err.value)
    assert "local cache" in msg and "Hugging Face hub: Zilun/GeoRSCLIP/ckpt/RS5M_ViT-L-14-336.pt (OSError" in msg
    assert "https://huggingface.co/Zilun/GeoRSCLIP" in msg and "MODEL.BACKBONE.PATH" in msg
    assert "not in cache" in caplog.text and "downloading ckpt/RS5M_ViT-L-14-336.pt" in caplog.text


def test_skyclip_without_weights_says_where_to_get_them(fake_hub):
    with pytest.raises(weights.BackboneNotFoundError) as err:
        load_clip("SkyCLIP50-ViT-L-14")
    msg = str(err.value)
    assert "https://opendatasharing.s3.us-west-2.amazonaws.com/SkyScript/ckpt/SkyCLIP_ViT_L14_top50pct.zip" in msg
    assert "SkyCLIP_ViT_L14_top50pct/epoch_20.pt" in msg and "MODEL.BACKBONE.PATH" in msg
    assert fake_hub[1] == []  # no hub copy is known: nothing asked


def test_weights_clip_cannot_hold_are_an_error_not_dropped(tmp_path):
    theirs = tiny_open_clip(BACKBONES["RemoteCLIP-ViT-B-32"].arch)
    state = theirs.state_dict() | {"logit_bias": torch.zeros(())}  # a SigLIP-style extra
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(weights.BackboneError, match="cannot hold: logit_bias"):
        load_clip("RemoteCLIP-ViT-B-32", path=tmp_path / "w.pt")


def test_a_file_without_clip_weights_is_named(tmp_path):
    torch.save({"epoch": 3, "state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, tmp_path / "w.pt")
    with pytest.raises(weights.CorruptWeightsError, match="w.pt is not a CLIP checkpoint"):
        load_clip("SkyCLIP50-ViT-B-32", path=tmp_path / "w.pt")


# ------------------------------------------------------------- every method on every backbone architecture
def shallow(name: str) -> weights.CLIPArch:
    """The row's widths, patch, resolution and heads at depth 1: the sizes the methods read, cheaply."""
    arch = BACKBONES[name].arch
    layers = (1, 1, 1, 1) if arch.vision_patch_size is None else 1
    return dataclasses.replace(arch, vision_layers=layers, transformer_layers=1)


def build_method(method: str, clip_model, classnames):
    if method == "ZeroshotCLIP":
        return ZeroshotModel(clip_model, classnames, ["a satellite photo of a {}."])
    if method == "CoOp":
        return CoOpModel(clip_model, classnames, n_ctx=4)
    if method == "CoCoOp":
        return CoCoOpModel(clip_model, classnames, n_ctx=4)
    if method == "MaPLe":
        return MaPLeModel(clip_model, classnames, n_ctx=2, prompt_depth=1)
    if method == "KgCoOp":
        return KgCoOpModel(clip_model, classnames, "a satellite photo of a {}.", n_ctx=4)
    if method == "PromptSRC":
        return PromptSRCModel(clip_model, classnames, ["a satellite photo of a {}."], n_ctx_text=2, n_ctx_vision=2,
                              prompt_depth_text=1, prompt_depth_vision=1)  # fmt: skip
    if method == "APPLeNet":
        return APPLeNetModel(clip_model, classnames, n_ctx=4)
    if method == "CLIP_Adapter":
        return CLIPAdapterModel(clip_model, classnames, "a satellite photo of a {}.")
    return BiMoRSModel(clip_model, classnames, caption_dim=8)


METHODS = ["ZeroshotCLIP", "CoOp", "CoCoOp", "MaPLe", "BiMoRS", "KgCoOp", "PromptSRC", "APPLeNet", "CLIP_Adapter"]
NEED_VIT_TOKENS = ("MaPLe", "BiMoRS", "PromptSRC", "APPLeNet")


@pytest.mark.parametrize(("name", "width", "tokens"), [
    ("GeoRSCLIP-ViT-B-32", 768, 50), ("RemoteCLIP-ViT-L-14", 1024, 257), ("GeoRSCLIP-ViT-L-14-336", 1024, 577),
    ("GeoRSCLIP-ViT-H-14", 1280, 257),
])  # fmt: skip
def test_every_method_runs_on_every_vit_size(name, width, tokens):
    torch.manual_seed(0)
    clip_model = shallow(name).build()
    side = clip_model.visual.input_resolution
    images = torch.randn(1, 3, side, side)
    feats, seq = VisualEncoder(clip_model)(images)
    assert seq.shape == (1, tokens, width)  # class token + patches, at the backbone's width
    for method in METHODS:
        model = build_method(method, clip_model, ["harbor", "forest"])
        extras = {"captions": torch.randn(1, 8)} if method == "BiMoRS" else {}
        with torch.no_grad():
            logits = model(images, **extras)
        assert logits.shape == (1, 2) and torch.isfinite(logits).all(), (name, method)


@pytest.mark.parametrize("method", METHODS)
def test_resnet_backbones_are_refused_by_methods_needing_vit_tokens(method):
    torch.manual_seed(0)
    clip_model = dataclasses.replace(shallow("RemoteCLIP-RN50"), image_resolution=64).build()
    if method in NEED_VIT_TOKENS:
        with pytest.raises(ValueError, match=f"^{method} needs a ViT backbone.*ViT-B/16.$") as err:
            build_method(method, clip_model, ["harbor", "forest"])
        assert "\n" not in str(err.value)
        return
    model = build_method(method, clip_model, ["harbor", "forest"])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
