"""Every trainer yaml merges into the full config, and its file name tells the truth.

Name tokens (upstream conventions): ``cN`` and ``Nctx`` = the trainer's ``N_CTX``, ``epN`` = ``OPTIM.MAX_EPOCH``,
``batchN`` = ``DATALOADER.TRAIN_X.BATCH_SIZE``, ``ctxv1`` = ``CTX_INIT "a photo of a"``, and the backbone prefix
(``vit_b16`` = ``ViT-B/16``, ``rn50`` = ``RN50``, ...). The folder is the registered trainer name.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from conftest import HAVE_DASSL, REPO_ROOT, requires_dassl

pytestmark = [requires_dassl]
if HAVE_DASSL:
    from dassl.config import get_cfg_default
    from dassl.engine import TRAINER_REGISTRY

    import trainers
    from datasets.catalog import add_dataset_config

CONFIG_DIR = REPO_ROOT / "configs" / "trainers"
CONFIGS = sorted(CONFIG_DIR.glob("*/*.yaml"))
BACKBONES = {"vit_b16": "ViT-B/16", "vit_b32": "ViT-B/32", "vit_l14": "ViT-L/14", "rn50": "RN50", "rn101": "RN101"}

# Upstream file names whose values disagree with a token, kept for recognisability: (file, token) -> why.
ALLOWED_MISMATCHES = {
    # MaPLe's cross-dataset config is named ep5 but trains 2 epochs (upstream multimodal-prompt-learning).
    ("MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml", "ep5"): "upstream MAX_EPOCH is 2",
    # PromptSRC's names keep MaPLe's c2 (muzairkhattak/PromptSRC); its contexts are N_CTX_TEXT 4 + N_CTX_VISION 4.
    ("PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml", "c2"): "no N_CTX key: 4 + 4 tokens",
    ("PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml", "c2"): "no N_CTX key: 4 + 4 tokens",
    ("PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml", "c2"): "no N_CTX key: 4 + 4 tokens",
}


@functools.cache
def _base_config():
    cfg = get_cfg_default()
    add_dataset_config(cfg)
    trainers.add_config(cfg)
    return cfg


def full_config():
    """Dassl defaults + the dataset layer's keys + every trainer's keys, as train.py builds them (a fresh copy)."""
    return _base_config().clone()


def name_claims(path: Path, node: str) -> dict[str, tuple[str, object]]:
    """What the file name says: token -> (config key, value)."""
    claims: dict[str, tuple[str, object]] = {}
    stem = path.stem
    for prefix, name in BACKBONES.items():
        if stem == prefix or stem.startswith(prefix + "_"):
            claims[prefix] = ("MODEL.BACKBONE.NAME", name)
    n_ctx = f"TRAINER.{node}.N_CTX" if node else "TRAINER.<no config node>.N_CTX"
    for token in stem.split("_"):
        patterns = (
            (r"c(\d+)", n_ctx),
            (r"(\d+)ctx", n_ctx),
            (r"ep(\d+)", "OPTIM.MAX_EPOCH"),
            (r"batch(\d+)", "DATALOADER.TRAIN_X.BATCH_SIZE"),
        )
        for pattern, key in patterns:
            match = re.fullmatch(pattern, token)
            if match:
                claims[token] = (key, int(match.group(1)))
        if token == "ctxv1":
            claims[token] = (f"TRAINER.{node}.CTX_INIT", "a photo of a")
    return claims


def lookup(cfg, key: str):
    node = cfg
    for part in key.split("."):
        if part not in node:
            return f"<missing key {key}>"
        node = node[part]
    return node


def mismatches(path: Path) -> dict[str, str]:
    """Tokens of the file name that disagree with the merged config: token -> explanation."""
    trainer = path.parent.name
    node = TRAINER_REGISTRY.get(trainer).CONFIG_NODE
    cfg = full_config()
    cfg.merge_from_file(str(path))
    out = {}
    for token, (key, expected) in name_claims(path, node).items():
        value = lookup(cfg, key)
        if value != expected:
            out[token] = f"{key} is {value!r}, the name says {expected!r}"
    return out


def test_there_are_configs_for_every_baseline():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIGS}
    for required in ("CoOp/vit_b16_ep50_ctxv1.yaml", "CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml",
                     "MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml", "MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml",
                     "ZeroshotCLIP/vit_b16.yaml", "KgCoOp/vit_b16_ep100_ctxv1.yaml",
                     "PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml",
                     "PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml"):  # fmt: skip
        assert required in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_config_merges_and_its_name_tells_the_truth(path):
    trainer = path.parent.name
    assert trainer in TRAINER_REGISTRY.registered_names(), f"folder {trainer} is not a registered trainer"
    rel = path.relative_to(CONFIG_DIR).as_posix()
    found = mismatches(path)  # merging raises on a key that does not exist
    unexplained = {t: why for t, why in found.items() if (rel, t) not in ALLOWED_MISMATCHES}
    assert not unexplained, f"{rel}: {unexplained}"


@pytest.mark.parametrize("entry", sorted(ALLOWED_MISMATCHES))
def test_allow_list_entries_are_still_real(entry):
    rel, token = entry
    path = CONFIG_DIR / rel
    assert path.is_file(), f"allow-list names {rel}, which no longer exists"
    assert token in mismatches(path), f"{rel} now agrees with {token}: remove it from ALLOWED_MISMATCHES"


def test_name_check_catches_a_lying_name(tmp_path):
    bad = tmp_path / "CoCoOp" / "vit_b16_c8_ep3_batch2.yaml"
    bad.parent.mkdir()
    bad.write_text("OPTIM:\n  MAX_EPOCH: 3\nDATALOADER:\n  TRAIN_X:\n    BATCH_SIZE: 4\nTRAINER:\n  COCOOP:\n    N_CTX: 8\n")
    assert set(mismatches(bad)) == {"batch2", "vit_b16"}  # batch 4 in the file; no backbone key: Dassl default


def test_unknown_key_in_a_config_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("TRAINER:\n  MAPLE:\n    PROMPT_DEPT: 3\n")
    with pytest.raises(KeyError, match="PROMPT_DEPT"):
        full_config().merge_from_file(str(bad))
