"""Shared pytest fixtures: offline environment, Dassl availability, tiny models."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

HAVE_DASSL = importlib.util.find_spec("dassl") is not None

requires_dassl = pytest.mark.skipif(
    not HAVE_DASSL,
    reason="Dassl.pytorch is not installed: `DASSL_SRC=/path/to/Dassl.pytorch make setup` installs it (see README)",
)


@pytest.fixture(scope="session")
def toyrs_root(tmp_path_factory) -> Path:
    """A generated ToyRS dataset (the real `tools.prepare_data` path), shared by the tests of a session."""
    from tools.prepare_data import main as prepare_main

    root = tmp_path_factory.mktemp("data")
    assert prepare_main(["toyrs", "--root", str(root)]) == 0
    return root


def write_random_caption_store(root: Path, dim: int = 24, captioner: str = "toy-blip2", encoder: str = "toy-bert") -> Path:
    """A caption store with random vectors for every ToyRS image (tests of trainers, not of captioning)."""
    import torch

    from datasets.captions import store_paths, write_caption_features

    image_dir = root / "ToyRS" / "images"
    relpaths = sorted(p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*") if p.is_file())
    path = store_paths(root / "ToyRS", captioner, encoder)[1]
    gen = torch.Generator().manual_seed(0)
    write_caption_features(path, torch.randn(len(relpaths), dim, generator=gen), relpaths,
                           {"captioner": captioner, "encoder": encoder})
    return path
