"""Fast, exact CLIP encoders (pure PyTorch) and the token helpers they use.

The encoders never edit CLIP: they run its stock sub-modules (layer norms, MLPs, projections) and compute
attention with :func:`torch.nn.functional.scaled_dot_product_attention` from the stock weights, which lets
them truncate the text sequence after the last end-of-text token and share the class-independent prompt
prefix across classes. Both are exact under CLIP's causal mask; tests compare them with the straightforward
formulations of :mod:`models.reference`. Weights and model building live in :mod:`models.weights`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from clip import clip as openai_clip
from clip.model import CLIP, QuickGELU, VisionTransformer
from torch import nn

from common.errors import ConfigError


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
    passes. Any other MLP (exact GELU, as in backbones trained with open_clip, or another shape) runs the block's
    own stock module, so it is exact too: the activation is never assumed.
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


#: What a model may read from the frozen image encoder (:meth:`VisualEncoder.outputs`), by name.
VISUAL_OUTPUTS = {
    "features": "the projected image feature (B, E)",
    "tokens": "the ViT's final token sequence before ln_post (B, T, W)",
    "layer_means": "the token mean of every ViT block's output (B, L, W)",
}


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
        out = self.outputs(images, ("features", "tokens") if self.is_vit else ("features",))
        return out["features"], out.get("tokens")

    def outputs(self, images: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The outputs ``names`` (keys of :data:`VISUAL_OUTPUTS`) of one pass over ``images``.

        Whatever else is asked for, every output is computed by the same operations in the same order, so a
        model that reads an output gets the same bits from this call as from any other that computes it on the
        same batch (the feature cache relies on it).
        """
        unknown = sorted(set(names) - set(VISUAL_OUTPUTS))
        if unknown:
            raise ValueError(f"unknown image-encoder outputs {unknown}; known: {', '.join(VISUAL_OUTPUTS)}")
        if not self.is_vit:
            if set(names) - {"features"}:
                raise ValueError(f"a ResNet image encoder has no {sorted(set(names) - {'features'})}")
            return {"features": self.visual(images.to(self.dtype))}
        means = []
        for x in self.layer_outputs(images):  # earlier layers' tokens are freed as x moves on
            if "layer_means" in names:
                means.append(x.mean(dim=1))
        out = {}
        if "features" in names:
            out["features"] = self.head(x)
        if "tokens" in names:
            out["tokens"] = x
        if "layer_means" in names:
            out["layer_means"] = torch.stack(means, dim=1)
        return out

    def layer_outputs(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """The ViT's token sequence (B, T, W) after each of its residual blocks, first to last."""
        x = self.visual.ln_pre(self.embed(images))
        for block in self.visual.transformer.resblocks:
            x = residual_block(block, x)
            yield x

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

    def fingerprint(self) -> str:
        """SHA-256 of everything the outputs depend on besides the input: the module structure (layer types and
        sizes, the MLP activation), the attention head counts, every weight (names, dtypes, shapes, bytes) and the
        source of this file (the operations that run them)."""
        digest = hashlib.sha256()
        heads = [m.num_heads for m in self.visual.modules() if isinstance(m, nn.MultiheadAttention)]
        digest.update(f"{self.visual!r}\nheads {heads}\n".encode())
        digest.update(Path(__file__).read_bytes())
        for name, tensor in self.visual.state_dict().items():
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


class FrozenImageModel(nn.Module):
    """Base of the models whose image encoder is CLIP's, frozen and unprompted (``self.visual``, a
    :class:`VisualEncoder`): what they read from it is the same for a given image whatever was learned.

    A model lists those outputs in ``VISUAL_OUTPUTS`` (keys of :data:`VISUAL_OUTPUTS`) and computes its logits
    from them in :meth:`forward_visual`; ``forward(images)`` is :meth:`encode_visual` then :meth:`forward_visual`,
    so an evaluation from stored outputs (the feature cache, docs/design.md section 7) runs the same code after
    the image encoder.
    """

    #: the image encoder is CLIP's, frozen and unprompted
    IMAGE_ENCODER_PROMPTED = False
    #: what the model reads from the frozen image encoder
    VISUAL_OUTPUTS: tuple[str, ...] = ("features",)
    visual: VisualEncoder

    def encode_visual(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen image encoder's ``VISUAL_OUTPUTS`` for ``images``, without an autograd graph."""
        with torch.no_grad():
            return self.visual.outputs(images, self.VISUAL_OUTPUTS)

    def forward_visual(self, visual: dict[str, torch.Tensor], *inputs, **extras) -> torch.Tensor:
        """Logits (B, C) from the image encoder's outputs ``visual`` (and the model's other inputs)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, *inputs, **extras) -> torch.Tensor:
        """Logits (B, C)."""
        return self.forward_visual(self.encode_visual(images), *inputs, **extras)


def require_vit(clip_model: CLIP, method: str) -> None:
    """A one-line ConfigError naming the fix unless ``clip_model``'s image encoder is a ViT (``method`` needs its tokens)."""
    if not isinstance(clip_model.visual, VisionTransformer):
        raise ConfigError(
            f"{method} needs a ViT backbone (it uses the ViT's token sequence) and ResNet CLIPs (RN50, RemoteCLIP-RN50, "
            "...) have none: set MODEL.BACKBONE.NAME (BACKBONE= in the scripts) to a ViT, e.g. ViT-B/16."
        )


def tokenize(texts: Sequence[str], context_length: int = 77) -> torch.Tensor:
    """CLIP tokenisation (OpenAI's BPE), returning (N, context_length) int64 ids."""
    return openai_clip.tokenize(list(texts), context_length=context_length).long()


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on all parameters of ``module`` and return it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
