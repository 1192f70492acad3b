"""CLIP backbone: loading from several sources, and fast exact encoders.

Loading (:func:`load_clip`) resolves weights in this order and logs every step:

1. an explicit path (OpenAI ``.pt`` JIT archive, a plain state dict, or a Hugging Face CLIP folder);
2. the local cache (``$CLIP_CACHE``, then ``~/.cache/clip``) with OpenAI's file names, SHA-256 checked;
3. OpenAI's download URL (SHA-256 checked; these URLs answer 404 for many users today);
4. the Hugging Face hub (``openai/clip-vit-base-patch16`` ...), converted to OpenAI's state-dict layout
   and built with :func:`clip.model.build_model`.

The encoders never edit CLIP: they run its stock sub-modules (layer norms, MLPs, projections) and compute
attention with :func:`torch.nn.functional.scaled_dot_product_attention` from the stock weights, which lets
them truncate the text sequence after the last end-of-text token and share the class-independent prompt
prefix across classes. Both are exact under CLIP's causal mask; tests compare them with ``encode_text``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from clip import clip as openai_clip
from clip.model import CLIP, QuickGELU, VisionTransformer, build_model
from torch import nn
from tqdm import tqdm

logger = logging.getLogger(__name__)

TOY_NAME = "toy"
OPENAI_URLS: dict[str, str] = dict(openai_clip._MODELS)
HF_REPOS: dict[str, str] = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}


class BackboneError(RuntimeError):
    """Base class of backbone loading errors."""


class UnknownBackboneError(BackboneError, ValueError):
    """The backbone name is not one we know."""


class CorruptWeightsError(BackboneError):
    """A weight file exists but is not what it should be."""


class BackboneNotFoundError(BackboneError):
    """No source could provide the weights."""


def available_backbones() -> list[str]:
    """Names accepted by :func:`load_clip` (OpenAI names plus ``toy``)."""
    return [*OPENAI_URLS, TOY_NAME]


def cache_dirs() -> list[Path]:
    """Local weight caches searched in order: ``$CLIP_CACHE`` then ``~/.cache/clip``."""
    dirs = []
    if os.environ.get("CLIP_CACHE"):
        dirs.append(Path(os.environ["CLIP_CACHE"]).expanduser())
    dirs.append(Path("~/.cache/clip").expanduser())
    return dirs


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Building models
# ----------------------------------------------------------------------------------------------------------
def build_toy_clip(seed: int = 0) -> CLIP:
    """A tiny random CLIP (ViT, 224 px input, patch 16, widths 64) for tests and offline smoke runs.

    It has the same input size and tokenizer as ViT-B/16, so every trainer config runs with it unchanged.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(
            embed_dim=64,
            image_resolution=224,
            vision_layers=2,
            vision_width=64,
            vision_patch_size=16,
            context_length=77,
            vocab_size=49408,
            transformer_width=64,
            transformer_heads=1,
            transformer_layers=2,
        )
    logger.warning(
        "Backbone 'toy': a tiny CLIP with RANDOM weights (seed %d). This is a smoke-test backbone; "
        "accuracies obtained with it mean nothing.",
        seed,
    )
    return model.float().eval()


def _check_hf_heads(config) -> None:
    for tower in ("text_config", "vision_config"):
        sub = getattr(config, tower)
        if sub.hidden_size // 64 != sub.num_attention_heads:
            raise BackboneError(
                f"Hugging Face CLIP {tower} has hidden_size={sub.hidden_size} and "
                f"num_attention_heads={sub.num_attention_heads}; OpenAI's build_model assumes heads = width // 64, "
                "so this checkpoint cannot be converted. Use an OpenAI-architecture CLIP checkpoint."
            )
        if getattr(sub, "hidden_act", "quick_gelu") != "quick_gelu":
            logger.warning(
                "Hugging Face CLIP %s uses activation %r, OpenAI CLIP uses quick_gelu: outputs will differ.",
                tower,
                sub.hidden_act,
            )


def hf_to_openai_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a Hugging Face ``CLIPModel`` state dict to OpenAI's CLIP layout (ViT models)."""
    out: dict[str, torch.Tensor] = {}

    def blocks(hf_prefix: str, oa_prefix: str) -> None:
        layer_ids = sorted(
            {int(k[len(hf_prefix) :].split(".")[0]) for k in hf_state if k.startswith(hf_prefix)}
        )
        for i in layer_ids:
            src, dst = f"{hf_prefix}{i}.", f"{oa_prefix}{i}."
            for kind in ("weight", "bias"):
                out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                    [hf_state[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
                )
                out[dst + f"attn.out_proj.{kind}"] = hf_state[src + f"self_attn.out_proj.{kind}"]
                out[dst + f"ln_1.{kind}"] = hf_state[src + f"layer_norm1.{kind}"]
                out[dst + f"ln_2.{kind}"] = hf_state[src + f"layer_norm2.{kind}"]
                out[dst + f"mlp.c_fc.{kind}"] = hf_state[src + f"mlp.fc1.{kind}"]
                out[dst + f"mlp.c_proj.{kind}"] = hf_state[src + f"mlp.fc2.{kind}"]

    t, v = "text_model.", "vision_model."
    out["token_embedding.weight"] = hf_state[t + "embeddings.token_embedding.weight"]
    out["positional_embedding"] = hf_state[t + "embeddings.position_embedding.weight"]
    blocks(t + "encoder.layers.", "transformer.resblocks.")
    for kind in ("weight", "bias"):
        out[f"ln_final.{kind}"] = hf_state[t + f"final_layer_norm.{kind}"]
        out[f"visual.ln_pre.{kind}"] = hf_state[v + f"pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = hf_state[v + f"post_layernorm.{kind}"]
    out["text_projection"] = hf_state["text_projection.weight"].t().contiguous()
    out["visual.class_embedding"] = hf_state[v + "embeddings.class_embedding"]
    out["visual.conv1.weight"] = hf_state[v + "embeddings.patch_embedding.weight"]
    out["visual.positional_embedding"] = hf_state[v + "embeddings.position_embedding.weight"]
    blocks(v + "encoder.layers.", "visual.transformer.resblocks.")
    out["visual.proj"] = hf_state["visual_projection.weight"].t().contiguous()
    out["logit_scale"] = hf_state["logit_scale"].reshape(())
    return out


def _from_state_dict(state: dict[str, torch.Tensor]) -> CLIP:
    """Build with OpenAI's ``build_model`` and reload the weights in fp32.

    ``build_model`` casts the model to fp16 before loading, which rounds fp32 weights; loading the state dict
    again after ``.float()`` keeps them exact.
    """
    model = build_model(dict(state)).float()
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    return model.eval()


def _from_hf(source: str | Path) -> CLIP:
    from transformers import CLIPModel  # imported lazily: heavy, and only this path needs it

    hf = CLIPModel.from_pretrained(str(source))
    _check_hf_heads(hf.config)
    return _from_state_dict(hf_to_openai_state_dict(hf.state_dict()))


def _from_openai_file(path: Path) -> CLIP:
    """Load an OpenAI JIT archive or a (possibly nested) state dict saved with torch.save."""
    if _is_jit_archive(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, but OpenAI ships JIT
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict) or "token_embedding.weight" not in state:
        raise CorruptWeightsError(
            f"{path} is not a CLIP checkpoint in OpenAI's layout (no 'token_embedding.weight'). "
            "Pass an OpenAI .pt file, a state dict saved with torch.save, or a Hugging Face CLIP folder."
        )
    return _from_state_dict(state)


def _is_jit_archive(path: Path) -> bool:
    """TorchScript archives (OpenAI's .pt files) are zip files with a ``code/`` folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/")[1:2] == ["code"] for name in zf.namelist())


def _load_path(path: Path) -> CLIP:
    if not path.exists():
        raise BackboneNotFoundError(
            f"MODEL.BACKBONE.PATH {path} does not exist. Point it at an OpenAI .pt file, a state dict, "
            "or a Hugging Face CLIP folder (with config.json)."
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BackboneNotFoundError(
                f"{path} is a folder without config.json, so it is not a Hugging Face CLIP folder. "
                "Save one with CLIPModel.save_pretrained(dir) or pass a .pt file."
            )
        logger.info("Loading CLIP from Hugging Face folder %s", path)
        return _from_hf(path)
    logger.info("Loading CLIP from file %s", path)
    try:
        return _from_openai_file(path)
    except CorruptWeightsError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise CorruptWeightsError(f"Could not read CLIP weights from {path}: {exc}") from exc


def _download(url: str, target: Path, expected_sha256: str) -> None:
    """Download ``url`` to ``target`` through a temporary file; the SHA-256 is checked before the rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as src:
            total = int(src.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        got = sha256_file(tmp)
        if got != expected_sha256:
            raise CorruptWeightsError(f"Downloaded {url} has SHA-256 {got}, expected {expected_sha256}.")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def load_clip(
    name: str,
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> CLIP:
    """Load a CLIP model in fp32, eval mode, on ``device``.

    Args:
        name: an OpenAI model name (``ViT-B/16``, ``RN50``, ...) or ``toy``.
        path: optional explicit weights (OpenAI ``.pt``, a state dict, or a Hugging Face CLIP folder).
        device: where to put the model.
        download: allow the network sources (OpenAI URL, Hugging Face hub).

    Raises:
        UnknownBackboneError: ``name`` is not known (the message lists the valid names).
        CorruptWeightsError: a cached or given file is damaged (the message names file and checksum).
        BackboneNotFoundError: no source had the weights (the message lists every source tried).
    """
    if name == TOY_NAME:
        return build_toy_clip().to(device)
    if path:
        return _load_path(Path(path).expanduser()).to(device)
    if name not in OPENAI_URLS:
        raise UnknownBackboneError(
            f"Unknown backbone {name!r}. Valid names: {', '.join(available_backbones())} "
            "(or set MODEL.BACKBONE.PATH to a weight file or a Hugging Face CLIP folder)."
        )

    url = OPENAI_URLS[name]
    filename, expected = os.path.basename(url), url.split("/")[-2]
    tried: list[str] = []
    for cache in cache_dirs():
        candidate = cache / filename
        if not candidate.is_file():
            logger.info("CLIP %s: not in cache %s", name, candidate)
            tried.append(f"local cache: {candidate} (absent)")
            continue
        got = sha256_file(candidate)
        if got != expected:
            raise CorruptWeightsError(
                f"Cached CLIP weights {candidate} have SHA-256 {got}, expected {expected}. "
                "The file is damaged or incomplete: delete it and run again, or replace it with a good copy."
            )
        logger.info("CLIP %s: loading cached file %s (SHA-256 ok)", name, candidate)
        return _from_openai_file(candidate).to(device)

    if download:
        target = cache_dirs()[0] / filename
        try:
            logger.info("CLIP %s: downloading %s", name, url)
            _download(url, target, expected)
            return _from_openai_file(target).to(device)
        except CorruptWeightsError:
            raise
        except Exception as exc:
            logger.warning("CLIP %s: OpenAI URL failed: %s", name, exc)
            tried.append(f"OpenAI URL: {url} ({exc})")
        repo = HF_REPOS.get(name)
        if repo:
            try:
                logger.info("CLIP %s: loading Hugging Face hub repo %s", name, repo)
                return _from_hf(repo).to(device)
            except Exception as exc:
                logger.warning("CLIP %s: Hugging Face hub failed: %s", name, exc)
                tried.append(f"Hugging Face hub: {repo} ({type(exc).__name__}: {exc})")
        else:
            tried.append(f"Hugging Face hub: no converted repo known for {name}")
    else:
        tried.append("network sources skipped (download=False)")

    lines = "\n  - ".join(tried)
    raise BackboneNotFoundError(
        f"Could not load CLIP {name!r}. Tried:\n  - {lines}\n"
        f"To provide weights offline: copy OpenAI's {filename} into {cache_dirs()[-1]} (or $CLIP_CACHE), "
        f"or save a Hugging Face CLIP folder and pass MODEL.BACKBONE.PATH /path/to/folder, "
        f"or set MODEL.BACKBONE.PATH to a state dict saved with torch.save."
    )


# ----------------------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------------------
def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, H*dh) -> (..., H, L, dh)."""
    return t.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(..., H, L, dh) -> (..., L, H*dh)."""
    return t.transpose(-3, -2).flatten(-2)


def qkv(block: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of a CLIP residual block for normalised input ``h`` (..., L, D)."""
    attn = block.attn
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    heads = attn.num_heads
    return _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)


_QUICK_GELU = 1.702


def mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's MLP ``c_proj(QuickGELU(c_fc(x)))`` with the activation fused.

    ``QuickGELU(h) = h * sigmoid(1.702 h) = silu(1.702 h) / 1.702``: the two scalings ride inside the matrix
    multiplications (``alpha``/``beta``), so the activation is one fused SiLU instead of three element-wise
    passes. Falls back to the stock module for MLPs of another shape.
    """
    fc, proj = block.mlp.c_fc, block.mlp.c_proj
    if not isinstance(block.mlp.gelu, QuickGELU) or fc.bias is None or proj.bias is None:
        return block.mlp(x)
    lead = x.shape[:-1]
    h = torch.addmm(fc.bias, x.reshape(-1, x.shape[-1]), fc.weight.t(), beta=_QUICK_GELU, alpha=_QUICK_GELU)
    h = torch.addmm(proj.bias, F.silu(h), proj.weight.t(), alpha=1.0 / _QUICK_GELU)
    return h.reshape(*lead, h.shape[-1])


def residual_block(
    block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """One CLIP ``ResidualAttentionBlock`` on batch-first input ``x`` (..., L, D), same maths as the stock block.

    Attention uses scaled-dot-product attention with the block's own weights; ``attn_mask`` is boolean
    (True = may attend) or additive.
    """
    q, k, v = qkv(block, block.ln_1(x))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    x = x + block.attn.out_proj(_merge_heads(o))
    return x + mlp(block, block.ln_2(x))


def _sdpa_4d(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool = False
) -> torch.Tensor:
    """SDPA over (G, C, H, L, dh) inputs run as (G*C, H, L, dh): 4-D inputs reach the fused kernels."""
    lead = q.shape[:2]
    o = F.scaled_dot_product_attention(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), attn_mask=mask, is_causal=is_causal
    )
    return o.unflatten(0, lead)


def eot_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Position of the end-of-text token in CLIP-tokenised ids (it has the largest id)."""
    return tokens.argmax(dim=-1)


class TextEncoder(nn.Module):
    """CLIP's frozen text transformer on prompt embeddings, batched and truncated.

    ``forward`` takes prompts of any leading shape (e.g. B x C prompts in one call). The sequence is cut
    after the longest prompt's end-of-text token, and a shorter prompt's tokens after its own end-of-text
    token are not computed either: exact, because under the causal mask later tokens never reach an earlier
    position. In the last layer only the end-of-text row is computed after attention.
    """

    def __init__(self, clip_model: CLIP) -> None:
        super().__init__()
        self.blocks = clip_model.transformer.resblocks
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    def forward(self, prompts: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Text features for prompt embeddings ``prompts`` (..., L, D) with EOT positions ``eot`` (...)."""
        lead = prompts.shape[:-2]
        x = prompts.reshape(1, -1, *prompts.shape[-2:])
        feats = self._encode(None, x, eot.reshape(-1))
        return feats.reshape(*lead, feats.shape[-1])

    def forward_shared_prefix(
        self, prefix: torch.Tensor, suffix: torch.Tensor, eot: torch.Tensor
    ) -> torch.Tensor:
        """Text features of the prompts ``cat(prefix[b], suffix[c])`` for every b and c, shape (B, C, E).

        ``prefix`` (B, P, D) is per image and class independent (``[SOS]`` + context), ``suffix`` (C, S, D) is
        per class (name, '.', EOT, padding) and ``eot`` (C,) the EOT position in the full sequence. The prefix
        is encoded once per image; the class suffixes attend to its cached keys and values.
        """
        return self._encode(prefix, suffix.unsqueeze(0).expand(prefix.shape[0], -1, -1, -1), eot)

    def _encode(self, prefix: torch.Tensor | None, suffix: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Core loop. ``suffix`` is (G, C, S, D); ``prefix`` is (G, P, D) or None; ``eot`` (C,) absolute.

        Prefix tokens and the suffix tokens up to each prompt's own end-of-text token are the rows of one
        (G*P + G*N, D) matrix (N <= C*S: tokens after a prompt's EOT never reach it under the causal mask, so
        they are not computed), so each layer does one matrix product per linear map; only the attention
        treats them apart (suffix rows attend to the prefix keys/values of their image and causally to their
        own suffix, laid out as a (G, C, S) grid for it).
        """
        dtype = self.dtype
        n_pre = 0 if prefix is None else prefix.shape[1]
        length = int(eot.max()) + 1
        if int(eot.min()) < n_pre:
            raise ValueError(
                f"An end-of-text position ({int(eot.min())}) lies inside the shared prefix of {n_pre} tokens; "
                "it must lie in the class suffix."
            )
        pos = self.positional_embedding.to(dtype)
        xs = suffix[..., : length - n_pre, :].to(dtype) + pos[n_pre:length]  # (G, C, S, D)
        groups, _, n_suf, width = xs.shape
        rows = SuffixRows((eot - n_pre).to(xs.device), n_suf)
        n_rows_pre = groups * n_pre
        x = rows.pack(xs)  # (G*N, D)
        if n_pre:
            x = torch.cat([(prefix.to(dtype) + pos[:n_pre]).reshape(n_rows_pre, width), x])
        # Suffix row i (absolute n_pre + i) may attend to every prefix token and to suffix tokens j <= i.
        mask = torch.arange(n_pre + n_suf, device=x.device)[None, :] <= (
            torch.arange(n_suf, device=x.device)[:, None] + n_pre
        )
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            h = block.ln_1(x)
            if i == last:
                return self._last_layer(block, x, h, rows, (groups, n_pre), mask)
            attn, heads = block.attn, block.attn.num_heads
            packed = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # (rows, 3D)
            suffix_qkv = rows.grid(packed[n_rows_pre:], groups).chunk(3, dim=-1)
            qs, ks, vs = (_split_heads(t, heads) for t in suffix_qkv)  # (G, C, H, S, dh)
            if n_pre:
                prefix_qkv = packed[:n_rows_pre].view(groups, n_pre, 3 * width).chunk(3, dim=-1)
                qp, kp, vp = (_split_heads(t, heads) for t in prefix_qkv)  # (G, H, P, dh)
                ks, vs = (_with_prefix(kp, ks), _with_prefix(vp, vs))
                o_suf = rows.pack(_sdpa_4d(qs, ks, vs, mask).transpose(-3, -2))
                o_pre = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
                o = torch.cat([_merge_heads(o_pre).reshape(n_rows_pre, width), o_suf])
            else:
                o = rows.pack(_sdpa_4d(qs, ks, vs, None, is_causal=True).transpose(-3, -2))
            x = x + attn.out_proj(o)
            x = x + mlp(block, block.ln_2(x))
        raise AssertionError("unreachable: the text transformer has no blocks")

    def _last_layer(
        self, block, x, h, rows: SuffixRows, shape: tuple[int, int], mask: torch.Tensor
    ) -> torch.Tensor:
        """Last block: keys/values of every row, the query and the rest for the end-of-text rows only.

        ``shape`` is (groups, prefix length). Returns the projected features (G, C, E).
        """
        attn, heads, width = block.attn, block.attn.num_heads, x.shape[-1]
        groups, n_pre = shape
        n_rows_pre = groups * n_pre
        weight, bias = attn.in_proj_weight, attn.in_proj_bias
        kv = F.linear(h, weight[width:], None if bias is None else bias[width:])  # (rows, 2D)
        ks, vs = (_split_heads(t, heads) for t in rows.grid(kv[n_rows_pre:], groups).chunk(2, -1))
        if n_pre:
            kp, vp = (_split_heads(t, heads) for t in kv[:n_rows_pre].view(groups, n_pre, 2 * width).chunk(2, -1))
            ks, vs = _with_prefix(kp, ks), _with_prefix(vp, vs)
        x_eot = x[n_rows_pre:].view(groups, -1, width)[:, rows.eot_rows]  # (G, C, D)
        h_eot = h[n_rows_pre:].view(groups, -1, width)[:, rows.eot_rows]
        q = F.linear(h_eot, weight[:width], None if bias is None else bias[:width]).unsqueeze(-2)
        mask_eot = mask[rows.eot].unsqueeze(1).unsqueeze(1)  # (C, 1, 1, P+S)
        o = F.scaled_dot_product_attention(_split_heads(q, heads), ks, vs, attn_mask=mask_eot)  # (G, C, H, 1, dh)
        y = x_eot + attn.out_proj(_merge_heads(o).squeeze(-2))
        y = y + mlp(block, block.ln_2(y))
        return self.ln_final(y).to(self.dtype) @ self.text_projection


class SuffixRows:
    """Which suffix tokens are computed: those up to each prompt's end-of-text token.

    Suffix tokens live in two layouts: packed rows (G*N, ...) for the linear maps, N = sum over classes of
    ``eot + 1``, and the (G, C, S, ...) grid the attention needs. A grid slot after a prompt's EOT holds a copy
    of that EOT row: under the causal mask no computed row attends to it and its output is dropped, so it
    changes neither values nor gradients (its gradient contributions are exact zeros).
    """

    def __init__(self, eot: torch.Tensor, n_suf: int) -> None:
        """``eot`` (C,): end-of-text position of each prompt within the suffix; ``n_suf``: the grid's S."""
        self.eot = eot
        self.n_cls, self.n_suf = eot.shape[0], n_suf
        valid = torch.arange(n_suf, device=eot.device)[None, :] <= eot[:, None]  # (C, S)
        self.full = bool(valid.all())
        self.n_rows = int(valid.sum())
        self.cls, self.pos = valid.nonzero(as_tuple=True)  # grid coordinates of the packed rows
        self.spread = valid.flatten().cumsum(0) - 1  # packed row of each grid slot; after an EOT: the EOT's row
        self.eot_rows = self.spread.view(self.n_cls, n_suf)[torch.arange(self.n_cls, device=eot.device), eot]

    def pack(self, grid: torch.Tensor) -> torch.Tensor:
        """(G, C, S, ...) grid -> (G*N, F) packed rows (trailing dimensions flattened into F)."""
        packed = grid if self.full else grid[:, self.cls, self.pos]
        return packed.reshape(-1, grid.shape[3:].numel())

    def grid(self, packed: torch.Tensor, groups: int) -> torch.Tensor:
        """(G*N, F) packed rows -> (G, C, S, F) grid (slots after an EOT copy the EOT row)."""
        packed = packed.view(groups, self.n_rows, -1)
        if not self.full:
            packed = packed.index_select(1, self.spread)
        return packed.view(groups, self.n_cls, self.n_suf, -1)


def _with_prefix(prefix: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
    """Prepend per-image prefix keys/values (G, H, P, dh) to every class's suffix ones (G, C, H, S, dh)."""
    return torch.cat([prefix.unsqueeze(1).expand(-1, suffix.shape[1], -1, -1, -1), suffix], dim=-2)


class VisualEncoder(nn.Module):
    """CLIP's image encoder returning the projected feature and, for ViTs, the token sequence before ``ln_post``."""

    def __init__(self, clip_model: CLIP) -> None:
        super().__init__()
        self.visual = clip_model.visual

    @property
    def is_vit(self) -> bool:
        return isinstance(self.visual, VisionTransformer)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(features (B, E), tokens (B, T, W) or None for ResNets)``."""
        if not self.is_vit:
            return self.visual(images.to(self.dtype)), None
        x = self.visual.ln_pre(self.embed(images))
        for block in self.visual.transformer.resblocks:
            x = residual_block(block, x)
        return self.head(x), x

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings with the class token and positional embeddings (B, 1 + grid*grid, W), before ``ln_pre``."""
        vis = self.visual
        x = vis.conv1(images.to(self.dtype)).flatten(2).transpose(1, 2)  # (B, grid*grid, W)
        cls = vis.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + vis.positional_embedding.to(x.dtype)

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Projected image feature (B, E) from the final token sequence (``ln_post`` on the class token, ``proj``)."""
        feats = self.visual.ln_post(tokens[:, 0, :])
        return feats @ self.visual.proj if self.visual.proj is not None else feats


def tokenize(texts: Sequence[str], context_length: int = 77) -> torch.Tensor:
    """CLIP tokenisation (OpenAI's BPE), returning (N, context_length) int64 ids."""
    return openai_clip.tokenize(list(texts), context_length=context_length).long()


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on all parameters of ``module`` and return it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
