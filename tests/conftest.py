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
