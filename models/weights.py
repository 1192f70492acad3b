"""CLIP weights: the backbone table, where the weights come from, and how the model is built (pure PyTorch).

:data:`BACKBONES` is the one table of backbone names: each row gives the architecture (:class:`CLIPArch`,
the MLP activation included) and the sources of its weights. A new backbone is one row.

:func:`load_clip` resolves weights in this order and logs every step:

1. an explicit path (OpenAI ``.pt`` TorchScript archive, a plain state dict, or a Hugging Face CLIP folder);
2. the local cache (``$CLIP_CACHE``, then ``~/.cache/clip``) with OpenAI's file names, SHA-256 checked;
3. OpenAI's download URL (SHA-256 checked; these URLs answer 404 for many users today);
4. the Hugging Face hub (``openai/clip-vit-base-patch16`` ...), converted to OpenAI's state-dict layout.

Every path ends in :meth:`CLIPArch.build` (OpenAI's ``CLIP`` module, in fp32) and a strict state-dict load.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from clip.model import CLIP
from torch import nn

from common.errors import ExpectedError
from common.io import atomic_path, file_digest
from common.io import download as download_file

logger = logging.getLogger(__name__)

TOY_NAME = "toy"
ACTIVATIONS = ("quick_gelu", "gelu")  # OpenAI's QuickGELU, or the exact GELU of open_clip-trained models


class BackboneError(ExpectedError, RuntimeError):
    """Base class of backbone loading errors."""


class UnknownBackboneError(BackboneError, ValueError):
    """The backbone name is not one we know."""


class CorruptWeightsError(BackboneError):
    """A weight file exists but is not what it should be."""


class BackboneNotFoundError(BackboneError):
    """No source could provide the weights."""


# ----------------------------------------------------------------------------------------------------------
# The backbone table
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CLIPArch:
    """The sizes of a CLIP model as OpenAI's ``CLIP`` constructor takes them, and the MLP activation.

    ``vision_layers`` is the ViT depth, or the four ResNet stage depths (then ``vision_patch_size`` is None).
    Attention heads follow OpenAI's rule: vision width // 64 (ResNet: width * 32 // 64).
    """

    embed_dim: int
    image_resolution: int
    vision_layers: int | tuple[int, int, int, int]
    vision_width: int
    vision_patch_size: int | None
    transformer_width: int
    transformer_heads: int
    transformer_layers: int
    context_length: int = 77
    vocab_size: int = 49408
    activation: str = "quick_gelu"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"CLIP activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}.")

    def build(self) -> CLIP:
        """OpenAI's ``CLIP`` at these sizes, fp32, eval mode, weights from the current random state."""
        model = CLIP(
            embed_dim=self.embed_dim,
            image_resolution=self.image_resolution,
            vision_layers=self.vision_layers,
            vision_width=self.vision_width,
            vision_patch_size=self.vision_patch_size,
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            transformer_width=self.transformer_width,
            transformer_heads=self.transformer_heads,
            transformer_layers=self.transformer_layers,
        )
        if self.activation == "gelu":  # set on this instance's blocks; OpenAI's classes stay as they are
            towers = [model.transformer, getattr(model.visual, "transformer", None)]
            for block in (b for tower in towers if tower is not None for b in tower.resblocks):
                block.mlp.gelu = nn.GELU()
        return model.float().eval()

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], activation: str = "quick_gelu") -> CLIPArch:
        """The architecture of an OpenAI-layout state dict (read from its tensor shapes and key names)."""
        if "visual.proj" in state:
            width, patch = state["visual.conv1.weight"].shape[0], state["visual.conv1.weight"].shape[-1]
            layers: int | tuple[int, ...] = sum(
                k.startswith("visual.transformer.resblocks.") and k.endswith(".attn.in_proj_weight") for k in state
            )
            grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            resolution = patch * grid
        else:
            layers = tuple(
                len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{stage}.")}) for stage in (1, 2, 3, 4)
            )
            width, patch = state["visual.layer1.0.conv1.weight"].shape[0], None
            resolution = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5) * 32
        text_width = state["ln_final.weight"].shape[0]
        return cls(
            embed_dim=state["text_projection"].shape[1],
            image_resolution=resolution,
            vision_layers=layers,
            vision_width=width,
            vision_patch_size=patch,
            transformer_width=text_width,
            transformer_heads=text_width // 64,
            transformer_layers=len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            activation=activation,
        )


@dataclass(frozen=True)
class Backbone:
    """One row of :data:`BACKBONES`: the architecture and the sources of the weights."""

    arch: CLIPArch
    url: str = ""  # OpenAI download; its last folder is the file's SHA-256
    hf_repo: str = ""  # Hugging Face hub repo of a ``CLIPModel``, converted to OpenAI's layout

    @property
    def filename(self) -> str:
        """OpenAI's file name (the cache file name), or '' without an OpenAI URL."""
        return os.path.basename(self.url)

    @property
    def sha256(self) -> str:
        """The expected SHA-256 of the OpenAI file (from its URL), or ''."""
        return self.url.split("/")[-2] if self.url else ""


def _openai(sha256: str, filename: str) -> str:
    return f"https://openaipublic.azureedge.net/clip/models/{sha256}/{filename}"


_TEXT_512 = dict(transformer_width=512, transformer_heads=8, transformer_layers=12)
_TEXT_768 = dict(transformer_width=768, transformer_heads=12, transformer_layers=12)
_VIT_B = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, **_TEXT_512)
_VIT_L = dict(embed_dim=768, vision_layers=24, vision_width=1024, vision_patch_size=14, **_TEXT_768)

#: Every backbone name accepted by :func:`load_clip` (OpenAI's names, then the tiny random ``toy``).
BACKBONES: dict[str, Backbone] = {
    "RN50": Backbone(
        CLIPArch(1024, 224, (3, 4, 6, 3), 64, None, **_TEXT_512),
        _openai("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    ),
    "RN101": Backbone(
        CLIPArch(512, 224, (3, 4, 23, 3), 64, None, **_TEXT_512),
        _openai("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    ),
    "RN50x4": Backbone(
        CLIPArch(640, 288, (4, 6, 10, 6), 80, None, 640, 10, 12),
        _openai("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    ),
    "RN50x16": Backbone(
        CLIPArch(768, 384, (6, 8, 18, 8), 96, None, **_TEXT_768),
        _openai("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    ),
    "RN50x64": Backbone(
        CLIPArch(1024, 448, (3, 15, 36, 10), 128, None, 1024, 16, 12),
        _openai("be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
    ),
    "ViT-B/32": Backbone(
        CLIPArch(vision_patch_size=32, **_VIT_B),
        _openai("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
        "openai/clip-vit-base-patch32",
    ),
    "ViT-B/16": Backbone(
        CLIPArch(vision_patch_size=16, **_VIT_B),
        _openai("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
        "openai/clip-vit-base-patch16",
    ),
    "ViT-L/14": Backbone(
        CLIPArch(image_resolution=224, **_VIT_L),
        _openai("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
        "openai/clip-vit-large-patch14",
    ),
    "ViT-L/14@336px": Backbone(
        CLIPArch(image_resolution=336, **_VIT_L),
        _openai("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
        "openai/clip-vit-large-patch14-336",
    ),
    # Tiny and random, for tests and offline smoke runs: ViT-B/16's input size and tokenizer, widths 64.
    TOY_NAME: Backbone(CLIPArch(64, 224, 2, 64, 16, 64, 1, 2)),
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`load_clip`."""
    return list(BACKBONES)


def backbone(name: str) -> Backbone:
    """The table row of ``name``; :class:`UnknownBackboneError` (listing the valid names) otherwise."""
    if name not in BACKBONES:
        raise UnknownBackboneError(
            f"Unknown backbone {name!r}. Valid names: {', '.join(available_backbones())} "
            "(or set MODEL.BACKBONE.PATH to a weight file or a Hugging Face CLIP folder)."
        )
    return BACKBONES[name]


def cache_dirs() -> list[Path]:
    """Local weight caches searched in order: ``$CLIP_CACHE`` then ``~/.cache/clip``."""
    dirs = []
    if os.environ.get("CLIP_CACHE"):
        dirs.append(Path(os.environ["CLIP_CACHE"]).expanduser())
    dirs.append(Path("~/.cache/clip").expanduser())
    return dirs


# ----------------------------------------------------------------------------------------------------------
# Building models
# ----------------------------------------------------------------------------------------------------------
def random_clip(name: str, seed: int = 0) -> CLIP:
    """CLIP with seeded random weights at the architecture of backbone ``name`` (nothing is downloaded).

    The global random state is left as it was.
    """
    arch = backbone(name).arch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return arch.build()


def build_toy_clip(seed: int = 0) -> CLIP:
    """The ``toy`` backbone: a tiny random CLIP for tests and offline smoke runs (says so in the log).

    It has the same input size and tokenizer as ViT-B/16, so every trainer config runs with it unchanged.
    """
    model = random_clip(TOY_NAME, seed)
    logger.warning(
        "Backbone 'toy': a tiny CLIP with RANDOM weights (seed %d). This is a smoke-test backbone; "
        "accuracies obtained with it mean nothing.",
        seed,
    )
    return model


def _hf_activation(config) -> str:
    """The activation of a Hugging Face ``CLIPConfig``; errors for checkpoints OpenAI's layout cannot hold."""
    acts = set()
    for tower in ("text_config", "vision_config"):
        sub = getattr(config, tower)
        if sub.hidden_size // 64 != sub.num_attention_heads:
            raise BackboneError(
                f"Hugging Face CLIP {tower} has hidden_size={sub.hidden_size} and "
                f"num_attention_heads={sub.num_attention_heads}; OpenAI's CLIP assumes heads = width // 64, "
                "so this checkpoint cannot be converted. Use an OpenAI-architecture CLIP checkpoint."
            )
        acts.add(getattr(sub, "hidden_act", "quick_gelu"))
    if len(acts) != 1 or not acts <= set(ACTIVATIONS):
        raise BackboneError(
            f"Hugging Face CLIP uses activations {sorted(acts)}; only one of {', '.join(ACTIVATIONS)} for both "
            "towers can be converted to OpenAI's CLIP."
        )
    return acts.pop()


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


def from_state_dict(state: dict[str, torch.Tensor], activation: str = "quick_gelu") -> CLIP:
    """Build the CLIP an OpenAI-layout state dict describes and load it, in fp32 (extra keys are ignored)."""
    model = CLIPArch.from_state_dict(state, activation).build()
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own})
    return model


def _from_hf(source: str | Path) -> CLIP:
    from transformers import CLIPModel  # imported lazily: heavy, and only this path needs it

    hf = CLIPModel.from_pretrained(str(source))
    return from_state_dict(hf_to_openai_state_dict(hf.state_dict()), _hf_activation(hf.config))


def _from_openai_file(path: Path, activation: str) -> CLIP:
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
    return from_state_dict(state, activation)


def _is_jit_archive(path: Path) -> bool:
    """TorchScript archives (OpenAI's .pt files) are zip files with a ``code/`` folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/")[1:2] == ["code"] for name in zf.namelist())


def _load_path(path: Path, activation: str) -> CLIP:
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
        return _from_openai_file(path, activation)
    except CorruptWeightsError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise CorruptWeightsError(f"Could not read CLIP weights from {path}: {exc}") from exc


def _download_checked(url: str, target: Path, expected_sha256: str) -> None:
    """Download ``url`` to ``target`` through a temporary file; the SHA-256 is checked before the rename."""
    with atomic_path(target) as tmp:
        download_file(url, tmp)
        got = file_digest(tmp)
        if got != expected_sha256:
            raise CorruptWeightsError(f"Downloaded {url} has SHA-256 {got}, expected {expected_sha256}.")


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def load_clip(
    name: str,
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> CLIP:
    """Load a CLIP model in fp32, eval mode, on ``device``.

    Args:
        name: a name of :data:`BACKBONES` (``ViT-B/16``, ``RN50``, ..., ``toy``).
        path: optional explicit weights (OpenAI ``.pt``, a state dict, or a Hugging Face CLIP folder); the
            architecture is read from the weights, the activation from ``name``'s row when it has one.
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
        activation = BACKBONES[name].arch.activation if name in BACKBONES else "quick_gelu"
        return _load_path(Path(path).expanduser(), activation).to(device)
    return _load_named(name, backbone(name), download).to(device)


def _load_named(name: str, row: Backbone, allow_download: bool) -> CLIP:
    """Try the cache, the OpenAI URL and the Hugging Face hub for backbone ``name``, in that order."""
    activation = row.arch.activation
    tried: list[str] = []
    for cache in cache_dirs() if row.url else []:
        candidate = cache / row.filename
        if not candidate.is_file():
            logger.info("CLIP %s: not in cache %s", name, candidate)
            tried.append(f"local cache: {candidate} (absent)")
            continue
        got = file_digest(candidate)
        if got != row.sha256:
            raise CorruptWeightsError(
                f"Cached CLIP weights {candidate} have SHA-256 {got}, expected {row.sha256}. "
                "The file is damaged or incomplete: delete it and run again, or replace it with a good copy."
            )
        logger.info("CLIP %s: loading cached file %s (SHA-256 ok)", name, candidate)
        return _from_openai_file(candidate, activation)

    if allow_download:
        if row.url:
            try:
                logger.info("CLIP %s: downloading %s", name, row.url)
                target = cache_dirs()[0] / row.filename
                _download_checked(row.url, target, row.sha256)
                return _from_openai_file(target, activation)
            except CorruptWeightsError:
                raise
            except Exception as exc:
                logger.warning("CLIP %s: OpenAI URL failed: %s", name, exc)
                tried.append(f"OpenAI URL: {row.url} ({exc})")
        if row.hf_repo:
            try:
                logger.info("CLIP %s: loading Hugging Face hub repo %s", name, row.hf_repo)
                return _from_hf(row.hf_repo)
            except Exception as exc:
                logger.warning("CLIP %s: Hugging Face hub failed: %s", name, exc)
                tried.append(f"Hugging Face hub: {row.hf_repo} ({type(exc).__name__}: {exc})")
        else:
            tried.append(f"Hugging Face hub: no converted repo known for {name}")
    else:
        tried.append("network sources skipped (download=False)")

    lines = "\n  - ".join(tried)
    copy = f"copy OpenAI's {row.filename} into {cache_dirs()[-1]} (or $CLIP_CACHE), or " if row.url else ""
    raise BackboneNotFoundError(
        f"Could not load CLIP {name!r}. Tried:\n  - {lines}\n"
        f"To provide weights offline: {copy}save a Hugging Face CLIP folder and pass MODEL.BACKBONE.PATH "
        "/path/to/folder, or set MODEL.BACKBONE.PATH to a state dict saved with torch.save."
    )
