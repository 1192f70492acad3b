"""Shared pytest fixtures and options: offline environment, per-test seeds, Dassl availability, tiny models.

Determinism: every test starts from random generators (torch, NumPy, Python) seeded from its own node id and
``--test-seed`` (default 0), so a test sees the same draws whatever ran before it. ``--shuffle`` runs the tests
in an order drawn from the same seed; ``make test-seeds`` runs the suite under several seeds, shuffled.

Skips that CI must never see: a test marked ``ci_required`` (e.g. everything that needs Dassl) that skips
while ``CI`` is set to a true value is reported as a failure, so a missing install step cannot hide behind a
green run.
"""

from __future__ import annotations

import importlib.util
import os
import random
import stat
import sys
import zlib
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

HAVE_DASSL = importlib.util.find_spec("dassl") is not None
DASSL_FIX = (
    "install it with `make setup` (DASSL_SRC=/path/to/Dassl.pytorch[.tar.gz] for a local copy, else GitHub), "
    "see README"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

requires_dassl = pytest.mark.skipif(not HAVE_DASSL, reason=f"Dassl.pytorch is not installed: {DASSL_FIX}")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bimors")
    group.addoption("--test-seed", type=int, default=0, help="base seed of every test's random generators (default 0)")
    group.addoption("--shuffle", action="store_true", help="run the tests in an order drawn from --test-seed")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ci_required: a skip of this test is a failure when CI is set")


def _needs_dassl(item: pytest.Item) -> bool:
    return any(m.name == "skipif" and "Dassl" in str(m.kwargs.get("reason", "")) for m in item.iter_markers())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_dassl(item) and item.get_closest_marker("cuda") is None:  # CI machines have no GPU
            item.add_marker(pytest.mark.ci_required)
    if config.getoption("--shuffle"):
        random.Random(config.getoption("--test-seed")).shuffle(items)


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"test seed: {config.getoption('--test-seed')}{' (shuffled order)' if config.getoption('--shuffle') else ''}"]
    if not HAVE_DASSL:
        lines.append(f"!!! Dassl.pytorch is NOT installed: every engine test will skip; {DASSL_FIX}")
    return lines


def pytest_collection_finish(session: pytest.Session) -> None:
    if not HAVE_DASSL:
        n = sum(_needs_dassl(item) for item in session.items)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        line = f"!!! Dassl.pytorch is not installed: {n} tests will skip. Fix: {DASSL_FIX}."
        if reporter is not None:
            reporter.write_line(line, red=True, bold=True)
        else:
            sys.stderr.write(line + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and item.get_closest_marker("ci_required") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must run this test: {reason}"


def assert_close_fp32(actual, expected, rel: float = 1e-5, what: str = "") -> None:
    """``actual`` equals ``expected`` up to fp32 rounding, judged against the magnitude of ``expected``.

    Two exact formulations sum the same products in different orders; in fp32 (unit roundoff 6e-8) the
    difference of such sums grows with the size of the largest terms, not with each element, so a near-zero
    element can differ by far more than its own relative 1e-4. Every element must lie within
    ``rel * max|expected|`` (1e-5: ~170 roundoffs of the largest element, orders of magnitude below any error
    of substance, which is O(1) relative).
    """
    import torch

    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    try:
        torch.testing.assert_close(actual, expected, atol=rel * max(scale, 1e-30), rtol=0.0)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}" if what else str(exc)) from None


def grads(loss, params) -> list:
    """Gradients of ``loss`` with respect to ``params`` (a list of tensors)."""
    import torch

    return list(torch.autograd.grad(loss, list(params)))


def assert_same(fast, ref, fast_g, ref_g) -> None:
    """A fast path and its reference agree in value and in every gradient (:func:`assert_close_fp32`); the
    reference gradients must not be trivially zero."""
    assert_close_fp32(fast, ref)
    assert len(fast_g) == len(ref_g) > 0
    for a, b in zip(fast_g, ref_g):
        assert b.abs().max() > 0  # the reference gradient is not trivially zero
        assert_close_fp32(a, b)


def kill_in_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Simulate a kill: every prompt trainer raises KeyboardInterrupt when epoch ``epoch`` (0-based) starts.
    ``monkeypatch.undo()`` lets the next run live."""
    import trainers.base as trainer_base

    original = trainer_base.PromptTrainer.run_epoch

    def dies(self):
        if self.epoch == epoch:
            raise KeyboardInterrupt("simulated kill")
        return original(self)

    monkeypatch.setattr(trainer_base.PromptTrainer, "run_epoch", dies, raising=False)


@pytest.fixture(autouse=True)
def _seed_random_generators(request: pytest.FixtureRequest) -> None:
    """Seed torch, NumPy and Python's ``random`` per test (from its node id and ``--test-seed``)."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + 7919 * request.config.getoption("--test-seed")) % 2**31
    random.seed(seed)
    if "numpy" in sys.modules or importlib.util.find_spec("numpy") is not None:
        import numpy as np

        np.random.seed(seed)
    import torch

    torch.manual_seed(seed)


@pytest.fixture(scope="module")
def make_clip():
    """A small random CLIP with 2 attention heads and 3 layers per tower, non-trivial layer norms (fp32): image
    feature 32, ViT width 128, text width ``text_width`` (default 128)."""
    import torch
    from clip.model import CLIP

    def make(text_width: int = 128) -> CLIP:
        torch.manual_seed(0)
        model = CLIP(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=128, vision_patch_size=16,
                     context_length=77, vocab_size=49408, transformer_width=text_width, transformer_heads=2,
                     transformer_layers=3).float().eval()  # fmt: skip
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ln" in name:
                    p.add_(0.1 * torch.randn_like(p))
        return model

    return make


@pytest.fixture(scope="module")
def images():
    """Three random 32 x 32 images for :func:`make_clip`'s models."""
    import torch

    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


@pytest.fixture(scope="session")
def toyrs_root(tmp_path_factory) -> Path:
    """A generated ToyRS dataset (the real `tools.prepare_data` path), shared by the tests of a session."""
    from tools.prepare_data import main as prepare_main

    root = tmp_path_factory.mktemp("data")
    assert prepare_main(["toyrs", "--root", str(root)]) == 0
    return root


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """A small ToyRS (12 images per class: 6 train / 2 val / 4 test) with a random caption store, so every
    trainer run on it takes seconds."""
    from datasets import toyrs

    root = tmp_path_factory.mktemp("toyrs")
    toyrs.generate(root / "ToyRS" / "images", per_class=12, progress=False)
    write_random_caption_store(root)
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


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Records every call but the planner's (the scripts plan with `-m tools.protocol`); train.py writes
# results.json and the CUDA_VISIBLE_DEVICES it saw (or fails when FAKE_FAIL matches the output folder);
# -m MODULE does nothing.
if [[ ${1:-} == -m && ${2:-} == tools.protocol ]]; then exec "$REAL_PYTHON" "$@"; fi
printf '%s\n' "$*" >> "$FAKE_LOG"
if [[ ${1:-} == train.py ]]; then
    out=""
    while (($#)); do [[ $1 == --output-dir ]] && out=$2; shift; done
    if [[ -n ${FAKE_FAIL:-} && $out == *"$FAKE_FAIL"* ]]; then exit 3; fi
    mkdir -p "$out" && echo '{}' > "$out/results.json"
    printf '%s\n' "${CUDA_VISIBLE_DEVICES-unset}" > "$out/cuda_visible_devices"
    exit 0
fi
exit 0
"""


@pytest.fixture
def fake_python(tmp_path) -> tuple[dict[str, str], Path]:
    """A fake interpreter for the protocol scripts and sweeps: (its environment variables, its call log)."""
    path = tmp_path / "bin" / "python"
    path.parent.mkdir(exist_ok=True)
    path.write_text(FAKE_PYTHON)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    env = {"PYTHON": str(path), "REAL_PYTHON": sys.executable, "FAKE_LOG": str(log)}
    return env, log
